#!/usr/bin/env python3
"""Benchmark: the fake upstream called directly vs. the same upstream through the gateway.

One command (from the repo root)::

    .venv/bin/python bench/run_benchmark.py [--duration 10] [--concurrency 1,16,64]
        [--modes nonstream,stream] [--workers 2] [--pg-url URL] [--redis-url URL] [--keep]
        [--admission] [--litellm]

Modes `messages` and `messages-stream` send the same prompt to the gateway's Anthropic
Messages endpoint (`/v1/messages`, translated to the same chat request upstream), so that the
translation's CPU cost shows against `nonstream` / `stream` of the same size. Modes `responses`
and `responses-stream` do the same through the Responses API (`/v1/responses`, `store: false`).
``--litellm`` also loads the LiteLLM proxy (bench/litellm_peer.py: no database, no Redis, as
many workers as the gateway) in front of the same upstream in each chat cell, beside the gateway.

It starts the fake upstream and the gateway (gunicorn) as child processes, drives both with
wrk in the same run, prints a comparison table and writes ``bench/results/latest.json``.
Everything it starts is stopped on exit, Ctrl-C included; the only thing it creates
elsewhere is the ``gateway_bench`` database (dropped at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import litellm_peer as peer  # noqa: E402 - bench/ is put on the path above

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
GUNICORN = str(VENV_BIN / "gunicorn")
RESULTS = REPO / "bench" / "results" / "latest.json"
BENCH_DB = os.environ.get("BENCH_DB") or "gateway_bench"  # another name lets two runs share a server
UPSTREAM_KEY = "sk-bench-upstream"  # the gateway's key for the fake upstream
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
RESPONSES_PATH = "/v1/responses"
# mode -> (streamed, gateway path); the upstream is always called with the chat request.
MODES = {"nonstream": (False, CHAT_PATH), "stream": (True, CHAT_PATH),
         "messages": (False, MESSAGES_PATH), "messages-stream": (True, MESSAGES_PATH),
         "responses": (False, RESPONSES_PATH), "responses-stream": (True, RESPONSES_PATH)}
PROMPT = "Say hello to the benchmark"
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")

LUA_TEMPLATE = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {auth}

-- Non-200 answers, counted per status in each thread (with one sample body) and
-- gathered by done(): wrk itself only says how many there were.
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
bad = {{}}
sample = ""
function response(status, headers, body)
  if status ~= 200 then
    bad[status] = (bad[status] or 0) + 1
    if sample == "" then sample = string.sub(body or "", 1, 300) end
  end
end

-- done() runs once after all threads finish; one JSON line is easier to trust than
-- wrk's human-readable, unit-suffixed output.
function done(summary, latency, requests)
  local e = summary.errors
  local merged, statuses, example = {{}}, {{}}, ""
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("bad")) do merged[status] = (merged[status] or 0) + n end
    if example == "" then example = t:get("sample") end
  end
  for status, n in pairs(merged) do
    table.insert(statuses, string.format('"%d":%d', status, n))
  end
  io.write(string.format(
    'BENCH_RESULT {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d,"statuses":{{%s}}}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, table.concat(statuses, ",")))
  io.write("BENCH_SAMPLE " .. string.gsub(example, "%s+", " ") .. "\\n")
end
"""


# --------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "bench",
                            "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": 64}
    if stream:
        body["stream"] = True
    return body


