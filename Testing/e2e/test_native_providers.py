"""Every provider through the real gunicorn + gevent gateway, driven by the official openai
client: the native adapters (Anthropic, Gemini, Ollama, GigaChat) against their fake upstreams
(answers, streams, tool calls both ways, usage rows equal to what the fake reported), and every
OpenAI-compatible preset of data/models.json pointed at a fake OpenAI server that answers on
the preset's own URL path (key variable, extra headers, account id in the URL). Also what
happens to a model whose provider is not configured."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import openai
import pytest

from Testing.conftest import app_config, wait_for_rows
from Testing.fakes.fake_openai import DEFAULT_CHUNKS, ChatPlan, expected_content, prompt_tokens_for
from Testing.fakes import fake_anthropic as fa, fake_gemini as fg, fake_gigachat as fgc, fake_ollama as fo
from Testing.fakes.http_fake import FakeHTTPServer, FakeRequest, Reply, Streamed, count_words, echo_words
from Testing.fakes.native import (fake_anthropic, fake_gemini, fake_gigachat, fake_ollama,  # noqa: F401
                                  provider_settings)
from Testing.support import SYSTEM_SECRET, UPSTREAM_KEY, GatewayProcess, http_json

pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello gateway"}]
PROMPT = count_words("be brief", "hello gateway") + 7  # every fake counts words + 7
PIECES = {"anthropic": fa.DEFAULT_PIECES, "gemini": fg.DEFAULT_PIECES, "ollama": fo.DEFAULT_PIECES,
          "gigachat": fgc.DEFAULT_PIECES}
UPSTREAM_MODEL = {"anthropic": "claude-test", "gemini": "gemini-test", "ollama": "llama3.2", "gigachat": "GigaChat-2"}
TOOL_MODEL = {"anthropic": "claude-tool", "gemini": "gemini-tool", "ollama": "llama-tool", "gigachat": "GigaChat-tool"}
PROVIDERS = list(UPSTREAM_MODEL)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
PRICING = {"input_per_mtok": "1.00", "output_per_mtok": "2.00"}


SHIPPED = json.loads((Path(__file__).resolve().parents[2] / "data" / "models.json").read_text())
PRESETS = sorted(n for n, s in SHIPPED["providers"].items() if s["type"] == "openai")
# The value each preset variable gets in the gateway's environment (local servers: their URL).
ACCOUNT_ID = "acct-0123"


class AnyPathOpenAI(FakeHTTPServer):
    """OpenAI chat completions (the fake_openai answers) on any path ending in /chat/completions,
    so that each preset keeps its own URL path."""
    name = "fake-openai-any-path"

    def handle(self, req: FakeRequest) -> Reply | Streamed:
        if req.method != "POST" or not req.path.endswith("/chat/completions"):
            return Reply(404, {"error": {"message": "no such path", "type": "invalid_request_error"}})
        plan = ChatPlan(req.json, "chatcmpl-preset")
        if plan.stream:
            return Streamed(plan.stream_events())
        return Reply(200, plan.completion_body())


def preset_env(fake: AnyPathOpenAI) -> dict[str, str]:
    env = {"CLOUDFLARE_ACCOUNT_ID": ACCOUNT_ID}
    for name in PRESETS:
        settings = SHIPPED["providers"][name]
        if settings.get("api_key_env"):
            env[settings["api_key_env"]] = f"sk-preset-{name}-{UPSTREAM_KEY[-8:]}"
        if settings["base_url"].startswith("${"):
            env[settings["base_url"][2:-1]] = f"{fake.url}/{name}/v1"
    return env


def preset_provider(name: str, fake: AnyPathOpenAI) -> dict:
    """The shipped preset, its host replaced by the fake (the host becomes the first path segment)."""
    settings = dict(SHIPPED["providers"][name])
    base = settings["base_url"]
    if base.startswith("https://"):
        host, _, path = base[len("https://"):].partition("/")
        settings["base_url"] = f"{fake.url}/{host}/{path}"
    settings["timeout_s"] = 5
    return settings


def preset_upstream_model(name: str) -> str:
    return next(d["model"] for m in SHIPPED["models"].values() for d in m["deployments"] if d["provider"] == name)


@pytest.fixture(scope="module")
def fake_any_path() -> Iterator[AnyPathOpenAI]:
    with AnyPathOpenAI() as fake:
        yield fake


def _model(provider: str, upstream: str, **extra) -> dict:
    return {"deployments": [{"provider": provider, "model": upstream}], "context_window": 100000,
            "max_output_tokens": 1000, "pricing": PRICING, **extra}


@pytest.fixture(scope="module")
def native_models_file(tmp_path_factory, fake_anthropic, fake_gemini, fake_ollama, fake_gigachat,  # noqa: F811
                       fake_any_path) -> Path:
    fakes = {"anthropic": fake_anthropic, "gemini": fake_gemini, "ollama": fake_ollama, "gigachat": fake_gigachat}
    providers = {name: provider_settings(name, fake) for name, fake in fakes.items()}
    providers["unconfigured"] = {**provider_settings("anthropic", fake_anthropic),
                                 "api_key_env": "TEST_NEVER_SET_PROVIDER_KEY"}
    models = {}
    for name in PROVIDERS:
        models[name] = _model(name, UPSTREAM_MODEL[name])
        models[f"{name}-tool"] = _model(name, TOOL_MODEL[name])
    models["claude-cache"] = _model("anthropic", "claude-cache")
    models["claude-overloaded"] = _model("anthropic", "claude-overloaded")
    models["gemini-safety"] = _model("gemini", "gemini-safety")
    models["ollama-missing"] = _model("ollama", "mistral-not-found")
    models["claude-malformed"] = _model("anthropic", "claude-malformed")
    models["gemini-bad-key"] = _model("gemini", "gemini-bad-key")
    models["giga-context"] = _model("gigachat", "GigaChat-context-too-long")
    models["needs-key"] = _model("unconfigured", "claude-test")
    models["half-configured"] = {**_model("unconfigured", "claude-test"), "deployments": [
        {"provider": "unconfigured", "model": "claude-test", "priority": 1},
        {"provider": "anthropic", "model": "claude-test", "priority": 2}]}
    for name in PRESETS:
        providers[name] = preset_provider(name, fake_any_path)
        models[f"preset-{name}"] = _model(name, preset_upstream_model(name))
    path = tmp_path_factory.mktemp("native") / "models.json"
    path.write_text(json.dumps({"providers": providers, "models": models}, indent=2))
    return path


@pytest.fixture(scope="module")
def native_gateway(pg_url, native_models_file, fake_any_path, tmp_path_factory) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("native-gateway") / "gunicorn.log"
    env = {k: str(v) for k, v in app_config(pg_url, native_models_file, LOG_LEVEL="INFO").items()}
    env.update(preset_env(fake_any_path))
    proc = GatewayProcess(env, workers=2, log_path=log).start()
    yield proc
    proc.stop()
    assert UPSTREAM_KEY not in proc.log_text(), "an upstream key leaked into the gateway log"


@pytest.fixture(scope="module")
def key(native_gateway) -> dict:
    status, _, body = http_json("POST", native_gateway.base_url + "/v1/api-keys",
                                {"name": "native-e2e", "tenant": "native-tenant"}, {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body


@pytest.fixture(scope="module")
def client(native_gateway, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=native_gateway.base_url + "/v1", max_retries=0, timeout=30)


def row_for(engine, key: dict, request_id: str) -> dict:
    [row] = wait_for_rows(engine, 1, "api_key_id = :k AND request_id = :r", {"k": key["id"], "r": request_id})
    return row


@pytest.mark.parametrize("provider", PROVIDERS)
def test_non_streaming_answer_and_usage_row(client, key, pg_engine, provider):
    """A completion through each adapter answers the fake's text, and the usage row holds
    exactly the usage the fake reported."""
    raw = client.chat.completions.with_raw_response.create(model=provider, messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == "".join(echo_words("hello gateway", PIECES[provider]))
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT, PIECES[provider])
    row = row_for(pg_engine, key, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        PROMPT, PIECES[provider], PROMPT + PIECES[provider])
    assert (row["provider"], row["upstream_model"], row["status"]) == (provider, UPSTREAM_MODEL[provider], "ok")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streaming_answer_and_usage_row(client, key, pg_engine, provider):
    """A stream through each adapter arrives as OpenAI chunks ending with the usage chunk when
    asked; the usage row equals the fake's usage."""
    raw = client.chat.completions.with_raw_response.create(
        model=provider, messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(echo_words("hello gateway", PIECES[provider]))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == PROMPT
    assert chunks[-1].usage.completion_tokens == PIECES[provider]
    row = row_for(pg_engine, key, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["streamed"]) == (PROMPT, PIECES[provider], True)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tool_call_round_trip(client, provider):
    """Each adapter returns a tool call in OpenAI shape, takes the tool result back in the
    next request, and answers from it."""
    first = client.chat.completions.create(model=f"{provider}-tool", messages=MESSAGES, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["unit"] == "celsius"
    follow = MESSAGES + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    second = client.chat.completions.create(model=f"{provider}-tool", messages=follow, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop"
    assert "Tool said" in second.choices[0].message.content and "21" in second.choices[0].message.content


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streamed_tool_call(client, provider):
    """A streamed tool call assembles, from the deltas, into a name and JSON arguments."""
    stream = client.chat.completions.create(model=f"{provider}-tool", messages=MESSAGES, tools=TOOLS, stream=True)
    name, arguments, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or ():
            name += delta.function.name or "" if delta.function else ""
            arguments += delta.function.arguments or "" if delta.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert json.loads(arguments) == {"query": "hello gateway", "unit": "celsius"}


def test_anthropic_cache_tokens_reach_the_client_and_the_bill(client, key, pg_engine):
    """Anthropic cache creation/read tokens are billed as prompt tokens and shown as cached_tokens."""
    raw = client.chat.completions.with_raw_response.create(model="claude-cache", messages=MESSAGES)
    usage = raw.parse().usage
    prompt = PROMPT + fa.CACHE_CREATION + fa.CACHE_READ
    assert usage.prompt_tokens == prompt and usage.prompt_tokens_details.cached_tokens == fa.CACHE_READ
    assert row_for(pg_engine, key, raw.headers["x-request-id"])["prompt_tokens"] == prompt


def test_gemini_safety_is_content_filter(client):
    """A Gemini SAFETY stop reaches the client as finish_reason content_filter."""
    completion = client.chat.completions.create(model="gemini-safety", messages=MESSAGES)
    assert completion.choices[0].finish_reason == "content_filter"


def test_upstream_errors_reach_the_client_as_envelopes(native_gateway, key):
    """Anthropic overloaded -> 429 with Retry-After; a model Ollama has not pulled -> 404."""
    headers = {"Authorization": f"Bearer {key['key']}"}
    status, hdrs, body = http_json("POST", native_gateway.base_url + "/v1/chat/completions",
                                   {"model": "claude-overloaded", "messages": MESSAGES}, headers)
    assert status == 429 and body["error"]["code"] == "upstream_rate_limited" and "Retry-After" in hdrs
    status, _, body = http_json("POST", native_gateway.base_url + "/v1/chat/completions",
                                {"model": "ollama-missing", "messages": MESSAGES, "stream": True}, headers)
    assert status == 404 and "ollama pull" in body["error"]["message"]


@pytest.mark.parametrize("model,status,code", [("claude-malformed", 502, "upstream_error"),
                                               ("gemini-bad-key", 502, "upstream_auth_error"),
                                               ("giga-context", 400, "context_length_exceeded")])
@pytest.mark.parametrize("stream", [False, True])
def test_failures_before_any_byte_are_envelopes(native_gateway, key, model, status, code, stream):
    """A malformed upstream body is a 502 envelope (never a 500), a refused key a 502 that shows
    no key, a context overflow a 400: streaming or not, in OpenAI's error envelope."""
    resp_status, _, body = http_json("POST", native_gateway.base_url + "/v1/chat/completions",
                                     {"model": model, "messages": MESSAGES, "stream": stream},
                                     {"Authorization": f"Bearer {key['key']}"})
    assert resp_status == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    assert UPSTREAM_KEY not in json.dumps(body)


def test_unconfigured_provider(native_gateway, key, client):
    """A model whose only provider lacks its key variable is not in /v1/models and answers 503
    naming the variable; a model with another, configured deployment is served by that one."""
    ids = {m.id for m in client.models.list().data}
    assert "needs-key" not in ids and {"anthropic", "half-configured"} <= ids
    status, _, body = http_json("POST", native_gateway.base_url + "/v1/chat/completions",
                                {"model": "needs-key", "messages": MESSAGES},
                                {"Authorization": f"Bearer {key['key']}"})
    assert status == 503 and body["error"]["code"] == "provider_not_configured"
    assert "TEST_NEVER_SET_PROVIDER_KEY" in body["error"]["message"]
    completion = client.chat.completions.create(model="half-configured", messages=MESSAGES)
    assert completion.choices[0].message.content.startswith("Echo:")


@pytest.mark.parametrize("preset", PRESETS)
def test_openai_compatible_presets(client, key, pg_engine, fake_any_path, preset):
    """Each shipped OpenAI-compatible preset answers through the gateway, streaming and not: the
    call goes to the preset's URL path (Cloudflare's account id in it) with its key variable as
    Bearer token (none for a local server without one) and its extra headers (OpenRouter), and
    the usage row equals the upstream's usage."""
    settings = SHIPPED["providers"][preset]
    env = preset_env(fake_any_path)
    fake_any_path.reset()
    raw = client.chat.completions.with_raw_response.create(model=f"preset-{preset}", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == expected_content(MESSAGES, DEFAULT_CHUNKS)
    chunks = list(client.chat.completions.create(model=f"preset-{preset}", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == prompt_tokens_for(MESSAGES)
    first, second = fake_any_path.requests()
    base = settings["base_url"]
    if base.startswith("https://"):
        expected_path = "/" + base[len("https://"):].replace("${CLOUDFLARE_ACCOUNT_ID}", ACCOUNT_ID)
    else:
        expected_path = f"/{preset}/v1"
    assert first["path"] == expected_path + "/chat/completions"
    assert first["body"]["model"] == preset_upstream_model(preset) and second["body"]["stream"] is True
    key_env = settings.get("api_key_env")
    assert first["headers"].get("authorization") == (f"Bearer {env[key_env]}" if key_env else None)
    for name, value in (settings.get("headers") or {}).items():
        assert first["headers"][name.lower()] == value
    row = row_for(pg_engine, key, raw.headers["x-request-id"])
    assert (row["provider"], row["prompt_tokens"], row["completion_tokens"]) == (
        preset, prompt_tokens_for(MESSAGES), DEFAULT_CHUNKS)
