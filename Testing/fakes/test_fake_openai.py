"""The fake upstream speaks the OpenAI wire format: proven with the official ``openai`` client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

from Testing.fakes.fake_openai import (DEFAULT_CHUNKS, FakeOpenAI, expected_content,
                                       prompt_tokens_for)

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello to the benchmark"}]

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture()
def client(fake: FakeOpenAI) -> openai.OpenAI:
    fake.reset()
    return openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0,
                         timeout=10)


def test_non_streaming_completion(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """A plain completion parses with the client and has deterministic content and usage."""
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected_content(MESSAGES)
    assert resp.choices[0].message.content.startswith("Echo: Say hello to the benchmark")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == prompt_tokens_for(MESSAGES) == 2 + 5 + 7
    assert resp.usage.completion_tokens == DEFAULT_CHUNKS
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + DEFAULT_CHUNKS


def test_requests_are_recorded(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """Tests can see what the upstream received: path, headers and parsed body."""
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=7)
    (req,) = fake.requests()
    assert req["method"] == "POST"
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    assert req["body"]["messages"] == MESSAGES
    assert req["body"]["max_tokens"] == 7
    fake.reset()
    assert fake.requests() == []


def test_streaming_with_include_usage(client: openai.OpenAI) -> None:
    """A stream has a role chunk, ~20 content chunks, a finish chunk and a final usage chunk."""
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                            stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini"
               for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content_chunks = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == DEFAULT_CHUNKS
    text = "".join(c.choices[0].delta.content for c in content_chunks)
    assert text == expected_content(MESSAGES)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == DEFAULT_CHUNKS
    assert last.usage.prompt_tokens == prompt_tokens_for(MESSAGES)


def test_stream_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    """Without stream_options the stream carries no usage at all, as OpenAI does."""
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                 stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_caps_answer(client: openai.OpenAI) -> None:
    """max_tokens / max_completion_tokens cap the pieces and finish with 'length'."""
    resp = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].message.content == "Echo: Say hello"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(
        model="m", messages=MESSAGES, max_completion_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chunks_n_model(client: openai.OpenAI) -> None:
    """A 'chunks-N' model streams exactly N content chunks."""
    chunks = list(client.chat.completions.create(model="fake-chunks-3", messages=MESSAGES,
                                                 stream=True))
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == ["Echo:", " Say", " hello"]


@pytest.mark.parametrize("model, exc, status, code", [
    ("fake-fail-500", openai.InternalServerError, 500, None),
    ("fake-fail-429", openai.RateLimitError, 429, "rate_limit_exceeded"),
    ("fake-fail-401", openai.AuthenticationError, 401, "invalid_api_key"),
    ("fake-fail-400", openai.BadRequestError, 400, "invalid_value"),
    ("fake-context-too-long", openai.BadRequestError, 400, "context_length_exceeded"),
])
def test_scripted_failures(client: openai.OpenAI, model: str, exc: type[openai.APIStatusError],
                           status: int, code: str | None) -> None:
    """Failure models answer with the status and OpenAI error envelope the client maps."""
    with pytest.raises(exc) as info:
        client.chat.completions.create(model=model, messages=MESSAGES)
    assert info.value.status_code == status
    assert info.value.code == code
    assert set(info.value.body) == {"message", "type", "param", "code"}
    if status == 429:
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.type == "rate_limit_error"


def test_failure_applies_to_streams_too(client: openai.OpenAI) -> None:
    """A failure model fails a streaming request before any chunk, with the JSON error."""
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fail-429", messages=MESSAGES, stream=True)


def test_die_mid_stream_raises(client: openai.OpenAI) -> None:
    """die-mid-stream sends 5 events then drops the connection: the client raises."""
    stream = client.chat.completions.create(model="die-mid-stream", messages=MESSAGES,
                                            stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 5


def test_hang_never_answers(client: openai.OpenAI) -> None:
    """A 'hang' model accepts the request and never answers (the client times out)."""
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(model="hang",
                                                                 messages=MESSAGES)
    assert time.monotonic() - start >= 0.3


def test_slow_stream_spaces_chunks(client: openai.OpenAI) -> None:
    """A 'slow' model waits about 50 ms between stream events."""
    start = time.monotonic()
    chunks = list(client.chat.completions.create(model="slow-chunks-2", messages=MESSAGES,
                                                 stream=True))
    assert len(chunks) == 4  # role, 2 content, finish
    assert time.monotonic() - start >= 0.15


def test_no_usage_model(client: openai.OpenAI) -> None:
    """A 'no-usage' model omits usage, even when the stream asked for it."""
    resp = client.chat.completions.create(model="no-usage", messages=MESSAGES)
    assert resp.usage is None
    chunks = list(client.chat.completions.create(model="no-usage", messages=MESSAGES,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.usage is None and c.choices for c in chunks)


def test_tool_calls(client: openai.OpenAI) -> None:
    """A 'tool' model answers with tool_calls, arguments streamed in several deltas."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    resp = client.chat.completions.create(model="fake-tool", messages=MESSAGES, tools=tools)
    call = resp.choices[0].message.tool_calls[0]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments)["query"] == "Say hello to the benchmark"
    chunks = list(client.chat.completions.create(model="fake-tool", messages=MESSAGES,
                                                 tools=tools, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[1:-1]]
    assert len(deltas) > 2
    assert "".join(deltas) == call.function.arguments
    assert chunks[0].choices[0].delta.tool_calls[0].id.startswith("call_")
    assert chunks[0].choices[0].delta.tool_calls[0].function.name == "lookup"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_models_endpoint(client: openai.OpenAI) -> None:
    """GET /v1/models lists models in the OpenAI list format."""
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids


def test_keep_alive_and_pipelining(fake: FakeOpenAI) -> None:
    """Two pipelined requests on one connection get two answers in order."""
    body = json.dumps({"model": "chunks-1", "messages": MESSAGES}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
           b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(req + req.replace(b"chunks-1", b"chunks-2"))
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 2 or not data.endswith(b"}"):
            data += sock.recv(65536)
    first, second = data.split(b"HTTP/1.1 200 OK")[1:]
    assert b'"model":"chunks-1"' in first and b'"model":"chunks-2"' in second


def test_works_in_a_gevent_patched_process() -> None:
    """In-process use works after gevent.monkey.patch_all (as in the gateway's tests)."""
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import gevent, json, urllib.request\n"
        "from Testing.fakes.fake_openai import FakeOpenAI\n"
        "f = FakeOpenAI().start()\n"
        "def call(i):\n"
        "    body = json.dumps({'model': 'slow', 'messages': [{'role': 'user', 'content': 'x'}]})\n"
        "    r = urllib.request.Request(f.base_url + '/chat/completions', data=body.encode())\n"
        "    return json.load(urllib.request.urlopen(r, timeout=5))['object']\n"
        "jobs = [gevent.spawn(call, i) for i in range(10)]\n"
        "gevent.joinall(jobs, raise_error=True)\n"
        "print([j.value for j in jobs].count('chat.completion'), len(f.requests()))\n"
        "f.stop()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10", "10"]


def test_runs_as_a_process() -> None:
    """`python -m Testing.fakes.fake_openai --port 0` serves and stops on SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "Testing.fakes.fake_openai", "--port", "0"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        base_url = line.split(" on ", 1)[1].strip()
        client = openai.OpenAI(base_url=base_url, api_key="sk-x", max_retries=0, timeout=5)
        resp = client.chat.completions.create(model="chunks-2", messages=MESSAGES)
        assert resp.choices[0].message.content == "Echo: Say"
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0


def test_embeddings_parse_with_the_client(client: openai.OpenAI) -> None:
    """/v1/embeddings answers what the client parses: its default base64 decodes to the
    literal vectors of fake_media, floats likewise; usage is words + 7."""
    default = client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e"])
    assert [d.embedding for d in default.data] == [[3.0, 0.5, -0.25, 0.125], [2.0, 1.5, -0.25, 0.125]]
    floats = client.embeddings.create(model="m", input=[[1, 2]], encoding_format="float", dimensions=2)
    assert floats.data[0].embedding == [2.0, 0.5]
    assert (default.usage.prompt_tokens, floats.usage.prompt_tokens) == (12, 9)


def test_images_parse_with_the_client(client: openai.OpenAI) -> None:
    """/v1/images/generations answers n images as URLs or base64, as the client expects."""
    urls = client.images.generate(model="dall-e-3", prompt="a fox", n=2)
    assert [u.url.rsplit("/", 1)[-1] for u in urls.data] == ["0.png", "1.png"]
    b64 = client.images.generate(model="gpt-image-1", prompt="a fox", response_format="b64_json")
    assert b64.data[0].b64_json and b64.usage.output_tokens == 100
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="dall-e-3", prompt="a fox", n=11)
