#!/usr/bin/env python3
"""Counted, not timed: what a request costs in system calls and in instructions, per tree of
the gateway. Counts repeat whatever else the machine does, where CPU time per request moves
by ±20% between runs on a shared 2-vCPU machine.

    .venv/bin/python bench/count_per_request.py --tree before=../before --tree main=. --strace
    .venv/bin/python bench/count_per_request.py --tree before=../before --tree main=. --callgrind

`--strace`: each tree's gunicorn gateway (every limit on, as compare_trees.py starts it) under
wrk at `--concurrency` connections; `strace -c -f` on the master and workers for `--duration`
seconds; prints the system calls per completed request (those at 0.05 or more per request).

`--callgrind`: each tree's Flask app driven in process (bench/inprocess_driver.py, `--greenlets`
greenlets under gevent, no HTTP server) under valgrind's callgrind, twice (`--requests A,B`);
the difference of the two runs' instruction totals over B-A requests is the instructions per
request of the whole process (its background threads included, start-up excluded). Needs
valgrind; about a minute per run.

Both need the same PostgreSQL and Redis as compare_trees.py; `--modes nonstream,stream`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_trees as ct  # noqa: E402 - the sibling scripts, found through the path above
import run_benchmark as rb  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "inprocess_driver.py"


def parse_strace_summary(text: str, requests: int, floor: float = 0.05) -> dict[str, float]:
    """`strace -c` table -> {syscall: calls per request} for those at `floor` or more, and
    "total" (every call)."""
    per: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[3].isdigit():
            continue
        calls = int(parts[3]) / max(requests, 1)
        name = parts[-1]
        if name == "total" or calls >= floor:
            per[name] = round(calls, 2)
    return per


def callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise rb.BenchError(f"no totals in {path}")


def count_syscalls(args: argparse.Namespace, tmp: Path, procs: rb.Processes, upstream_port: int) -> None:
    wrk = rb.ensure_wrk()
    gateways = ct.start_gateways(args, procs, tmp, upstream_port)
    for mode in args.modes:
        for name, g in gateways.items():
            lua = rb.write_lua(g["tmp"], mode == "stream", g["key"])
            rb.run_wrk(wrk, g["url"], lua, args.concurrency, 2)  # warm-up
            out = tmp / f"strace-{name}-{mode}.txt"
            pids = [g["pid"], *rb.descendants(g["pid"])]
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), *[a for p in pids for a in ("-p", str(p))]],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            result = rb.run_wrk(wrk, g["url"], lua, args.concurrency, args.duration)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            counts = parse_strace_summary(out.read_text(), result.requests)
            print(f"{mode:9s} {name:10s} {result.requests:6d} requests  "
                  + "  ".join(f"{k} {v:g}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])), flush=True)


def count_instructions(args: argparse.Namespace, tmp: Path, upstream_port: int) -> None:
    models_file = tmp / "models.json"
    models_file.write_text(json.dumps(rb.models_json(upstream_port)))
    admin_url, bench_url = rb.pg_urls(args.pg_url)
    import psycopg  # noqa: PLC0415
    envs = {}
    for i, (name, tree) in enumerate(args.trees.items()):
        db = f"{rb.BENCH_DB}_count_{name}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db}"')
        env = {**rb.gateway_env(args, bench_url.rsplit("/", 1)[0] + "/" + db, models_file, rb.free_port()),
               **args.tree_env[name], "G": str(args.greenlets)}
        ct.manager(tree, env, "create-db")
        for pad in range(i):  # distinct key ids across trees (one Redis database)
            ct.manager(tree, env, "create-key", "--name", f"pad{pad}", "--tenant", f"pad{pad}")
        out = ct.manager(tree, env, "create-key", "--name", "bench", "--tenant", "bench", *rb.ADMISSION_LIMITS)
        env["BENCH_KEY"] = [ln.strip() for ln in out.splitlines() if ln.strip()][-1]
        envs[name] = (env, db)
    low, high = args.requests
    try:
        for mode in args.modes:
            for name, (env, _) in envs.items():
                totals = []
                for n in (low, high):
                    target = tmp / f"callgrind-{name}-{mode}-{n}.out"
                    run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={target}",
                                          rb.PYTHON, str(DRIVER)], cwd=args.trees[name],
                                         env={**env, "N": str(n), "STREAM": "1" if mode == "stream" else "0"},
                                         capture_output=True, text=True, timeout=3600)
                    if run.returncode != 0:
                        raise rb.BenchError(f"{name} {mode}: the driver failed:\n{run.stdout}\n{run.stderr[-2000:]}")
                    totals.append(callgrind_total(target))
                print(f"{mode:9s} {name:10s} {(totals[1] - totals[0]) / (high - low):,.0f} instructions/request "
                      f"({args.greenlets} greenlets)", flush=True)
    finally:
        for _, db in envs.values():
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--env", action="append", default=[], metavar="NAME:VAR=VALUE")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--strace", action="store_true", help="system calls per request under gunicorn")
    what.add_argument("--callgrind", action="store_true", help="instructions per request in process")
    p.add_argument("--modes", default="nonstream,stream")
    p.add_argument("--concurrency", type=int, default=64, help="--strace: wrk connections")
    p.add_argument("--duration", type=float, default=4.0, help="--strace: seconds traced")
    p.add_argument("--greenlets", type=int, default=16, help="--callgrind: concurrent requests")
    p.add_argument("--requests", default="100,400", help="--callgrind: the two run sizes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    # what compare_trees' machinery reads
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    base = ct.parse_args([a for spec in args.tree for a in ("--tree", spec)]
                         + [a for spec in args.env for a in ("--env", spec)]
                         + ["--workers", str(args.workers), "--pg-url", args.pg_url, "--redis-url", args.redis_url])
    args.trees, args.tree_env, args.admission = base.trees, base.tree_env, True
    args.modes = [m for m in args.modes.split(",") if m]
    low, high = (int(x) for x in args.requests.split(","))
    if not 0 < low < high:
        p.error("--requests takes two sizes, the smaller first")
    args.requests = (low, high)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rb.raise_on_sigterm()
    procs = rb.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-count-"))
    try:
        port, _fake = rb.start_fake(procs, tmp)
        if args.strace:
            count_syscalls(args, tmp, procs, port)
        else:
            count_instructions(args, tmp, port)
        return 0
    except rb.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        procs.stop_all()
        if args.strace:
            import psycopg  # noqa: PLC0415
            admin_url, _ = rb.pg_urls(args.pg_url)
            for name in args.trees:
                with psycopg.connect(admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{rb.BENCH_DB}_{name}" WITH (FORCE)')
        import shutil  # noqa: PLC0415
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
