"""Who is calling: a consumer's Bearer key, or the operator's `X-System-Secret`."""
from __future__ import annotations

import hmac

from flask import g, request

from app.api.request_guard import CLIENT_ADDRESS
from app.errors import (AuthenticationFailed, PermissionDenied, RateLimited, ServiceUnavailable,
                        SystemSecretRequired)
from app.extensions import db
from app.runtime import runtime
from app.services.actor import SYSTEM, Actor
from app.services.api_key_service import KeyInfo, hash_key, lookup_key


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(token: str | None = None) -> KeyInfo:
    """The calling key (`token`, else the Bearer token), or AuthenticationFailed (401 +
    WWW-Authenticate: Bearer).

    The plaintext key is never logged; error messages name at most its display prefix.
    """
    token = token or bearer_token()
    if token is None:
        raise AuthenticationFailed("Missing API key. Send it as 'Authorization: Bearer sk-...'.")
    rt = runtime()
    key_hash = hash_key(token)  # once per request: the lookup takes the hash
    # A key in this worker's cache (fresh, or stale within AUTH_CACHE_STALE_S and not
    # invalidated) gets no throttle check (no Redis round trip on the hot path). Everything else
    # does: guesses, and any key whose entry was invalidated or expired past the stale window.
    if not rt.key_cache.servable(key_hash):
        _refuse_if_throttled(rt)
    # The database down: 503 database_unavailable, mapped with every refusal in app/errors.py.
    info = lookup_key(lambda: db.session, rt.key_cache, key_hash)
    if info is None:
        rt.auth_throttle.failed(client_address())
        raise AuthenticationFailed("Incorrect API key provided.")
    ok, reason = info.usable(rt.clock.now())
    if not ok:
        raise AuthenticationFailed(reason)
    g.api_key = info
    return info


def require_system_secret() -> None:
    """Constant-time check of `X-System-Secret`; 503 when the operator configured none."""
    expected = runtime().settings.SYSTEM_SECRET
    if not expected:
        raise ServiceUnavailable("The admin API is disabled: SYSTEM_SECRET is not configured "
                                 "on this gateway.", code="system_secret_not_configured")
    given = request.headers.get("X-System-Secret", "")
    rt = runtime()
    _refuse_if_throttled(rt)
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        if given:
            rt.auth_throttle.failed(client_address())
        raise SystemSecretRequired("Missing or wrong X-System-Secret header.")


def client_address() -> str:
    """The client's address as the request guard resolved it (TRUSTED_PROXIES)."""
    return request.environ.get(CLIENT_ADDRESS) or request.remote_addr or "unknown"


def _refuse_if_throttled(rt) -> None:
    """429 for an address that failed too many key or secret checks in the current window."""
    retry = rt.auth_throttle.retry_after(client_address())
    if retry:
        raise RateLimited(f"Too many failed authentication attempts from this address; retry after {retry}s.",
                          code="too_many_failed_attempts", headers={"Retry-After": str(retry)})


def key_actor(key: KeyInfo) -> Actor:
    return Actor("key", key_id=key.id, tenant_id=key.tenant_id, role=key.role)


def caller() -> Actor:
    """The system secret when `X-System-Secret` is sent, else the Bearer key (any role)."""
    if "X-System-Secret" in request.headers:
        require_system_secret()
        return SYSTEM
    return key_actor(authenticate())


def admin_caller() -> Actor:
    """The system secret or a tenant-admin key; a member key gets 403."""
    if "X-System-Secret" in request.headers or bearer_token() is None:
        require_system_secret()
        return SYSTEM
    actor = key_actor(authenticate())
    if not actor.is_tenant_admin:
        raise PermissionDenied("This endpoint needs the system secret or a tenant admin key; "
                               "this is a member key.", code="admin_required")
    return actor


def operator_caller() -> Actor:
    """Only the system secret; any key (even a tenant admin's) gets 403."""
    actor = admin_caller()
    if not actor.is_operator:
        raise PermissionDenied("This endpoint needs the system secret.", code="system_secret_required")
    return actor