def messages_body(stream: bool) -> dict[str, Any]:
    """The Anthropic Messages request of the same size as `request_body`."""
    body: dict[str, Any] = {"model": "bench", "max_tokens": 64,
                            "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
    return body


def responses_body(stream: bool) -> dict[str, Any]:
    """The Responses API request of the same size as `request_body` (not stored: the
    translation is measured, not the stored-response insert)."""
    body: dict[str, Any] = {"model": "bench", "input": PROMPT, "max_output_tokens": 64, "store": False}
    if stream:
        body["stream"] = True
    return body


def gateway_body(mode: str) -> dict[str, Any]:
    stream, path = MODES[mode]
    if path == RESPONSES_PATH:
        return responses_body(stream)
    return messages_body(stream) if path == MESSAGES_PATH else request_body(stream)


def http_post(url: str, body: dict[str, Any], key: str,
              timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_get(url: str, timeout: float = 2) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class BenchError(RuntimeError):
    """A step failed; the message says which and why."""


# --------------------------------------------------------------------------- processes


class Processes:
    """Children started in their own sessions, so Ctrl-C reaches only this script and
    cleanup can stop each child's whole process group (gunicorn master + workers)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> \
            subprocess.Popen[bytes]:
        out = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            stop_group(name, proc)
        self.procs.clear()


def stop_group(name: str, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the child's process group (it leads its own session), then SIGKILL what is
    left of it: only pids seen under the child that are still in its group."""
    members = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop in {grace:.0f}s, killing it")
    for pid in members:
        try:
            if os.getpgid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) could not be reaped")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def raise_on_sigterm() -> None:
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------- CPU accounting


def descendants(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def proc_ticks(pid: int, with_children: bool = False) -> int:
    """utime+stime (and cutime+cstime when asked) of one process, in clock ticks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks


def tree_cpu_ms(root: int) -> float:
    """CPU of a process tree in ms. The root's reaped-children time is included so that a
    worker that gunicorn replaced during a run still counts (its time moves to the master)."""
    ticks = sum(proc_ticks(p, with_children=(p == root)) for p in descendants(root))
    return ticks * 1000.0 / CLK_TCK


def profile_under_load(pid: int, target: Path, seconds: float, load: Callable[[], Any]) -> None:
    """py-spy (requirements-dev.txt) records process `pid` and its children for `seconds` while
    `load()` runs: a speedscope JSON when `target` ends in .json, else an SVG flame graph."""
    pyspy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not pyspy:
        raise BenchError("py-spy is not installed (requirements-dev.txt)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fmt = "speedscope" if target.suffix == ".json" else "flamegraph"
    spy = subprocess.Popen([pyspy, "record", "-p", str(pid), "--subprocesses", "-r", "200",
                            "-d", f"{seconds:g}", "--nonblocking", "--nolineno",
                            "--format", fmt, "-o", str(target)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    load()
    _, err = spy.communicate(timeout=60)
    log(f"profile {target}: {'ok' if spy.returncode == 0 else err.decode()[-300:]}")


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    statuses: dict[str, int]  # non-200 answers by status code
    error_sample: str  # start of the first non-200 body
    cpu_ms_per_req: float | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    @property
    def timed(self) -> bool:
        """Whether any request completed: with none, wrk's percentiles are 0, not latencies."""
        return self.requests > 0


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0:
        raise BenchError("wrk is not installed and this is not root: "
                         "run `sudo apt-get install -y wrk` first")
    log("wrk not found: apt-get install -y wrk")
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=False)
        subprocess.run(install, stdout=subprocess.DEVNULL, check=False)
    path = shutil.which("wrk")
    if not path:
        raise BenchError("could not install wrk with apt-get")
    return path


def write_lua(directory: Path, stream: bool, key: str, body: dict[str, Any] | None = None,
              name: str | None = None) -> Path:
    path = directory / f"{name or ('stream' if stream else 'nonstream')}.lua"
    lua = LUA_TEMPLATE.format(body=lua_string(json.dumps(body or request_body(stream))),
                              auth=lua_string(f"Bearer {key}"))
    path.write_text(lua)
    return path


def lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_wrk(wrk: str, url: str, lua: Path, concurrency: int, duration: float) -> WrkResult:
    threads = 1 if concurrency == 1 else 2
    cmd = [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{duration:g}s", "--latency",
           "--timeout", "10s", "-s", str(lua), url]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip()}\n{out.stdout}")
    return parse_wrk(out.stdout)


def parse_wrk(text: str) -> WrkResult:
    m = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.M)
    if not m:
        raise BenchError(f"no BENCH_RESULT line in wrk output:\n{text}")
    r = json.loads(m.group(1))
    sample = re.search(r"^BENCH_SAMPLE (.*)$", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if non2xx and int(non2xx.group(1)) != r["status"]:
        raise BenchError(f"wrk disagrees with itself about non-2xx counts:\n{text}")
    duration_s = r["duration_us"] / 1e6
    return WrkResult(
        requests=r["requests"], duration_s=duration_s,
        rps=r["requests"] / duration_s if duration_s else 0.0,
        p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000, p99_ms=r["p99_us"] / 1000,
        mean_ms=r["mean_us"] / 1000, max_ms=r["max_us"] / 1000, non_2xx=r["status"],
        socket_errors={k: r[k] for k in ("connect", "read", "write", "timeout") if r[k]},
        statuses=r["statuses"], error_sample=sample.group(1).strip() if sample else "")


def measured_run(wrk: str, url: str, lua: Path, concurrency: int, duration: float,
                 cpu_root: int | None) -> WrkResult:
    """One wrk run; CPU ms/request of the process tree under cpu_root when given."""
    before = tree_cpu_ms(cpu_root) if cpu_root else 0.0
    result = run_wrk(wrk, url, lua, concurrency, duration)
    if cpu_root and result.requests:
        result.cpu_ms_per_req = (tree_cpu_ms(cpu_root) - before) / result.requests
    return result


# --------------------------------------------------------------------------- upstream


def start_fake(procs: Processes, tmp: Path, script: list[str] | None = None,
               log_name: str = "fake_openai.log") -> tuple[int, subprocess.Popen[bytes]]:
    """Start a fake upstream (`Testing.fakes.fake_openai`, or `script`: the Python arguments
    before `--port N`) on a free port; returns when its GET /v1/models answers 200."""
    port = free_port()
    log_path = tmp / log_name
    proc = procs.start("fake upstream",
                       [PYTHON, *(script or ["-m", "Testing.fakes.fake_openai"]), "--port", str(port)],
                       dict(os.environ), log_path)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"fake upstream exited ({proc.returncode}):\n{tail(log_path)}")
        try:
            if http_get(f"http://127.0.0.1:{port}/v1/models")[0] == 200:
                return port, proc
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"fake upstream did not answer on port {port}:\n{tail(log_path)}")


