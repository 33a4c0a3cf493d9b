"""The key's admission as the API answers it: one limiter round trip, and the refusal or the
limiter's outage turned into the client's 429 / 503 envelope."""
from __future__ import annotations

from typing import Any

from app.errors import ServiceUnavailable, limit_error
from app.services.rate_limit_service import Admission, KeyLimits, LimiterUnavailable


def admit_or_raise(limiter: Any, limits: KeyLimits, request_id: str, tokens: int, cost_nano: int) -> Admission:
    """Reserve `tokens` and `cost_nano` on every limit of the key, or raise the API error."""
    try:
        adm = limiter.admit(limits, request_id, tokens, cost_nano)
    except LimiterUnavailable:
        raise ServiceUnavailable("Rate limits cannot be checked right now (the limiter's Redis is "
                                 "unreachable); try again shortly.", code="rate_limiter_unavailable") from None
    if not adm.admitted:
        raise limit_error(adm.reason, adm.retry_after_ms, adm.headers, tokens=tokens, rpm=limits.rpm,
                          tpm=limits.tpm, daily=limits.daily_tokens, concurrent=limits.max_concurrent)
    return adm
