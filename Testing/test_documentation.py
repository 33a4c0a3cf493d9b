"""The documented interface matches the code: the API table of docs/api.md lists exactly the
routes of app/api/routes.py (method and path); `.env.example` documents exactly the settings of
app/config.py plus the variables data/models.json and the server files read; docker-compose.yml's wiring is
checked in Testing/test_docker_compose.py; every relative link of README.md and
docs/ leads to a file (and heading) of the repository, and nothing cites a file outside it.
Each would drift silently otherwise."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from flask import Flask

from app.api.routes import api, messages_api
from app.config import ROOT_DIR, Settings
from Testing.docs_pages import documentation_pages, markdown_outside_code, page_name

METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")
# URL parameters as docs/api.md names them.
PARAM_NAMES = {"key_id": "<id>", "tenant_id": "<id>", "tenant_ref": "<id>", "model_id": "<model>"}


def api_table_routes() -> set[tuple[str, str]]:
    """(method, path) pairs of the API table of docs/api.md. A cell reads like
    "`GET`/`POST /v1/usage`" or "`POST /v1/chat/completions` (also `/chat/completions`)"."""
    text = (ROOT_DIR / "docs" / "api.md").read_text()
    table = text[text.index("| method and path |"):]
    table = table[:table.index("\n\n")]
    routes: set[tuple[str, str]] = set()
    for line in table.splitlines()[2:]:
        cell = line.split("|")[1]
        pending: list[str] = []
        last: list[str] = []
        for span in re.findall(r"`([^`]+)`", cell):
            parts = span.split()
            if len(parts) == 1 and parts[0] in METHODS:
                pending.append(parts[0])
            elif parts[0] in METHODS:
                last = pending + [parts[0]]
                routes.update((m, parts[1]) for m in last)
                pending = []
            elif span.startswith("/"):
                routes.update((m, span) for m in last)  # "(also `/path`)": same methods
    return routes


def code_routes() -> set[tuple[str, str]]:
    app = Flask(__name__)
    app.register_blueprint(api)
    app.register_blueprint(messages_api)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: PARAM_NAMES.get(m.group(1), f"<{m.group(1)}>"),
                      rule.rule)
        routes.update((method, path) for method in rule.methods or () if method in METHODS)
    return routes


def test_api_page_table_lists_exactly_the_routes():
    """Every route (method and path) is in the API table of docs/api.md, and the table lists no
    route the gateway does not have."""
    documented, served = api_table_routes(), code_routes()
    assert served - documented == set(), "routes missing from the API table of docs/api.md"
    assert documented - served == set(), "the API table of docs/api.md lists routes the gateway does not have"


def env_example_names() -> set[str]:
    text = (ROOT_DIR / ".env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))


def provider_variables() -> set[str]:
    """The variables data/models.json reads: api_key_env names and ${VAR} in URLs."""
    raw = (ROOT_DIR / "data" / "models.json").read_text()
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", raw))
    for provider in json.loads(raw)["providers"].values():
        if provider.get("api_key_env"):
            names.add(provider["api_key_env"])
    return names


def server_variables() -> set[str]:
    """What gunicorn.config.py and run.py read from the environment themselves."""
    found: set[str] = set()
    for name in ("gunicorn.config.py", "run.py"):
        source = (ROOT_DIR / name).read_text()
        found |= set(re.findall(r"""(?:_env\(|environ\.get\(|environ\[)["']([A-Z][A-Z0-9_]+)["']""", source))
    return found


def test_env_example_documents_exactly_the_settings():
    """Every Settings field, provider variable and server variable is in .env.example, and
    .env.example names nothing the gateway does not read."""
    settings = {f.name for f in fields(Settings) if f.name != "extra"}
    read = settings | provider_variables() | server_variables()
    documented = env_example_names()
    assert settings - documented == set(), "settings missing from .env.example"
    assert provider_variables() - documented == set(), "provider variables missing from .env.example"
    assert server_variables() - documented == set(), "server variables missing from .env.example"
    assert documented - read == set(), ".env.example documents variables nothing reads"


# Pages other branches add (linked from the README's Documentation section before they land).
# Remove a name once its page is on main: the link check then holds for it too.
PAGES_FROM_OTHER_BRANCHES: set[str] = set()
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def linking_pages() -> list[Path]:
    return [*documentation_pages(), ROOT_DIR / "bench" / "README.md"]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", markdown_outside_code(path.read_text(), True), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(markdown_outside_code(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not files


def test_every_relative_link_of_the_docs_resolves():
    """A relative link of README.md, docs/ or bench/README.md names a file of the repository,
    and its #anchor a heading of that file."""
    broken = []
    for page in linking_pages():
        for target in relative_links(page):
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            name = str(linked.relative_to(ROOT_DIR)) if linked.is_relative_to(ROOT_DIR) else str(linked)
            if not linked.is_relative_to(ROOT_DIR):
                broken.append(f"{page_name(page)}: {target} leaves the repository")
            elif not linked.exists():
                if name not in PAGES_FROM_OTHER_BRANCHES:
                    broken.append(f"{page_name(page)}: {target} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{page_name(page)}: {target}: no such heading in {name}")
    assert broken == []


def test_the_readme_links_every_docs_page():
    """The README is the front door: every page under docs/ is reachable from it."""
    linked = {str((ROOT_DIR / t.partition("#")[0]).resolve().relative_to(ROOT_DIR))
              for t in relative_links(ROOT_DIR / "README.md") if t.partition("#")[0]}
    pages = {page_name(p) for p in documentation_pages()[1:]}
    assert pages - linked == set()


# Spelled in two pieces so that this file does not cite them itself.
OUTSIDE_CITATIONS = ("TRAPS" + ".md", "../" + "shared", "/work/" + "shared")
NOT_SHIPPED = {".git", ".venv", "instance", "__pycache__", ".pytest_cache", "node_modules"}


def test_nothing_cites_a_file_outside_the_repository():
    """The repository stands on its own: no source, script or page points to notes kept
    outside it (what the code relies on is in docs/, in particular docs/traps.md)."""
    citing = []
    for path in ROOT_DIR.rglob("*"):
        if NOT_SHIPPED & set(path.relative_to(ROOT_DIR).parts) or not path.is_file():
            continue
        if path.suffix not in (".py", ".md", ".sh", ".txt", ".ini", ".toml", ".yml", ".yaml", ".json",
                               ".example", ".lua", ".cfg", "") or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="replace")
        citing += [f"{path.relative_to(ROOT_DIR)}: {c}" for c in OUTSIDE_CITATIONS if c in text]
    assert citing == []
