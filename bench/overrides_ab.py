#!/usr/bin/env python3
"""What each override of app/overrides.py is worth: gateways with every override on and with
one switched off, loaded in turn, side by side.

    .venv/bin/python bench/overrides_ab.py                      # 5 rounds, 4 s per run
    .venv/bin/python bench/overrides_ab.py --rounds 8 --duration 5

One fake upstream, one database, one key (with every limit on, as `run_benchmark.py
--admission`: Redis admission and settlement on every request), and one gunicorn gateway
per configuration (all on; OVERRIDE_REDIS_POOL_BYPASS=0; all on again, as a control), all
running at once. (The gunicorn response writer and the one-send http.client override were
measured with it too, as `writer_off` and `http_off`, and removed: docs/overrides.md.) Each round loads every gateway for
`--duration` seconds with wrk at `--concurrency` connections, non-streaming then streaming,
in an order reversed every round (ABC CBA ...), so that whatever else runs on the machine
weighs on every configuration alike. A sequential run per configuration (run_benchmark.py)
cannot tell a 5% difference on a shared 2-core machine whose load changes by several times
within minutes; the pairs here can.

Printed per configuration and mode: the median over rounds of its requests/s, of its gateway
CPU ms per request, and of the gain of "all on" over it within the same round (all-on rps /
its rps - 1). Options: see --help. Uses the `BENCH_DB` database (default gateway_bench),
dropped at the end. The OVERRIDE_TIKTOKEN_LOADER override acts at start-up only (it is not
on the request path) and is not measured here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # noqa: E402 - the benchmark's own helpers

# "all_on_again" is a second gateway with every override on: the spread between the two
# "all on" gateways is the noise floor of the run (an A/A comparison).
CONFIGS = {"all_on": {}, "redis_off": {"OVERRIDE_REDIS_POOL_BYPASS": "0"}, "all_on_again": {}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--modes", default="nonstream,stream")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="configurations to run (all_on is always run): " + ", ".join(CONFIGS))
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", default=str(rb.REPO / "bench" / "results" / "overrides_ab.json"))
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.configs = ["all_on"] + [c for c in args.configs.split(",") if c and c != "all_on"]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    # run_benchmark's gateway_env reads these
    args.admission, args.direct_only = True, False
    return args


def start_gateways(args: argparse.Namespace, procs: rb.Processes, tmp: Path,
                   upstream_port: int) -> tuple[dict[str, tuple[str, int]], str]:
    admin_url, bench_db_url = rb.pg_urls(args.pg_url)
    rb.log(f"recreating database {rb.BENCH_DB}")
    rb.recreate_database(admin_url)
    models_file = tmp / "models.json"
    models_file.write_text(json.dumps(rb.models_json(upstream_port), indent=2))
    gateways: dict[str, tuple[str, int]] = {}
    key = ""
    for name in args.configs:
        switches = CONFIGS[name]
        port = rb.free_port()
        env = {**rb.gateway_env(args, bench_db_url, models_file, port), **switches}
        if not key:
            rb.run_manager(env, "create-db")
        own = tmp / name
        own.mkdir()
        rb.log(f"starting gateway {name} on port {port} ({' '.join(f'{k}={v}' for k, v in switches.items()) or 'every override on'})")
        proc = rb.start_gateway(procs, env, port, own)
        gateways[name] = (f"http://127.0.0.1:{port}{rb.CHAT_PATH}", proc.pid)
        if not key:
            key = rb.mint_key(env, admission=True)
    return gateways, key


def measure(args: argparse.Namespace, wrk: str, gateways: dict[str, tuple[str, int]], key: str,
            tmp: Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    results: dict[str, dict[str, list[dict[str, float]]]] = {m: {n: [] for n in gateways} for m in args.modes}
    for mode in args.modes:
        lua = rb.write_lua(tmp, mode == "stream", key)
        for name, (url, _pid) in gateways.items():
            rb.smoke_check(name, url, key, mode == "stream")
            rb.run_wrk(wrk, url, lua, args.concurrency, 2)  # warm-up
        order = list(gateways)
        for rnd in range(args.rounds):
            for name in (order if rnd % 2 == 0 else order[::-1]):
                url, pid = gateways[name]
                r = rb.measured_run(wrk, url, lua, args.concurrency, args.duration, pid)
                if r.errors:
                    raise rb.BenchError(f"{name} {mode}: {r.errors} errors ({r.statuses} {r.error_sample})")
                results[mode][name].append({"rps": r.rps, "cpu_ms_per_req": r.cpu_ms_per_req or 0.0})
                rb.log(f"{mode} round {rnd + 1} {name}: {r.rps:.0f} req/s, {r.cpu_ms_per_req:.2f} ms CPU/req")
    return results


def summary(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[dict[str, Any]]:
    rows = []
    for mode, per_config in results.items():
        base = per_config["all_on"]
        for name, runs in per_config.items():
            gains = [b["rps"] / r["rps"] - 1 for b, r in zip(base, runs)]
            cpu = [r["cpu_ms_per_req"] / b["cpu_ms_per_req"] - 1 for b, r in zip(base, runs)]
            rows.append({"mode": mode, "config": name, "rps_median": statistics.median(r["rps"] for r in runs),
                         "cpu_ms_per_req_median": statistics.median(r["cpu_ms_per_req"] for r in runs),
                         "all_on_rps_gain_median": statistics.median(gains),
                         "all_on_rps_gains": gains, "cpu_increase_median": statistics.median(cpu)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rb.raise_on_sigterm()
    procs = rb.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-overrides-ab-"))
    admin_url, _ = rb.pg_urls(args.pg_url)
    try:
        wrk = rb.ensure_wrk()
        info = rb.machine_info(wrk)
        port, _fake = rb.start_fake(procs, tmp)
        gateways, key = start_gateways(args, procs, tmp, port)
        started = time.time()
        results = measure(args, wrk, gateways, key, tmp)
        rows = summary(results)
        print(f"\n{info['nproc']} CPUs, {info['cpu_model']}; {args.workers} workers per gateway, "
              f"{args.concurrency} connections, {args.rounds} rounds of {args.duration:g} s, "
              f"{time.time() - started:.0f} s\n")
        print(f"{'mode':9s}  {'configuration':13s}  {'req/s':>7s}  {'CPU ms/req':>10s}  "
              f"{'all-on gain (median)':>20s}  per round")
        for r in rows:
            print(f"{r['mode']:9s}  {r['config']:13s}  {r['rps_median']:7.0f}  {r['cpu_ms_per_req_median']:10.2f}  "
                  f"{100 * r['all_on_rps_gain_median']:+19.1f}%  "
                  + " ".join(f"{100 * g:+.0f}%" for g in r["all_on_rps_gains"]))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "results": results,
                                              "summary": rows}, indent=2))
        print(f"\nwritten to {args.out}")
        return 0
    except rb.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        rb.stop_and_drop(procs, admin_url)


if __name__ == "__main__":
    sys.exit(main())
