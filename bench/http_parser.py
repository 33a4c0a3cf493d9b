#!/usr/bin/env python3
"""gunicorn's two request parsers side by side, in process: the CPU time gunicorn spends
reading one typical chat-completion request (request line, headers, a small JSON body) with
its Python parser and with the C parser of requirements-fast.txt (gunicorn_h1c), alternating
round by round; medians of the rounds.

    .venv/bin/python bench/http_parser.py [--rounds 9] [--requests 20000]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

from gunicorn.config import Config
from gunicorn.http.parser import RequestParser

BODY = (b'{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark, '
        b'briefly and politely please."}],"max_tokens":64}')
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
           b"Authorization: Bearer sk-0123456789abcdef0123456789abcdef0123\r\n"
           b"Content-Type: application/json\r\nUser-Agent: OpenAI/Python 3.51.0\r\nAccept: application/json\r\n"
           b"X-Stainless-Lang: python\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


class _Socket:
    """What the parser reads from: the request's bytes, then nothing."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def recv(self, n: int) -> bytes:
        return self._data.read(n)


def parse_all(cfg: Config, n: int) -> float:
    """CPU microseconds per request to parse `n` requests (one connection each)."""
    started = time.process_time()
    for _ in range(n):
        request = next(RequestParser(cfg, _Socket(REQUEST), ("127.0.0.1", 50000)))
        if request.body.read() != BODY:
            raise SystemExit("the parser returned another body")
    return (time.process_time() - started) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args(argv)
    try:
        import gunicorn_h1c  # noqa: F401
    except ImportError:
        print("gunicorn_h1c is not installed (pip install -r requirements-fast.txt)", file=sys.stderr)
        return 2
    configs = {}
    for name in ("python", "fast"):
        configs[name] = Config()
        configs[name].set("http_parser", name)
    figures: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            figures[name].append(parse_all(cfg, args.requests))
    for name, values in figures.items():
        print(f"{name:7s} median {statistics.median(values):6.1f} us/request  "
              f"(rounds: {' '.join(f'{v:.1f}' for v in values)})")
    saved = statistics.median(figures["python"]) - statistics.median(figures["fast"])
    print(f"the C parser saves {saved:.1f} us of CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
