#!/usr/bin/env python3
"""CPU cost of the metrics and the request log, per request, with and without, in one run.

    .venv/bin/python bench/metrics_overhead.py                 # the observation alone, ~10 s
    .venv/bin/python bench/metrics_overhead.py --app           # also whole requests (needs PostgreSQL)

Everything runs in this process and is timed with the process CPU clock; the machine is shared,
so each figure is the median of several rounds, "on" and "off" alternating round by round.

1. **The observation alone**: what a settled run costs once the figures and the log are on,
   with what a gunicorn worker uses: gevent's patching, prometheus_client's multiprocess files
   (a temporary PROMETHEUS_MULTIPROC_DIR; the pending amounts flushed into them once per round,
   the ticker's share included) and a JSON request line written by a logging handler to a file,
   through the redacting filter (`GatewayMetrics.observe_run` + `RequestLog.run`, and the
   refusal path's `observe_refusal` + `RequestLog.error`). "off" is the same loop calling
   nothing (the loop's own cost is subtracted).
2. **Whole requests** (`--app`): one app in this process (LOG_FORMAT=json), its metrics and
   request lines switched on and off round by round (off: what METRICS_ENABLED=0 REQUEST_LOG=0
   build: no observers, nothing counted); chat completions through Flask's test client (no
   gunicorn), a key without limits, a temporary PostgreSQL database, the fake OpenAI upstream in
   its own process (its CPU is not counted). One app, so that both sides share the same
   threads, pools and caches. The median of the per-round differences is the added CPU per
   request; it is noisier than (1), which it should confirm.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As a gunicorn worker: gevent's patching first (its locks are what prometheus_client and
# logging take there), unless --no-gevent; and prometheus_client's multiprocess mode, which it
# picks when first imported.
GEVENT = "--no-gevent" not in sys.argv and "--app" not in sys.argv
if GEVENT:
    from gevent import monkey
    monkey.patch_all()
MP_DIR = tempfile.mkdtemp(prefix="gw-metrics-bench-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = MP_DIR
LOG_DIRS: list[Path] = []

from app.services.api_key_service import KeyInfo  # noqa: E402
from app.services.metrics import GatewayMetrics  # noqa: E402
from app.services.request_lines import JsonFormatter, RequestLog  # noqa: E402
from app.services.settlement_service import CompletionTrace  # noqa: E402
from app.services.usage_service import UsageEvent  # noqa: E402
from app.utils.redaction import RedactingFilter  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say hello to the benchmark"}]


def _log_to_file() -> Path:
    """Log lines to a file (as gunicorn's stderr redirected), JSON, through the redacting filter."""
    path = Path(tempfile.mkdtemp(prefix="gw-log-bench-")) / "gateway.log"
    LOG_DIRS.append(path.parent)
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.getLogger("gateway").setLevel(logging.INFO)
    return path


def _trace_and_event(entry) -> tuple[CompletionTrace, UsageEvent]:
    key = KeyInfo(id=12, tenant_id=3, tenant_name="bench-team", tenant_status="active", name="bench", prefix="sk-gw-x",
                  role="member", rpm_limit=None, tpm_limit=None, daily_token_limit=None, max_concurrent=None,
                  budget_usd=None, tenant_budget_usd=None, allowed_models=None, expires_at=None, revoked_at=None)
    trace = CompletionTrace(request_id="req_0123456789abcdef0123456789abcdef", key=key, entry=entry,
                            deployment=entry.deployments[0], request={"model": "bench", "messages": MESSAGES},
                            streamed=True)
    trace.first_byte_at = trace.started + 0.05
    trace.attempts = trace.deployments_tried = 1
    event = UsageEvent(request_id=trace.request_id, tenant_id=3, api_key_id=12, model="bench", provider="up",
                       upstream_model="bench", prompt_tokens=14, completion_tokens=20,
                       cost_usd=Decimal("0.0000141"), status="ok", error_type=None, streamed=True, latency_ms=80,
                       ttft_ms=50, created_at=trace.created_at, endpoint="chat.completions")
    return trace, event


def observation_alone(iterations: int, rounds: int) -> None:
    log_path = _log_to_file()
    entry = _bench_entry()
    metrics = GatewayMetrics(enabled=True)
    lines = RequestLog(enabled=True, json_format=True)
    trace, event = _trace_and_event(entry)

    def with_figures() -> None:
        metrics.observe_run(trace, event)
        lines.run(trace, event)

    def refusal() -> None:
        metrics.observe_refusal("chat.completions", "rpm")
        lines.error(request_id="req_x", endpoint="chat.completions", http_status=429, code="rate_limit_exceeded",
                    refusal="rpm", key=trace.key)

    def nothing() -> None:
        pass

    def cpu_us(fn) -> float:
        start = time.process_time()
        for _ in range(iterations):
            fn()
        metrics.flush()  # the ticker's share: the round's pending amounts into the files
        return (time.process_time() - start) / iterations * 1e6

    def metrics_only() -> None:
        metrics.observe_run(trace, event)

    def line_only() -> None:
        lines.run(trace, event)

    with_figures(), refusal()
    rows = []
    for _ in range(rounds):
        base = cpu_us(nothing)
        rows.append((cpu_us(with_figures) - base, cpu_us(refusal) - base, cpu_us(metrics_only) - base,
                     cpu_us(line_only) - base))
    print(f"observation alone (multiprocess files, JSON line to {log_path.parent}/, median of {rounds} rounds of "
          f"{iterations}):")
    print(f"  a settled run (metrics + request line): {statistics.median(r[0] for r in rows):6.1f} µs CPU")
    print(f"    of which the metrics:                 {statistics.median(r[2] for r in rows):6.1f} µs CPU")
    print(f"    of which the request line:            {statistics.median(r[3] for r in rows):6.1f} µs CPU")
    print(f"  a refusal (metrics + request line):     {statistics.median(r[1] for r in rows):6.1f} µs CPU")
    print(f"  request log file: {log_path.stat().st_size // 1024} KiB; metrics files: "
          f"{sum(p.stat().st_size for p in Path(MP_DIR).glob('*.db')) // 1024} KiB")


def _bench_entry():
    from app.providers.catalog import load_catalog
    path = Path(tempfile.mkdtemp()) / "models.json"
    path.write_text(json.dumps(_models("http://127.0.0.1:9/v1")))
    return load_catalog(path).get("bench")


def _models(base_url: str) -> dict:
    return {"providers": {"up": {"type": "openai", "base_url": base_url, "api_key_env": "BENCH_UPSTREAM_KEY"}},
            "models": {"bench": {"deployments": [{"provider": "up", "model": "bench"}], "context_window": 128000,
                                 "max_output_tokens": 4096,
                                 "pricing": {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}}}}


def whole_requests(iterations: int, rounds: int, pg_url: str) -> None:
    os.environ["TEST_PG_URL"] = pg_url
    from Testing.support import create_database, database_url, drop_database, free_port
    import db_manager
    from app import create_app

    _log_to_file()
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "Testing.fakes.fake_openai", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    name = create_database("gw_metrics_bench")
    apps = []
    try:
        assert fake.stdout is not None and b"listening" in fake.stdout.readline()
        db_manager.upgrade(database_url(name))
        models = Path(tempfile.mkdtemp()) / "models.json"
        models.write_text(json.dumps(_models(f"http://127.0.0.1:{port}/v1")))
        os.environ["BENCH_UPSTREAM_KEY"] = "sk-bench-upstream"
        app = create_app({"DATABASE_URL": database_url(name), "MODELS_FILE": str(models),
                          "SYSTEM_SECRET": "bench-secret", "REDIS_URL": "", "LOG_LEVEL": "INFO",
                          "STREAM_KEEPALIVE_S": 0, "METRICS_ENABLED": True, "REQUEST_LOG": True, "LOG_FORMAT": "json"})
        rt = app.extensions["gateway"]
        rt.start()
        apps.append(app)
        client = app.test_client()
        key = client.post("/v1/api-keys", json={"name": "bench", "tenant": "bench"},
                          headers={"X-System-Secret": "bench-secret"}).get_json()["key"]
        headers = {"Authorization": f"Bearer {key}"}
        observers = rt.settlement.observers

        def switch(on: bool) -> None:
            """Everything on, or what METRICS_ENABLED=0 REQUEST_LOG=0 would build."""
            rt.metrics.enabled = rt.request_log.enabled = on
            rt.settlement.observers = observers if on else ()

        def cpu_ms(label: str, stream: bool) -> float:
            switch(label == "on")
            start = time.process_time()
            for _ in range(iterations):
                resp = client.post("/v1/chat/completions", json={"model": "bench", "messages": MESSAGES,
                                                                 "max_tokens": 64, "stream": stream}, headers=headers)
                resp.get_data()
                resp.close()
                if resp.status_code != 200:
                    raise SystemExit(f"answered {resp.status_code}")
            return (time.process_time() - start) / iterations * 1000

        print(f"whole requests in process (test client; median of {rounds} rounds of {iterations}, on/off "
              "alternating in one app):")
        for stream in (False, True):
            cpu_ms("on", stream), cpu_ms("off", stream)
            pairs = []
            for i in range(rounds):
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                got = {label: cpu_ms(label, stream) for label in order}
                pairs.append((got["on"], got["off"]))
            on, off = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            added = statistics.median(p[0] - p[1] for p in pairs) * 1000
            print(f"  {'streamed' if stream else 'plain':<8} on {on:.3f} ms, off {off:.3f} ms, added {added:+.0f} µs")
    finally:
        for app in apps:
            app.extensions["gateway"].close(timeout=5)
        fake.terminate()
        fake.wait()
        drop_database(name)


def _cleanup(*paths: str | Path) -> None:
    import shutil
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=20000, help="observations per round (--app: requests, "
                   "at most 500)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--app", action="store_true", help="also whole requests through the app (needs PostgreSQL)")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--no-gevent", action="store_true", help="do not patch with gevent (--app never does: the "
                   "test client and psycopg run unpatched)")
    args = p.parse_args(argv)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"{'; gevent-patched (as a gunicorn worker)' if GEVENT else ''}")
    try:
        observation_alone(args.iterations, args.rounds)
        if args.app:
            whole_requests(min(args.iterations, 500), args.rounds, args.pg_url)
    finally:
        _cleanup(MP_DIR, *LOG_DIRS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
