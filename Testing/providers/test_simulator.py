"""SimulatorProvider: deterministic offline answers, real token counts, OpenAI-shaped streams,
and the configured latency / throughput."""
from __future__ import annotations

import json
import threading
import time

import pytest

from app.providers.base import Completion, StreamPiece
from app.providers.simulator import DEFAULT_OUTPUT_TOKENS, SimulatorProvider

pytestmark = pytest.mark.timeout(30)

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the gateway simulator, please."}]


def sim(**settings) -> SimulatorProvider:
    return SimulatorProvider("simulator", {"type": "simulator", "latency_ms": 0, "tokens_per_s": 0,
                                           **settings}, {})


def request(**extra) -> dict:
    return {"model": "demo", "messages": [dict(m) for m in MESSAGES], **extra}


def content_of(completion: Completion) -> str:
    return completion.body["choices"][0]["message"]["content"]


def stream_chunks(pieces: list[StreamPiece]) -> list[dict]:
    return [json.loads(p.data()) for p in pieces]


def test_same_request_gives_same_text():
    """The same request always gets the same text (also from a fresh provider instance)."""
    a = content_of(sim().complete(request()))
    b = content_of(sim().complete(request()))
    assert a == b and a.startswith("Simulated")


def test_different_prompts_give_different_text():
    """The text depends on the prompt (not one canned answer for everything)."""
    a = content_of(sim().complete(request()))
    other = request()
    other["messages"][-1]["content"] = "Something entirely different"
    assert content_of(sim().complete(other)) != a


def test_stream_text_equals_complete_text():
    """Streaming and non-streaming answers to the same request carry the same text."""
    chunks = stream_chunks(list(sim().stream(request(max_tokens=10))))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == content_of(sim().complete(request(max_tokens=10)))


def test_default_output_is_default_tokens_and_stops():
    """Without a cap the answer has the default number of words and finish_reason 'stop'."""
    result = sim().complete(request())
    assert len(content_of(result).split()) == DEFAULT_OUTPUT_TOKENS
    assert result.body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_caps_output_with_length(field):
    """max_tokens / max_completion_tokens cap the output and give finish_reason 'length'."""
    result = sim().complete(request(**{field: 5}))
    assert len(content_of(result).split()) == 5
    assert result.usage["completion_tokens"] == 5
    assert result.body["choices"][0]["finish_reason"] == "length"


def test_cap_above_natural_length_stops():
    """A cap larger than the natural answer does not lengthen it and finishes with 'stop'."""
    result = sim(output_tokens=6).complete(request(max_tokens=50))
    assert len(content_of(result).split()) == 6
    assert result.body["choices"][0]["finish_reason"] == "stop"


def test_usage_is_tiktoken_prompt_and_word_count_completion():
    """usage.prompt_tokens is the tiktoken count of the messages (24 with o200k_base);
    completion_tokens is the number of words."""
    req = request(max_tokens=12)
    result = sim().complete(req)
    words = len(content_of(result).split())
    assert words == 12
    assert result.usage == {"prompt_tokens": 24, "completion_tokens": 12, "total_tokens": 36}
    assert result.body["usage"] == result.usage
    assert result.body["object"] == "chat.completion" and result.body["model"] == "demo"


def test_stream_shape_role_content_finish_usage():
    """A stream is a role chunk, one chunk per word, a finish chunk and a usage_only piece."""
    pieces = list(sim().stream(request(max_tokens=4)))
    assert all(isinstance(p, StreamPiece) for p in pieces)
    chunks = stream_chunks(pieces)
    assert len(pieces) == 1 + 4 + 1 + 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    for c in chunks[1:5]:
        assert c["choices"][0]["delta"]["content"].strip()
        assert c["choices"][0]["finish_reason"] is None
    assert chunks[5]["choices"][0]["delta"] == {}
    assert chunks[5]["choices"][0]["finish_reason"] == "length"
    last = pieces[-1]
    assert last.usage_only is True and chunks[-1]["choices"] == []
    assert last.usage == {"prompt_tokens": 24, "completion_tokens": 4, "total_tokens": 28}
    assert chunks[-1]["usage"] == last.usage
    assert not any(p.usage_only or p.usage for p in pieces[:-1])


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The waits the simulator asks for on this thread (it still really waits): its pacing is
    checked by what it asks, not by timing a busy machine."""
    calls: list[float] = []
    real_sleep, me = time.sleep, threading.get_ident()

    def recording(seconds: float) -> None:
        if threading.get_ident() == me:
            calls.append(seconds)
        real_sleep(seconds)
    monkeypatch.setattr(time, "sleep", recording)
    return calls


def test_latency_delays_the_first_piece(sleeps):
    """latency_ms=100 waits 100 ms before the first stream piece, and only then."""
    stream = sim(latency_ms=100).stream(request(max_tokens=2))
    assert sleeps == []  # nothing before the stream is read
    next(stream)
    assert sleeps == [pytest.approx(0.1)]


def test_tokens_per_s_paces_the_stream(sleeps):
    """tokens_per_s=50 waits 20 ms before each of the 5 content pieces."""
    stream = sim(tokens_per_s=50).stream(request(max_tokens=5))
    next(stream)  # role chunk, no latency
    assert sleeps == [0]
    rest = list(stream)
    assert len(rest) == 5 + 2
    assert sleeps[1:] == [pytest.approx(0.02)] * 5


def test_complete_waits_latency_plus_generation_time(sleeps):
    """complete() waits latency + words / tokens_per_s (100 ms + 5/50 s = 0.2 s), once."""
    sim(latency_ms=100, tokens_per_s=50).complete(request(max_tokens=5))
    assert sleeps == [pytest.approx(0.2)]


def test_zero_latency_does_not_wait(sleeps):
    """latency_ms=0 and tokens_per_s=0 answer without waiting."""
    sim().complete(request())
    list(sim().stream(request()))
    assert sleeps and all(s == 0 for s in sleeps)


@pytest.mark.parametrize("settings", [{"latency_ms": -1}, {"tokens_per_s": "fast"},
                                      {"output_tokens": True}])
def test_validate_settings_rejects_bad_values(settings):
    """Negative, non-numeric and boolean settings are rejected, naming the field."""
    with pytest.raises(ValueError) as info:
        SimulatorProvider.validate_settings("sim", {"type": "simulator", **settings})
    assert f"providers.sim.{next(iter(settings))}" in str(info.value)
