#!/usr/bin/env python3
"""Two (or more) source trees of the gateway side by side: the same load on each in turn,
gateway CPU per request and requests/s, and optionally a py-spy profile of each.

    .venv/bin/python bench/compare_trees.py --tree before=/path/to/old/worktree --tree after=.
    .venv/bin/python bench/compare_trees.py --tree before=../before --tree after=. \\
        --rounds 6 --duration 3 --concurrency 64,1 --profile docs/profiles

One fake upstream; per tree its own database (`<BENCH_DB>_<name>`, created with that tree's
`db_manager.py create-db`), its own key (with every limit on, as `run_benchmark.py
--admission`, unless `--no-admission`) and its own gunicorn gateway started from that tree
(`cwd` = the tree, so `app` is that tree's code). All gateways run at once. Each round loads
every gateway for `--duration` seconds with wrk, for each mode and concurrency, in an order
reversed every round (AB BA ...), so that the machine's changing load weighs on every tree
alike. CPU per request is utime+stime of the gateway's process tree (from /proc) over the
requests wrk completed: on a shared machine it moves far less than requests/s.

The trees share one Redis database: the later tree's key is minted after a padding key, so
the two keys (and tenants) have different ids and never share limiter state.

`--profile DIR`, after the measured rounds: for each tree and mode at the highest
concurrency, `py-spy record --subprocesses -r 200` on the gateway (master and workers) while
wrk loads it, once as speedscope JSON and once as an SVG flame graph
(`DIR/<name>-<mode>.speedscope.json`, `DIR/<name>-<mode>.svg`). Profiled runs are not counted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # noqa: E402 - the benchmark's own helpers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                   help="a source tree of the gateway (give two or more)")
    p.add_argument("--env", action="append", default=[], metavar="NAME:VAR=VALUE",
                   help="an environment variable for one tree's gateway (e.g. an OVERRIDE_* switch)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    p.add_argument("--concurrency", default="64", help="comma-separated connections")
    p.add_argument("--modes", default="nonstream,stream")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-admission", dest="admission", action="store_false",
                   help="keys without limits (no Redis on the request path)")
    p.add_argument("--profile", metavar="DIR", help="write py-spy profiles of each tree here")
    p.add_argument("--profile-seconds", type=float, default=6.0)
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", default=str(rb.REPO / "bench" / "results" / "compare_trees.json"))
    args = p.parse_args(argv)
    args.trees = {}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        if not name or not path or not (Path(path) / "db_manager.py").exists():
            p.error(f"--tree {spec}: expected NAME=PATH of a gateway source tree")
        args.trees[name] = Path(path).resolve()
    args.tree_env = {name: {} for name in args.trees}
    for spec in args.env:
        name, _, assignment = spec.partition(":")
        var, _, value = assignment.partition("=")
        if name not in args.trees or not var:
            p.error(f"--env {spec}: expected NAME:VAR=VALUE for a NAME given with --tree")
        args.tree_env[name][var] = value
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.modes = [m for m in args.modes.split(",") if m]
    args.direct_only = False
    return args


def manager(tree: Path, env: dict[str, str], *argv: str) -> str:
    out = subprocess.run([rb.PYTHON, "db_manager.py", *argv], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise rb.BenchError(f"{tree}: db_manager {' '.join(argv)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def start_tree(procs: rb.Processes, tree: Path, env: dict[str, str], port: int, logdir: Path) -> int:
    log_path = logdir / "gateway.log"
    # started in the tree (cwd), so `app` is that tree's code
    out = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen([rb.GUNICORN, "-c", "gunicorn.config.py", "app:create_app()"], cwd=tree,
                            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    out.close()
    procs.procs.append((f"gateway {tree}", proc))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise rb.BenchError(f"gateway in {tree} exited:\n{rb.tail(log_path)}")
        try:
            if rb.http_get(f"http://127.0.0.1:{port}/health")[0] == 200:
                return proc.pid
        except OSError:
            pass
        time.sleep(0.2)
    raise rb.BenchError(f"gateway in {tree} not healthy:\n{rb.tail(log_path)}")


def start_gateways(args: argparse.Namespace, procs: rb.Processes, tmp: Path,
                   upstream_port: int) -> dict[str, dict[str, Any]]:
    models_file = tmp / "models.json"
    models_file.write_text(json.dumps(rb.models_json(upstream_port), indent=2))
    gateways: dict[str, dict[str, Any]] = {}
    for i, (name, tree) in enumerate(args.trees.items()):
        db = f"{rb.BENCH_DB}_{name}"
        admin_url, bench_url = rb.pg_urls(args.pg_url)
        bench_url = bench_url.rsplit("/", 1)[0] + "/" + db
        import psycopg  # noqa: PLC0415
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db}"')
        port = rb.free_port()
        env = {**rb.gateway_env(args, bench_url, models_file, port), **args.tree_env[name]}
        manager(tree, env, "create-db")
        own = tmp / name
        own.mkdir()
        rb.log(f"starting gateway {name} ({tree}) on port {port}")
        pid = start_tree(procs, tree, env, port, own)
        for pad in range(i):  # distinct key and tenant ids across trees (one Redis database)
            manager(tree, env, "create-key", "--name", f"pad{pad}", "--tenant", f"pad{pad}")
        out = manager(tree, env, "create-key", "--name", "bench", "--tenant", "bench",
                      *(rb.ADMISSION_LIMITS if args.admission else []))
        key = [ln.strip() for ln in out.splitlines() if ln.strip()][-1]
        gateways[name] = {"url": f"http://127.0.0.1:{port}{rb.CHAT_PATH}", "pid": pid, "key": key,
                          "db": db, "tmp": own}
    return gateways


def measure(args: argparse.Namespace, wrk: str, gateways: dict[str, dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in args.modes:
        stream = mode == "stream"
        for name, g in gateways.items():
            g["lua"] = rb.write_lua(g["tmp"], stream, g["key"])
            rb.smoke_check(name, g["url"], g["key"], stream)
            rb.run_wrk(wrk, g["url"], g["lua"], max(args.concurrency), 2)  # warm-up
        order = list(gateways)
        for rnd in range(args.rounds):
            for c in args.concurrency:
                for name in (order if rnd % 2 == 0 else order[::-1]):
                    g = gateways[name]
                    load = Path("/proc/loadavg").read_text().split()[0]
                    r = rb.measured_run(wrk, g["url"], g["lua"], c, args.duration, g["pid"])
                    if r.errors:
                        raise rb.BenchError(f"{name} {mode}: {r.errors} errors ({r.statuses} {r.error_sample})")
                    results.setdefault(f"{mode} c={c}", {}).setdefault(name, []).append(
                        {"rps": r.rps, "cpu": r.cpu_ms_per_req or 0.0, "p50": r.p50_ms, "load": float(load)})
                    rb.log(f"{mode} c={c} round {rnd + 1} {name}: {r.rps:.0f} req/s, "
                           f"{r.cpu_ms_per_req:.3f} ms CPU/req, p50 {r.p50_ms:.2f} ms (load {load})")
    return results


def profile(args: argparse.Namespace, wrk: str, gateways: dict[str, dict[str, Any]]) -> None:
    out = Path(args.profile)
    c = max(args.concurrency)
    for mode in args.modes:
        for name, g in gateways.items():
            g["lua"] = rb.write_lua(g["tmp"], mode == "stream", g["key"])
            for suffix in ("speedscope.json", "svg"):
                rb.profile_under_load(g["pid"], out / f"{name}-{mode}.{suffix}", args.profile_seconds,
                                      lambda g=g: rb.run_wrk(wrk, g["url"], g["lua"], c, args.profile_seconds))


def summary(results: dict[str, Any]) -> list[str]:
    lines = [f"{'cell':16s} {'tree':10s} {'req/s med':>9s} {'CPU ms/req med':>14s} {'min':>6s} {'max':>6s} "
             f"{'p50 ms med':>10s}  per round CPU"]
    for cell, per_tree in results.items():
        for name, runs in per_tree.items():
            cpus = [r["cpu"] for r in runs]
            lines.append(f"{cell:16s} {name:10s} {statistics.median(r['rps'] for r in runs):9.0f} "
                         f"{statistics.median(cpus):14.3f} {min(cpus):6.3f} {max(cpus):6.3f} "
                         f"{statistics.median(r['p50'] for r in runs):10.2f}  "
                         + " ".join(f"{x:.3f}" for x in cpus))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rb.raise_on_sigterm()
    procs = rb.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-compare-"))
    admin_url, _ = rb.pg_urls(args.pg_url)
    gateways: dict[str, dict[str, Any]] = {}
    try:
        wrk = rb.ensure_wrk()
        port, _fake = rb.start_fake(procs, tmp)
        gateways = start_gateways(args, procs, tmp, port)
        started = time.time()
        results = measure(args, wrk, gateways) if args.rounds else {}
        if args.profile:
            profile(args, wrk, gateways)
        print(f"\n{args.workers} workers per gateway, {args.rounds} rounds of {args.duration:g} s, "
              f"admission {'on' if args.admission else 'off'}, {time.time() - started:.0f} s, "
              f"load average now {Path('/proc/loadavg').read_text().split()[:3]}\n")
        print("\n".join(summary(results)))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                              "results": results}, indent=2))
        return 0
    except rb.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        import psycopg  # noqa: PLC0415
        for g in gateways.values():
            try:
                with psycopg.connect(admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{g["db"]}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - cleanup must not mask the result
                print(f"could not drop {g['db']}: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