UPSTREAM_COUNTERS = ("requests_total", "connections_total", "answers_cut",
                     "closed_with_partial_request")


def upstream_stats(port: int) -> dict[str, int]:
    """The fake upstream's counters (requests, connections, cut answers, ...) so far."""
    return json.loads(http_get(f"http://127.0.0.1:{port}/_stats")[1])


def wait_drained(upstream_port: int, auth: str | None, limit: float = 120.0) -> float | None:
    """Wait until a target has stopped calling the upstream (requests the load generator gave
    up on may still be worked through: LiteLLM does not cancel them), so that the next run does
    not queue behind the last one's backlog. Seconds waited; None when it never settled."""
    start = time.monotonic()
    if auth is None:
        return 0.0
    last, stable_since = -1, start
    while time.monotonic() - start < limit:
        calls = upstream_stats(upstream_port)["requests_by_authorization"].get(auth, 0)
        now = time.monotonic()
        if calls != last:
            last, stable_since = calls, now
        elif now - stable_since >= 1.0:
            return now - start
        time.sleep(0.2)
    log(f"  the target still called the upstream {limit:g} s after the run")
    return None


# --------------------------------------------------------------------------- database


def pg_urls(admin_url: str) -> tuple[str, str]:
    """(psycopg admin URL, SQLAlchemy URL of the bench database) from --pg-url."""
    parts = urlsplit(admin_url)
    scheme = "postgresql" if parts.scheme.startswith("postgres") else parts.scheme
    admin = urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))
    bench = urlunsplit(("postgresql+psycopg", parts.netloc, "/" + BENCH_DB, parts.query, ""))
    return admin, bench


def recreate_database(admin_url: str) -> None:
    import psycopg  # noqa: PLC0415 - only the benchmark needs it at this point
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    except psycopg.Error as exc:
        raise BenchError(f"cannot recreate {BENCH_DB} via {admin_url}: {exc}") from None


def drop_database(admin_url: str) -> None:
    import psycopg  # noqa: PLC0415
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')


def stop_and_drop(procs: "Processes", admin_url: str) -> None:
    """Stop every child, then drop the benchmark's database (a failure is printed, not raised:
    cleanup must not mask the result)."""
    procs.stop_all()
    try:
        drop_database(admin_url)
    except Exception as exc:  # noqa: BLE001
        print(f"could not drop {BENCH_DB}: {exc}", file=sys.stderr)


def count_usage_rows(admin_url: str) -> int:
    import psycopg  # noqa: PLC0415
    parts = urlsplit(admin_url)
    url = urlunsplit((parts.scheme, parts.netloc, "/" + BENCH_DB, parts.query, ""))
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute("SELECT count(*) FROM usage_records").fetchone()[0]


def wait_for_usage_rows(admin_url: str, expected: int, timeout: float = 15.0) -> int:
    """Usage may be written after the response (settlement): wait until the count
    reaches expected or stops moving."""
    deadline, last, stable_since = time.monotonic() + timeout, -1, time.monotonic()
    while True:
        rows = count_usage_rows(admin_url)
        if rows != last:
            last, stable_since = rows, time.monotonic()
        if rows >= expected or time.monotonic() - stable_since > 3 \
                or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


# --------------------------------------------------------------------------- gateway


