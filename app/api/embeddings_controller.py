"""POST /v1/embeddings (also /embeddings): authenticate, validate OpenAI's embeddings request,
run it through the completion run (admission on the counted input, routing, retries,
fallbacks, settlement: one usage row, endpoint "embeddings") and answer OpenAI's list of
embeddings, as floats or as base64 float32 (`encoding_format`)."""
from __future__ import annotations

from typing import Any

from flask import Response, request

from app.api.auth import authenticate
from app.api.common import json_response, new_request_id, read_json_object
from app.errors import InvalidRequest, UpstreamError
from app.providers.base import Completion, Provider, ProviderBadRequest
from app.providers.catalog import Deployment
from app.runtime import runtime
from app.services.completion import CompletionRun
from app.utils.token_counter import DEFAULT_ENCODING, count_text, get_encoding
from app.utils.vectors import encoded

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request
ENCODINGS = ("float", "base64")


def embeddings() -> Response:
    rt = runtime()
    key = authenticate()
    body = read_json_object()
    inputs = embedding_inputs(body)
    entry = rt.providers.catalog.get(body["model"])
    tokenizer = entry.tokenizer if entry is not None else DEFAULT_ENCODING
    check_token_ids(inputs, tokenizer)
    counted = input_tokens(inputs, tokenizer)
    canonical = {**body, "input": inputs}
    try:
        run = CompletionRun.begin(rt, key, canonical, "embeddings", request_id=new_request_id(),
                                  body_bytes=request.content_length, prompt_tokens=counted, output_tokens=0)
    except InvalidRequest as exc:
        if exc.code == "request_too_large_for_limit":  # only the input is reserved: say so
            exc.param, exc.message = "input", exc.message.replace("(prompt + max_tokens)", "(the input)") \
                .replace("Lower max_tokens or the prompt.", "Send fewer or shorter inputs per request.")
        raise
    with run:
        def invoke(provider: Provider, deployment: Deployment) -> Completion:
            return provider.embed(upstream_request(canonical, provider, deployment, run.trace.entry.tokenizer))

        result = run.complete(invoke=invoke)
        return run.respond(json_response(answer(result, body["model"], body.get("encoding_format", "float"),
                                                counted)))


def embedding_inputs(body: dict[str, Any]) -> list[Any]:
    """Validate the request (OpenAI's rules and messages) and return `input` as a list: of
    strings, or of token arrays."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    fmt = body.get("encoding_format", "float")
    if fmt not in ENCODINGS:
        raise InvalidRequest(f"Invalid value for 'encoding_format': {fmt!r}. Supported values are: "
                             "'float' and 'base64'.", param="encoding_format", code="invalid_value")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise InvalidRequest("Invalid value for 'dimensions': must be a positive integer.", param="dimensions",
                             code="invalid_value")
    if "user" in body and not isinstance(body["user"], str):
        raise InvalidRequest("Invalid value for 'user': must be a string.", param="user", code="invalid_value")
    if body.get("stream"):
        raise InvalidRequest("Embeddings are not streamed.", param="stream", code="invalid_value")
    inputs = _as_list(body.get("input"))
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(f"'input' holds {len(inputs)} items; at most {MAX_INPUTS} are allowed per request.",
                             param="input", code="invalid_value")
    return inputs


def _as_list(value: Any) -> list[Any]:
    invalid = InvalidRequest("'input' must be a non-empty string, an array of non-empty strings, an array of "
                             "token ids or an array of token-id arrays.", param="input", code="invalid_value")
    if value is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    if isinstance(value, str):
        if not value:
            raise invalid
        return [value]
    if not isinstance(value, list) or not value:
        raise invalid
    if all(_is_token_id(v) for v in value):
        return [value]
    if all(isinstance(v, str) and v for v in value):
        return value
    if all(isinstance(v, list) and v and all(_is_token_id(t) for t in v) for v in value):
        return value
    raise invalid


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_token_ids(inputs: list[Any], tokenizer: str) -> None:
    """Token ids must exist in the model's tokenizer (they may have to be decoded to text)."""
    if isinstance(inputs[0], str):
        return
    top = get_encoding(tokenizer).max_token_value
    for i, ids in enumerate(inputs):
        bad = next((t for t in ids if t > top), None)
        if bad is not None:
            raise InvalidRequest(f"'input[{i}]' holds the token id {bad}, which the model's tokenizer "
                                 f"({tokenizer}) does not have.", param="input", code="invalid_value")


def input_tokens(inputs: list[Any], tokenizer: str) -> int:
    """Tokens of the input: tiktoken counts of the texts, the length of token arrays. What
    admission reserves, and what is billed when the provider reports no usage."""
    return sum(count_text(i, tokenizer) if isinstance(i, str) else len(i) for i in inputs)


def upstream_request(canonical: dict[str, Any], provider: Provider, deployment: Deployment,
                     tokenizer: str) -> dict[str, Any]:
    """The request for one deployment: its upstream model id; token arrays decoded to text
    for providers that take text only."""
    inputs = canonical["input"]
    if not provider.token_input and not isinstance(inputs[0], str):
        enc = get_encoding(tokenizer)
        try:
            inputs = [enc.decode(ids) for ids in inputs]
        except KeyError as exc:
            raise ProviderBadRequest(f"token id {exc.args[0]} cannot be decoded to text for this provider") from None
    return {**canonical, "model": deployment.model, "input": inputs}


def answer(result: Completion, alias: str, encoding_format: str, counted: int) -> dict[str, Any]:
    """OpenAI's embeddings answer: vectors in input order, in the client's encoding; usage the
    provider's, else the gateway's count (what the usage row bills)."""
    body = result.body or {}
    try:
        items = sorted(body["data"], key=lambda d: d["index"])
        data = [{"object": "embedding", "index": i, "embedding": encoded(d["embedding"], encoding_format)}
                for i, d in enumerate(items)]
    except (KeyError, TypeError, ValueError):
        raise UpstreamError("The provider sent embeddings that are not vectors.", code="upstream_malformed") from None
    usage = result.usage or {}
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int) or isinstance(prompt, bool):
        prompt = counted
    return {"object": "list", "data": data, "model": alias,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
