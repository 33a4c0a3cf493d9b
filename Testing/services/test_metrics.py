"""The metrics' label bounding and their summary, in process (no server): a label never takes
client input or unbounded values, and the JSON summary's rates come from the samples."""
from __future__ import annotations

from types import SimpleNamespace

from app.services.metrics import MAX_LABEL_LENGTH, GatewayMetrics, LabelBound
from app.services.metrics_summary import summary


def test_label_values_are_bounded_in_number():
    """Past its limit of distinct values a label says "other"; values seen before keep their name."""
    bound = LabelBound(limit=3)
    assert [bound(v) for v in ("a", "b", "c", "d", "e", "a")] == ["a", "b", "c", "other", "other", "a"]


def test_unsafe_or_long_label_values_are_invalid():
    """A value with quotes, newlines, tabs, braces, commas or non-ASCII text, or longer than
    MAX_LABEL_LENGTH, is "invalid" (and takes no place among the distinct values)."""
    bound = LabelBound(limit=3)
    for bad in ("tab\there", "a,b", 'quo"te', "new\nline", "br{ace}", "\u00e9t\u00e9", "x" * (MAX_LABEL_LENGTH + 1)):
        assert bound(bad) == "invalid"
    assert bound("openai/gpt-4o-mini") == "openai/gpt-4o-mini"
    assert bound("demo-model_v1.2:latest") == "demo-model_v1.2:latest"
    assert bound("gpt4all/Llama 3 8B Instruct") == "gpt4all/Llama 3 8B Instruct"
    assert bound(None) == "" and bound("") == ""


def _trace(alias: str, status: str = "ok") -> SimpleNamespace:
    return SimpleNamespace(
        request_id="req_1", endpoint="chat.completions", status=status, streamed=False, error_type=None, refusal=None,
        entry=SimpleNamespace(alias=alias), deployment=SimpleNamespace(provider="openai", model="m"),
        key=SimpleNamespace(id=7, tenant_id=3), started=0.0, first_byte_at=None, attempts=1,
        deployments_tried=1, cache=None, saved_cost=None)


def test_model_labels_beyond_the_bound_fold_into_other():
    """Runs of more distinct models than a label may take are still all counted: the excess
    under model="other"."""
    metrics = GatewayMetrics(mp_dir="")
    metrics._bound["model"] = LabelBound(limit=2)
    for alias in ("m1", "m2", "m3", "m4"):
        metrics.observe_run(_trace(alias), None)
    metrics.flush()
    by_model = {s.labels["model"]: s.value for f in metrics.requests.collect() for s in f.samples}
    assert by_model == {"m1": 1.0, "m2": 1.0, "other": 2.0}


def test_tenant_and_key_ids_only_when_enabled():
    """Tokens and cost carry tenant_id / api_key_id only when the settings ask for them."""
    plain = GatewayMetrics(mp_dir="")
    with_ids = GatewayMetrics(mp_dir="", tenant_labels=True, key_labels=True)
    event = SimpleNamespace(prompt_tokens=5, completion_tokens=7, cost_usd=1)
    plain.observe_run(_trace("m"), event)
    with_ids.observe_run(_trace("m"), event)
    plain.flush(), with_ids.flush()
    assert {s.labels.get("tenant_id") for f in plain.tokens.collect() for s in f.samples} == {None}
    labels = [s.labels for f in with_ids.tokens.collect() for s in f.samples]
    assert {(ls["tenant_id"], ls["api_key_id"], ls["token_type"]) for ls in labels} == {
        ("3", "7", "input"), ("3", "7", "output")}


def test_summary_rates_use_the_sample_a_minute_old():
    """The last minute's figures are the difference with the newest sample at least 60 s old;
    with no sample that old, with the oldest (its age is the window)."""
    metrics = GatewayMetrics(mp_dir="")
    metrics.record_sample(now=1000.0)
    metrics.observe_run(_trace("m"), None)
    metrics.record_sample(now=1030.0)
    metrics.observe_run(_trace("m"), None)
    metrics.observe_run(_trace("m", status="error"), None)
    body = summary(metrics, now=1050.0)
    assert body["totals"]["requests"] == 3 and body["totals"]["errors"] == 1
    assert body["last_minute"]["window_s"] == 50.0 and body["last_minute"]["requests"] == 3
    body = summary(metrics, now=1095.0)
    assert body["last_minute"]["window_s"] == 65.0 and body["last_minute"]["requests"] == 2


def test_observations_wait_in_memory_until_flushed():
    """An observation is a pending amount until `flush()` (the ticker's, every FLUSH_S, or a
    read of the figures): then each value holds exactly what was observed, once."""
    metrics = GatewayMetrics(mp_dir="")
    for _ in range(3):
        metrics.observe_run(_trace("m"), None)
    assert sum(s.value for f in metrics.requests.collect() for s in f.samples) == 0
    metrics.flush()
    metrics.flush()
    assert sum(s.value for f in metrics.requests.collect() for s in f.samples) == 3
    assert [s.value for f in metrics.duration.collect() for s in f.samples if s.name.endswith("_count")] == [3]


def test_runs_without_a_provider_count_in_the_totals_and_their_model_only():
    """A run that reached no provider (a cache hit, a refusal before routing) has an empty
    provider label: the summary counts it in the totals and under its model, and lists no
    provider for it (it once broke the whole summary, and with it the ticker's samples)."""
    metrics = GatewayMetrics(mp_dir="")
    hit = _trace("m")
    hit.deployment, hit.cache = None, "hit"
    metrics.observe_run(hit, None)
    metrics.observe_run(_trace("m"), None)
    metrics.record_sample(now=1000.0)
    body = summary(metrics, now=1010.0)
    assert body["totals"]["requests"] == 2
    assert [(m["name"], m["requests"]) for m in body["models"]] == [("m", 2)]
    assert [(p["name"], p["requests"]) for p in body["providers"]] == [("openai", 1)]
    assert len(metrics.history) == 1
