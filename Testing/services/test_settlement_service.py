"""The streamed pieces a completion keeps for its fallback token count: bounded whatever the
stream's length (a minute-long stream must not hold its whole text until it ends), and counted
exactly all the same."""
from __future__ import annotations

import json

from app.services.api_key_service import KeyInfo
from app.providers.base import StreamPiece
from app.providers.catalog import parse_catalog
from app.services.settlement_service import CompletionTrace, piece_bytes, usage_figures

KEY = KeyInfo(id=1, tenant_id=10, tenant_name="t", tenant_status="active", name="k", prefix="sk-x",
              role="member", rpm_limit=None, tpm_limit=None, daily_token_limit=None, max_concurrent=None,
              budget_usd=None, tenant_budget_usd=None, allowed_models=None, expires_at=None, revoked_at=None)


def trace() -> CompletionTrace:
    entry = parse_catalog({"providers": {"p": {"type": "openai", "base_url": "http://x"}},
                           "models": {"m": {"deployments": [{"provider": "p", "model": "m"}],
                                            "pricing": {"input_per_mtok": "1", "output_per_mtok": "2"}}}}).models["m"]
    return CompletionTrace(request_id="req_1", key=KEY, entry=entry, deployment=None,
                           request={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, streamed=True,
                           prompt_estimate=8)


def token_piece() -> StreamPiece:
    """An OpenAI chunk of one token (" tok"), forwarded raw, as an upstream sends it (~200 bytes)."""
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
    return StreamPiece(raw=json.dumps(chunk).encode())


def test_a_long_stream_keeps_at_most_fold_bytes_of_pieces():
    """1,200 pieces (a minute at 20 tokens/s, ~240 KB of chunks): the trace never holds more
    than 8 KB of them (FOLD_BYTES), however long the stream."""
    t = trace()
    most = 0
    for _ in range(1200):
        t.add_piece(token_piece())
        most = max(most, sum(piece_bytes(p) for p in t.chunks))
    assert most <= 8 * 1024
    assert t.folded_tokens > 0


def test_the_fallback_count_of_a_folded_stream_is_exact():
    """Without the provider's usage, the completion tokens are the folded counts plus the count
    of what is still kept: 1,200 one-token pieces count 1,200."""
    t = trace()
    for _ in range(1200):
        t.add_piece(token_piece())
    assert usage_figures(t) == (8, 1200, True)


def test_stream_pieces_have_no_instance_dict():
    """StreamPiece has slots (less memory per kept piece); its fields are still set freely."""
    piece = token_piece()
    assert not hasattr(piece, "__dict__")
    piece.flush = False
    piece.usage = {"prompt_tokens": 1}
    assert (piece.flush, piece.usage) == (False, {"prompt_tokens": 1})
