"""Embeddings, image generation, model retrieval and the short paths through the real gunicorn
+ gevent gateway, driven by the official openai client, against the fake OpenAI upstream and
the simulator (models of Testing/support.py media_models), billed in PostgreSQL."""
from __future__ import annotations

import base64
import struct
from datetime import datetime, timezone
from decimal import Decimal

import openai
import pytest

from Testing.conftest import key_rows
from Testing.fakes.fake_media import IMAGE_TOKENS, image_bytes
from Testing.support import SYSTEM_SECRET, http_json

pytestmark = pytest.mark.timeout(60)
TEXT = "hello embedding world"           # 3 words: the fake's vector starts with 3.0
VECTOR = [3.0, 0.5, -0.25, 0.125]         # fake_media.fake_vector(0, TEXT)
FAKE_PROMPT_TOKENS = 10                   # 3 words + 7, as the fake reports


def mint(gateway, **fields) -> dict:
    since = datetime.now(timezone.utc)
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys",
                                {"name": "media", "tenant": "media-tenant", **fields},
                                {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return {**body, "since": since}


@pytest.fixture
def key(gateway, clean_db) -> dict:
    return mint(gateway)


@pytest.fixture
def client(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=gateway.base_url + "/v1", max_retries=0, timeout=30)


def floats32(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# -- embeddings ----------------------------------------------------------------------------------

def test_embeddings_as_floats_and_exact_usage_row(client, key, clean_db, fake_upstream):
    """encoding_format float: the upstream's vectors as floats, in input order; the usage row
    holds the upstream's prompt tokens, no completion tokens, endpoint embeddings, priced."""
    fake_upstream.reset()
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=[TEXT, "two words"],
                                                     encoding_format="float")
    result = raw.parse()
    assert [d.embedding for d in result.data] == [VECTOR, [2.0, 1.5, -0.25, 0.125]]
    assert [d.index for d in result.data] == [0, 1] and result.model == "text-embedding-3-small"
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (12, 12)  # 5 words + 7
    [row] = key_rows(clean_db, key, 1)
    assert row["request_id"] == raw.headers["x-request-id"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (12, 0, 12)
    assert (row["endpoint"], row["status"], row["provider"], row["upstream_model"]) == (
        "embeddings", "ok", "openai", "text-embedding-3-small")
    assert row["cost_usd"] == Decimal("0.02") * 12 / 1_000_000
    [sent] = [r for r in fake_upstream.requests() if r["path"] == "/v1/embeddings"]
    assert sent["body"]["input"] == [TEXT, "two words"] and sent["body"]["encoding_format"] == "float"


def test_sdk_default_is_base64_decoded_to_the_same_floats(client):
    """The openai SDK asks for base64 by default and decodes it: the same literal vector."""
    result = client.embeddings.create(model="text-embedding-3-small", input=TEXT)
    assert result.data[0].embedding == VECTOR


def test_base64_float32_little_endian(client):
    """encoding_format base64: the vector as base64 of little-endian float32, as OpenAI sends it."""
    result = client.embeddings.create(model="text-embedding-3-small", input=TEXT, encoding_format="base64")
    assert isinstance(result.data[0].embedding, str)
    assert floats32(result.data[0].embedding) == VECTOR


def test_base64_made_by_the_gateway_for_float_only_providers(client):
    """A provider that answers floats (the simulator) is encoded to base64 by the gateway; the
    same vector both ways."""
    as_floats = client.embeddings.create(model="demo-embed", input=TEXT, encoding_format="float", dimensions=8)
    as_b64 = client.embeddings.create(model="demo-embed", input=TEXT, encoding_format="base64", dimensions=8)
    assert len(as_floats.data[0].embedding) == 8
    assert floats32(as_b64.data[0].embedding) == pytest.approx(as_floats.data[0].embedding, abs=1e-6)


def test_dimensions_user_and_token_arrays_are_passed_on(client, fake_upstream):
    """dimensions, user and token-array input reach the OpenAI-compatible upstream as sent."""
    fake_upstream.reset()
    result = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]], dimensions=2,
                                      user="user-7", encoding_format="float")
    assert [d.embedding for d in result.data] == [[3.0, 0.5], [2.0, 1.5]]
    [sent] = [r for r in fake_upstream.requests() if r["path"] == "/v1/embeddings"]
    assert sent["body"] == {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]], "user": "user-7",
                            "dimensions": 2, "encoding_format": "float"}
    single = client.embeddings.create(model="text-embedding-3-small", input=[7, 8, 9, 10], encoding_format="float")
    assert single.data[0].embedding == [4.0, 0.5, -0.25, 0.125]


