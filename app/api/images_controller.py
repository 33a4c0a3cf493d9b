"""POST /v1/images/generations (also /images/generations and the short /image): validate
OpenAI's image request, reserve n x the model's per-image price on the key's budget, run it
through the completion run (routing, retries, fallbacks, settlement: one usage row, endpoint
"images") and answer OpenAI's images object (`url` or `b64_json` items)."""
from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from flask import Response, request

from app.api.auth import authenticate
from app.api.common import json_response, new_request_id, read_json_object
from app.errors import InvalidRequest, UpstreamError
from app.providers.base import Completion, Provider
from app.providers.catalog import Deployment
from app.runtime import runtime
from app.services.completion import CompletionRun
from app.utils.token_counter import DEFAULT_ENCODING, count_text

MAX_IMAGES = 10
FORMATS = ("url", "b64_json")
_SIZE = re.compile(r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")


def generate_images() -> Response:
    rt = runtime()
    key = authenticate()
    body = read_json_object()
    n = image_request(body)
    entry = rt.providers.catalog.get(body["model"])
    size = body.get("size")
    price = entry.pricing.image_price(size) if entry is not None else Decimal(0)
    prompt_tokens = count_text(body["prompt"], entry.tokenizer if entry is not None else DEFAULT_ENCODING)
    run = CompletionRun.begin(rt, key, body, "images", request_id=new_request_id(), body_bytes=request.content_length,
                              prompt_tokens=prompt_tokens, output_tokens=0, flat_cost=price * n)
    with run:
        def invoke(provider: Provider, deployment: Deployment) -> Completion:
            return provider.generate_images({**body, "model": deployment.model, "n": n})

        result = run.complete(invoke=invoke)
        data = (result.body or {}).get("data")
        if not isinstance(data, list) or not data:
            raise UpstreamError("The provider answered no images.", code="upstream_malformed")
        # Billed per image returned, at the price of the model that answered (a fallback may differ).
        run.trace.flat_cost = run.trace.entry.pricing.image_price(size) * len(data)
        return run.respond(json_response(result.body))


def image_request(body: dict[str, Any]) -> int:
    """Validate the request (OpenAI's rules and messages); the number of images asked for."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise InvalidRequest(f"Invalid value for 'n': must be an integer from 1 to {MAX_IMAGES}.", param="n",
                             code="invalid_value")
    size = body.get("size")
    if size is not None and size != "auto" and not (isinstance(size, str) and _SIZE.match(size)):
        raise InvalidRequest(f"Invalid value for 'size': {size!r}; use WIDTHxHEIGHT such as '1024x1024', or "
                             "'auto'.", param="size", code="invalid_value")
    fmt = body.get("response_format", "url")
    if fmt not in FORMATS:
        raise InvalidRequest(f"Invalid value for 'response_format': {fmt!r}. Supported values are: 'url' and "
                             "'b64_json'.", param="response_format", code="invalid_value")
    if body.get("stream"):
        raise InvalidRequest("Streamed image generation is not supported by this gateway.", param="stream",
                             code="invalid_value")
    return n
