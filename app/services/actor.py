"""Who is making an administrative change or reading admin data (no Flask in here)."""
from __future__ import annotations

import getpass
from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """The system secret (`system`), the command line (`cli`), or a key (`key`) with its role.

    A key actor acts within its own tenant only; `system` and `cli` act on every tenant.
    """
    kind: str                      # system | cli | key
    key_id: int | None = None
    tenant_id: int | None = None   # the key's tenant
    role: str | None = None        # admin | member (keys only)
    name: str | None = None        # who, in words, when the kind does not say it (the CLI's user)

    @property
    def label(self) -> str:
        """What the audit log records as the actor: `system`, `key:<id>` or `cli:<user>`."""
        if self.name:
            return self.name
        return f"key:{self.key_id}" if self.kind == "key" else self.kind

    @property
    def is_operator(self) -> bool:
        return self.kind in ("system", "cli")

    @property
    def is_tenant_admin(self) -> bool:
        return self.kind == "key" and self.role == "admin"

    def sees_tenant(self, tenant_id: int | None) -> bool:
        """May this actor see (or manage) data of `tenant_id`?"""
        return self.is_operator or (self.is_tenant_admin and tenant_id == self.tenant_id)


SYSTEM = Actor("system")


def cli_actor() -> Actor:
    """The command line, named by the operating system user running it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (a container with an unnamed uid)
        user = "unknown"
    return Actor("cli", name=f"cli:{user}"[:100])
