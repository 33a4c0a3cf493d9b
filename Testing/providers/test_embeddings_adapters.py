"""The `embed` call of each adapter that serves embedding models, against its real HTTP fake:
the wire request (path, key header, body translation, dimensions), the OpenAI-shaped answer
(vectors in input order) and the usage the upstream reported (None when it reports none)."""
from __future__ import annotations

import pytest

from Testing.fakes.native import provider_settings
from Testing.support import UPSTREAM_KEY
from app.providers.base import ProviderBadRequest, ProviderNotFound, ProviderRateLimited, ProviderUnavailable
from app.providers.gemini import GeminiProvider
from app.providers.ollama import OllamaProvider
from app.providers.simulator import SimulatorProvider
from app.utils.vectors import from_base64

pytestmark = pytest.mark.timeout(30)
TEXTS = ["hello embedding world", "second input"]


def test_openai_compatible_posts_the_request_as_it_is(openai_provider, fake_upstream):
    """POST {base}/embeddings with the Bearer key; token arrays, dimensions, encoding_format and
    user reach the upstream unchanged; the answer and its usage come back as sent."""
    result = openai_provider.embed({"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]],
                                    "dimensions": 3, "encoding_format": "float", "user": "u-1"})
    [sent] = fake_upstream.requests()
    assert sent["path"] == "/v1/embeddings"
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent["body"] == {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]], "dimensions": 3,
                            "encoding_format": "float", "user": "u-1"}
    assert [d["embedding"] for d in result.body["data"]] == [[3.0, 0.5, -0.25], [2.0, 1.5, -0.25]]
    assert result.usage == {"prompt_tokens": 12, "total_tokens": 12}  # 5 ids + 7


def test_openai_compatible_base64_answer_is_kept(openai_provider):
    """An upstream asked for base64 answers base64 float32; the adapter passes it on."""
    result = openai_provider.embed({"model": "m", "input": ["one two"], "encoding_format": "base64"})
    vector = result.body["data"][0]["embedding"]
    assert isinstance(vector, str) and from_base64(vector) == [2.0, 0.5, -0.25, 0.125]


def test_openai_compatible_errors_are_classified(openai_provider):
    with pytest.raises(ProviderRateLimited):
        openai_provider.embed({"model": "fake-fail-429", "input": ["x"]})
    with pytest.raises(ProviderBadRequest):
        openai_provider.embed({"model": "m", "input": ["x"], "dimensions": -1})


def test_gemini_batch_embed_contents(fake_gemini):
    """One EmbedContentRequest per input on models/{model}:batchEmbedContents, the key in
    x-goog-api-key, dimensions as outputDimensionality; no usage in the documented answer."""
    fake_gemini.reset()
    prov = GeminiProvider("gemini", provider_settings("gemini", fake_gemini), {})
    try:
        result = prov.embed({"model": "gemini-embedding-001", "input": TEXTS, "dimensions": 3})
    finally:
        prov.close()
    [sent] = fake_gemini.requests()
    assert sent["path"] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert sent["headers"]["x-goog-api-key"] == UPSTREAM_KEY and "key" not in sent["query"]
    assert sent["body"] == {"requests": [
        {"model": "models/gemini-embedding-001", "outputDimensionality": 3,
         "content": {"parts": [{"text": "hello embedding world"}]}},
        {"model": "models/gemini-embedding-001", "outputDimensionality": 3,
         "content": {"parts": [{"text": "second input"}]}}]}
    assert result.body["data"] == [{"object": "embedding", "index": 0, "embedding": [3.0, 0.5, -0.25]},
                                   {"object": "embedding", "index": 1, "embedding": [2.0, 1.5, -0.25]}]
    assert result.usage is None


def test_gemini_usage_metadata_when_reported(fake_gemini):
    prov = GeminiProvider("gemini", provider_settings("gemini", fake_gemini), {})
    try:
        result = prov.embed({"model": "embed-usage", "input": TEXTS})
    finally:
        prov.close()
    assert result.usage == {"prompt_tokens": 12, "total_tokens": 12}  # 5 words + 7


def test_gemini_errors(fake_gemini):
    prov = GeminiProvider("gemini", provider_settings("gemini", fake_gemini), {})
    try:
        with pytest.raises(ProviderRateLimited):
            prov.embed({"model": "embed-fail-429", "input": ["x"]})
        with pytest.raises(ProviderNotFound):
            prov.embed({"model": "embed-not-found", "input": ["x"]})
    finally:
        prov.close()


def test_ollama_api_embed(fake_ollama):
    """POST /api/embed with every input and dimensions; prompt_eval_count is the usage."""
    fake_ollama.reset()
    prov = OllamaProvider("ollama", provider_settings("ollama", fake_ollama), {})
    try:
        result = prov.embed({"model": "nomic-embed-text", "input": TEXTS, "dimensions": 2})
        with pytest.raises(ProviderNotFound, match="ollama pull"):
            prov.embed({"model": "embed-not-found", "input": ["x"]})
    finally:
        prov.close()
    sent = fake_ollama.requests()[0]
    assert sent["path"] == "/api/embed"
    assert sent["body"] == {"model": "nomic-embed-text", "input": TEXTS, "dimensions": 2}
    assert [d["embedding"] for d in result.body["data"]] == [[3.0, 0.5], [2.0, 1.5]]
    assert result.usage == {"prompt_tokens": 12, "total_tokens": 12}


def test_malformed_answers_are_upstream_failures(fake_ollama, fake_gemini):
    """An answer with fewer vectors than inputs, or no JSON at all, is the upstream's failure
    (502 upstream_malformed), not an exception of ours."""
    ollama = OllamaProvider("ollama", provider_settings("ollama", fake_ollama), {})
    gemini = GeminiProvider("gemini", provider_settings("gemini", fake_gemini), {})
    try:
        with pytest.raises(ProviderUnavailable) as short:
            ollama.embed({"model": "embed-malformed", "input": TEXTS})
        with pytest.raises(ProviderUnavailable) as html:
            gemini.embed({"model": "embed-malformed", "input": TEXTS})
    finally:
        ollama.close()
        gemini.close()
    assert short.value.code == html.value.code == "upstream_malformed"


def test_simulator_vectors_are_deterministic_unit_vectors():
    """Same text, same vector; `dimensions` wide; length 1; usage = tiktoken tokens of the
    texts (token arrays: their length)."""
    sim = SimulatorProvider("simulator", {"latency_ms": 0}, {})
    a = sim.embed({"model": "demo-embed", "input": ["hello", [1, 2, 3]], "dimensions": 8})
    b = sim.embed({"model": "demo-embed", "input": ["hello"], "dimensions": 8})
    va = a.body["data"][0]["embedding"]
    assert va == b.body["data"][0]["embedding"] and len(va) == 8
    assert abs(sum(v * v for v in va) - 1.0) < 1e-4
    assert a.body["data"][1]["embedding"] != va
    assert a.usage == {"prompt_tokens": 4, "total_tokens": 4}  # "hello" is 1 token + 3 ids
    assert len(sim.embed({"model": "d", "input": ["x"]}).body["data"][0]["embedding"]) == 64
