"""Stored Responses (`store: true`): save after the answer went out, read back for
`previous_response_id`, `GET`/`DELETE /v1/responses/{id}` and `input_items`, prune by age.

Saving happens after the client has the answer (off its critical path), yet the client may name
the response in its very next request, on another connection, worker or replica. The response
id says whether a row is on its way: it carries the time it was minted and whether it is
stored. A lookup that finds no row for a stored id minted in the last PENDING_WINDOW_S polls
the table for up to `wait_s` (the save lands milliseconds after the answer); any other unknown
id is a 404 at once. Rows belong to a tenant: another tenant's id is reported as not found.
"""
from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine

from app.models import StoredResponse
from app.models.types import utcnow
from app.translate.chat_to_responses import new_item_id

PENDING_WINDOW_S = 2 * 3600   # longer than any stream: a save may still follow the answer
DEFAULT_WAIT_S = 3.0
POLL_S = 0.02
TABLE = StoredResponse.__table__
ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def new_response_id(stored: bool) -> str:
    """`resp_` + 48 hex digits like OpenAI's: 12 of mint time (ms), 1 stored flag, 35 random."""
    return "resp_%012x%d%s" % (int(time.time() * 1000), 1 if stored else 0, os.urandom(18).hex()[:35])


def may_be_pending(response_id: str, now: float | None = None) -> bool:
    """True when `response_id` is one of ours, marked stored, and minted recently enough that
    its row may not be written yet."""
    digits = response_id[5:] if response_id.startswith("resp_") else ""
    if len(digits) != 48 or digits[12] != "1":
        return False
    try:
        minted = int(digits[:12], 16) / 1000
    except ValueError:
        return False
    now = time.time() if now is None else now
    return -60 <= now - minted <= PENDING_WINDOW_S


def input_item_list(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input items as `input_items` lists them: each with an id and a status, message
    content as parts (a string becomes one input_text part)."""
    out = []
    for item in items:
        kind = item.get("type", "message")
        entry = {"id": item.get("id") or new_item_id(ITEM_PREFIX.get(kind, "item")), **item, "type": kind}
        if kind == "message" and isinstance(entry.get("content"), str):
            part = "output_text" if entry.get("role") == "assistant" else "input_text"
            entry["content"] = [{"type": part, "text": entry["content"]}]
        entry.setdefault("status", "completed")
        out.append(entry)
    return out


class ResponseStore:
    def __init__(self, engine: Engine, wait_s: float = DEFAULT_WAIT_S) -> None:
        self.engine = engine
        self.wait_s = wait_s

    def save(self, body: dict[str, Any], *, tenant_id: int, api_key_id: int, history: list[dict[str, Any]],
             input_items: list[dict[str, Any]], created_at: datetime | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(TABLE).values(
                id=body["id"], tenant_id=tenant_id, api_key_id=api_key_id, model=str(body.get("model") or ""),
                status=str(body.get("status") or "completed"), previous_response_id=body.get("previous_response_id"),
                history=history, input_items=input_items, body=body, created_at=created_at or utcnow()))

    def _row(self, response_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(TABLE).where(TABLE.c.id == response_id)).first()

    def get(self, response_id: str, tenant_id: int) -> Any | None:
        """The row (history, input_items, body, ...) of a response of this tenant, else None.
        Waits for a row that is still being saved (see the module docstring)."""
        row = self._row(response_id)
        if row is None and may_be_pending(response_id):
            deadline = time.monotonic() + self.wait_s
            while row is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
                row = self._row(response_id)
        if row is None or row.tenant_id != tenant_id:
            return None
        return row

    def delete(self, response_id: str, tenant_id: int) -> bool:
        if self.get(response_id, tenant_id) is None:
            return False
        with self.engine.begin() as conn:
            conn.execute(delete(TABLE).where(TABLE.c.id == response_id, TABLE.c.tenant_id == tenant_id))
        return True

    def prune(self, cutoff: datetime) -> int:
        """Delete responses created before `cutoff`; the number deleted."""
        with self.engine.begin() as conn:
            return conn.execute(delete(TABLE).where(TABLE.c.created_at < cutoff)).rowcount or 0


def conversation(row: Any) -> list[dict[str, Any]]:
    """The items a continuation of stored response `row` starts from: its history, its input,
    its output."""
    return [*row.history, *row.input_items, *(row.body.get("output") or [])]
