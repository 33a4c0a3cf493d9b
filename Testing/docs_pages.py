"""The documentation pages (README.md and docs/*.md) as the tests read them: the setup a page
declares on its first line, and its fenced code blocks with their language, line and markers.

The rules these encode are written for authors in docs/testing.md ("Examples are tests")."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from Testing.support import ROOT

SETUPS = ("embedded", "postgres", "none")
SHELL_LANGUAGES = ("bash", "sh", "shell")
RUNNABLE_LANGUAGES = SHELL_LANGUAGES + ("python",)
SETUP_LINE = re.compile(r"<!-- docs-test: (\w+) -->")
MARKER = re.compile(r"<!-- docs-test: (skip|expect-error)(?::\s*(.*?))? -->")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    """One fenced code block: `line` is the 1-based line of its opening fence."""
    page: str
    line: int
    language: str
    text: str
    skip_reason: str | None = None
    expect_error: bool = False

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE_LANGUAGES and self.skip_reason is None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def documentation_pages() -> list[Path]:
    """README.md, then every page under docs/ in name order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def page_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def declared_setup(text: str) -> str | None:
    """The setup named by the page's first line (`<!-- docs-test: embedded -->`), or None."""
    first = text.split("\n", 1)[0]
    match = SETUP_LINE.fullmatch(first.strip())
    return match.group(1) if match else None


def code_blocks(name: str, text: str) -> list[Block]:
    """Every fenced block of a page, with the marker on the line just before its fence."""
    blocks: list[Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        marker = MARKER.fullmatch(lines[start - 1].strip()) if start > 0 else None
        skip = (marker.group(2) or "no reason given") if marker and marker.group(1) == "skip" else None
        blocks.append(Block(name, start + 1, language, "\n".join(body) + "\n", skip,
                            bool(marker and marker.group(1) == "expect-error")))
        i += 1
    return blocks


def markdown_outside_code(text: str, keep_inline_code: bool = False) -> str:
    """The page with its fenced blocks blanked out, and its inline code spans too unless asked
    to keep them (links are only real outside both; headings keep their code's text)."""
    kept: list[str] = []
    fence = None
    for line in text.split("\n"):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            kept.append("")
        elif fence is not None:
            if line.startswith(fence):
                fence = None
            kept.append("")
        else:
            kept.append(line if keep_inline_code else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(kept)
