"""The administrative use cases, once, for the HTTP API and the command line (`db_manager.py`).

Each method is a whole use case: it checks what the actor may do and what the values mean,
applies the change, writes its audit row, commits, and only then tells every gateway worker
that a key or a tenant changed (`KeyChangeNotifier`: the app's `KeyEvents`, or a plain Redis
publisher for the CLI). The methods own the transaction: the lower-level helpers of
`api_key_service` and `tenant_service` only add and flush, never commit. A refusal raises an
`app.errors.APIError` (its message is what both the API and the CLI show) and rolls back.

Nothing here knows about Flask: the caller passes the session, the actor and the names of
the models a key may be limited to.
"""
from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from app.models import ApiKey, Tenant
from app.providers.catalog import Catalog
from app.services import api_key_service, audit_service, tenant_service
from app.services.actor import Actor
from app.services.key_events import KeyChangeNotifier
from app.services.router import CATEGORY_ALIASES
from app.utils.clock import SYSTEM_CLOCK, Clock

# The fields of a new key its audit row records (never the secret or its hash).
AUDITED_KEY_FIELDS = ("name", "prefix", "role", *api_key_service.LIMIT_FIELDS, "budget_usd",
                      "allowed_models", "expires_at", "cache")


def known_models(catalog: Catalog) -> frozenset[str]:
    """What `allowed_models` may name: the catalog's model aliases and the category aliases."""
    return frozenset(catalog.models) | frozenset(CATEGORY_ALIASES)


