#!/usr/bin/env python3
"""Open-loop benchmark: latency added by the gateway (and by the LiteLLM proxy) at a constant
arrival rate, measured from each request's intended send time.

    .venv/bin/python bench/open_loop.py [--rates 200,500,1000] [--duration 10] [--warmup 2]
        [--modes nonstream,stream] [--no-litellm] [--json bench/results/open_loop.json]
        [--validate]

In one run it starts a paced fake upstream (bench/paced_upstream.py: non-streaming answers after
50 ms; streams of 10 content chunks, the first after 50 ms, then one every 20 ms), the gateway
as bench/run_benchmark.py runs it (gunicorn + gevent, 2 workers, PostgreSQL + Redis, a key with
every limit on, set too high to refuse anything), and, unless ``--no-litellm``, the LiteLLM proxy
(no database, no Redis) in front of the same upstream, installed on first use into its own
virtualenv, bench/.peers/litellm-venv (never into the project's requirements). Then, for each
mode and rate, it loads the upstream directly, the gateway and LiteLLM in turn with
bench/open_loop_gen.py (constant arrival rate; latency from the intended send time, so queueing
is never hidden by a slowed-down load generator) and prints, per target: achieved rate, latency
p50/p99/p99.9 (streams: time to first token too), what each adds to the direct figures, errors,
CPU per request; then the same as a Markdown table ready to paste, and the issue's targets.

``--validate`` instead runs Debian's `hey` (rate-limited closed-loop workers, exact when each
worker's interval is longer than the answer takes) and the generator against the upstream
directly, non-streaming, at each rate, and prints both side by side.

Exit code: 0 when no gateway run had errors, 1 when some did, 2 when a step failed, 130 on
Ctrl-C. Every process it started is stopped in all cases; the database ``gateway_openloop`` is
dropped at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import open_loop_gen as gen  # noqa: E402 - bench/ is put on the path above
import litellm_peer as peer  # noqa: E402 - the LiteLLM proxy: install, config, start
import run_benchmark as rb  # noqa: E402 - processes, gateway setup, database helpers

rb.BENCH_DB = os.environ.get("BENCH_DB") or "gateway_openloop"
RESULTS = rb.REPO / "bench" / "results" / "open_loop.json"
DIRECT_KEY = "sk-direct"
TARGETS = ("direct", "gateway", "litellm")
MODES = {"nonstream": False, "stream": True}
PROMPT = "Say hello to the benchmark"
TARGET_RATE = 500  # the targets are stated at 500 req/s
TARGET_ADDED_MS = 1.0


def log(msg: str) -> None:
    print(f"[open-loop] {msg}", flush=True)


def request_body(stream: bool, chunks: int) -> dict[str, Any]:
    """The same request for all three targets: `chunks` content chunks (max_tokens caps the
    fake's answer), model `bench` (the gateway's and LiteLLM's name for the upstream)."""
    body: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": chunks}
    if stream:
        body["stream"] = True
    return body


# --------------------------------------------------------------------------- one cell


@dataclass
class Target:
    name: str
    url: str
    key: str
    pid: int | None  # whose process tree's CPU is counted (None: the upstream's own)
    upstream_auth: str | None  # how the upstream tells this target's calls (None: direct)
    proc: Any = None  # the target's process (stopped when its backlog does not drain)
    stopped: str = ""  # why it was stopped; its later cells are not run
    saturated_at: dict[str, float] = field(default_factory=dict)  # mode -> rate


@dataclass
class Cell:
    mode: str
    rate: float
    target: str
    summary: dict[str, Any] | None = None  # open_loop_gen.summarize; None when not run
    note: str = ""
    cpu_ms_per_req: float | None = None  # the target's process tree
    upstream_cpu_ms_per_req: float | None = None
    generator_cpu_ms_per_req: float | None = None
    upstream_busy: float | None = None  # upstream CPU seconds per wall second
    max_conns_open: int = 0
    retries: int = 0  # sent again after an idle keep-alive connection closed under them
    drained_s: float | None = None  # wait after the cell until the target stopped calling upstream
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)


