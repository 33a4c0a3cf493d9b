"""The audit log: one row per administrative change, written in the transaction of the change."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import AuditEntry
from app.models.types import as_utc, utcnow
from app.services.actor import Actor

ACTIONS = ("tenant.create", "tenant.update", "key.create", "key.update", "key.rotate", "key.revoke")


def record(session: Session, actor: Actor, action: str, *, target_type: str, target_id: int,
           tenant_id: int | None, details: dict[str, Any] | None = None,
           at: datetime | None = None) -> AuditEntry:
    """Add an audit row to the session (the caller commits it with the change itself)."""
    entry = AuditEntry(created_at=at or utcnow(), actor_type=actor.kind, actor_key_id=actor.key_id,
                       actor_name=actor.label,
                       tenant_id=tenant_id, action=action, target_type=target_type,
                       target_id=target_id, details=details or None)
    session.add(entry)
    return entry


def list_entries(session: Session, *, tenant_id: int | None = None, action: str | None = None,
                 target_type: str | None = None, target_id: int | None = None,
                 before_id: int | None = None, limit: int = 100) -> list[AuditEntry]:
    """Newest first; `before_id` pages backwards (pass the last id of the previous page)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if tenant_id is not None:
        query = query.where(AuditEntry.tenant_id == tenant_id)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if target_type is not None:
        query = query.where(AuditEntry.target_type == target_type)
    if target_id is not None:
        query = query.where(AuditEntry.target_id == target_id)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(session.scalars(query))


def entry_to_dict(entry: AuditEntry) -> dict[str, Any]:
    created = as_utc(entry.created_at)
    return {
        "id": entry.id, "object": "audit_entry",
        "created_at": created.isoformat().replace("+00:00", "Z") if created else None,
        "actor": {"type": entry.actor_type, "api_key_id": entry.actor_key_id, "name": entry.actor_name},
        "tenant_id": entry.tenant_id, "action": entry.action,
        "target": {"type": entry.target_type, "id": entry.target_id},
        "details": entry.details or {},
    }