def models_json(upstream_port: int) -> dict[str, Any]:
    return {
        "providers": {"upstream": {"type": "openai",
                                   "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                                   "api_key_env": "BENCH_UPSTREAM_KEY", "timeout_s": 60}},
        "models": {"bench": {"deployments": [{"provider": "upstream", "model": "bench"}],
                             "context_window": 128000, "max_output_tokens": 4096,
                             "pricing": {"input_per_mtok": "0.15", "output_per_mtok": "0.60"},
                             "tokenizer": "o200k_base", "category": "small"}},
    }


def gateway_env(args: argparse.Namespace, bench_db_url: str, models_file: Path,
                port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": bench_db_url,
        "REDIS_URL": args.redis_url,
        "SYSTEM_SECRET": secrets.token_urlsafe(32),
        "MODELS_FILE": str(models_file),
        "LOG_LEVEL": "WARNING",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": str(args.workers),
        "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
    })
    return env


def run_manager(env: dict[str, str], *argv: str) -> str:
    cmd = [PYTHON, "db_manager.py", *argv]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise BenchError(f"`{' '.join(cmd[1:])}` failed ({out.returncode}):\n"
                         f"{out.stdout}\n{out.stderr}")
    return out.stdout


def start_gateway(procs: Processes, env: dict[str, str], port: int,
                  tmp: Path) -> subprocess.Popen[bytes]:
    log_path = tmp / "gateway.log"
    # BENCH_GUNICORN_CONFIG: another gunicorn config for a run (one that wraps the project's to
    # add a profiler or tracemalloc to the workers); the project's by default.
    config = env.get("BENCH_GUNICORN_CONFIG") or "gunicorn.config.py"
    proc = procs.start("gateway", [GUNICORN, "-c", config, "app:create_app()"], env, log_path)
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"gateway exited ({proc.returncode}) before /health answered:\n"
                             f"{tail(log_path)}")
        try:
            status, body = http_get(f"http://127.0.0.1:{port}/health")
            if status == 200:
                return proc
            last = f"/health answered {status}: {body[:300]!r}"
        except OSError as exc:
            last = f"/health: {exc}"
        time.sleep(0.2)
    raise BenchError(f"gateway not healthy after 60s ({last}):\n{tail(log_path)}")


# Limits far above what a run can reach: every request pays for admission and settlement
# (two Redis round trips, the prompt counted with tiktoken) but none is refused.
ADMISSION_LIMITS = ["--rpm-limit", "100000000", "--tpm-limit", "1000000000",
                    "--daily-token-limit", "100000000000", "--max-concurrent", "100000",
                    "--budget-usd", "1000000000"]


def mint_key(env: dict[str, str], admission: bool = False) -> str:
    out = run_manager(env, "create-key", "--name", "bench", "--tenant", "bench",
                      *(ADMISSION_LIMITS if admission else []))
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if not lines:
        raise BenchError("create-key printed nothing")
    return lines[-1]


def smoke_check(name: str, url: str, key: str, stream: bool, request: dict[str, Any] | None = None) -> None:
    """One request before wrk, so a broken answer fails loudly instead of as a fast 4xx."""
    status, body = http_post(url, request or request_body(stream), key)
    if status != 200:
        raise BenchError(f"{name}: {'stream' if stream else 'non-stream'} request answered "
                         f"{status}: {body[:500]!r}")
    end = (b"event: message_stop" if url.endswith(MESSAGES_PATH) else
           b"event: response.completed" if url.endswith(RESPONSES_PATH) else b"data: [DONE]")
    if stream and end not in body:
        raise BenchError(f"{name}: stream did not end with {end.decode()}: {body[-500:]!r}")
    if not stream and b'"usage"' not in body:
        raise BenchError(f"{name}: non-stream answer has no usage: {body[:500]!r}")


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    mode: str
    concurrency: int
    direct: WrkResult
    gateway: WrkResult | None = None  # direct.cpu_ms_per_req is the fake upstream's CPU
    upstream_during_gateway: dict[str, int] | None = None  # fake's counters, gateway run
    litellm: WrkResult | None = None  # the LiteLLM proxy (--litellm), same mode and concurrency

    def table_cells(self, with_litellm: bool = False) -> list[str]:
        d, g, lt = self.direct, self.gateway, self.litellm

        def f(v: float | None, fmt: str = "{:.2f}") -> str:
            return "-" if v is None else fmt.format(v)

        cells = [self.mode, str(self.concurrency), f(d.rps, "{:.0f}"),
                 f(g.rps if g else None, "{:.0f}"),
                 f(g.rps / d.rps if g and d.rps else None),
                 f(d.p50_ms), f(g.p50_ms if g else None),
                 f(g.p50_ms - d.p50_ms if g else None),
                 f(d.p99_ms), f(g.p99_ms if g else None),
                 f(g.cpu_ms_per_req if g else None, "{:.3f}")]
        errors = f"{d.errors}/{g.errors if g else '-'}"
        if with_litellm:
            timed = lt is not None and lt.timed
            cells += [f(lt.rps if lt else None, "{:.0f}"), f(lt.p50_ms if timed else None),
                      f(lt.p50_ms - d.p50_ms if timed else None), f(lt.p99_ms if timed else None),
                      f(lt.cpu_ms_per_req if lt else None, "{:.3f}")]
            errors += f"/{lt.errors if lt else '-'}"
        return cells + [errors]


HEADERS = ["mode", "conc", "direct rps", "gw rps", "ratio", "direct p50", "gw p50",
           "added p50", "direct p99", "gw p99", "gw CPU ms/req", "errors d/g"]
