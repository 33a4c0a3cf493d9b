"""Token counting from the shipped tiktoken files: tiktoken's known values, offline, no cache
files written, and OpenAI's per-message framing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ROOT_DIR
from app.utils.token_counter import (count_messages, count_prompt, count_text,
                                     get_encoding)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("name,ids", [("o200k_base", [24912, 2375]), ("cl100k_base", [15339, 1917])])
def test_hello_world_known_token_ids(name, ids):
    """'hello world' encodes to tiktoken's published ids (2 tokens) with both shipped encodings."""
    enc = get_encoding(name)
    assert enc.name == name
    assert enc.encode("hello world") == ids
    assert count_text("hello world", name) == 2


def test_vocab_sizes_match_tiktoken():
    """The shipped rank files are the full encodings (tiktoken's n_vocab)."""
    assert get_encoding("cl100k_base").n_vocab == 100277
    assert get_encoding("o200k_base").n_vocab == 200019


def test_default_encoding_is_o200k():
    """count_text defaults to o200k_base."""
    text = "Привет, как дела? Это тест токенизатора."  # the two encodings count it differently
    assert (count_text(text), count_text(text, "o200k_base"), count_text(text, "cl100k_base")) == (13, 13, 19)


def test_encoding_is_loaded_once():
    """get_encoding returns the same Encoding object each time (loaded once per process)."""
    assert get_encoding("cl100k_base") is get_encoding("cl100k_base")


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_special_token_text_does_not_raise(name):
    """User text containing '<|endoftext|>' is counted as plain text instead of raising."""
    n = count_text("before <|endoftext|> after", name)
    assert n > 3  # the marker is several ordinary tokens, not one control token
    assert count_messages([{"role": "user", "content": "<|endoftext|><|im_start|>"}], name) > 6


def test_empty_text_is_zero():
    """Empty text counts 0 tokens."""
    assert count_text("") == 0


@pytest.mark.parametrize("name", ["gpt2", "p50k_base", "nope", ""])
def test_unknown_encoding_raises_value_error(name):
    """An encoding that is not shipped raises ValueError naming the available ones."""
    with pytest.raises(ValueError) as info:
        get_encoding(name)
    assert "o200k_base" in str(info.value)
    with pytest.raises(ValueError):
        count_text("hello", name)


def test_count_messages_framing():
    """count_messages = 3 (reply priming) + per message 3 + tokens of role and content."""
    enc = get_encoding("o200k_base")
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "Hi! How can I help?"}]
    expected = 3 + sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in messages)
    assert count_messages(messages) == expected
    assert count_messages([{"role": "user", "content": "hello world"}]) == 3 + 3 + 1 + 2
    assert count_messages([]) == 3


def test_count_messages_name_adds_one_plus_name_tokens():
    """A `name` adds 1 token plus its own tokens."""
    base = [{"role": "user", "content": "hi"}]
    named = [{"role": "user", "content": "hi", "name": "example_user"}]
    assert count_messages(named) - count_messages(base) == 1 + count_text("example_user")


def test_count_messages_uses_the_given_encoding():
    """count_messages counts with the requested encoding."""
    messages = [{"role": "user", "content": "Grüße aus Köln — 東京 and ünïcödé text"}]
    enc = get_encoding("cl100k_base")
    assert count_messages(messages, "cl100k_base") == 3 + 3 + len(enc.encode("user")) + \
        len(enc.encode(messages[0]["content"]))


def test_count_messages_content_parts_and_images():
    """Text parts are counted; an image part costs 85 tokens in low detail and OpenAI's
    high-detail bound (85 + 170 x 8 tiles = 1445) otherwise (auto or unset may pick high)."""
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "low"}},
        {"type": "text", "text": "hello world"}]}]
    assert count_messages(messages) == 3 + 3 + 1 + 2 + 2 + 1445 + 85


def test_count_prompt_adds_tools_functions_and_json_schema():
    """The prompt the provider bills includes tool and function definitions and a
    response_format JSON schema, counted as their compact JSON."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    schema = {"name": "answer", "schema": {"type": "object"}}
    base = {"messages": [{"role": "user", "content": "hello world"}]}
    assert count_prompt(base) == 3 + 3 + 1 + 2
    # o200k_base tokens of the compact JSON (checked with tiktoken): 20, 14 and 11
    assert count_prompt({**base, "tools": tools}) == 9 + 20
    assert count_prompt({**base, "functions": [tools[0]["function"]]}) == 9 + 14
    assert count_prompt({**base, "response_format": {"type": "json_schema", "json_schema": schema}}) == 9 + 11
    assert count_prompt({**base, "response_format": {"type": "json_object"}}) == 9


def test_count_messages_survives_wrong_tool_call_shapes():
    """Counting never raises on shapes validation refuses anyway (a string function, a string call)."""
    messages = [{"role": "assistant", "content": None, "tool_calls": ["x", {"function": "y"}]}]
    assert count_messages(messages) == 3 + 3 + 1


def test_count_messages_tool_calls_counted():
    """Assistant tool calls count their function name and arguments."""
    args = json.dumps({"city": "Paris", "unit": "celsius"})
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]}]
    assert count_messages(messages) == 3 + 3 + 1 + count_text("get_weather") + \
        count_text(args)


LOAD_SCRIPT = """
import json, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
from app.utils.token_counter import count_messages, count_text, get_encoding
counts = [count_text("hello world", n) for n in ("o200k_base", "cl100k_base")]
counts.append(count_messages([{"role": "user", "content": "hello world"}], "cl100k_base"))
print(json.dumps({"counts": counts, "tempdir": tempfile.gettempdir()}))
"""


def snapshot(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in path.rglob("*")} if path.exists() else {}


@pytest.mark.parametrize("cache_env", [None, "dir"])
def test_loading_writes_no_tiktoken_cache(tmp_path, cache_env):
    """Loading encodings (fresh process) writes no data-gym-cache / TIKTOKEN_CACHE_DIR files anywhere."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env["TMPDIR"] = str(tmpdir)  # tiktoken's default cache is <tempdir>/data-gym-cache
    env["HTTPS_PROXY"] = env["HTTP_PROXY"] = "http://127.0.0.1:9"  # any download would fail
    cache_dir = tmp_path / "tiktoken-cache"
    if cache_env:
        env["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    real_cache = Path("/tmp/data-gym-cache")
    before = snapshot(real_cache)
    existed = real_cache.exists()
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(ROOT_DIR)], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["counts"] == [2, 2, 9]
    assert Path(result["tempdir"]) == tmpdir
    assert list(tmpdir.iterdir()) == [], "files written under the temp dir"
    assert not cache_dir.exists(), "files written to TIKTOKEN_CACHE_DIR"
    assert real_cache.exists() == existed and snapshot(real_cache) == before
