"""The `generate_images` call of each adapter that serves image models, against its real HTTP
fake (OpenAI-compatible, Pollinations) or in process (simulator): the wire request, the OpenAI
images answer (`url` or `b64_json`), token usage where the upstream reports it, errors."""
from __future__ import annotations

import base64

import pytest

from Testing.fakes.fake_media import IMAGE_TOKENS, image_bytes
from Testing.fakes.fake_pollinations import image_for_seed
from Testing.fakes.native import provider_settings
from Testing.support import UPSTREAM_KEY
from app.providers.base import ProviderRateLimited, ProviderUnavailable
from app.providers.pollinations import PollinationsImageProvider
from app.providers.simulator import SimulatorProvider

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pollinations(fake_pollinations):
    fake_pollinations.reset()
    prov = PollinationsImageProvider("pollinations-image", provider_settings("pollinations", fake_pollinations), {})
    yield prov
    prov.close()


def test_openai_compatible_posts_images_generations(openai_provider, fake_upstream):
    """POST {base}/images/generations as it is; b64_json images come back as sent."""
    result = openai_provider.generate_images({"model": "dall-e-3", "prompt": "a red fox", "n": 2,
                                              "size": "1024x1024", "response_format": "b64_json",
                                              "quality": "hd"})
    [sent] = fake_upstream.requests()
    assert sent["path"] == "/v1/images/generations"
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent["body"] == {"model": "dall-e-3", "prompt": "a red fox", "n": 2, "size": "1024x1024",
                            "response_format": "b64_json", "quality": "hd"}
    assert [base64.b64decode(d["b64_json"]) for d in result.body["data"]] == [image_bytes(0), image_bytes(1)]
    assert result.usage is None  # dall-e reports no tokens


def test_gpt_image_token_usage_is_normalised(openai_provider):
    """gpt-image models report input/output tokens: they become prompt/completion tokens."""
    result = openai_provider.generate_images({"model": "gpt-image-1", "prompt": "a red fox"})
    assert result.usage == {"prompt_tokens": 10, "completion_tokens": IMAGE_TOKENS, "total_tokens": 10 + IMAGE_TOKENS}
    assert result.body["data"][0]["url"].startswith("https://images.fake/")


def test_pollinations_one_get_per_image(pollinations, fake_pollinations):
    """GET /prompt/{prompt} with width, height, model and consecutive seeds, the key in a
    Bearer header; `url` answers are those URLs (no key in them)."""
    result = pollinations.generate_images({"model": "flux", "prompt": "a red fox", "n": 2,
                                           "size": "512x768", "seed": 40})
    sent = fake_pollinations.requests()
    assert [r["path"] for r in sent] == ["/prompt/a%20red%20fox"] * 2
    assert [r["query"] for r in sent] == [{"width": "512", "height": "768", "model": "flux", "seed": "40"},
                                          {"width": "512", "height": "768", "model": "flux", "seed": "41"}]
    assert sent[0]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    base = fake_pollinations.base_url
    assert [d["url"] for d in result.body["data"]] == [
        f"{base}/prompt/a%20red%20fox?width=512&height=768&model=flux&seed=40",
        f"{base}/prompt/a%20red%20fox?width=512&height=768&model=flux&seed=41"]
    assert result.usage is None


def test_pollinations_b64_json_and_fixed_query(fake_pollinations):
    """b64_json answers carry the bytes Pollinations sent; the `query` setting is added."""
    prov = PollinationsImageProvider("p", {**provider_settings("pollinations", fake_pollinations),
                                           "query": {"nologo": "true"}}, {})
    fake_pollinations.reset()
    try:
        result = prov.generate_images({"model": "turbo", "prompt": "fox", "seed": 7,
                                       "response_format": "b64_json"})
    finally:
        prov.close()
    assert base64.b64decode(result.body["data"][0]["b64_json"]) == image_for_seed(7)
    assert fake_pollinations.requests()[0]["query"]["nologo"] == "true"


def test_pollinations_errors(pollinations):
    """429 with Retry-After is rate limiting; an HTML page instead of an image is malformed."""
    with pytest.raises(ProviderRateLimited) as limited:
        pollinations.generate_images({"model": "fail-429", "prompt": "fox"})
    assert limited.value.retry_after == 1
    with pytest.raises(ProviderUnavailable) as html:
        pollinations.generate_images({"model": "not-image", "prompt": "fox"})
    assert html.value.code == "upstream_malformed"


def test_simulator_images_are_real_pngs():
    """The simulator draws a PNG of the requested size, as b64_json or a data: URL."""
    sim = SimulatorProvider("simulator", {"latency_ms": 0}, {})
    b64 = sim.generate_images({"model": "demo-image", "prompt": "fox", "size": "16x8", "n": 2,
                               "response_format": "b64_json"})
    png = base64.b64decode(b64.body["data"][0]["b64_json"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (16).to_bytes(4, "big") + (8).to_bytes(4, "big")
    assert len(b64.body["data"]) == 2
    url = sim.generate_images({"model": "demo-image", "prompt": "fox", "size": "16x8"})
    assert url.body["data"][0]["url"] == "data:image/png;base64," + b64.body["data"][0]["b64_json"]
