"""The console's files keep the promises its Content-Security-Policy relies on: no inline script
or style in the HTML, no HTML parsing of data in the scripts, the vendored chart library is the
file its VERSION names (checksum) with its licence beside it."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from app.api.console_controller import CONTENT_SECURITY_POLICY

STATIC = Path(__file__).resolve().parents[2] / "app" / "static"
CONSOLE = STATIC / "console"
VENDOR = STATIC / "vendor" / "chart.js"


def test_html_has_no_inline_script_style_or_handlers():
    """Every <script> has a src, and no style attribute, <style> block or on* handler exists."""
    html = (CONSOLE / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S | re.I)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"<style\b|\sstyle\s*=|\son[a-z]+\s*=", html, re.I)


def test_scripts_never_parse_html():
    """No innerHTML/outerHTML/insertAdjacentHTML/document.write/eval/new Function in our scripts:
    data only ever reaches the page as text."""
    scripts = list(CONSOLE.rglob("*.js"))
    assert len(scripts) >= 9
    for path in scripts:
        text = path.read_text()
        for pattern in (r"innerHTML", r"outerHTML", r"insertAdjacentHTML", r"document\.write", r"\beval\(",
                        r"new Function", r"\.style\s*=", r"setAttribute\(\s*['\"]style"):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"


def test_policy_allows_no_inline_code():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"


def test_vendored_chart_library_matches_its_version_file():
    """The committed chart.umd.min.js has the sha256 its VERSION file names, and the MIT licence."""
    version = (VENDOR / "VERSION").read_text()
    sha = re.search(r"sha256:\s+([0-9a-f]{64})", version).group(1)
    assert hashlib.sha256((VENDOR / "chart.umd.min.js").read_bytes()).hexdigest() == sha
    assert "version:   4.6.1" in version and "Chart.js v4.6.1" in (VENDOR / "chart.umd.min.js").read_text()[:200]
    assert "MIT License" in (VENDOR / "LICENSE.md").read_text()