LITELLM_HEADERS = ["llm rps", "llm p50", "llm added", "llm p99", "llm CPU ms/req"]


def format_table(rows: list[Row]) -> str:
    """The aligned table for the terminal; LiteLLM's columns (`llm`) when a row has them."""
    with_litellm = any(r.litellm for r in rows)
    headers = HEADERS[:-1] + (LITELLM_HEADERS if with_litellm else []) + \
        ["errors d/g/l" if with_litellm else HEADERS[-1]]
    cells = [headers] + [r.table_cells(with_litellm) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(c))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(latencies in ms; ratio = gateway rps / direct rps" + \
        ("; llm = the LiteLLM proxy, llm added = its p50 - direct p50)" if with_litellm else ")")


MODE_LABELS = {"nonstream": "non-streaming", "stream": "streaming (20 chunks)"}


def ms(v: float | None, sign: bool = False) -> str:
    """Milliseconds with three significant figures or so, as bench/README.md's tables."""
    if v is None:
        return "-"
    digits = 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0
    return f"{v:+.{digits}f} ms" if sign else f"{v:.{digits}f} ms"


def markdown_table(rows: list[Row]) -> str:
    """The table ready to paste into bench/README.md: the gateway beside the direct upstream
    and, when --litellm ran, LiteLLM's req/s, p50, added p50, p99 and CPU per request beside
    the gateway's. An errors column (direct/gateway[/LiteLLM]) only when a run had errors."""
    with_litellm = any(r.litellm for r in rows)
    with_errors = any(r.direct.errors or (r.gateway and r.gateway.errors)
                      or (r.litellm and r.litellm.errors) for r in rows)
    both = ["gateway", "LiteLLM"] if with_litellm else ["gateway"]
    head = (["mode", "conns", "direct req/s"] + [f"{w} req/s" for w in both] + ["direct p50"]
            + [f"{w} p50" for w in both] + [f"added p50 {w}" if with_litellm else "added p50"
                                            for w in both]
            + [f"{w} p99" for w in both] + [f"{w} CPU/req" for w in both])
    if with_errors:
        head.append("errors d/g/l" if with_litellm else "errors d/g")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = r.direct
        runs = [r.gateway, r.litellm] if with_litellm else [r.gateway]
        timed = [x if x and x.timed else None for x in runs]  # latencies of runs that completed some
        line = ([MODE_LABELS.get(r.mode, r.mode), str(r.concurrency), f"{d.rps:.0f}"]
                + [f"{x.rps:.0f}" if x else "-" for x in runs] + [ms(d.p50_ms)]
                + [ms(x.p50_ms) if x else "-" for x in timed]
                + [ms(x.p50_ms - d.p50_ms, sign=True) if x else "-" for x in timed]
                + [ms(x.p99_ms) if x else "-" for x in timed]
                + [ms(x.cpu_ms_per_req) if x and x.cpu_ms_per_req is not None else "-"
                   for x in runs])
        if with_errors:
            line.append("/".join([str(d.errors)] + [str(x.errors) if x else "-" for x in runs]))
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def print_usage(usage: dict[str, Any], rows: list[Row]) -> None:
    """Requests served vs. usage rows written, and how the gateway used upstream sockets."""
    seen = usage["upstream_seen_during_gateway_steps"]
    per_run = "; ".join(
        f"{r.mode} c={r.concurrency}: {r.upstream_during_gateway['connections_total']} new, "
        f"{r.upstream_during_gateway['answers_cut']} cut"
        for r in rows if r.upstream_during_gateway)
    print(f"\nGateway responses completed (wrk + checks): "
          f"{usage['gateway_responses_completed']}\n"
          f"Upstream calls made by the gateway (all of them, warm-up and checks included): "
          f"{usage['upstream_calls_from_gateway']}\n"
          f"Rows in {BENCH_DB}.usage_records: {usage['usage_records_rows']}\n"
          f"Upstream TCP connections opened by the gateway: {seen.get('connections_total')}, "
          f"answers it hung up on: {seen.get('answers_cut')} "
          f"(includes the in-flight ones at each wrk stop)\n"
          f"  per measured run: {per_run}")


def translation_overhead(rows: list[Row]) -> Iterator[str]:
    """Gateway CPU per request of each Messages or Responses mode minus its chat mode of the same size."""
    cpu = {(r.mode, r.concurrency): r.gateway.cpu_ms_per_req for r in rows
           if r.gateway and r.gateway.cpu_ms_per_req is not None}
    for translated, chat in (("messages", "nonstream"), ("messages-stream", "stream"),
                             ("responses", "nonstream"), ("responses-stream", "stream")):
        for (mode, c), value in cpu.items():
            if mode == translated and (chat, c) in cpu:
                yield (f"{translated} vs {chat} c={c}: gateway CPU {value:.3f} vs {cpu[(chat, c)]:.3f} "
                       f"ms/req, translation adds {value - cpu[(chat, c)]:+.3f} ms/req")


