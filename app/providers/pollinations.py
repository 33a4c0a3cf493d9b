"""Pollinations' image API (`GET {base}/prompt/{prompt}?width=&height=&model=&seed=`, the
answer is the image itself), as OpenAI's `images/generations`.

One GET per image: image i of a request gets seed `seed + i` (the request's `seed`, else a
random one), so every image differs and each URL names its own picture; Pollinations serves
the same image again for the same URL. `response_format: "url"` answers that URL (it carries
no key: the key, optional, goes in an `Authorization: Bearer` header), `"b64_json"` the bytes
read. The `query` setting adds fixed parameters to every call (e.g. {"nologo": "true",
"private": "true"}). Pollinations reports no usage: images are billed per image.
"""
from __future__ import annotations

import base64
import random
import time
from typing import Any
from urllib.parse import quote, urlencode

from app.providers.base import (Completion, ProviderError, error_for_status, image_size, parse_retry_after,
                                redact, register)
from app.providers.native_http import NativeHTTPProvider, json_or_none
from app.providers.openai_compatible import transport_error

MAX_SEED = 2**31 - 1


@register
class PollinationsImageProvider(NativeHTTPProvider):
    type = "pollinations"
    kinds = frozenset({"image"})
    default_base_url = "https://image.pollinations.ai"
    key_required = False

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        super().validate_settings(name, settings)
        if "query" in settings and not isinstance(settings["query"], dict):
            raise ValueError(f"providers.{name}.query: must be an object of query parameters")

    def upstream_error(self, status: int, body: bytes, headers: Any) -> ProviderError:
        parsed = json_or_none(body)
        message = f"Pollinations answered HTTP {status}"
        if isinstance(parsed, dict) and (parsed.get("error") or parsed.get("message")):
            message = str(parsed.get("message") or parsed.get("error"))
        elif body and not isinstance(parsed, (dict, list)):
            message = body[:200].decode("utf-8", "replace").strip() or message
        return error_for_status(status, redact(message), retry_after=parse_retry_after(headers.get("Retry-After")))

    def headers(self) -> dict[str, str]:
        headers = {k: v for k, v in self.static_headers.items() if k != "Content-Type"}
        headers["Accept"] = "image/*"
        key = self.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def image_path(self, prompt: str, model: str, width: int, height: int, seed: int) -> str:
        query = {"width": width, "height": height, "model": model, "seed": seed,
                 **{str(k): str(v) for k, v in (self.settings.get("query") or {}).items()}}
        return f"/prompt/{quote(prompt, safe='')}?{urlencode(query)}"

    def fetch(self, path: str) -> bytes:
        """GET one image: its bytes (an error status or a body that is no image raises)."""
        try:
            resp = self.pool.get(path, self.headers())
            data = resp.read()
        except OSError as exc:
            raise transport_error(exc, self.name) from None
        if resp.status >= 400:
            raise self.upstream_error(resp.status, data, resp.headers)
        if not str(resp.headers.get("Content-Type", "")).startswith("image/") or not data:
            raise self.malformed("an answer that is not an image")
        return data

    def generate_images(self, request: dict[str, Any]) -> Completion:
        self.require_configured()
        width, height = image_size(request.get("size"))
        seed = request.get("seed")
        first = seed if isinstance(seed, int) and not isinstance(seed, bool) else random.randint(0, MAX_SEED - 100)
        items = []
        for i in range(int(request.get("n") or 1)):
            path = self.image_path(str(request["prompt"]), str(request["model"]), width, height, first + i)
            image = self.fetch(path)
            if request.get("response_format") == "b64_json":
                items.append({"b64_json": base64.b64encode(image).decode("ascii")})
            else:
                items.append({"url": self.base_url + path})
        return Completion(body={"created": int(time.time()), "data": items})
