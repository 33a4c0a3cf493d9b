"""Helpers of the test suite: real databases, real servers on free ports, polling."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres:postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SYSTEM_SECRET = "test-system-secret-" + secrets.token_hex(8)
# Pub/sub channels are shared by every database of a Redis server: one per test run.
KEY_EVENTS_CHANNEL = "gw-test-key-events-" + secrets.token_hex(6)
UPSTREAM_KEY = "sk-upstream-" + secrets.token_hex(12)  # must never appear in a response or log


def head_revision() -> str:
    """The newest alembic revision in migrations/versions (what `upgrade` reaches)."""
    from alembic.script import ScriptDirectory
    import db_manager
    return ScriptDirectory.from_config(db_manager.alembic_config("sqlite://")).get_current_head()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url(name: str) -> str:
    """SQLAlchemy URL of database `name` on the test PostgreSQL server."""
    return make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name) \
        .render_as_string(hide_password=False)


def create_database(prefix: str = "gw_test") -> str:
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_exists(name: str) -> bool:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def ok(resp: Any, status: int = 200) -> Any:
    """The JSON body of a Flask test response that must have `status`."""
    assert resp.status_code == status, (resp.status_code, resp.get_json())
    return resp.get_json()


def error(resp: Any, status: int) -> dict:
    """The `error` object of a Flask test response that must be an error with `status`."""
    assert resp.status_code == status, (resp.status_code, resp.get_json())
    return resp.get_json()["error"]


def http_json(method: str, url: str, body: Any = None, headers: dict | None = None,
              timeout: float = 30) -> tuple[int, dict, Any]:
    """A plain HTTP call (no client library): (status, headers, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


def open_chat_stream(port: int, key: str, body: dict, close: bool = False) -> socket.socket:
    """POST a chat completion over a raw socket (so a test can read the wire format or hang
    up mid-stream, which no HTTP client library lets it do) and return the socket."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 + (b"Connection: close\r\n" if close else b"")
                 + b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def write_models_file(path: Path, upstream_base_url: str) -> Path:
    """models.json of the tests: `openai` points at the fake upstream; scripted aliases map to
    the fake's failure behaviours; `demo` is a fast simulator."""
    scripted = ["fail-500", "fail-429", "fail-401", "fail-400", "context-too-long", "hang",
                "die-mid-stream", "slow", "no-usage", "tool", "chunks-3",
                "slow-chunks-600"]  # 600 pieces 50 ms apart: a 30 s stream to stop in the middle
    pricing = {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}
    models: dict[str, Any] = {
        "gpt-4o-mini": {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}],
                        "context_window": 128000, "max_output_tokens": 16384, "pricing": pricing,
                        "tokenizer": "o200k_base", "category": "small"},
        "demo": {"deployments": [{"provider": "simulator", "model": "demo"}],
                 "context_window": 128000, "max_output_tokens": 4096,
                 "pricing": {"input_per_mtok": "0.10", "output_per_mtok": "0.40"}},
        "slow-sim": {"deployments": [{"provider": "slow-simulator", "model": "slow"}],
                     "context_window": 128000, "max_output_tokens": 4096, "pricing": pricing},
    }
    for name in scripted:
        models[name] = {"deployments": [{"provider": "openai", "model": f"fake-{name}"}],
                        "context_window": 128000, "max_output_tokens": 4096, "pricing": pricing,
                        "tokenizer": "cl100k_base"}
    models.update(media_models())
    data = {
        "providers": {
            "openai": {"type": "openai", "base_url": upstream_base_url, "api_key_env": "TEST_UPSTREAM_KEY",
                       "timeout_s": 3, "connect_timeout_s": 2, "headers": {"X-Test-Header": "yes"}},
            "simulator": {"type": "simulator", "latency_ms": 0, "tokens_per_s": 0},
            "slow-simulator": {"type": "simulator", "latency_ms": 50, "tokens_per_s": 20},
        },
        "models": models,
    }
    path.write_text(json.dumps(data, indent=2))
    return path


def media_models() -> dict[str, Any]:
    """The embedding and image models of the tests (Testing/e2e/test_embeddings_images.py): on
    the fake OpenAI upstream (`openai`) and on the simulator."""
    def model(kind: str, provider: str, upstream: str, pricing: dict, **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "deployments": [{"provider": provider, "model": upstream}], "pricing": pricing,
                "tokenizer": "cl100k_base", **extra}

    embed_price = {"input_per_mtok": "0.02"}
    return {
        "text-embedding-3-small": model("embedding", "openai", "text-embedding-3-small", embed_price),
        "embed-no-usage": model("embedding", "openai", "embed-no-usage", embed_price),
        "embed-fallback": model("embedding", "openai", "embed-fail-500", embed_price,
                                fallbacks=["text-embedding-3-small"]),
        "demo-embed": model("embedding", "simulator", "demo-embed", embed_price),
        "dall-e-3": model("image", "openai", "dall-e-3",
                          {"per_image": "0.04", "per_image_by_size": {"1792x1024": "0.08"}}),
        "gpt-image-1": model("image", "openai", "gpt-image-1",
                             {"input_per_mtok": "5.00", "output_per_mtok": "40.00", "per_image": "0.01"}),
        "demo-image": model("image", "simulator", "demo-image", {"per_image": "0.01"}),
    }


def process_alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


class GatewayProcess:
    """The gateway under a real `gunicorn -k gevent` process on a free port."""

    def __init__(self, env: dict[str, str], workers: int = 2, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "WEB_CONCURRENCY": str(workers), "LOG_LEVEL": "INFO", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 30) -> "GatewayProcess":
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "-c", "gunicorn.config.py", "app:create_app()"],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=self._log, start_new_session=True)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}; log: {self.log_text()[-3000:]}")
            try:
                return http_json("GET", self.base_url + "/health", timeout=2)[0] in (200, 503)
            except OSError:
                return False

        wait_until(healthy, timeout=timeout, interval=0.1, message="gunicorn to answer /health")
        return self

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class FakeClock:
    """A clock the test moves by hand (`advance`): both readings move together, nothing sleeps.

    Pass it to `create_app(..., clock=...)` or to a component's `clock` argument.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(timezone.utc)  # starts at the real time, then only moves when told
        self._monotonic = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._monotonic += seconds