def error_details(rows: list[Row]) -> Iterator[str]:
    """One line per run that had errors: statuses, socket errors and a sample body."""
    for r in rows:
        for target, res in (("direct", r.direct), ("gateway", r.gateway), ("litellm", r.litellm)):
            if res is not None and res.errors:
                yield (f"errors {target} {r.mode} c={r.concurrency}: non-2xx by status "
                       f"{res.statuses or '-'}, socket errors {res.socket_errors or '-'}, "
                       f"first body: {res.error_sample[:200] or '-'}")


def uptime() -> str:
    """`uptime`'s line (the load average says how busy the machine was)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine_info(wrk: str) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout
    return {"nproc": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "kernel": platform.release(),
            "wrk": (wrk_version.splitlines() or ["?"])[0].split(" Copyright")[0].strip()}


def write_results(info: dict[str, Any], args: argparse.Namespace, rows: list[Row],
                  usage: dict[str, Any], litellm: str = "") -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
            "config": {k: getattr(args, k) for k in ("duration", "concurrency", "modes",
                                                      "workers", "direct_only", "admission",
                                                      "litellm")},
            "litellm": litellm, "rows": [asdict(r) for r in rows], "usage_check": usage}
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def save_logs(tmp: Path, names: tuple[str, ...] = ("gateway.log", "fake_openai.log", "litellm.log"),
              prefix: str = "") -> None:
    """Keep the children's logs next to the results (bench/results/ is not committed)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (tmp / name).exists():
            shutil.copyfile(tmp / name, RESULTS.parent / f"{prefix}{name}")


def bench_main(args: argparse.Namespace, run: Any, tmp_prefix: str, *, drop_db: bool = True,
               logs: tuple[str, ...] = ("gateway.log", "fake_openai.log", "litellm.log"),
               log_prefix: str = "") -> int:
    """Every benchmark script's main: `run(args, procs, tmp)` with its child processes and a
    temporary folder, then, however it ended, the children stopped, their logs kept, the
    benchmark database dropped (unless `--keep`) and the folder removed. Exit codes: run's,
    2 when the benchmark failed, 130 when interrupted."""
    raise_on_sigterm()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix))
    try:
        return run(args, procs, tmp)
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        save_logs(tmp, logs, log_prefix)
        if drop_db and not getattr(args, "keep", False):
            try:
                drop_database(pg_urls(args.pg_url)[0])
            except Exception as exc:  # noqa: BLE001 - cleanup must not mask the result
                print(f"could not drop {BENCH_DB}: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- main flow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated connections")
    p.add_argument("--modes", default="nonstream,stream", help=",".join(MODES))
    p.add_argument("--workers", type=int, default=2, help="gunicorn WEB_CONCURRENCY")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of unmeasured load per target and mode (0 = none)")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--keep", action="store_true", help=f"keep the {BENCH_DB} database")
    p.add_argument("--admission", action="store_true",
                   help="mint the key with (unreachable) rpm/tpm/daily/concurrency/budget limits, "
                        "so every request goes through Redis admission and settlement")
    p.add_argument("--direct-only", action="store_true",
                   help="only the upstream half (no database, no gateway)")
    p.add_argument("--litellm", action="store_true",
                   help="also load the LiteLLM proxy (no database, no Redis, --workers workers) "
                        "in front of the same upstream in each nonstream/stream cell; installed on "
                        "first use into bench/.peers/litellm-venv, left out if it cannot be had")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.modes) - set(MODES)
    if bad or not args.modes or not args.concurrency or min(args.concurrency) < 1:
        p.error(f"--modes takes {','.join(MODES)} and --concurrency positive integers")
    return args


@dataclass
class Targets:
    """Where wrk sends load, and what to measure the CPU of."""
    direct_url: str
    upstream_pid: int
    upstream_port: int
    gateway_url: str | None = None
    gateway_pid: int | None = None
    key: str = "sk-direct"
    gateway_completed: int = 0  # responses wrk (and smoke checks) got from the gateway
    upstream_seen: dict[str, int] = field(default_factory=dict)  # summed over gateway steps
    last_upstream: dict[str, int] = field(default_factory=dict)  # ... during the last step
    litellm_url: str | None = None  # the LiteLLM proxy's chat completions URL (--litellm)
    litellm_proc: subprocess.Popen[bytes] | None = None
    litellm_note: str = ""  # what became of --litellm, for the report

    def on_gateway(self, fn: Callable[[], T]) -> T:
        """Run one gateway-bound step, counting what the upstream saw meanwhile: requests,
        new TCP connections (a pooling client opens about as many as its concurrency),
        answers the gateway hung up on."""
        before = upstream_stats(self.upstream_port)
        try:
            return fn()
        finally:
            after = upstream_stats(self.upstream_port)
            self.last_upstream = {k: after[k] - before[k] for k in UPSTREAM_COUNTERS}
            for k, v in self.last_upstream.items():
                self.upstream_seen[k] = self.upstream_seen.get(k, 0) + v


