"""A fake Pollinations image server (`GET /prompt/{prompt}?width=&height=&model=&seed=`): a real
HTTP server answering the image itself (`Content-Type: image/jpeg`), as Pollinations documents
it. The bytes are `fake_media.IMAGE_BYTES` + the seed's last byte, so a test can tell images
of different seeds apart. Scripted by the model parameter: fail-500, fail-429 (Retry-After: 1),
not-image (a 200 HTML page). Requests are recorded (path, query, headers).
"""
from __future__ import annotations

from typing import Any

from Testing.fakes import fake_media
from Testing.fakes.http_fake import FakeHTTPServer, FakeRequest, Reply


def image_for_seed(seed: int) -> bytes:
    return fake_media.IMAGE_BYTES + bytes([seed % 256])


class FakePollinations(FakeHTTPServer):
    name = "fake-pollinations"

    @property
    def base_url(self) -> str:
        return self.url

    def handle(self, req: FakeRequest) -> Any:
        if req.method != "GET" or not req.path.startswith("/prompt/") or len(req.path) <= len("/prompt/"):
            return Reply(404, {"error": "Not Found"})
        model = req.query.get("model", "flux")
        if "fail-500" in model:
            return Reply(500, {"error": "Internal Server Error", "message": "image generation failed"})
        if "fail-429" in model:
            return Reply(429, {"error": "Too Many Requests", "message": "queue full: 1 request per 5 seconds"},
                         headers={"Retry-After": "1"})
        if "not-image" in model:
            return Reply(200, b"<html>maintenance</html>", content_type="text/html")
        try:
            seed = int(req.query.get("seed", "42"))
            int(req.query.get("width", "1024")), int(req.query.get("height", "1024"))
        except ValueError:
            return Reply(400, {"error": "Bad Request", "message": "width, height and seed must be integers"})
        return Reply(200, image_for_seed(seed), content_type="image/jpeg")
