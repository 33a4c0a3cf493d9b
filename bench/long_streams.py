#!/usr/bin/env python3
"""Long streams: N streamed completions held open at once through the gateway, one token every
50 ms for a minute each, with every limit of the key on.

    .venv/bin/python bench/long_streams.py [--streams 5000] [--interval 0.05] [--duration 60]
        [--ramp 10] [--workers 2] [--pg-url URL] [--redis-url URL] [--keep]

It starts the long-stream upstream (bench/long_upstream.py), the gateway (gunicorn + gevent,
PostgreSQL, Redis: the same setup as bench/run_benchmark.py, `launch_gateway`) with a key
whose rpm, tpm, tokens/day, concurrency and budget are all set (too high to refuse), checks
the raw reader against the official openai client on one short stream, then opens the
streams over `--ramp` seconds with bench/sse_reader.py and reads them to their end. Every
second it samples the gateway workers' RSS (summed, from /proc), their open descriptors and
the CPU of the gateway, the upstream and the reader. It reports errors (a stream that did not
answer 200, end with [DONE] and carry the right number of tokens), memory per open stream
((plateau - baseline) / streams), the gateway's CPU, and the usage rows written (must be one
per stream). Writes bench/results/long_streams.json. Exit code 0 when there were no errors,
rows = streams and memory per stream <= --max-kb-per-stream; 1 otherwise; 2 when a step failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark as rb  # noqa: E402  (the gateway, process, CPU and database helpers)
from sse_reader import StreamParser, request_bytes  # noqa: E402

rb.BENCH_DB = os.environ.get("BENCH_DB") or "gateway_long_streams"
RESULTS = rb.REPO / "bench" / "results" / "long_streams.json"
# Streams per client address: MAX_CONNECTIONS_PER_CLIENT (500 per worker) counts a stream until
# its first byte; a ramp from one address could reach it while admissions queue.
PER_ADDRESS = 250


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=5000)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between two tokens of a stream")
    p.add_argument("--duration", type=float, default=60.0, help="seconds a stream lasts (tokens = duration / interval)")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds over which the streams are opened")
    p.add_argument("--workers", type=int, default=2, help="gunicorn WEB_CONCURRENCY")
    p.add_argument("--worker-connections", type=int, default=0,
                   help="gunicorn WORKER_CONNECTIONS (default: streams + 200, whatever the split between workers)")
    p.add_argument("--sources", type=int, default=0,
                   help=f"client loopback addresses (default: one per {PER_ADDRESS} streams)")
    p.add_argument("--max-kb-per-stream", type=float, default=50.0, help="the memory target")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--keep", action="store_true", help=f"keep the {rb.BENCH_DB} database")
    args = p.parse_args(argv)
    args.tokens = max(1, round(args.duration / args.interval))
    args.sources = args.sources or max(1, math.ceil(args.streams / PER_ADDRESS))
    args.worker_connections = args.worker_connections or args.streams + 200
    return args


# --------------------------------------------------------------------------- limits and /proc


def raise_fd_limit(need: int) -> tuple[int, int]:
    """Open-file limit of this process (and so of every child) raised to `need` when the hard
    limit allows, or when root may raise the hard limit too. Returns the (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            except (ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def worker_pids(master: int) -> list[int]:
    return rb.descendants(master)[1:]


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def cpu_s(pid: int) -> float:
    return rb.proc_ticks(pid) / rb.CLK_TCK


class Sampler(threading.Thread):
    """Once a second: the gateway workers' RSS and descriptors, the CPU of gateway, upstream
    and reader, the reader's latest progress line and the upstream's counters."""

    def __init__(self, gateway: int, upstream: int, upstream_port: int) -> None:
        super().__init__(daemon=True)
        self.gateway, self.upstream, self.upstream_port = gateway, upstream, upstream_port
        self.progress: dict[str, Any] = {}
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict[str, Any]:
        workers = worker_pids(self.gateway)
        try:
            upstream = json.loads(rb.http_get(f"http://127.0.0.1:{self.upstream_port}/_stats", timeout=5)[1])
        except (OSError, ValueError):
            upstream = {}
        return {"t": round(time.monotonic() - self.t0, 1), "load1": os.getloadavg()[0],
                "rss_kb": [rss_kb(p) for p in workers], "fds": [open_fds(p) for p in workers],
                "gateway_cpu_s": rb.tree_cpu_ms(self.gateway) / 1000, "upstream_cpu_s": cpu_s(self.upstream),
                "reader": dict(self.progress), "upstream": upstream}

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append(self.sample())


# --------------------------------------------------------------------------- the steps


def validate_reader(base_url: str, key: str) -> dict[str, Any]:
    """One short stream read by the official openai client and the same request read by the
    raw reader's parser: same text, same token count, [DONE] seen. The bench trusts the
    reader only when they agree."""
    from openai import OpenAI  # noqa: PLC0415 - requirements-dev
    tokens = 20
    client = OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="bench", stream=True, max_tokens=tokens,
                                            messages=[{"role": "user", "content": "Stream for a long time, please."}])
    official = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    parser = StreamParser(keep_text=True)
    host, port = base_url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(request_bytes(base_url + rb.CHAT_PATH, key, tokens, "bench"))
        while not parser.finished:
            data = s.recv(65536)
            if not data:
                break
            parser.feed(data)
    result = {"official_text": official, "reader_text": parser.text, "reader_tokens": parser.tokens,
              "reader_done": parser.done, "status": parser.status}
    if parser.status != 200 or not parser.done or parser.tokens != tokens or parser.text != official \
            or parser.error:
        raise rb.BenchError(f"the raw reader disagrees with the openai client: {result}, error {parser.error}")
    return result


def start_reader(args: argparse.Namespace, procs: rb.Processes, base_url: str, key: str, tmp: Path,
                 sampler: Sampler) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = [rb.PYTHON, str(rb.REPO / "bench" / "sse_reader.py"), "--url", base_url + rb.CHAT_PATH,
           "--key", key, "--streams", str(args.streams), "--tokens", str(args.tokens),
           "--ramp", str(args.ramp), "--sources", str(args.sources),
           "--timeout", str(args.duration * 4 + 120)]
    err = open(tmp / "sse_reader.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=rb.REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                            start_new_session=True)
    err.close()
    procs.procs.append(("reader", proc))  # type: ignore[arg-type]  # stopped with the rest on Ctrl-C
    final: dict[str, Any] = {}
    last_log = 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "progress" in msg:
            sampler.progress = msg["progress"]
            if time.monotonic() - last_log >= 5:
                last_log = time.monotonic()
                rb.log(f"reader: {msg['progress']}")
        elif "result" in msg:
            final = msg["result"]
    proc.wait()
    if not final:
        raise rb.BenchError(f"the reader ended ({proc.returncode}) without a result:\n{rb.tail(tmp / 'sse_reader.log')}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reader is the only child reaped meanwhile
    final["reader_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    return proc, final


def usage_rows(admin_url: str, tokens: int) -> dict[str, int]:
    import psycopg  # noqa: PLC0415
    url = admin_url.rsplit("/", 1)[0] + "/" + rb.BENCH_DB
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'ok' AND streamed AND completion_tokens = %s), "
            "count(*) FILTER (WHERE status <> 'ok') FROM usage_records", (tokens,)).fetchone()
    return {"rows": row[0], "ok_with_all_tokens": row[1], "not_ok": row[2]}


def wait_rows(admin_url: str, expected: int, tokens: int, timeout: float = 60.0) -> dict[str, int]:
    """Usage rows are written after each stream ends (batched): wait until they are all in, or
    the count stops moving for 10 s."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while True:
        rows = usage_rows(admin_url, tokens)
        if rows["rows"] != last:
            last, since = rows["rows"], time.monotonic()
        if rows["rows"] >= expected or time.monotonic() - since > 10 or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def analyse(args: argparse.Namespace, baseline: dict[str, Any], samples: list[dict[str, Any]],
            after: dict[str, Any], t_start: dict[str, Any], t_end: dict[str, Any]) -> dict[str, Any]:
    """Memory per open stream and CPU from the samples. A stream is open from the moment the
    reader opened its connection until it ended (admitted and streaming, or still waiting for
    its first byte: both hold memory in the gateway). The plateau: the samples taken while the
    most streams were open at once (at least 98% of that count)."""
    opens = [s["reader"].get("open", 0) for s in samples]
    most = max(opens, default=0)
    plateau = [s for s, o in zip(samples, opens) if most and o >= 0.98 * most]
    base_kb = sum(baseline["rss_kb"])
    plateau_kb = median([sum(s["rss_kb"]) for s in plateau])
    peak_kb = max((sum(s["rss_kb"]) for s in samples), default=0)
    wall = t_end["t"] - t_start["t"]
    gw_cpu = t_end["gateway_cpu_s"] - t_start["gateway_cpu_s"]
    tokens_total = args.streams * args.tokens
    return {
        "most_open_streams": most, "plateau_samples": len(plateau),
        "upstream_streams_at_plateau": plateau[len(plateau) // 2]["upstream"].get("open") if plateau else None,
        "most_upstream_streams": max((s["upstream"].get("open", 0) for s in samples), default=0),
        "rss_baseline_mb": round(base_kb / 1024, 1), "rss_plateau_mb": round(plateau_kb / 1024, 1),
        "rss_peak_mb": round(peak_kb / 1024, 1), "rss_after_mb": round(sum(after["rss_kb"]) / 1024, 1),
        "rss_per_worker_plateau_mb": [round(k / 1024, 1) for k in (plateau[len(plateau) // 2]["rss_kb"] if plateau else [])],
        "fds_per_worker_plateau": plateau[len(plateau) // 2]["fds"] if plateau else [],
        "kb_per_stream_plateau": round((plateau_kb - base_kb) / most, 1) if most else None,
        "kb_per_stream_peak": round((peak_kb - base_kb) / most, 1) if most else None,
        "wall_s": round(wall, 1), "gateway_cpu_s": round(gw_cpu, 1),
        "gateway_cores": round(gw_cpu / wall, 2) if wall else None,
        "gateway_cpu_ms_per_stream": round(gw_cpu * 1000 / args.streams, 2),
        "gateway_cpu_us_per_token": round(gw_cpu * 1e6 / tokens_total, 2),
        "upstream_cpu_s": round(t_end["upstream_cpu_s"] - t_start["upstream_cpu_s"], 1),
        "load1_max": max((s["load1"] for s in samples), default=0.0),
        "upstream_late_ticks": t_end["upstream"].get("late_ticks"),
        "upstream_ticks": t_end["upstream"].get("ticks"),
        "upstream_max_tick_ms": t_end["upstream"].get("max_tick_ms"),
    }


def report(args: argparse.Namespace, res: dict[str, Any], reader: dict[str, Any], rows: dict[str, int],
           expected_rows: int, met: bool) -> None:
    print()
    print(f"Long streams: {args.streams} streams x {args.tokens} tokens, one every {args.interval * 1000:g} ms "
          f"({args.duration:g} s), ramp {args.ramp:g} s, {args.workers} gevent workers, "
          f"WORKER_CONNECTIONS={args.worker_connections}, {args.sources} client addresses, every limit on")
    print(f"  streams ok {reader['ok']} / {reader['streams']}, errors {reader['errors']} {reader['error_reasons'] or ''}")
    for sample in reader["error_samples"]:
        print(f"    {sample}")
    print(f"  stream duration p50 {reader['duration_s']['p50']} s, max {reader['duration_s']['max']} s; "
          f"first byte p50 {reader['first_byte_s']['p50']} s, max {reader['first_byte_s']['max']} s; "
          f"longest silence in a stream p50 {reader['longest_silence_s']['p50']} s, "
          f"max {reader['longest_silence_s']['max']} s")
    print(f"  most streams open at once: {res['most_open_streams']} (streaming from the upstream at that "
          f"plateau: {res['upstream_streams_at_plateau']}; most ever streaming at once: {res['most_upstream_streams']})")
    print(f"  gateway RSS (sum of workers): before {res['rss_baseline_mb']} MB, plateau {res['rss_plateau_mb']} MB "
          f"(per worker {res['rss_per_worker_plateau_mb']}), peak {res['rss_peak_mb']} MB, after {res['rss_after_mb']} MB")
    print(f"  memory per open stream: {res['kb_per_stream_plateau']} KB at the plateau "
          f"({res['kb_per_stream_peak']} KB at the peak); target <= {args.max_kb_per_stream:g} KB")
    print(f"  open descriptors per worker at the plateau: {res['fds_per_worker_plateau']}")
    print(f"  gateway CPU {res['gateway_cpu_s']} s over {res['wall_s']} s = {res['gateway_cores']} cores; "
          f"{res['gateway_cpu_ms_per_stream']} ms per stream, {res['gateway_cpu_us_per_token']} us per token")
    print(f"  upstream CPU {res['upstream_cpu_s']} s (late ticks {res['upstream_late_ticks']} of "
          f"{res['upstream_ticks']}, longest tick {res['upstream_max_tick_ms']} ms), reader CPU {reader.get('reader_cpu_s')} s, "
          f"load average up to {res['load1_max']:.1f}")
    print(f"  usage rows {rows['rows']} (expected {expected_rows}: the streams + 2 validation streams), "
          f"ok with all {args.tokens} tokens: {rows['ok_with_all_tokens']}, not ok: {rows['not_ok']}")
    print(f"  target (zero errors, <= {args.max_kb_per_stream:g} KB per stream, a row per stream): "
          f"{'MET' if met else 'NOT MET'}")


def run(args: argparse.Namespace, procs: rb.Processes, tmp: Path) -> int:
    limits = raise_fd_limit(2 * args.streams + 1000)
    loadavg = Path("/proc/loadavg").read_text().strip()
    rb.log(f"open-file limit {limits[0]} (hard {limits[1]}); load average: {loadavg}")
    up_port, upstream = rb.start_fake(procs, tmp, [str(rb.REPO / "bench" / "long_upstream.py"),
                                                   "--interval", str(args.interval), "--tokens", str(args.tokens)],
                                      "long_upstream.log")
    gw = rb.launch_gateway(args, procs, up_port, tmp, admission=True,
                           extra_env={"WORKER_CONNECTIONS": str(args.worker_connections)})
    validation = validate_reader(gw.base_url, gw.key)
    rb.log(f"reader agrees with the openai client on a {validation['reader_tokens']}-token stream")
    sampler = Sampler(gw.proc.pid, upstream.pid, up_port)
    time.sleep(2.0)
    baseline = sampler.sample()
    rb.log(f"baseline: workers RSS {baseline['rss_kb']} KB; opening {args.streams} streams over {args.ramp:g} s")
    sampler.start()
    t_start = sampler.sample()
    _, reader = start_reader(args, procs, gw.base_url, gw.key, tmp, sampler)
    t_end = sampler.sample()
    admin_url, _ = rb.pg_urls(args.pg_url)
    expected_rows = args.streams + 2
    rows = wait_rows(admin_url, expected_rows, args.tokens)
    time.sleep(3.0)
    sampler.stop.set()
    after = sampler.sample()
    res = analyse(args, baseline, sampler.samples, after, t_start, t_end)
    met = (reader["errors"] == 0 and reader["ok"] == args.streams and rows["rows"] == expected_rows
           and rows["ok_with_all_tokens"] == expected_rows - 2
           and res["kb_per_stream_plateau"] is not None and res["kb_per_stream_plateau"] <= args.max_kb_per_stream)
    report(args, res, reader, rows, expected_rows, met)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": {k: v for k, v in vars(args).items()},
        "machine": {"nproc": os.cpu_count(), "loadavg_at_start": loadavg, "fd_limit": limits},
        "validation": validation, "reader": reader, "usage_rows": rows, "expected_rows": expected_rows,
        "result": res, "target_met": met, "baseline": baseline, "after": after, "samples": sampler.samples,
    }, indent=1) + "\n")
    print(f"\nResults written to {RESULTS.relative_to(rb.REPO)}")
    return 0 if met else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return rb.bench_main(args, run, "gateway-long-streams-", logs=("gateway.log", "long_upstream.log", "sse_reader.log"), log_prefix="long_streams_")


if __name__ == "__main__":
    sys.exit(main())