def run_cell(args: argparse.Namespace, target: Target, mode: str, rate: float, upstream_pid: int,
             tmp: Path) -> Cell:
    stream = MODES[mode]
    body_file = tmp / f"{mode}.json"
    body_file.write_text(json.dumps(request_body(stream, args.chunks)))
    cell = Cell(mode, rate, target.name, loadavg=os.getloadavg())
    start = time.monotonic() + 0.6  # the generator processes start and import meanwhile
    outs = [tmp / f"gen-{target.name}-{mode}-{rate:g}-{k}.json" for k in range(args.gen_procs)]
    cmd = [rb.PYTHON, str(Path(__file__).with_name("open_loop_gen.py")), "--url", target.url,
           "--rate", f"{rate:g}", "--duration", f"{args.duration:g}", "--warmup", f"{args.warmup:g}",
           "--body-file", str(body_file), "--header", f"Authorization: Bearer {target.key}",
           "--timeout", f"{args.timeout:g}", "--max-conns", str(max(1, args.max_conns // args.gen_procs)),
           "--start", repr(start)] + (["--stream"] if stream else [])
    cpu_before = rb.tree_cpu_ms(target.pid) if target.pid else 0.0
    up_before, wall_before = rb.tree_cpu_ms(upstream_pid), time.monotonic()
    children = [subprocess.Popen(cmd + ["--shard", f"{k}/{args.gen_procs}", "--out", str(out)],
                                 cwd=rb.REPO) for k, out in enumerate(outs)]
    codes = [c.wait() for c in children]
    up_cpu, wall = rb.tree_cpu_ms(upstream_pid) - up_before, time.monotonic() - wall_before
    cpu = rb.tree_cpu_ms(target.pid) - cpu_before if target.pid else None
    if any(codes):
        raise rb.BenchError(f"load generator failed ({codes}) on {target.name} {mode} {rate:g}/s")
    samples, gen_cpu = gen.Samples(), 0.0
    for out in outs:
        data = json.loads(out.read_text())
        samples.extend(gen.Samples.from_json(data["samples"]))
        gen_cpu += data["cpu_s"]
        cell.max_conns_open += data["max_conns_open"]
        cell.retries += data["retries"]
        out.unlink()
    answered = sum(1 for s in samples.status if s)  # warm-up included, as the CPU is
    cell.summary = gen.summarize(samples, start + args.warmup, rate)
    if answered:
        cell.upstream_cpu_ms_per_req = up_cpu / answered
        cell.generator_cpu_ms_per_req = gen_cpu * 1000.0 / answered
        if cpu is not None:
            cell.cpu_ms_per_req = cpu / answered
    cell.upstream_busy = up_cpu / 1000.0 / wall if wall else None
    return cell


def saturated(cell: Cell) -> bool:
    """Far from keeping up: more than 1% errors or under 90% of the offered rate served."""
    s = cell.summary
    return bool(s) and (s["errors"] > 0.01 * max(1, s["requests"])
                        or s["achieved_rate"] < 0.9 * cell.rate)


# --------------------------------------------------------------------------- report


def fmt(v: float | None, digits: int = 1, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def added(cell: Cell, direct: Cell | None, key: str) -> dict[str, float | None]:
    """cell's quantiles of `key` minus the direct run's, at the same mode and rate."""
    if not (cell.summary and direct and direct.summary) or cell.target == "direct":
        return {q: None for q in ("p50", "p99", "p99.9")}
    mine, base = cell.summary[key], direct.summary[key]
    return {q: mine[q] - base[q] for q in ("p50", "p99", "p99.9")}


def triple(values: dict[str, float | None], sign: bool = False) -> str:
    return " / ".join(fmt(values[q], 1, sign) for q in ("p50", "p99", "p99.9"))


def markdown(cells: list[Cell]) -> str:
    """One Markdown table per mode: for streams the time to first token leads."""
    direct = {(c.mode, c.rate): c for c in cells if c.target == "direct"}
    out = []
    for mode in MODES:
        rows = [c for c in cells if c.mode == mode]
        if not rows:
            continue
        key = "ttft_ms" if MODES[mode] else "latency_ms"
        what = "time to first token" if MODES[mode] else "latency"
        out.append(f"{'Streaming (10 chunks)' if MODES[mode] else 'Non-streaming'}, {what} in ms "
                   "from the intended send time (p50 / p99 / p99.9):\n")
        head = ["rate", "target", "achieved req/s", f"{what}", "added", "errors", "CPU ms/req"]
        if MODES[mode]:
            head[5:5] = ["whole stream", "added (stream)"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for c in rows:
            d = direct.get((c.mode, c.rate))
            if c.summary is None:
                out.append(f"| {c.rate:g} | {c.target} | {c.note} |" + " |" * (len(head) - 3))
                continue
            s = c.summary
            line = [f"{c.rate:g}", c.target, fmt(s["achieved_rate"], 0), triple(s[key]),
                    triple(added(c, d, key), sign=True) if c.target != "direct" else "",
                    str(s["errors"]), fmt(c.cpu_ms_per_req, 2) if c.target != "direct"
                    else f"({fmt(c.upstream_cpu_ms_per_req, 2)} upstream)"]
            if MODES[mode]:
                line[5:5] = [triple(s["latency_ms"]),
                             triple(added(c, d, "latency_ms"), sign=True) if c.target != "direct" else ""]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def targets_check(cells: list[Cell]) -> list[str]:
    """The issue's targets: added p99 latency at 500 req/s <= 1 ms non-streaming, added time
    to first token <= 1 ms streaming (read at p99 too)."""
    lines = []
    by = {(c.mode, c.rate, c.target): c for c in cells}
    for mode, key, label in (("nonstream", "latency_ms", "added p99 latency, non-streaming"),
                             ("stream", "ttft_ms", "added p99 time to first token, streaming")):
        for target in ("gateway", "litellm"):
            c, d = by.get((mode, TARGET_RATE, target)), by.get((mode, TARGET_RATE, "direct"))
            if c is None or d is None:
                continue
            if c.summary is None:
                lines.append(f"{target}: {label} at {TARGET_RATE} req/s: not measured ({c.note})")
                continue
            a = added(c, d, key)["p99"]
            met = a is not None and a <= TARGET_ADDED_MS and c.summary["errors"] == 0
            lines.append(f"{target}: {label} at {TARGET_RATE} req/s: {fmt(a, 2, True)} ms "
                         f"(target <= {TARGET_ADDED_MS:g} ms): {'met' if met else 'NOT met'}")
    return lines


def print_cell(c: Cell, direct: Cell | None) -> None:
    if c.summary is None:
        log(f"  {c.target:8s} {c.note}")
        return
    s = c.summary
    key = "ttft_ms" if MODES[c.mode] else "latency_ms"
    extra = f" added {triple(added(c, direct, key), True)}" if c.target != "direct" else ""
    log(f"  {c.target:8s} achieved {s['achieved_rate']:7.1f}/s  "
        f"{'ttft' if MODES[c.mode] else 'latency'} {triple(s[key])} ms{extra}  "
        f"errors {s['errors']}{' ' + str(s['errors_by_kind']) if s['errors'] else ''}  "
        f"send lag p99 {fmt(s['send_lag_ms']['p99'])} ms  "
        f"CPU/req {fmt(c.cpu_ms_per_req, 2)} ms (upstream {fmt(c.upstream_cpu_ms_per_req, 2)}, "
        f"generator {fmt(c.generator_cpu_ms_per_req, 2)}; upstream busy "
        f"{fmt((c.upstream_busy or 0) * 100, 0)}%)  load {c.loadavg[0]:.1f}  "
        f"conns {c.max_conns_open}{f'  retried {c.retries}' if c.retries else ''}  "
        f"drained in {fmt(c.drained_s)} s")


# --------------------------------------------------------------------------- validation


def validate_with_hey(args: argparse.Namespace, url: str, upstream_pid: int, tmp: Path) -> list[dict[str, Any]]:
    """hey (rate-limited workers, 10 req/s each: a worker waits 100 ms between sends, twice
    the 50 ms answer, so no send is held back) vs the generator at the same rate, upstream
    directly, non-streaming: their latencies should agree."""
    hey = shutil.which("hey")
    if not hey:
        if os.geteuid() == 0:
            subprocess.run(["apt-get", "install", "-y", "-q", "hey"], stdout=subprocess.DEVNULL,
                           check=False)
        hey = shutil.which("hey")
    if not hey:
        log("validation skipped: Debian's hey is not installed (apt-get install hey)")
        return []
    body = tmp / "nonstream.json"
    body.write_text(json.dumps(request_body(False, args.chunks)))
    rows = []
    for rate in args.rates:
        workers = max(1, int(rate // 10))
        out = subprocess.run([hey, "-z", f"{args.duration:g}s", "-c", str(workers), "-q", "10",
                              "-m", "POST", "-T", "application/json", "-D", str(body),
                              "-H", f"Authorization: Bearer {DIRECT_KEY}", "-o", "csv", url],
                             capture_output=True, text=True)
        times = sorted(float(r["response-time"]) for r in csv.DictReader(out.stdout.splitlines())
                       if r.get("status-code") == "200")
        total = len(out.stdout.splitlines()) - 1
        hey_row = {q: gen.percentile(times, float(q[1:])) * 1000 for q in ("p50", "p99", "p99.9")}
        target = Target("direct", url, DIRECT_KEY, None, None)
        cell = run_cell(args, target, "nonstream", rate, upstream_pid, tmp)
        s = cell.summary or {}
        rows.append({"rate": rate, "hey": hey_row, "hey_ok": len(times), "hey_total": total,
                     "hey_rate": len(times) / args.duration,
                     "generator_latency": s.get("latency_ms"), "generator_service": s.get("service_ms"),
                     "generator_rate": s.get("achieved_rate")})
        log(f"validate {rate:g}/s: hey {len(times) / args.duration:.0f}/s {triple(hey_row)} ms | "
            f"generator {s.get('achieved_rate', 0):.0f}/s latency {triple(s['latency_ms'])} ms, "
            f"from actual send {triple(s['service_ms'])} ms")
    return rows


# --------------------------------------------------------------------------- main flow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="200,500,1000", help="requests per second, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell")
    p.add_argument("--modes", default="nonstream,stream", help="nonstream,stream")
    p.add_argument("--no-litellm", action="store_true", help="leave the LiteLLM peer out")
    p.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    p.add_argument("--validate", action="store_true",
                   help="only compare the generator with hey on the upstream, non-streaming "
                        "(no gateway, no LiteLLM)")
    p.add_argument("--chunks", type=int, default=10, help="content chunks per answer")
    p.add_argument("--ttfb-ms", type=float, default=50.0)
    p.add_argument("--chunk-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds from the intended send time before a request counts as failed")
    p.add_argument("--max-conns", type=int, default=2000, help="connections per target at most")
    p.add_argument("--gen-procs", type=int, default=2,
                   help="load generator processes (each sends every Nth request of the schedule)")
    p.add_argument("--drain-limit", type=float, default=120.0,
                   help="seconds to wait after a cell for the target to stop calling the "
                        "upstream; a target (LiteLLM) still busy then is stopped")
    p.add_argument("--no-skip", action="store_true",
                   help="run higher rates on a target that could not keep up with a lower one")
    p.add_argument("--workers", type=int, default=2, help="gateway and LiteLLM worker processes")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--keep", action="store_true", help=f"keep the {rb.BENCH_DB} database")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - set(MODES) or not args.modes or not args.rates or min(args.rates) <= 0:
        p.error("--modes takes nonstream,stream and --rates positive numbers")
    args.admission = True  # every limit on, as the issue asks (run_benchmark's --admission)
    return args


def run(args: argparse.Namespace, procs: rb.Processes, tmp: Path) -> int:
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    log(f"machine: {os.cpu_count()} CPUs; {uptime_before}")
    upstream_cmd = [str(Path(__file__).with_name("paced_upstream.py")),
                    "--ttfb-ms", f"{args.ttfb_ms:g}", "--chunk-ms", f"{args.chunk_ms:g}"]
    port, upstream = rb.start_fake(procs, tmp, upstream_cmd)
    direct_url = f"http://127.0.0.1:{port}{rb.CHAT_PATH}"
    log(f"paced upstream on port {port}")
    if args.validate:
        validation = validate_with_hey(args, direct_url, upstream.pid, tmp)
        write_results(args, [], validation, {}, uptime_before,
                      subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        return 0
    t = rb.Targets(direct_url, upstream.pid, port)
    rb.setup_gateway(args, procs, t, tmp)
    targets = [Target("direct", direct_url, DIRECT_KEY, None, None),
               Target("gateway", t.gateway_url or "", t.key, t.gateway_pid, f"Bearer {rb.UPSTREAM_KEY}")]
    litellm_note = "not run (--no-litellm)"
    if not args.no_litellm:
        exe = peer.ensure_litellm()
        litellm_note = "not run: LiteLLM could not be installed"
        if exe is not None:
            try:
                url, proc = peer.start_litellm(procs, exe, port, args.workers, tmp)
                targets.append(Target("litellm", url, peer.LITELLM_MASTER_KEY, proc.pid,
                                      f"Bearer {peer.LITELLM_UPSTREAM_KEY}", proc))
                log(f"LiteLLM proxy up ({exe.parent.parent.relative_to(rb.REPO)})")
            except peer.LiteLLMUnavailable as exc:
                litellm_note = "not run: LiteLLM did not start"
                log(f"LiteLLM did not start, continuing without it: {exc}")
    for target in list(targets):
        for mode in args.modes:
            try:
                rb.smoke_check(target.name, target.url, target.key, MODES[mode],
                               request_body(MODES[mode], args.chunks))
            except (rb.BenchError, OSError) as exc:
                if target.name != "litellm":
                    raise
                log(f"LiteLLM answered wrongly, continuing without it: {exc}")
                if target.proc is not None:
                    rb.stop_group(target.name, target.proc)
                targets.remove(target)
                litellm_note = "not run: LiteLLM answered wrongly"
                break
    cells: list[Cell] = []
    for mode in args.modes:
        for rate in args.rates:
            log(f"{mode} at {rate:g} req/s")
            direct: Cell | None = None
            for target in targets:
                if target.stopped:
                    cell = Cell(mode, rate, target.name, note=target.stopped)
                elif target.saturated_at.get(mode) is not None and not args.no_skip:
                    cell = Cell(mode, rate, target.name,
                                note=f"not run: could not keep up at {target.saturated_at[mode]:g}/s")
                else:
                    cell = run_cell(args, target, mode, rate, upstream.pid, tmp)
                    if saturated(cell):
                        target.saturated_at[mode] = rate
                    cell.drained_s = rb.wait_drained(port, target.upstream_auth, args.drain_limit)
                    if cell.drained_s is None and target.proc is not None:
                        # Its backlog would load the machine under every later cell.
                        target.stopped = (f"not run: stopped, still busy {args.drain_limit:g} s "
                                          f"after {mode} at {rate:g}/s")
                        log(f"  stopping {target.name}: {target.stopped}")
                        rb.stop_group(target.name, target.proc)
                direct = cell if target.name == "direct" else direct
                print_cell(cell, direct)
                cells.append(cell)
            if not args.no_litellm and "litellm" not in [x.name for x in targets]:
                cells.append(Cell(mode, rate, "litellm", note=litellm_note))
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    usage = usage_check(args, t)
    print()
    print(f"Machine: {os.cpu_count()} CPUs; before: {uptime_before}\n         after:  {uptime_after}")
    print(f"Each cell: {args.warmup:g} s warm-up + {args.duration:g} s measured at a constant rate; "
          f"upstream {args.ttfb_ms:g} ms to first byte, {args.chunks} chunks {args.chunk_ms:g} ms apart; "
          f"gateway and LiteLLM with {args.workers} workers.\n")
    print(markdown(cells))
    for line in targets_check(cells):
        print(line)
    print(f"\nGateway: upstream calls {usage['upstream_calls_from_gateway']}, "
          f"usage rows {usage['usage_records_rows']}")
    write_results(args, cells, [], usage, uptime_before, uptime_after)
    return 0 if all(c.summary is None or c.summary["errors"] == 0
                    for c in cells if c.target == "gateway") else 1


def usage_check(args: argparse.Namespace, t: rb.Targets) -> dict[str, Any]:
    """Every upstream call the gateway made has its usage row (none lost, none twice)."""
    time.sleep(0.5)
    calls = rb.upstream_stats(t.upstream_port)["requests_by_authorization"].get(
        f"Bearer {rb.UPSTREAM_KEY}", 0)
    try:
        rows: Any = rb.wait_for_usage_rows(rb.pg_urls(args.pg_url)[0], calls)
    except Exception as exc:  # noqa: BLE001 - the table is still worth printing
        rows = f"could not count: {type(exc).__name__}: {exc}"
    return {"upstream_calls_from_gateway": calls, "usage_records_rows": rows}


def write_results(args: argparse.Namespace, cells: list[Cell], validation: list[dict[str, Any]],
                  usage: dict[str, Any], uptime_before: str, uptime_after: str) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    data = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nproc": os.cpu_count(),
            "uptime_before": uptime_before, "uptime_after": uptime_after, "config": config,
            "litellm_spec": peer.LITELLM_SPEC, "cells": [asdict(c) for c in cells],
            "validation": validation, "usage_check": usage}
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(f"Results written to {args.json}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return rb.bench_main(args, run, "gateway-openloop-", logs=("gateway.log", "fake_openai.log", "litellm.log"), log_prefix="open_loop-")


if __name__ == "__main__":
    sys.exit(main())
