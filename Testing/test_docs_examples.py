"""Every shell and Python example of README.md and docs/*.md runs as written, in page order,
against a live gateway started the way the README says (`./scripts/serve.sh`: embedded mode,
or `--prod` with PostgreSQL and Redis), as a new user pasting them into one terminal would.
A failing example fails its page with the block's file and line.

How a page is run (the rules for authors are in docs/testing.md):
- a working directory that looks like a fresh clone (symlinks to the repository's files and
  `.venv`, and a `.env` holding the gateway's SYSTEM_SECRET, as serve.sh writes it);
- the gateway started by `scripts/serve.sh` from there, on a free port; its own database;
- one bash session for the page's blocks (`set -euo pipefail`; `curl` fails on HTTP errors),
  Python blocks run by `.venv/bin/python` in it; `127.0.0.1:8000` and `localhost:8000` in the
  blocks become the live gateway's address;
- SYSTEM_SECRET and GATEWAY_KEY exported, as the README's quick start leaves them.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import redis

from Testing.docs_pages import (SETUPS, SHELL_LANGUAGES, Block, code_blocks, declared_setup,
                                documentation_pages, page_name)
from Testing.support import (REDIS_URL, ROOT, create_database, database_url, drop_database, free_port,
                             http_json, wait_until)

# Not part of what a fresh clone has (or private to the developer's checkout).
NOT_IN_CLONE = {".env", ".git", "instance", ".pytest_cache", "__pycache__"}
DOCUMENTED_ADDRESSES = ("127.0.0.1:8000", "localhost:8000")
PAGES = documentation_pages()
RUN_PAGES = [p for p in PAGES if declared_setup(p.read_text()) in ("embedded", "postgres")]


def test_every_page_declares_its_setup():
    """The first line of README.md and of every docs/ page says how its examples run."""
    undeclared = [page_name(p) for p in PAGES if declared_setup(p.read_text()) not in SETUPS]
    assert undeclared == [], f"pages without '<!-- docs-test: embedded|postgres|none -->' first: {undeclared}"


def test_every_fenced_block_is_tagged_with_a_language():
    """An untagged fence is ambiguous (run it or not?): every block names its language."""
    untagged = [b.where for p in PAGES for b in code_blocks(page_name(p), p.read_text()) if not b.language]
    assert untagged == []


def test_the_readme_quick_start_is_run_against_the_embedded_gateway():
    """The front door's examples are among those run, in embedded mode (what serve.sh starts)."""
    readme = ROOT / "README.md"
    assert declared_setup(readme.read_text()) == "embedded"
    assert any(b.runnable for b in code_blocks("README.md", readme.read_text()))


SAMPLE_PAGE = """<!-- docs-test: postgres -->
# A page

```bash
echo one
```

<!-- docs-test: skip: needs a real provider -->
```python
print("two")
```

<!-- docs-test: expect-error -->
```sh
false
```

```json
{"three": 3}
```
"""


def test_a_page_is_read_as_its_setup_and_blocks_with_their_markers():
    """The harness reads the setup line, each fence's language and line, and the marker on the
    line before a fence (skip with its reason, expect-error)."""
    assert declared_setup(SAMPLE_PAGE) == "postgres"
    assert declared_setup("# no setup line\n") is None
    blocks = code_blocks("page.md", SAMPLE_PAGE)
    assert [(b.line, b.language, b.text, b.skip_reason, b.expect_error) for b in blocks] == [
        (4, "bash", "echo one\n", None, False),
        (9, "python", 'print("two")\n', "needs a real provider", False),
        (14, "sh", "false\n", None, True),
        (18, "json", '{"three": 3}\n', None, False),
    ]
    assert [b.where for b in blocks if b.runnable] == ["page.md:4", "page.md:14"]


def test_the_page_script_reports_the_failing_block_and_requires_expected_errors(tmp_path):
    """The page script stops at the first failing block with its location recorded, and an
    expect-error block that succeeds fails the page."""
    state = tmp_path / "at"
    failing = [Block("p.md", 3, "bash", "echo ok\n"), Block("p.md", 7, "bash", "false\necho after\n"),
               Block("p.md", 11, "bash", "echo never\n")]
    done = subprocess.run(["bash", "-c", page_script(failing, 1, state)], capture_output=True, text=True)
    assert (done.returncode, done.stdout, state.read_text()) == (1, "ok\n", "p.md:7\n")

    expected = [Block("p.md", 3, "bash", "echo fine\n", expect_error=True)]
    done = subprocess.run(["bash", "-c", page_script(expected, 1, state)], capture_output=True, text=True)
    assert (done.returncode, state.read_text()) == (97, "p.md:3\n")

    addresses = [Block("p.md", 3, "bash", "echo localhost:8000 http://127.0.0.1:8000/v1\n")]
    done = subprocess.run(["bash", "-c", page_script(addresses, 4321, state)], capture_output=True, text=True)
    assert done.stdout == "127.0.0.1:4321 http://127.0.0.1:4321/v1\n"

    refused = [Block("p.md", 3, "bash", "false\n", expect_error=True), Block("p.md", 9, "bash", "echo next\n")]
    done = subprocess.run(["bash", "-c", page_script(refused, 1, state)], capture_output=True, text=True)
    assert (done.returncode, done.stdout, state.read_text()) == (0, "next\n", "done\n")


