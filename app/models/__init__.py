"""SQLAlchemy models; alembic's `migrations/` owns the schema they describe."""
from app.models.tenant import Tenant
from app.models.api_key import ApiKey
from app.models.usage import UsageDaily, UsageRecord
from app.models.audit import AuditEntry
from app.models.conversation import Conversation
from app.models.stored_response import StoredResponse

__all__ = ["Tenant", "ApiKey", "UsageRecord", "UsageDaily", "AuditEntry", "Conversation", "StoredResponse"]
