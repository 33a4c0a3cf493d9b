#!/usr/bin/env python3
"""Chat completions through one tree's Flask app in this process, under gevent, with no HTTP
server: what `count_per_request.py --callgrind` runs under valgrind.

Run with the tree as the working directory and the gateway's environment (DATABASE_URL,
REDIS_URL, MODELS_FILE, ...) plus BENCH_KEY (a key of that gateway), N (requests), G
(greenlets sending them, default 16), STREAM=1 for streamed answers. It starts the app's
runtime, freezes the start-up heap as a gunicorn worker does, sends 200 warm-up requests, then
N, and prints the CPU time per request. Any answer that is not a 200 stops it (exit 1).
"""
import gevent.monkey

gevent.monkey.patch_all()

import gc  # noqa: E402 - after the patching, as in a gunicorn gevent worker
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, os.getcwd())
from app import create_app  # noqa: E402 - the tree's own app (cwd)

PROMPT = "Say hello to the benchmark, briefly and politely please."


def environ_for(body: bytes, key: str) -> dict:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
            "wsgi.multiprocess": True, "wsgi.run_once": False, "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
            "HTTP_AUTHORIZATION": f"Bearer {key}", "HTTP_HOST": "127.0.0.1:8000", "QUERY_STRING": ""}


def main() -> int:
    app = create_app()
    runtime = app.extensions.get("gateway")
    if runtime is not None and hasattr(runtime, "start"):
        runtime.start()
    gc.collect()
    gc.freeze()
    stream = os.environ.get("STREAM") == "1"
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64,
                       **({"stream": True} if stream else {})}).encode()
    base = environ_for(body, os.environ["BENCH_KEY"])
    failures: list[str] = []

    def one() -> None:
        env = dict(base, **{"wsgi.input": io.BytesIO(body)})
        status: list[str] = []
        answer = app(env, lambda s, h, e=None: status.append(s))
        for _ in answer:
            pass
        if hasattr(answer, "close"):
            answer.close()
        if not status or not status[0].startswith("200"):
            failures.append(status[0] if status else "no status")

    def send(n: int) -> None:
        left = [n]

        def worker() -> None:
            while left[0] > 0 and not failures:
                left[0] -= 1
                one()
        gevent.joinall([gevent.spawn(worker) for _ in range(int(os.environ.get("G", "16")))])

    send(200)
    n = int(os.environ.get("N", "400"))
    before = resource.getrusage(resource.RUSAGE_SELF)
    send(n)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n * 1000
    print(f"cpu ms/request {cpu:.3f}" if not failures else f"failed: {failures[:3]}", flush=True)
    os._exit(1 if failures else 0)  # the runtime's threads are daemons; nothing to wait for


if __name__ == "__main__":
    sys.exit(main())