def fresh_clone_view(directory: Path, secret: str) -> Path:
    """A directory that looks like a fresh clone after serve.sh wrote `.env`: symlinks to the
    repository's files (and its .venv), plus a `.env` of our own."""
    directory.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in NOT_IN_CLONE:
            (directory / entry.name).symlink_to(entry)
    env_text = (ROOT / ".env.example").read_text()
    (directory / ".env").write_text(
        "\n".join(f"SYSTEM_SECRET={secret}" if line.startswith("SYSTEM_SECRET=") else line
                  for line in env_text.splitlines()) + "\n")
    return directory


class ServedGateway:
    """`scripts/serve.sh` (or `--prod`) started from a clone view, on a free port."""

    def __init__(self, clone: Path, setup: str, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = ["./scripts/serve.sh"] + (["--prod"] if setup == "postgres" else [])
        self.env = {**env, "HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": "2"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=clone, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.sh exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                return http_json("GET", self.url + "/health", timeout=2)[0] == 200
            except OSError:
                return False
        wait_until(up, timeout=90, interval=0.2, message="serve.sh's gateway to answer /health")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def page_database(request) -> Iterator[str | None]:
    """A fresh PostgreSQL database for a `postgres` page (serve.sh migrates it); None otherwise."""
    if declared_setup(request.node.callspec.params["page"].read_text()) != "postgres":
        yield None
        return
    name = create_database("gw_docs")
    yield database_url(name)
    drop_database(name)


def gateway_environment(setup: str, tmp_path: Path, secret: str, pg_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DATABASE_URL", "REDIS_URL"))}
    env.update({
        "SYSTEM_SECRET": secret, "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "KEY_EVENTS_CHANNEL": "gw-docs-key-events-" + secrets.token_hex(6),
        "USAGE_OUTBOX_NAME": "usage-docs-" + secrets.token_hex(4),
    })
    if setup == "postgres":
        env.update({"DATABASE_URL": pg_url, "REDIS_URL": REDIS_URL})
    else:
        # REDIS_URL empty, not absent: the app reads `.env` without overriding the environment.
        env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}", "REDIS_URL": ""})
    return env


def page_script(blocks: list[Block], port: int, state_file: Path) -> str:
    """One bash script running the page's runnable blocks in order; before each block it writes
    the block's location to `state_file`, so a failure can be reported as file:line."""
    lines = ["set -euo pipefail",
             "curl() { command curl --fail-with-body \"$@\"; }",
             f"__docs_at() {{ printf '%s\\n' \"$1\" > '{state_file}'; }}"]
    for block in blocks:
        text = block.text
        for address in DOCUMENTED_ADDRESSES:
            text = text.replace(address, f"127.0.0.1:{port}")
        if block.language in SHELL_LANGUAGES:
            body = text
        else:
            body = f".venv/bin/python - <<'__DOCS_PYTHON_END__'\n{text}__DOCS_PYTHON_END__\n"
        lines.append(f"__docs_at '{block.where}'")
        if block.expect_error:
            lines += ["set +e", f"(\nset -e\n{body})", "__docs_rc=$?", "set -e",
                      f"if [ $__docs_rc = 0 ]; then echo 'expected this example to fail' >&2; exit 97; fi"]
        else:
            lines.append(body)
    lines.append(f"__docs_at 'done'")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(420)
@pytest.mark.parametrize("page", RUN_PAGES, ids=page_name)
def test_examples_run_as_written(page: Path, page_database: str | None, tmp_path: Path):
    """The page's shell and Python examples, pasted in order into one terminal after the
    gateway was started the way the README says, all succeed."""
    name, text = page_name(page), page.read_text()
    setup = declared_setup(text)
    blocks = code_blocks(name, text)
    runnable = [b for b in blocks if b.runnable]
    for block in blocks:
        if block.skip_reason:
            print(f"skipped {block.where}: {block.skip_reason}")

    secret = "docs-secret-" + secrets.token_hex(8)
    clone = fresh_clone_view(tmp_path / "clone", secret)
    env = gateway_environment(setup, tmp_path, secret, page_database)
    if setup == "postgres":
        client = redis.Redis.from_url(REDIS_URL)
        client.flushdb()
        client.close()
    gateway = ServedGateway(clone, setup, env, tmp_path / "gateway.log")
    try:
        gateway.wait_healthy()
        status, _, minted = http_json("POST", gateway.url + "/v1/api-keys",
                                      {"name": "me", "tenant": "demo-team"},
                                      headers={"X-System-Secret": secret})
        assert status == 201, minted
        state = tmp_path / "at"
        script = tmp_path / "page.sh"
        script.write_text(page_script(runnable, gateway.port, state))
        shell_env = {**env, "GATEWAY_KEY": minted["key"]}
        done = subprocess.run(["bash", str(script)], cwd=clone, env=shell_env, capture_output=True,
                              text=True, timeout=360, stdin=subprocess.DEVNULL)
        at = state.read_text().strip() if state.exists() else "before the first block"
        if done.returncode != 0 or at != "done":
            block = next((b for b in runnable if b.where == at), None)
            pytest.fail(
                f"example at {at} failed (exit {done.returncode})\n"
                f"--- the block ---\n{block.text if block else ''}"
                f"--- stdout (end) ---\n{done.stdout[-3000:]}\n--- stderr (end) ---\n{done.stderr[-3000:]}\n"
                f"--- gateway log (end) ---\n{gateway.log()[-2000:]}", pytrace=False)
    finally:
        gateway.stop()
