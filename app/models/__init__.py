"""SQLAlchemy models; alembic's `migrations/` owns the schema they describe."""
from app.models.tenant import Tenant
from app.models.api_key import ApiKey
from app.models.usage import UsageDaily, UsageRecord

__all__ = ["Tenant", "ApiKey", "UsageRecord", "UsageDaily"]
