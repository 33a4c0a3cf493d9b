"""Embeddings and images through each native provider type (Gemini batchEmbedContents, Ollama
/api/embed, Pollinations' image API) behind the real gunicorn + gevent gateway, driven by the
openai client: the answer, and a usage row whose tokens equal what the upstream reported
(the gateway's tiktoken count where the upstream reports none), with the endpoint and cost."""
from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import openai
import pytest

from Testing.conftest import gateway_process, wait_for_rows
from Testing.fakes.fake_pollinations import image_for_seed
from Testing.fakes.native import fake_gemini, fake_ollama, fake_pollinations, provider_settings  # noqa: F401
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json

pytestmark = pytest.mark.timeout(60)
TEXTS = ["hello embedding world", "two words"]
VECTORS = [[3.0, 0.5, -0.25, 0.125], [2.0, 1.5, -0.25, 0.125]]  # Testing/fakes/fake_media.py
EMBED_PRICE = {"input_per_mtok": "1.00"}


def _model(kind: str, provider: str, upstream: str, pricing: dict) -> dict:
    return {"kind": kind, "deployments": [{"provider": provider, "model": upstream}], "pricing": pricing}


@pytest.fixture(scope="module")
def media_models_file(tmp_path_factory, fake_gemini, fake_ollama, fake_pollinations) -> Path:  # noqa: F811
    providers = {"gemini": provider_settings("gemini", fake_gemini), "ollama": provider_settings("ollama", fake_ollama),
                 "pollinations": provider_settings("pollinations", fake_pollinations)}
    models = {
        "gemini-embed": _model("embedding", "gemini", "gemini-embedding-001", EMBED_PRICE),
        "gemini-embed-usage": _model("embedding", "gemini", "embed-usage", EMBED_PRICE),
        "ollama-embed": _model("embedding", "ollama", "nomic-embed-text", EMBED_PRICE),
        "flux": _model("image", "pollinations", "flux", {"per_image": "0.02"}),
        "flux-broken": _model("image", "pollinations", "fail-500", {"per_image": "0.02"}),
    }
    path = tmp_path_factory.mktemp("media") / "models.json"
    path.write_text(json.dumps({"providers": providers, "models": models}, indent=2))
    return path


@pytest.fixture(scope="module")
def media_gateway(pg_url, media_models_file, tmp_path_factory) -> Iterator[GatewayProcess]:
    yield from gateway_process(pg_url, media_models_file, tmp_path_factory.mktemp("media-gateway"))


@pytest.fixture(scope="module")
def key(media_gateway) -> dict:
    since = datetime.now(timezone.utc)
    status, _, body = http_json("POST", media_gateway.base_url + "/v1/api-keys",
                                {"name": "media-providers", "tenant": "media-providers"},
                                {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return {**body, "since": since}


@pytest.fixture(scope="module")
def client(media_gateway, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=media_gateway.base_url + "/v1", max_retries=0, timeout=30)


def row_for(engine, key: dict, request_id: str) -> dict:
    [row] = wait_for_rows(engine, 1, "api_key_id = :k AND request_id = :r", {"k": key["id"], "r": request_id})
    return row


@pytest.mark.parametrize("model,tokens,provider", [
    ("gemini-embed", 5, "gemini"),         # Gemini reports no usage: tiktoken's count of the texts
    ("gemini-embed-usage", 12, "gemini"),  # usageMetadata.promptTokenCount: 5 words + 7
    ("ollama-embed", 12, "ollama"),        # prompt_eval_count: 5 words + 7
])
@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_per_provider_and_usage_row(client, key, pg_engine, model, tokens, provider, encoding):
    raw = client.embeddings.with_raw_response.create(model=model, input=TEXTS, encoding_format=encoding)
    result = raw.parse()
    vectors = [d.embedding for d in result.data]
    if encoding == "base64":
        vectors = [list(memoryview(base64.b64decode(v)).cast("f")) for v in vectors]
    assert vectors == VECTORS
    assert result.usage.prompt_tokens == tokens
    row = row_for(pg_engine, key, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["endpoint"], row["provider"], row["status"]) == (
        tokens, 0, "embeddings", provider, "ok")
    assert row["cost_usd"] == Decimal(tokens) / 1_000_000


def test_dimensions_reach_gemini_and_ollama(client, fake_gemini, fake_ollama):  # noqa: F811
    fake_gemini.reset()
    fake_ollama.reset()
    assert len(client.embeddings.create(model="gemini-embed", input="a b", dimensions=2).data[0].embedding) == 2
    assert len(client.embeddings.create(model="ollama-embed", input="a b", dimensions=3).data[0].embedding) == 3
    assert fake_gemini.requests()[0]["body"]["requests"][0]["outputDimensionality"] == 2
    assert fake_ollama.requests()[0]["body"]["dimensions"] == 3


def test_token_arrays_are_decoded_for_text_only_providers(client, fake_ollama):  # noqa: F811
    """Ollama takes text only: token ids are decoded with the model's tokenizer before the call."""
    fake_ollama.reset()
    client.embeddings.create(model="ollama-embed", input=[[24912, 2375]])  # "hello world" in o200k_base
    assert fake_ollama.requests()[0]["body"]["input"] == ["hello world"]


def test_pollinations_images_and_row(client, key, pg_engine, fake_pollinations):  # noqa: F811
    """One GET per image; b64_json carries Pollinations' bytes; the row bills 2 x $0.02."""
    raw = client.images.with_raw_response.generate(model="flux", prompt="a red fox", n=2, size="512x512",
                                                   response_format="b64_json", extra_body={"seed": 9})
    images = raw.parse()
    assert [base64.b64decode(i.b64_json) for i in images.data] == [image_for_seed(9), image_for_seed(10)]
    row = row_for(pg_engine, key, raw.headers["x-request-id"])
    assert (row["endpoint"], row["provider"], row["upstream_model"], row["cost_usd"]) == (
        "images", "pollinations", "flux", Decimal("0.04"))


def test_failed_image_generation_costs_nothing(media_gateway, key, pg_engine):
    """The upstream fails: a 502 envelope, and a row with status error that bills nothing."""
    status, headers, body = http_json("POST", media_gateway.base_url + "/v1/images/generations",
                                      {"model": "flux-broken", "prompt": "a fox"},
                                      {"Authorization": f"Bearer {key['key']}"})
    assert status == 502 and body["error"]["code"] == "upstream_error"
    row = row_for(pg_engine, key, {k.lower(): v for k, v in headers.items()}["x-request-id"])
    assert (row["status"], row["cost_usd"], row["endpoint"]) == ("error", Decimal(0), "images")
