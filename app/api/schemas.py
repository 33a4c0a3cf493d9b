"""marshmallow schemas of the request bodies, with strict types.

Strictness matters: marshmallow's Integer would turn 1.5 into 1 and "10" into 10, Boolean
would take "yes", Float would take "0.7" (see docs/traps.md). An OpenAI client never sends those,
so a gateway that accepts them hides a bug of its caller.
"""
from __future__ import annotations

from datetime import timezone
from typing import Any, Callable

from app.utils.money import MAX_BUDGET_USD
from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, validate

INT32_MAX = 2**31 - 1  # the limit columns' range (INTEGER; daily_token_limit is BIGINT)
INT64_MAX = 2**63 - 1
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class StrictBool(fields.Boolean):
    def _deserialize(self, value: Any, attr: Any, data: Any, **kw: Any) -> bool:
        if not isinstance(value, bool):
            raise ValidationError("Must be a boolean (true or false).")
        return value


class StrictNumber(fields.Float):
    def _deserialize(self, value: Any, attr: Any, data: Any, **kw: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError("Must be a number.")
        return super()._deserialize(value, attr, data, **kw)


class StrictDecimal(fields.Decimal):
    """A decimal string ("12.50") or a number; never a bool, which Decimal() would take as 1."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kw: Any):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValidationError("Must be a decimal string or a number.")
        return super()._deserialize(value, attr, data, **kw)


class StrictString(fields.String):
    def _deserialize(self, value: Any, attr: Any, data: Any, **kw: Any) -> str:
        if not isinstance(value, str):
            raise ValidationError("Must be a string.")
        return value


def _validate_content(content: Any, role: str) -> str | None:
    """None when valid, else the problem with a message's `content`."""
    if content is None:
        return None if role in ("assistant", "function") else "Content is required for this role."
    if isinstance(content, str):
        return None
    if isinstance(content, list):
        if not content:
            return "Content parts must not be empty."
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return "Each content part must be an object with a 'type'."
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                return "A text part needs a string 'text'."
            if part["type"] == "image_url" and not _image_url_ok(part.get("image_url")):
                return "An image_url part needs 'image_url': {\"url\": string, \"detail\": low|high|auto}."
        return None
    return "Content must be a string or a list of content parts."


def _image_url_ok(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return (isinstance(value, dict) and isinstance(value.get("url"), str)
            and value.get("detail", "auto") in ("low", "high", "auto"))


def _tool_calls_problem(calls: Any) -> dict | list | None:
    """marshmallow-shaped messages for a wrong `tool_calls` of an assistant message (None: fine):
    a list of {"id": str, "type": "function", "function": {"name": str, "arguments": str}}."""
    if not isinstance(calls, list):
        return ["Must be a list of tool calls."]
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            return {j: ["Each tool call must be an object."]}
        if not isinstance(call.get("id", ""), str):
            return {j: {"id": ["Must be a string."]}}
        fn = call.get("function")
        if not isinstance(fn, dict):
            return {j: {"function": ["Must be an object with 'name' and 'arguments'."]}}
        for name in ("name", "arguments"):
            if not isinstance(fn.get(name), str):
                return {j: {"function": {name: ["Must be a string."]}}}
    return None


class Messages(fields.List):
    """A non-empty list of chat messages, checked in plain Python (much cheaper than a Nested
    schema per message); unknown message fields (`name`, `tool_calls`, ...) pass through."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(fields.Raw(), **kw)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kw: Any) -> list:
        if not isinstance(value, list):
            raise ValidationError("Must be a list of messages.")
        if not value:
            raise ValidationError("At least one message is required.")
        for i, msg in enumerate(value):
            if not isinstance(msg, dict):
                raise ValidationError({i: ["Each message must be an object."]})
            role = msg.get("role")
            if role not in ROLES:
                raise ValidationError({i: {"role": [f"Must be one of: {', '.join(ROLES[:5])}."]}})
            problem = _validate_content(msg.get("content"), role)
            if problem and not (role == "assistant" and msg.get("tool_calls")):
                raise ValidationError({i: {"content": [problem]}})
            if msg.get("tool_calls") is not None:
                problem = _tool_calls_problem(msg["tool_calls"])
                if problem:
                    raise ValidationError({i: {"tool_calls": problem}})
            if msg.get("name") is not None and not isinstance(msg["name"], str):
                raise ValidationError({i: {"name": ["Must be a string."]}})
            if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
                raise ValidationError({i: {"tool_call_id": ["A tool message needs a string 'tool_call_id'."]}})
        return value


class ChatCompletionSchema(Schema):
    """`POST /v1/chat/completions`. Fields not modelled here pass through to the provider."""

    class Meta:
        unknown = INCLUDE

    model = StrictString(required=True, validate=validate.Length(min=1, max=200))
    messages = Messages(required=True)
    temperature = StrictNumber(validate=validate.Range(min=0, max=2), allow_none=True)
    top_p = StrictNumber(validate=validate.Range(min=0, max=1), allow_none=True)
    max_tokens = fields.Integer(strict=True, validate=validate.Range(min=1), allow_none=True)
    max_completion_tokens = fields.Integer(strict=True, validate=validate.Range(min=1), allow_none=True)
    n = fields.Integer(strict=True, validate=validate.Range(min=1, max=128), allow_none=True)
    stream = StrictBool(allow_none=True)
    stream_options = fields.Dict(allow_none=True)
    presence_penalty = StrictNumber(validate=validate.Range(min=-2, max=2), allow_none=True)
    frequency_penalty = StrictNumber(validate=validate.Range(min=-2, max=2), allow_none=True)
    user = StrictString(allow_none=True)
    # Counted in the admission's token reservation: their shapes must be what the count expects.
    tools = fields.List(fields.Dict(), allow_none=True)
    functions = fields.List(fields.Dict(), allow_none=True)
    response_format = fields.Dict(allow_none=True)


class CountTokensSchema(Schema):
    """`POST /v1/messages/count_tokens` (Anthropic). The blocks of `system` and `messages` are
    checked where they are translated (app/translate/anthropic_to_chat.py)."""

    class Meta:
        unknown = INCLUDE

    model = StrictString(required=True, validate=validate.Length(min=1, max=200))
    messages = fields.List(fields.Raw(), required=True, validate=validate.Length(min=1))
    system = fields.Raw(allow_none=True)
    tools = fields.List(fields.Dict(), allow_none=True)
    tool_choice = fields.Dict(allow_none=True)


class MessagesSchema(CountTokensSchema):
    """`POST /v1/messages` (Anthropic). `max_tokens` is required, as Anthropic requires it;
    fields not modelled here (thinking, cache_control, service_tier, ...) reach an Anthropic
    upstream untouched."""

    max_tokens = fields.Integer(strict=True, required=True, validate=validate.Range(min=1))
    stream = StrictBool(allow_none=True)
    temperature = StrictNumber(validate=validate.Range(min=0, max=1), allow_none=True)
    top_p = StrictNumber(validate=validate.Range(min=0, max=1), allow_none=True)
    top_k = fields.Integer(strict=True, validate=validate.Range(min=1), allow_none=True)
    stop_sequences = fields.List(StrictString(), allow_none=True)
    metadata = fields.Dict(allow_none=True)


class UTCDateTime(fields.AwareDateTime):
    """An ISO 8601 time (UTC when it has no offset), returned in UTC. A time UTC cannot hold
    (31 Dec 9999 west of Greenwich, 1 Jan 0001 east of it) is refused here, where it would
    otherwise overflow later, when compared or stored."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(default_timezone=timezone.utc, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kw: Any) -> Any:
        moment = super()._deserialize(value, attr, data, **kw)
        try:
            return moment.astimezone(timezone.utc)
        except OverflowError:
            raise ValidationError("Not a time that can be expressed in UTC.") from None


class IdField(fields.Integer):
    """A positive id: an integer in JSON, or its digits in a query string."""

    def __init__(self, maximum: int = INT64_MAX, **kw: Any) -> None:
        super().__init__(strict=True, validate=validate.Range(min=1, max=maximum), **kw)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kw: Any) -> int:
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20:
            value = int(value)
        if isinstance(value, bool):
            raise ValidationError("Must be an integer id.")
        return super()._deserialize(value, attr, data, **kw)


class KeyLimitsFields(Schema):
    """The four limits of a key (each optional; null: no limit)."""

    class Meta:
        unknown = RAISE

    rpm_limit = fields.Integer(strict=True, validate=validate.Range(min=1, max=INT32_MAX), allow_none=True)
    tpm_limit = fields.Integer(strict=True, validate=validate.Range(min=1, max=INT32_MAX), allow_none=True)
    daily_token_limit = fields.Integer(strict=True, validate=validate.Range(min=1, max=INT64_MAX),
                                       allow_none=True)
    max_concurrent = fields.Integer(strict=True, validate=validate.Range(min=1, max=INT32_MAX), allow_none=True)


def _budget() -> StrictDecimal:
    return StrictDecimal(validate=validate.Range(min=0, max=MAX_BUDGET_USD), allow_none=True, allow_nan=False)


class ApiKeyUpdateSchema(KeyLimitsFields):
    """`PATCH /v1/api-keys/<id>`: any of these; null clears a limit, the budget or the expiry."""

    name = StrictString(validate=validate.Length(min=1, max=200))
    budget_usd = _budget()
    allowed_models = fields.List(StrictString(validate=validate.Length(min=1)), allow_none=True)
    expires_at = UTCDateTime(allow_none=True)
    cache = StrictBool(allow_none=True)  # the response cache (null: the model or the default decides)


class ApiKeyCreateSchema(ApiKeyUpdateSchema):
    """`POST /v1/api-keys`. `tenant` defaults to "default" for the system secret and to its own
    tenant for a tenant admin (which may name no other)."""

    name = StrictString(required=True, validate=validate.Length(min=1, max=200))
    tenant = StrictString(validate=validate.Length(min=1, max=200))
    role = StrictString(load_default="member", validate=validate.OneOf(("member", "admin")))


class RotateSchema(Schema):
    """`POST /v1/api-keys/<id>/rotate` (the body is optional)."""

    class Meta:
        unknown = RAISE

    grace_period_s = StrictNumber(load_default=0, validate=validate.Range(min=0, max=30 * 86400))


class TenantUpdateSchema(Schema):
    """`PATCH /v1/tenants/<id>`: any of these (key_limits may name some of its four fields)."""

    class Meta:
        unknown = RAISE

    name = StrictString(validate=validate.Length(min=1, max=200))
    status = StrictString(validate=validate.OneOf(("active", "suspended")))
    budget_usd = _budget()
    key_limits = fields.Nested(KeyLimitsFields)


class TenantCreateSchema(TenantUpdateSchema):
    """`POST /v1/tenants`."""

    name = StrictString(required=True, validate=validate.Length(min=1, max=200))
    status = StrictString(load_default="active", validate=validate.OneOf(("active", "suspended")))


class AuditQuerySchema(Schema):
    """Query string of `GET /v1/audit`."""

    class Meta:
        unknown = RAISE

    tenant = StrictString(validate=validate.Length(min=1, max=200))
    action = StrictString(validate=validate.Length(min=1, max=40))
    target_type = StrictString(validate=validate.OneOf(("tenant", "api_key")))
    target_id = IdField()
    before_id = IdField()
    limit = IdField(maximum=1000, load_default=100)


class UsageQuerySchema(Schema):
    """Query string (GET) or JSON body (POST) of `/v1/usage`."""

    class Meta:
        unknown = RAISE

    start = UTCDateTime()
    end = UTCDateTime()
    model = StrictString(validate=validate.Length(min=1, max=200))
    group_by = StrictString(validate=validate.OneOf(("model", "day", "key", "tenant", "endpoint")))
    tenant = StrictString(validate=validate.Length(min=1, max=200))
    api_key_id = IdField()
    format = StrictString(validate=validate.OneOf(("json", "csv")))


class ApiChatSchema(Schema):
    """POST /api/chat: one message, optional model, system prompt and conversation id."""
    class Meta:
        unknown = RAISE

    message = fields.String(required=True, validate=validate.Length(min=1))
    model = fields.String(validate=validate.Length(min=1))
    system = fields.String()
    conversation = fields.String(validate=validate.Length(min=1, max=40))
    stream = StrictBool()
    max_tokens = fields.Integer(strict=True, validate=validate.Range(min=1, max=INT32_MAX))
    temperature = StrictNumber(validate=validate.Range(min=0, max=2))
class RequestsQuerySchema(Schema):
    """Query string of `GET /v1/requests` (scope parameters as for `/v1/usage`)."""

    class Meta:
        unknown = RAISE

    limit = IdField(maximum=100, load_default=20)
    cursor = StrictString(validate=validate.Length(min=1, max=300))
    start = UTCDateTime()
    end = UTCDateTime()
    model = StrictString(validate=validate.Length(min=1, max=200))
    endpoint = StrictString(validate=validate.Length(min=1, max=40))
    status = StrictString(validate=validate.Length(min=1, max=20))
    request_id = StrictString(validate=validate.Length(min=1, max=64))
    tenant = StrictString(validate=validate.Length(min=1, max=200))
    api_key_id = IdField()


class ClearCacheSchema(Schema):
    """`POST /api/clear-cache` (the body is optional): a tenant (id or name) and a model alias."""

    class Meta:
        unknown = RAISE

    tenant = StrictString(validate=validate.Length(min=1, max=200))
    model = StrictString(validate=validate.Length(min=1, max=200))


CHAT_SCHEMA = ChatCompletionSchema()
API_CHAT_SCHEMA = ApiChatSchema()
MESSAGES_SCHEMA = MessagesSchema()
COUNT_TOKENS_SCHEMA = CountTokensSchema()
API_KEY_CREATE_SCHEMA = ApiKeyCreateSchema()
API_KEY_UPDATE_SCHEMA = ApiKeyUpdateSchema()
ROTATE_SCHEMA = RotateSchema()
TENANT_CREATE_SCHEMA = TenantCreateSchema()
TENANT_UPDATE_SCHEMA = TenantUpdateSchema()
AUDIT_QUERY_SCHEMA = AuditQuerySchema()
USAGE_QUERY_SCHEMA = UsageQuerySchema()
REQUESTS_QUERY_SCHEMA = RequestsQuerySchema()
CLEAR_CACHE_SCHEMA = ClearCacheSchema()


# --- the chat request's common case, checked without marshmallow ---------------------------

_NUMBER_TYPES = (int, float)   # not bool (type() is exact)


def _number_in(value: Any, low: float, high: float) -> bool:
    return (type(value) in _NUMBER_TYPES and low <= value <= high) or value is None


def _dicts(value: Any) -> bool:
    return value is None or (type(value) is list and all(type(item) is dict for item in value))


def _count_in(value: Any, low: int, high: int | None) -> bool:
    return (type(value) is int and low <= value and (high is None or value <= high)) or value is None


# Each declared field of ChatCompletionSchema, with a test that is True only for values its
# marshmallow field accepts (None where it allows None). A NaN fails every comparison; an
# infinity fails the ranges.
_CHAT_FIELD_OK: dict[str, Callable[[Any], bool]] = {
    "temperature": lambda v: _number_in(v, 0, 2),
    "top_p": lambda v: _number_in(v, 0, 1),
    "max_tokens": lambda v: _count_in(v, 1, None),
    "max_completion_tokens": lambda v: _count_in(v, 1, None),
    "n": lambda v: _count_in(v, 1, 128),
    "stream": lambda v: v is None or type(v) is bool,
    "stream_options": lambda v: v is None or type(v) is dict,
    "presence_penalty": lambda v: _number_in(v, -2, 2),
    "frequency_penalty": lambda v: _number_in(v, -2, 2),
    "user": lambda v: v is None or type(v) is str,
    "tools": _dicts,
    "functions": _dicts,
    "response_format": lambda v: v is None or type(v) is dict,
}


def chat_surely_valid(body: dict[str, Any]) -> bool:
    """True only for a body CHAT_SCHEMA accepts (False: let marshmallow decide and word the
    error). marshmallow visits all 15 declared fields of every body, present or not, through
    several layers of calls: ~7% of a cached answer's CPU, for a verdict that on an ordinary
    request (a model, messages, a few numbers) plain type checks give as surely."""
    model = body.get("model")
    if type(model) is not str or not 1 <= len(model) <= 200:
        return False
    try:
        CHAT_SCHEMA.fields["messages"]._deserialize(body.get("messages"), "messages", body)
    except ValidationError:
        return False
    for name, ok in _CHAT_FIELD_OK.items():
        if name in body and not ok(body[name]):
            return False
    return True


def validate_chat(body: dict[str, Any]) -> None:
    """CHAT_SCHEMA's verdict on `body`: returns when valid, raises its ValidationError when not
    (unknown fields are allowed and stay in `body`)."""
    if not chat_surely_valid(body):
        CHAT_SCHEMA.load(body)