def test_without_upstream_usage_the_gateway_counts(client, key, clean_db):
    """An upstream that reports no usage: prompt tokens are tiktoken's count of the input."""
    result = client.embeddings.create(model="embed-no-usage", input=TEXT, encoding_format="float")
    assert result.usage.prompt_tokens == 3  # "hello embedding world" in cl100k_base
    [row] = key_rows(clean_db, key, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 0)


def test_embeddings_fall_back_like_completions(client, key, clean_db):
    """A failing embedding deployment falls back to the alias's fallback model; one row, naming
    the model that answered."""
    result = client.embeddings.create(model="embed-fallback", input=TEXT, encoding_format="float")
    assert result.data[0].embedding == VECTOR
    [row] = key_rows(clean_db, key, 1)
    assert (row["model"], row["upstream_model"], row["prompt_tokens"]) == (
        "text-embedding-3-small", "text-embedding-3-small", FAKE_PROMPT_TOKENS)


def test_wrong_kind_is_a_400_on_model(client):
    """A chat model on /embeddings, an embedding model on /chat/completions, a chat model on
    /images: 400 invalid_request_error with param model (the SDK's BadRequestError)."""
    with pytest.raises(openai.BadRequestError) as chat_on_embed:
        client.embeddings.create(model="gpt-4o-mini", input=TEXT)
    with pytest.raises(openai.BadRequestError) as embed_on_chat:
        client.chat.completions.create(model="text-embedding-3-small", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as chat_on_images:
        client.images.generate(model="demo", prompt="a fox")
    for err in (chat_on_embed, embed_on_chat, chat_on_images):
        assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_supported"
    assert "is a chat model" in chat_on_embed.value.body["message"]
    assert "is an embedding model" in embed_on_chat.value.body["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": "text-embedding-3-small"}, "input"),
    ({"model": "text-embedding-3-small", "input": ""}, "input"),
    ({"model": "text-embedding-3-small", "input": []}, "input"),
    ({"model": "text-embedding-3-small", "input": ["a", 1]}, "input"),
    ({"model": "text-embedding-3-small", "input": [[1, -2]]}, "input"),
    ({"model": "text-embedding-3-small", "input": [[99999999]]}, "input"),
    ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "text-embedding-3-small", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "text-embedding-3-small", "input": "x", "dimensions": True}, "dimensions"),
    ({"input": "x"}, "model"),
])
def test_bad_embedding_requests_are_400_envelopes(gateway, key, body, param):
    status, _, answer = http_json("POST", gateway.base_url + "/v1/embeddings", body,
                                  {"Authorization": f"Bearer {key['key']}"})
    assert status == 400 and answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"


def test_admission_counts_the_input(gateway, clean_db):
    """A key whose tokens-per-minute limit is below the input's token count is refused before
    any upstream call (the input is what embeddings reserve)."""
    small = mint(gateway, tpm_limit=5)
    client = openai.OpenAI(api_key=small["key"], base_url=gateway.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="one two three four five six seven eight")
    assert err.value.body["code"] == "request_too_large_for_limit" and err.value.body["param"] == "input"
    assert "This request reserves 8 tokens (the input)" in err.value.body["message"]
    assert client.embeddings.create(model="text-embedding-3-small", input="hi", encoding_format="float").data


# -- images -----------------------------------------------------------------------------------

def test_images_url_and_per_image_billing(client, key, clean_db, fake_upstream):
    """response_format url (the default): the upstream's URLs; the row bills n x the model's
    price for that size, endpoint images."""
    raw = client.images.with_raw_response.generate(model="dall-e-3", prompt="a red fox", n=2, size="1792x1024")
    images = raw.parse()
    assert [i.url.rsplit("/", 1)[-1] for i in images.data] == ["0.png", "1.png"]
    [row] = key_rows(clean_db, key, 1)
    assert (row["endpoint"], row["status"], row["model"], row["request_id"]) == (
        "images", "ok", "dall-e-3", raw.headers["x-request-id"])
    assert row["cost_usd"] == Decimal("0.16")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 0)  # "a red fox": tiktoken, no usage reported


def test_images_b64_json(client):
    images = client.images.generate(model="dall-e-3", prompt="a red fox", response_format="b64_json")
    assert base64.b64decode(images.data[0].b64_json) == image_bytes(0)