class Admin:
    """The use cases, performed by `actor` in `session`."""

    def __init__(self, session: Session, actor: Actor, notifier: KeyChangeNotifier, *,
                 known_models: Collection[str] | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        """`known_models`: the model aliases and category aliases `allowed_models` may name
        (None: not checked)."""
        self.session = session
        self.actor = actor
        self.notifier = notifier
        self.known_models = known_models
        self.clock = clock

    # --- keys -------------------------------------------------------------------------------

    def mint_key(self, params: dict[str, Any]) -> tuple[ApiKey, str]:
        """A new key (and its tenant, named by `params["tenant"]`, created on first use by an
        operator). Returns the key and its plaintext, which exists only in this return value."""
        params = dict(params)
        tenant_ref = params.pop("tenant", None)
        self._check_models(params.get("allowed_models"))
        with self._transaction():
            tenant = self._tenant_of_new_key(tenant_ref)
            values = {**tenant_service.key_defaults(tenant, params), **params}
            self._check_ceilings(tenant, values)
            key, plaintext = api_key_service.new_key(self.session, tenant=tenant, created_at=self.clock.now(),
                                                     **values)
            body = api_key_service.key_to_dict(key, self.clock.now())
            self._audit("key.create", key, {k: v for k, v in body.items() if k in AUDITED_KEY_FIELDS})
        return key, plaintext

    def _tenant_of_new_key(self, ref: str | None) -> Tenant:
        """An operator names the tenant by id or name (a new name creates it; none: "default");
        a tenant admin mints into its own tenant only."""
        if not self.actor.is_operator:
            tenant = self.session.get(Tenant, self.actor.tenant_id)
            if ref is not None and ref not in (tenant.name, str(tenant.id)):
                raise PermissionDenied("A tenant admin key mints keys of its own tenant only.",
                                       param="tenant", code="other_tenant")
            return tenant
        if ref is None:
            ref = "default"
        existing = tenant_service.resolve_tenant(self.session, ref)
        if existing is not None:
            return existing
        if tenant_service.is_id(ref):
            raise NotFound(f"No tenant with id {ref}.", param="tenant")
        return tenant_service.get_or_create_tenant(self.session, self.actor, ref)

    def update_key(self, key_id: int, changes: dict[str, Any]) -> ApiKey:
        if not changes:
            raise InvalidRequest("Nothing to change: send at least one field.", code="invalid_value")
        if "allowed_models" in changes:
            self._check_models(changes["allowed_models"])
        with self._transaction():
            key = self._live_key(key_id, "changed")
            self._check_ceilings(key.tenant, changes)
            changed = api_key_service.update_key(key, changes)
            if changed:
                self._audit("key.update", key, changed)
        if changed:
            self.notifier.changed(key_id=key.id)
        return key

    def rotate_key(self, key_id: int, grace_period_s: float) -> tuple[ApiKey, str]:
        """A new secret for the key; the old one keeps working for `grace_period_s` seconds."""
        with self._transaction():
            key = self._live_key(key_id, "rotated")
            old_prefix = key.prefix
            plaintext = api_key_service.rotate_key(key, grace_period_s, self.clock.now())
            grace = int(grace_period_s) if float(grace_period_s).is_integer() else grace_period_s
            self._audit("key.rotate", key, {"previous_prefix": old_prefix, "prefix": key.prefix,
                                            "grace_period_s": grace})
        self.notifier.changed(key_id=key.id)
        return key, plaintext

    def revoke_key(self, key_id: int) -> tuple[ApiKey, bool]:
        """Revoke the key: (key, True), or (key, False) when it already was (nothing written).
        The event is published either way (a gateway that missed the first one learns it)."""
        with self._transaction():
            key = self.visible_key(key_id)
            revoked = api_key_service.revoke_key(key, self.clock.now())
            if revoked:
                self._audit("key.revoke", key, {"name": key.name, "prefix": key.prefix})
        self.notifier.changed(key_id=key.id)
        return key, revoked

    def visible_key(self, key_id: int) -> ApiKey:
        """The key, if it exists and the actor may see it (404 otherwise, the same answer for a
        key of another tenant as for a key that does not exist)."""
        key = self.session.get(ApiKey, key_id) if 0 < key_id <= tenant_service.MAX_ID else None
        if key is None or not self.actor.sees_tenant(key.tenant_id):
            raise NotFound(f"No API key with id {key_id}.", param="id")
        return key

    # --- tenants ----------------------------------------------------------------------------

    def create_tenant(self, *, name: str, status: str = "active", budget_usd: Decimal | None = None,
                      key_limits: dict[str, int | None] | None = None) -> Tenant:
        self._require_operator()
        with self._transaction():
            tenant = tenant_service.add_tenant(self.session, name=name, status=status, budget_usd=budget_usd,
                                               key_limits=key_limits, created_at=self.clock.now())
            self._audit_tenant("tenant.create", tenant, {
                "name": name, "status": status, "budget_usd": tenant_service.plain(budget_usd),
                "key_limits": key_limits or {}})
        return tenant

    def update_tenant(self, ref: str | int, changes: dict[str, Any]) -> Tenant:
        """Change a tenant named by id or name (see `tenant_service.resolve_tenant`)."""
        self._require_operator()
        if not changes:
            raise InvalidRequest("Nothing to change: send at least one field.", code="invalid_value")
        with self._transaction():
            tenant = self.visible_tenant(ref)
            changed = tenant_service.apply_changes(self.session, tenant, changes)
            if changed:
                self._audit_tenant("tenant.update", tenant, changed)
        if changed:
            # Status, budget and name live in every cached key snapshot of the tenant.
            self.notifier.changed(tenant_id=tenant.id)
        return tenant

    def visible_tenant(self, ref: str | int, param: str = "id") -> Tenant:
        return tenant_service.visible_tenant(self.session, self.actor, ref, param)

    # --- the parts ---------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Commit what the block did, or roll all of it back when it raised."""
        try:
            yield
            self.session.commit()
        except BaseException:
            self.session.rollback()
            raise

    def _live_key(self, key_id: int, verb: str) -> ApiKey:
        key = self.visible_key(key_id)
        if key.revoked_at is not None:
            raise Conflict(f"The API key {key_id} is revoked and cannot be {verb}.", code="key_revoked")
        return key

    def _require_operator(self) -> None:
        if not self.actor.is_operator:
            raise PermissionDenied("Only the system secret (or the command line) manages tenants.",
                                   code="operator_only")

    def _check_ceilings(self, tenant: Tenant, values: dict[str, Any]) -> None:
        """A tenant admin gives its keys no more than its tenant's limits (operators may)."""
        if self.actor.is_operator:
            return
        problems = tenant_service.ceiling_violations(tenant, values)
        if problems:
            field, reason = problems[0]
            raise PermissionDenied(f"A tenant admin cannot set '{field}' here: {reason}.", param=field,
                                   code="exceeds_tenant_limits")

    def _check_models(self, names: list[str] | None) -> None:
        """Every name of `allowed_models` is a model alias or a category alias: a typo would
        make a key that can use no model at all."""
        if names is None or self.known_models is None:
            return
        unknown = [n for n in names if n not in self.known_models]
        if unknown:
            known = sorted(self.known_models)
            listed = ", ".join(known[:40]) + (f" and {len(known) - 40} more" if len(known) > 40 else "")
            raise InvalidRequest(f"Unknown model alias {unknown[0]!r} in allowed_models; known aliases: {listed}.",
                                 param="allowed_models", code="model_not_found")

    def _audit(self, action: str, key: ApiKey, details: dict[str, Any]) -> None:
        audit_service.record(self.session, self.actor, action, target_type="api_key", target_id=key.id,
                             tenant_id=key.tenant_id, details=details, at=self.clock.now())

    def _audit_tenant(self, action: str, tenant: Tenant, details: dict[str, Any]) -> None:
        audit_service.record(self.session, self.actor, action, target_type="tenant", target_id=tenant.id,
                             tenant_id=tenant.id, details=details, at=self.clock.now())
