#!/usr/bin/env python3
"""Benchmark: response cache hits vs. misses, on one gateway against an instant upstream.

    .venv/bin/python bench/cache_benchmark.py [--duration 10] [--concurrency 1,16]
        [--modes nonstream,stream] [--workers 2] [--admission] [--pg-url URL] [--redis-url URL]

One gateway (gunicorn, PostgreSQL, Redis) with RESPONSE_CACHE_DEFAULT=1 in front of the fake
upstream (which answers at once). For each mode and concurrency, wrk sends:

- **miss**: every request a new prompt (a counter in the message), so each one is looked up,
  missed, sent to the upstream and stored;
- **hit**: one prompt, stored beforehand, so each request is answered from the cache.

`--slow-upstream` makes the fake upstream wait 50 ms before each answer (and each stream
chunk), closer to a real model; `--admission` gives the key limits (Redis admission on every
request).

It prints requests/s, p50/p99 latency and the gateway's CPU per request (utime+stime of the
gunicorn master and workers, from /proc) for both, the miss/hit ratios, and the upstream
requests seen during the hit runs (which must be 0). The machinery (processes, wrk, the
database, the fake upstream) is bench/run_benchmark.py's.
"""
from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # noqa: E402 - the sibling module, found through the path above

MARKER = "UNIQUE-PROMPT-MARKER"
# Appended to run_benchmark's wrk script: each thread numbers itself in setup() and sends a
# prompt no other request of the run sends (run nonce, thread, counter).
MISS_LUA = """
local setup_base = setup
local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  setup_base(thread)
end
local counter = 0
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, {prefix} .. tid .. "-" .. counter .. {suffix})
end
"""


@dataclass
class Pair:
    mode: str
    concurrency: int
    miss: rb.WrkResult
    hit: rb.WrkResult
    upstream_during_hits: int


def miss_lua(directory: Path, stream: bool, key: str, nonce: str) -> Path:
    body = rb.request_body(stream)
    body["messages"][0]["content"] = f"{rb.PROMPT} {nonce} {MARKER}"
    prefix, suffix = json.dumps(body).split(MARKER)
    path = rb.write_lua(directory, stream, key, body, f"miss-{'stream' if stream else 'nonstream'}")
    path.write_text(path.read_text() + MISS_LUA.format(prefix=rb.lua_string(prefix), suffix=rb.lua_string(suffix)))
    return path


def hit_lua(directory: Path, stream: bool, key: str, nonce: str) -> tuple[Path, dict[str, Any]]:
    body = rb.request_body(stream)
    body["messages"][0]["content"] = f"{rb.PROMPT} {nonce} cached"
    return rb.write_lua(directory, stream, key, body, f"hit-{'stream' if stream else 'nonstream'}"), body