def test_gpt_image_tokens_are_the_upstreams(client, key, clean_db):
    """A gpt-image model reports input/output tokens: the row holds them and prices them on top
    of the per-image price."""
    client.images.generate(model="gpt-image-1", prompt="a red fox")
    [row] = key_rows(clean_db, key, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (FAKE_PROMPT_TOKENS, IMAGE_TOKENS)
    assert row["cost_usd"] == (Decimal("5") * 10 + Decimal("40") * 100) / 1_000_000 + Decimal("0.01")


def test_simulator_images_offline(client):
    """demo-image (the simulator) answers a real PNG, as b64_json or a data: URL."""
    images = client.images.generate(model="demo-image", prompt="a red fox", size="64x32", n=2,
                                    response_format="b64_json")
    png = base64.b64decode(images.data[1].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(images.data) == 2
    assert client.images.generate(model="demo-image", prompt="fox", size="8x8").data[0].url.startswith(
        "data:image/png;base64,")


def test_image_budget_refusal(gateway, clean_db):
    """Admission reserves n x the image price: a budget of $0.10 admits two $0.04 images, refuses
    three (429 insufficient_quota, the SDK's RateLimitError) before any upstream call."""
    poor = mint(gateway, budget_usd="0.10")
    client = openai.OpenAI(api_key=poor["key"], base_url=gateway.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.images.generate(model="dall-e-3", prompt="a fox", n=3)
    assert err.value.body["code"] == "insufficient_quota"
    assert len(client.images.generate(model="dall-e-3", prompt="a fox", n=2).data) == 2
    assert key_rows(clean_db, poor, 1)[0]["cost_usd"] == Decimal("0.08")


@pytest.mark.parametrize("body,param", [
    ({"model": "dall-e-3"}, "prompt"),
    ({"model": "dall-e-3", "prompt": "x", "n": 0}, "n"),
    ({"model": "dall-e-3", "prompt": "x", "n": 11}, "n"),
    ({"model": "dall-e-3", "prompt": "x", "size": "big"}, "size"),
    ({"model": "dall-e-3", "prompt": "x", "response_format": "png"}, "response_format"),
    ({"prompt": "x"}, "model"),
])
def test_bad_image_requests_are_400_envelopes(gateway, key, body, param):
    status, _, answer = http_json("POST", gateway.base_url + "/v1/images/generations", body,
                                  {"Authorization": f"Bearer {key['key']}"})
    assert status == 400 and answer["error"]["param"] == param


def test_short_image_path(gateway, key):
    """POST /image (the seed design's short path) is the same endpoint."""
    status, _, answer = http_json("POST", gateway.base_url + "/image", {"model": "demo-image", "prompt": "fox",
                                                                         "size": "8x8"},
                                  {"Authorization": f"Bearer {key['key']}"})
    assert status == 200 and answer["data"][0]["url"].startswith("data:image/png")


# -- models and short paths -----------------------------------------------------------------------

def test_models_retrieve(client):
    """client.models.retrieve: the model object; unknown -> the SDK's NotFoundError (404 envelope)."""
    model = client.models.retrieve("text-embedding-3-small")
    assert (model.id, model.object, model.owned_by) == ("text-embedding-3-small", "model", "openai")
    assert client.models.retrieve("small").owned_by == "gateway-router (category alias)"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_models_retrieve_of_a_model_the_key_may_not_use_is_404(gateway, clean_db):
    limited = mint(gateway, allowed_models=["demo"])
    client = openai.OpenAI(api_key=limited["key"], base_url=gateway.base_url + "/v1", max_retries=0)
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o-mini")


def test_short_paths(gateway, key):
    """/models, /models/{id}, /embeddings beside /chat/completions; /ping answers without a key."""
    auth = {"Authorization": f"Bearer {key['key']}"}
    status, _, listing = http_json("GET", gateway.base_url + "/models", headers=auth)
    assert status == 200 and "demo-embed" in [m["id"] for m in listing["data"]]
    status, _, one = http_json("GET", gateway.base_url + "/models/demo", headers=auth)
    assert status == 200 and one["id"] == "demo"
    status, _, emb = http_json("POST", gateway.base_url + "/embeddings",
                               {"model": "text-embedding-3-small", "input": TEXT}, auth)
    assert status == 200 and emb["data"][0]["embedding"] == VECTOR
    status, _, pong = http_json("GET", gateway.base_url + "/ping")
    assert status == 200 and pong == {"status": "ok", "message": "pong"}
