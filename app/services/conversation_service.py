"""The stored conversations of POST /api/chat: read one (tenant-scoped) and append an exchange.

An exchange is appended to the messages stored at the time of writing (row locked for the
update), not to those read before the upstream call, so two calls continuing one conversation
at once both keep their exchange (in the order they finished).
"""
from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from app.errors import NotFound
from app.models import Conversation
from app.models.types import utcnow

_TABLE = Conversation.__table__


def history(engine: Engine, tenant_id: int, conversation_id: str) -> list[dict[str, Any]]:
    """The conversation's messages; NotFound (404) when it does not exist for this tenant."""
    with engine.connect() as conn:
        messages = conn.execute(select(_TABLE.c.messages).where(
            _TABLE.c.id == conversation_id, _TABLE.c.tenant_id == tenant_id)).scalar()
    if messages is None:
        raise NotFound(f"No conversation '{conversation_id}' exists for this API key's tenant.",
                       param="conversation", code="conversation_not_found")
    return list(messages)


def append(engine: Engine, tenant_id: int, key_id: int, conversation_id: str | None,
           exchange: list[dict[str, Any]]) -> str:
    """Store `exchange` (the user message and the reply) at the end of the conversation, or
    in a new one when `conversation_id` is None. Returns the conversation's id."""
    now = utcnow()
    with engine.begin() as conn:
        if conversation_id is None:
            conversation_id = "conv_" + uuid.uuid4().hex
            conn.execute(_TABLE.insert().values(id=conversation_id, tenant_id=tenant_id, api_key_id=key_id,
                                                messages=exchange, created_at=now, updated_at=now))
            return conversation_id
        where = (_TABLE.c.id == conversation_id, _TABLE.c.tenant_id == tenant_id)
        stored = conn.execute(select(_TABLE.c.messages).where(*where).with_for_update()).scalar()
        if stored is None:  # deleted with its tenant meanwhile
            raise NotFound(f"No conversation '{conversation_id}' exists for this API key's tenant.",
                           param="conversation", code="conversation_not_found")
        conn.execute(update(_TABLE).where(*where).values(messages=list(stored) + exchange, updated_at=now))
    return conversation_id
