"""marshmallow schema of `POST /v1/responses` (top-level fields; the input items, tools and
text format are checked by app/translate/responses_to_chat.py, which names the exact param)."""
from __future__ import annotations

from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from app.api.schemas import StrictBool, StrictNumber, StrictString


def _metadata(value: Any) -> None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if len(value) > 16:
        raise ValidationError("At most 16 key-value pairs.")
    for k, v in value.items():
        if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise ValidationError("Keys are strings of at most 64 characters, values strings of at most 512.")


class ResponsesRequestSchema(Schema):
    class Meta:
        unknown = INCLUDE  # other Responses fields (include, truncation, ...) are accepted and ignored

    model = StrictString(required=True, validate=validate.Length(min=1, max=200))
    input = fields.Raw(allow_none=True)
    instructions = StrictString(allow_none=True)
    previous_response_id = StrictString(allow_none=True, validate=validate.Length(max=64))
    store = StrictBool(allow_none=True)
    stream = StrictBool(allow_none=True)
    parallel_tool_calls = StrictBool(allow_none=True)
    temperature = StrictNumber(validate=validate.Range(min=0, max=2), allow_none=True)
    top_p = StrictNumber(validate=validate.Range(min=0, max=1), allow_none=True)
    max_output_tokens = fields.Integer(strict=True, validate=validate.Range(min=1), allow_none=True)
    metadata = fields.Dict(keys=fields.String(), allow_none=True, validate=_metadata)
    user = StrictString(allow_none=True)
    tools = fields.List(fields.Raw(), allow_none=True)
    text = fields.Dict(allow_none=True)
    reasoning = fields.Dict(allow_none=True)


RESPONSES_SCHEMA = ResponsesRequestSchema()