def bench_mode(wrk: str, args: argparse.Namespace, t: Targets, mode: str,
               tmp: Path) -> Iterator[Row]:
    stream, path = MODES[mode]
    lua = write_lua(tmp, stream, t.key)
    gw_lua = write_lua(tmp, stream, t.key, gateway_body(mode), f"gateway-{mode}")
    smoke_check("upstream", t.direct_url, t.key, stream)
    gw = t.gateway_url.replace(CHAT_PATH, path) if t.gateway_url else None
    if gw:
        t.on_gateway(lambda: smoke_check("gateway", gw, t.key, stream, gateway_body(mode)))
        t.gateway_completed += 1
    if args.warmup > 0:
        top = max(args.concurrency)
        run_wrk(wrk, t.direct_url, lua, top, args.warmup)
        if gw:
            warm = t.on_gateway(lambda: run_wrk(wrk, gw, gw_lua, top, args.warmup))
            t.gateway_completed += warm.requests
    lt_lua = litellm_lua(wrk, args, t, mode, tmp)
    for c in args.concurrency:
        log(f"{mode} c={c}: direct")
        direct = measured_run(wrk, t.direct_url, lua, c, args.duration, t.upstream_pid)
        row = Row(mode, c, direct)
        if gw:
            log(f"{mode} c={c}: gateway")
            row.gateway = t.on_gateway(lambda: measured_run(wrk, gw, gw_lua, c, args.duration,
                                                            t.gateway_pid))
            t.gateway_completed += row.gateway.requests
            row.upstream_during_gateway = t.last_upstream
        if lt_lua:
            row.litellm = litellm_run(wrk, args, t, lt_lua, c)
        yield row


LITELLM_MODES = ("nonstream", "stream")  # LiteLLM is loaded with the chat request only


def litellm_lua(wrk: str, args: argparse.Namespace, t: Targets, mode: str,
                tmp: Path) -> Path | None:
    """The wrk script for LiteLLM in this mode, after a smoke check and the warm-up; None when
    LiteLLM is not running, not measured in this mode, or answered wrongly (it is then stopped
    and left out of the rest of the run)."""
    if not t.litellm_url or t.litellm_proc is None or mode not in LITELLM_MODES:
        return None
    stream = MODES[mode][0]
    try:
        smoke_check("litellm", t.litellm_url, peer.LITELLM_MASTER_KEY, stream)
    except (BenchError, OSError) as exc:
        log(f"LiteLLM answered wrongly, continuing without it: {exc}")
        stop_group("litellm", t.litellm_proc)
        t.litellm_url, t.litellm_note = None, f"not run from {mode} on: it answered wrongly"
        return None
    lua = write_lua(tmp, stream, peer.LITELLM_MASTER_KEY, request_body(stream), f"litellm-{mode}")
    if args.warmup > 0:
        run_wrk(wrk, t.litellm_url, lua, max(args.concurrency), args.warmup)
        wait_drained(t.upstream_port, f"Bearer {peer.LITELLM_UPSTREAM_KEY}", 30)
    return lua


def litellm_run(wrk: str, args: argparse.Namespace, t: Targets, lua: Path, c: int) -> WrkResult:
    """One measured wrk run on LiteLLM, then a wait until it stopped calling the upstream (the
    requests wrk cut), so that the next run does not share the machine with its backlog."""
    log(f"  c={c}: litellm")
    assert t.litellm_url and t.litellm_proc
    result = measured_run(wrk, t.litellm_url, lua, c, args.duration, t.litellm_proc.pid)
    wait_drained(t.upstream_port, f"Bearer {peer.LITELLM_UPSTREAM_KEY}", 30)
    return result


def setup_litellm(args: argparse.Namespace, procs: Processes, t: Targets, tmp: Path) -> None:
    """Install (first use) and start the LiteLLM proxy in front of the run's upstream; when it
    cannot be had, say so and go on without it."""
    exe = peer.ensure_litellm()
    if exe is None:
        t.litellm_note = "not run: it could not be installed"
        return
    try:
        t.litellm_url, t.litellm_proc = peer.start_litellm(procs, exe, t.upstream_port,
                                                           args.workers, tmp)
    except peer.LiteLLMUnavailable as exc:
        log(f"LiteLLM did not start, continuing without it: {exc}")
        t.litellm_note = "not run: it did not start"
        return
    t.litellm_note = (f"{peer.LITELLM_SPEC} from {exe.parent.parent.relative_to(REPO)}, "
                      f"{args.workers} workers, no database, no Redis")
    log(f"LiteLLM proxy up: {t.litellm_note}")


