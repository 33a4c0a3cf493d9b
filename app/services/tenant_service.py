"""Tenants: creating, reading, updating and suspending them, and the limits of their keys.

A tenant's `rpm_limit`, `tpm_limit`, `daily_token_limit` and `max_concurrent` are the limits
of its keys: the defaults of a new key that does not set them, and the most a tenant admin
may give a key. Its `budget_usd` is a monthly budget shared by all its keys (the limiter
enforces it on every request) and the most a tenant admin may give one key.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidRequest, NotFound
from app.models import ApiKey, Tenant
from app.models.types import utcnow
from app.services import audit_service
from app.services.actor import Actor
from app.services.api_key_service import LIMIT_FIELDS, iso
from app.utils.money import format_money

STATUSES = ("active", "suspended")


def tenant_to_dict(tenant: Tenant, key_count: int | None = None) -> dict[str, Any]:
    body = {
        "id": tenant.id, "object": "tenant", "name": tenant.name, "status": tenant.status,
        "budget_usd": format_money(tenant.budget_usd) if tenant.budget_usd is not None else None,
        "key_limits": {f: getattr(tenant, f) for f in LIMIT_FIELDS},
        "created_at": iso(tenant.created_at),
    }
    if key_count is not None:
        body["keys"] = key_count
    return body


# Ids are BIGINTs: a larger number (from a URL) names nothing, and PostgreSQL would refuse it.
MAX_ID = 2**63 - 1


def get_tenant(session: Session, tenant_id: int) -> Tenant | None:
    return session.get(Tenant, tenant_id) if 0 < tenant_id <= MAX_ID else None


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    if "\x00" in name:  # PostgreSQL text cannot hold it, so no tenant has it
        return None
    return session.scalar(select(Tenant).where(Tenant.name == name))


def resolve_tenant(session: Session, ref: str | int) -> Tenant | None:
    """A tenant by id or by name, as every API and CLI parameter that names a tenant takes it:
    a reference of digits only is an id (names cannot be all digits), anything else a name."""
    if isinstance(ref, int):
        return get_tenant(session, ref)
    if is_id(ref):
        return get_tenant(session, int(ref)) if len(ref) <= 19 else None
    return get_tenant_by_name(session, ref)


def visible_tenant(session: Session, actor: Actor, ref: str | int, param: str = "tenant") -> Tenant:
    """The tenant `ref` names (id or name), if the actor may see it; 404 otherwise, the same
    answer for another tenant as for a tenant that does not exist."""
    tenant = resolve_tenant(session, ref)
    if tenant is None or not actor.sees_tenant(tenant.id):
        raise NotFound(f"No tenant {describe_ref(ref)}.", param=param)
    return tenant


def describe_ref(ref: str | int) -> str:
    """'with id 3' or "named 'research'", for a not-found message."""
    return f"with id {ref}" if isinstance(ref, int) or is_id(ref) else f"named '{ref}'"


def is_id(ref: str) -> bool:
    """Does this tenant reference name an id (digits only)?"""
    return ref.isascii() and ref.isdigit()


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.id)))


def key_counts(session: Session) -> dict[int, int]:
    """Active (unrevoked) keys per tenant id."""
    rows = session.execute(select(ApiKey.tenant_id, func.count()).where(ApiKey.revoked_at.is_(None))
                           .group_by(ApiKey.tenant_id))
    return {tenant_id: count for tenant_id, count in rows}


def get_or_create_tenant(session: Session, actor: Actor, name: str) -> Tenant:
    """The tenant named `name`, created on first use (minting a key into a new tenant) with its
    `tenant.create` audit row, in the caller's transaction. A tenant created concurrently by
    another request is used as is (its creator wrote the audit row)."""
    tenant = get_tenant_by_name(session, name)
    if tenant is not None:
        return tenant
    check_name(name)
    try:
        with session.begin_nested():
            tenant = Tenant(name=name, status="active", created_at=utcnow())
            session.add(tenant)
            session.flush()
    except IntegrityError:
        return session.scalars(select(Tenant).where(Tenant.name == name)).one()
    audit_service.record(session, actor, "tenant.create", target_type="tenant", target_id=tenant.id,
                         tenant_id=tenant.id, details={"name": name, "status": "active",
                                                       "created_with_first_key": True})
    return tenant


def add_tenant(session: Session, *, name: str, status: str = "active", budget_usd: Decimal | None = None,
               key_limits: dict[str, int | None] | None = None, created_at: datetime | None = None) -> Tenant:
    """Add a tenant to the session (flushed, not committed: `admin_service.Admin.create_tenant`
    is the use case). 409 when the name is taken."""
    check_name(name)
    tenant = Tenant(name=name, status=status, budget_usd=budget_usd, created_at=created_at or utcnow(),
                    **{f: (key_limits or {}).get(f) for f in LIMIT_FIELDS})
    session.add(tenant)
    _flush_unique_name(session, name)
    return tenant


def apply_changes(session: Session, tenant: Tenant, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply `changes` (name, status, budget_usd, key_limits: a partial mapping), flushed, not
    committed. Returns {field: [old, new]} of what changed ({} for nothing); 409 when the new
    name belongs to another tenant."""
    if "name" in changes:
        check_name(changes["name"])
    flat = {k: v for k, v in changes.items() if k != "key_limits"}
    flat.update(changes.get("key_limits") or {})
    changed: dict[str, Any] = {}
    for name, new in flat.items():
        old = getattr(tenant, name)
        if old != new:
            setattr(tenant, name, new)
            changed[name] = [plain(old), plain(new)]
    if changed:
        _flush_unique_name(session, tenant.name)
    return changed


def _flush_unique_name(session: Session, name: str) -> None:
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(f"A tenant named '{name}' already exists.", param="name", code="tenant_exists") from None


def check_name(name: str) -> None:
    """A tenant name is never all digits: `/v1/tenants/42` and `--tenant 42` mean the id 42."""
    if is_id(name):
        raise InvalidRequest(f"A tenant name cannot be only digits ('{name}'): digits name a tenant "
                             "by its id.", param="name", code="invalid_value")


def key_defaults(tenant: Tenant, given: dict[str, Any]) -> dict[str, Any]:
    """The tenant's key limits for every limit field a new key's request does not mention."""
    return {f: getattr(tenant, f) for f in LIMIT_FIELDS if f not in given and getattr(tenant, f) is not None}


def ceiling_violations(tenant: Tenant, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, reason) for each value of `values` above what the tenant allows its keys.

    No limit (null) is above any limit the tenant has; a key without a budget is fine (the
    tenant's budget still bounds all its keys), a key budget above the tenant's is not.
    """
    problems = []
    for name in LIMIT_FIELDS:
        ceiling = getattr(tenant, name)
        if name not in values or ceiling is None:
            continue
        value = values[name]
        if value is None or value > ceiling:
            problems.append((name, f"the tenant allows its keys at most {name}={ceiling}"))
    if "budget_usd" in values and tenant.budget_usd is not None and values["budget_usd"] is not None \
            and values["budget_usd"] > tenant.budget_usd:
        problems.append(("budget_usd", "a key's budget cannot exceed its tenant's monthly budget of "
                                       f"{format_money(tenant.budget_usd)}"))
    return problems


def plain(value: Any) -> Any:
    """A value as the audit log shows it (money as a string)."""
    return format_money(value) if isinstance(value, Decimal) else value
