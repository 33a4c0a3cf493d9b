"""The closed-loop benchmark's ready-to-paste table (bench/run_benchmark.py): with --litellm the
LiteLLM proxy's req/s, p50, added p50, p99 and CPU per request stand beside the gateway's, a
LiteLLM that was not measured in a mode, or completed no request in a run, shows "-" for
its latencies, and without it the table keeps the columns
of bench/README.md's tables."""

from __future__ import annotations

from Testing.bench import load_bench_script


rb = load_bench_script("run_benchmark")


def _wrk(rps: float, p50: float, p99: float, cpu: float | None = None, non_2xx: int = 0,
         requests: int = 1000) -> object:
    return rb.WrkResult(requests=requests, duration_s=1.0, rps=rps, p50_ms=p50, p90_ms=p99, p99_ms=p99,
                        mean_ms=p50, max_ms=p99, non_2xx=non_2xx, socket_errors={}, statuses={},
                        error_sample="", cpu_ms_per_req=cpu)


def test_litellm_columns_stand_beside_the_gateways() -> None:
    """Each measured target's req/s, p50, p50 minus direct p50, p99 and CPU per request; a run
    that completed nothing (LiteLLM's slow streams within a short run) has no latencies."""
    rows = [rb.Row("nonstream", 16, _wrk(20000, 0.65, 2.0, 0.07), _wrk(1500, 9.75, 50.0, 1.0),
                   litellm=_wrk(200, 80.4, 250.0, 9.5)),
            rb.Row("messages", 16, _wrk(20000, 0.65, 2.0), _wrk(1400, 10.5, 52.0, 1.1)),
            rb.Row("stream", 64, _wrk(3500, 17.0, 54.0), _wrk(170, 323.0, 702.0, 2.7),
                   litellm=_wrk(0, 0.0, 0.0, requests=0))]
    assert rb.markdown_table(rows).splitlines() == [
        "| mode | conns | direct req/s | gateway req/s | LiteLLM req/s | direct p50 | gateway p50 "
        "| LiteLLM p50 | added p50 gateway | added p50 LiteLLM | gateway p99 | LiteLLM p99 "
        "| gateway CPU/req | LiteLLM CPU/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| non-streaming | 16 | 20000 | 1500 | 200 | 0.65 ms | 9.75 ms | 80.4 ms | +9.10 ms "
        "| +79.8 ms | 50.0 ms | 250 ms | 1.00 ms | 9.50 ms |",
        "| messages | 16 | 20000 | 1400 | - | 0.65 ms | 10.5 ms | - | +9.85 ms | - | 52.0 ms | - "
        "| 1.10 ms | - |",
        "| streaming (20 chunks) | 64 | 3500 | 170 | 0 | 17.0 ms | 323 ms | - | +306 ms | - | 702 ms "
        "| - | 2.70 ms | - |",
    ]


def test_without_litellm_the_table_keeps_its_columns_and_errors_show() -> None:
    """No LiteLLM run: bench/README.md's columns; a run with errors adds the errors column."""
    rows = [rb.Row("stream", 1, _wrk(4000, 0.23, 0.5), _wrk(500, 1.88, 4.17, 1.88, non_2xx=3))]
    assert rb.markdown_table(rows).splitlines() == [
        "| mode | conns | direct req/s | gateway req/s | direct p50 | gateway p50 | added p50 "
        "| gateway p99 | gateway CPU/req | errors d/g |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| streaming (20 chunks) | 1 | 4000 | 500 | 0.23 ms | 1.88 ms | +1.65 ms | 4.17 ms "
        "| 1.88 ms | 0/3 |",
    ]