@dataclass
class Gateway:
    """A gateway started by `launch_gateway`: its base URL, gunicorn master, key and environment."""
    base_url: str
    proc: subprocess.Popen[bytes]
    key: str
    env: dict[str, str]


def launch_gateway(args: argparse.Namespace, procs: Processes, upstream_port: int, tmp: Path,
                   extra_env: dict[str, str] | None = None, admission: bool = False) -> Gateway:
    """The gateway of every benchmark: the BENCH_DB database recreated and migrated, a
    models.json with the model `bench` on the upstream at `upstream_port`, gunicorn with
    `args.workers` gevent workers on `args.pg_url`'s server and `args.redis_url`, `extra_env`
    on top of `gateway_env`, and a key minted (with every limit on, set too high to refuse
    anything, when `admission`)."""
    admin_url, bench_db_url = pg_urls(args.pg_url)
    log(f"recreating database {BENCH_DB}")
    recreate_database(admin_url)
    models_file = tmp / "models.json"
    models_file.write_text(json.dumps(models_json(upstream_port), indent=2))
    port = free_port()
    env = gateway_env(args, bench_db_url, models_file, port)
    env.update(extra_env or {})
    log("db_manager.py create-db")
    run_manager(env, "create-db")
    log(f"starting gateway on port {port} with {args.workers} workers")
    proc = start_gateway(procs, env, port, tmp)
    key = mint_key(env, admission)
    log(f"minted key {key[:8]}...")
    return Gateway(f"http://127.0.0.1:{port}", proc, key, env)


def setup_gateway(args: argparse.Namespace, procs: Processes, t: Targets, tmp: Path) -> None:
    gw = launch_gateway(args, procs, t.upstream_port, tmp, admission=args.admission)
    t.gateway_url, t.gateway_pid, t.key = gw.base_url + CHAT_PATH, gw.proc.pid, gw.key


def usage_check(args: argparse.Namespace, t: Targets) -> dict[str, Any]:
    admin_url, _ = pg_urls(args.pg_url)
    time.sleep(0.5)  # the gateway's last in-flight requests reach the upstream
    # The gateway calls the upstream with its provider key; wrk's direct runs use another.
    calls = upstream_stats(t.upstream_port)["requests_by_authorization"].get(
        f"Bearer {UPSTREAM_KEY}", 0)
    result: dict[str, Any] = {"gateway_responses_completed": t.gateway_completed,
                              "upstream_calls_from_gateway": calls,
                              "upstream_seen_during_gateway_steps": t.upstream_seen}
    try:
        result["usage_records_rows"] = wait_for_usage_rows(
            admin_url, max(t.gateway_completed, calls))
    except Exception as exc:  # noqa: BLE001 - the table is still worth printing
        result["usage_records_rows"] = f"could not count: {type(exc).__name__}: {exc}"
    return result


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    wrk = ensure_wrk()
    info = machine_info(wrk)
    uptime_before = uptime()
    log(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
        f"{info['wrk']}; {uptime_before}")
    port, fake = start_fake(procs, tmp)
    t = Targets(f"http://127.0.0.1:{port}{CHAT_PATH}", fake.pid, port)
    if not args.direct_only:
        setup_gateway(args, procs, t, tmp)
    if args.litellm:
        setup_litellm(args, procs, t, tmp)
    rows: list[Row] = []
    for mode in args.modes:
        for row in bench_mode(wrk, args, t, mode, tmp):
            rows.append(row)
    usage = {} if args.direct_only else usage_check(args, t)
    print()
    print(f"Machine: nproc={info['nproc']}  CPU: {info['cpu_model']}  "
          f"Python {info['python']}  {info['wrk']}")
    print(f"Load: before: {uptime_before}\n      after:  {uptime()}")
    print(f"wrk: {args.duration:g}s per run, 1 thread at c=1 else 2; gateway workers: "
          f"{args.workers}")
    if args.litellm:
        print(f"LiteLLM: {t.litellm_note}")
    print()
    print(format_table(rows))
    print("\nMarkdown:\n")
    print(markdown_table(rows))
    print()
    for line in translation_overhead(rows):
        print(line)
    for line in error_details(rows):
        print(line)
    if usage:
        print_usage(usage, rows)
    write_results(info, args, rows, usage, t.litellm_note)
    print(f"\nResults written to {RESULTS.relative_to(REPO)}")
    return 0 if all(r.direct.errors == 0 and (not r.gateway or r.gateway.errors == 0)
                    for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return bench_main(args, run, "gateway-bench-", drop_db=not args.direct_only)


if __name__ == "__main__":
    sys.exit(main())