def bench(wrk: str, args: argparse.Namespace, t: rb.Targets, tmp: Path) -> list[Pair]:
    pairs = []
    for mode in args.modes:
        stream = mode == "stream"
        nonce = secrets.token_hex(4)
        miss, (hit, body) = miss_lua(tmp, stream, t.key, nonce), hit_lua(tmp, stream, t.key, nonce)
        rb.smoke_check("gateway", t.gateway_url, t.key, stream, body)  # stores the answer the hits replay
        if args.warmup > 0:
            rb.run_wrk(wrk, t.gateway_url, miss, max(args.concurrency), args.warmup)
            rb.run_wrk(wrk, t.gateway_url, hit, max(args.concurrency), args.warmup)
        for c in args.concurrency:
            rb.log(f"{mode} c={c}: misses")
            missed = t.on_gateway(lambda: rb.measured_run(wrk, t.gateway_url, miss, c, args.duration, t.gateway_pid))
            time.sleep(1.0)  # the misses still in flight when wrk stopped reach the upstream
            rb.log(f"{mode} c={c}: hits")
            hits = t.on_gateway(lambda: rb.measured_run(wrk, t.gateway_url, hit, c, args.duration, t.gateway_pid))
            pairs.append(Pair(mode, c, missed, hits, t.last_upstream.get("requests_total", 0)))
        if args.profile:
            top = max(args.concurrency)
            fresh_misses = miss_lua(tmp, stream, t.key, secrets.token_hex(4))  # prompts not stored yet
            for kind, lua in (("miss", fresh_misses), ("hit", hit)):
                for suffix in ("speedscope.json", "svg"):
                    rb.profile_under_load(t.gateway_pid, Path(args.profile) / f"cache-{kind}-{mode}.{suffix}",
                                          args.profile_seconds,
                                          lambda lua=lua: rb.run_wrk(wrk, t.gateway_url, lua, top, args.profile_seconds))
    return pairs


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def table(pairs: list[Pair]) -> str:
    head = (f"{'mode':<10} {'c':>3} | {'miss rps':>9} {'p50':>7} {'p99':>7} {'CPU ms':>7} | "
            f"{'hit rps':>9} {'p50':>7} {'p99':>7} {'CPU ms':>7} | {'rps x':>6} {'p50 x':>6} {'CPU x':>6} | "
            f"{'errors m/h':>10} {'upstream in hits':>16}")
    lines = [head, "-" * len(head)]
    for p in pairs:
        m, h = p.miss, p.hit
        lines.append(
            f"{p.mode:<10} {p.concurrency:>3} | {m.rps:>9.0f} {m.p50_ms:>7.2f} {m.p99_ms:>7.2f} "
            f"{m.cpu_ms_per_req or 0:>7.2f} | {h.rps:>9.0f} {h.p50_ms:>7.2f} {h.p99_ms:>7.2f} "
            f"{h.cpu_ms_per_req or 0:>7.2f} | {ratio(h.rps, m.rps):>6} {ratio(m.p50_ms, h.p50_ms):>6} "
            f"{ratio(m.cpu_ms_per_req, h.cpu_ms_per_req):>6} | {f'{m.errors}/{h.errors}':>10} "
            f"{p.upstream_during_hits:>16}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--concurrency", default="1,16", help="comma-separated connections")
    p.add_argument("--modes", default="nonstream,stream", help="nonstream,stream")
    p.add_argument("--workers", type=int, default=2, help="gunicorn WEB_CONCURRENCY")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per mode")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--admission", action="store_true",
                   help="a key with (unreachable) limits: every request goes through Redis admission")
    p.add_argument("--profile", metavar="DIR",
                   help="after the measured runs, py-spy profiles of the gateway under misses and "
                        "under hits at the highest concurrency (DIR/cache-<miss|hit>-<mode>.speedscope.json "
                        "and .svg); not counted")
    p.add_argument("--profile-seconds", type=float, default=6.0)
    p.add_argument("--slow-upstream", action="store_true",
                   help="the fake upstream waits 50 ms before answering (and between stream chunks) "
                        "instead of answering at once")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - {"nonstream", "stream"} or not args.modes or not args.concurrency:
        p.error("--modes takes nonstream,stream and --concurrency positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rb.raise_on_sigterm()
    procs = rb.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-cache-bench-"))
    real_env = rb.gateway_env

    def cached_env(*a: Any, **kw: Any) -> dict[str, str]:
        return {**real_env(*a, **kw), "RESPONSE_CACHE_DEFAULT": "1"}
    rb.gateway_env = cached_env  # the same gateway as run_benchmark's, with the cache on
    real_models = rb.models_json

    def slow_models(port: int) -> dict[str, Any]:
        models = real_models(port)
        models["models"]["bench"]["deployments"][0]["model"] = "bench-slow"  # the fake's 50 ms delay
        return models
    if args.slow_upstream:
        rb.models_json = slow_models
    try:
        wrk = rb.ensure_wrk()
        info = rb.machine_info(wrk)
        port, fake = rb.start_fake(procs, tmp)
        t = rb.Targets(f"http://127.0.0.1:{port}{rb.CHAT_PATH}", fake.pid, port)
        rb.setup_gateway(args, procs, t, tmp)
        pairs = bench(wrk, args, t, tmp)
        print()
        print(f"Machine: nproc={info['nproc']}  CPU: {info['cpu_model']}  Python {info['python']}  {info['wrk']}")
        print(f"wrk: {args.duration:g}s per run; gateway workers: {args.workers}; "
              f"admission: {'on' if args.admission else 'off'}; upstream: "
              f"{'50 ms per answer (and per stream chunk)' if args.slow_upstream else 'instant'}\n")
        print(table(pairs))
        print("\nrps x = hit rps / miss rps; p50 x and CPU x = miss / hit; CPU ms = gateway CPU per request.")
        return 0 if all(p.miss.errors == 0 and p.hit.errors == 0 and p.upstream_during_hits == 0
                        for p in pairs) else 1
    except rb.BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        try:
            rb.drop_database(rb.pg_urls(args.pg_url)[0])
        except Exception as exc:  # noqa: BLE001 - cleanup must not mask the result
            print(f"could not drop {rb.BENCH_DB}: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
