#!/usr/bin/env python3
"""Capacity figures for sizing: what one request costs the gateway, Redis and PostgreSQL.

    .venv/bin/python bench/capacity.py [--duration 10] [--concurrency 16] [--workers 2]

Starts the fast fake upstream, a private redis-server (so that its INFO counters see only this
run), and the gateway under gunicorn with every limit on (each request is admitted and settled
in Redis, and writes one usage row to PostgreSQL, in the `gateway_capacity` database, dropped at
the end). For each mode (non-streaming, streaming) it loads the gateway with wrk and reports:

- gateway CPU ms per request (the gunicorn tree) and the requests/s reached;
- resident memory per worker (RSS and PSS) after the run;
- Redis commands per request (INFO commandstats) and Redis CPU microseconds per request;
- PostgreSQL rows inserted per second, commits per second and rows per commit
  (pg_stat_database of the database), the CPU of the gateway's PostgreSQL backends per row,
  and the bytes one usage row takes on disk (table and indexes).

docs/replicas.md turns these into the sizing table. Results: bench/results/capacity.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import shutil
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # noqa: E402  (the benchmark's process, wrk and database helpers)

rb.BENCH_DB = "gateway_capacity"
RESULTS = rb.REPO / "bench" / "results" / "capacity.json"
# Commands only the gateway sends itself (GET, SET, DEL... also run inside its Lua scripts and
# are left out, so this slightly undercounts the odd direct GET of the uptime cache).
CLIENT_COMMANDS = {"evalsha", "eval", "rpush", "llen", "hgetall", "hset", "hdel", "publish", "ping",
                   "script", "multi", "exec", "hello", "client"}


def start_private_redis(procs: rb.Processes, tmp: Path) -> tuple[int, Any]:
    port = rb.free_port()
    proc = procs.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp)], {}, tmp / "redis.log")
    import redis  # noqa: PLC0415
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return port, proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise rb.BenchError("private redis-server did not start") from None
            time.sleep(0.1)


def redis_counters(client: Any) -> dict[str, float]:
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    counters = {name.replace("cmdstat_", ""): float(v["calls"]) for name, v in stats.items()}
    counters["_cpu_s"] = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    return counters


def pg_counters(admin_url: str) -> dict[str, float]:
    import psycopg  # noqa: PLC0415
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit, tup_inserted FROM pg_stat_database WHERE datname = %s",
                           (rb.BENCH_DB,)).fetchone()
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                           (rb.BENCH_DB,)).fetchall()]
    ticks = sum(rb.proc_ticks(pid) for pid in pids)
    return {"commits": float(row[0]), "inserted": float(row[1]), "backend_cpu_ms": ticks * 1000.0 / rb.CLK_TCK}


def worker_memory(master_pid: int) -> list[dict[str, float]]:
    """RSS and PSS (MiB) of each gunicorn worker (the master's children)."""
    out = []
    for pid in rb.descendants(master_pid)[1:]:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        values = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
        out.append({"pid": pid, "rss_mib": values.get("Rss", 0) / 1024, "pss_mib": values.get("Pss", 0) / 1024})
    return out


def usage_row_bytes(admin_url: str) -> float:
    import psycopg  # noqa: PLC0415
    url = admin_url.rsplit("/", 1)[0] + "/" + rb.BENCH_DB
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT count(*) FROM usage_records").fetchone()[0]
        size = conn.execute("""SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
                               WHERE c.relname LIKE 'usage_records%' AND c.relkind = 'r'""").fetchone()[0]
    return float(size) / rows if rows else 0.0


def measure(wrk: str, url: str, lua: Path, concurrency: int, duration: float, gateway_pid: int,
            redis_client: Any, admin_url: str) -> dict[str, Any]:
    r0, p0 = redis_counters(redis_client), pg_counters(admin_url)
    result = rb.measured_run(wrk, url, lua, concurrency, duration, gateway_pid)
    time.sleep(1.0)   # the last settlements and usage rows of the run
    r1, p1 = redis_counters(redis_client), pg_counters(admin_url)
    n = max(result.requests, 1)
    commands = {k: r1[k] - r0.get(k, 0) for k in r1 if not k.startswith("_") and r1[k] - r0.get(k, 0) > 0}
    commands.pop("info", None)
    inserted = p1["inserted"] - p0["inserted"]
    commits = p1["commits"] - p0["commits"]
    return {
        "requests": result.requests, "rps": result.rps, "errors": result.errors,
        "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
        "gateway_cpu_ms_per_request": result.cpu_ms_per_req,
        # commandstats also counts the commands a script runs (redis.call): EVALSHA is the
        # round trip, the rest mostly run inside the limiter's script.
        "redis_commands_per_request": sum(commands.values()) / n,
        "redis_round_trips_per_request": sum(v for k, v in commands.items() if k in CLIENT_COMMANDS) / n,
        "redis_commands_by_name_per_request": {k: round(v / n, 3) for k, v in sorted(commands.items())},
        "redis_cpu_us_per_request": (r1["_cpu_s"] - r0["_cpu_s"]) * 1e6 / n,
        "pg_rows_inserted_per_s": inserted / result.duration_s,
        "pg_commits_per_s": commits / result.duration_s,
        "pg_rows_per_commit": inserted / commits if commits else None,
        "pg_backend_cpu_ms_per_request": (p1["backend_cpu_ms"] - p0["backend_cpu_ms"]) / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--modes", default="nonstream,stream")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    rb.raise_on_sigterm()
    procs, tmp = rb.Processes(), Path(tempfile.mkdtemp(prefix="gateway-capacity-"))
    admin_url, bench_url = rb.pg_urls(args.pg_url)
    try:
        wrk = rb.ensure_wrk()
        up_port, _ = rb.start_fake(procs, tmp)
        redis_port, _ = start_private_redis(procs, tmp)
        import redis  # noqa: PLC0415
        redis_client = redis.Redis(port=redis_port)
        rb.recreate_database(admin_url)
        models = tmp / "models.json"
        models.write_text(json.dumps(rb.models_json(up_port)))
        port = rb.free_port()
        env = rb.gateway_env(argparse.Namespace(redis_url=f"redis://127.0.0.1:{redis_port}/0", workers=args.workers),
                             bench_url, models, port)
        rb.run_manager(env, "create-db")
        gateway = rb.start_gateway(procs, env, port, tmp)
        key = rb.mint_key(env, admission=True)
        url = f"http://127.0.0.1:{port}{rb.CHAT_PATH}"
        report: dict[str, Any] = {"machine": rb.machine_info(wrk), "workers": args.workers,
                                  "concurrency": args.concurrency, "duration_s": args.duration, "modes": {}}
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            lua = rb.write_lua(tmp, mode == "stream", key)
            rb.smoke_check("gateway", url, key, mode == "stream")
            rb.run_wrk(wrk, url, lua, args.concurrency, 2.0)   # warm-up
            rb.log(f"{mode}: measuring {args.duration:g}s at c={args.concurrency}")
            report["modes"][mode] = measure(wrk, url, lua, args.concurrency, args.duration, gateway.pid,
                                            redis_client, admin_url)
        report["worker_memory"] = worker_memory(gateway.pid)
        report["usage_row_bytes_on_disk"] = usage_row_bytes(admin_url)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 0
    except rb.BenchError as exc:
        print(f"CAPACITY RUN FAILED: {exc}", file=sys.stderr)
        return 2
    finally:
        rb.stop_and_drop(procs, admin_url)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
