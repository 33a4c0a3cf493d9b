"""Production server: gunicorn with gevent workers.

    gunicorn -c gunicorn.config.py "app:create_app()"

No `preload_app`: the gevent worker monkey-patches *before* it imports the app, which is what
makes psycopg 3 cooperative. Preloading would import psycopg in the unpatched master and every
query would block its whole worker (measured in TRAPS.md). If you ever need preloading, the
first lines of this file must be `from gevent import monkey; monkey.patch_all()`.
"""
import multiprocessing
import os

from dotenv import load_dotenv
from gunicorn import util as gunicorn_util
from gunicorn.http import wsgi as gunicorn_wsgi

load_dotenv(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env"), override=False)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


bind = f"{_env('HOST', '0.0.0.0')}:{_env('PORT', '8000')}"
workers = int(_env("WEB_CONCURRENCY", str(multiprocessing.cpu_count())))
worker_class = "gevent"
worker_connections = int(_env("WORKER_CONNECTIONS", "1000"))
preload_app = False
# Streams can last minutes: the worker heartbeat is not tied to request time under gevent.
timeout = int(_env("WORKER_TIMEOUT", "60"))
graceful_timeout = int(_env("GRACEFUL_TIMEOUT", "30"))
keepalive = int(_env("KEEPALIVE", "5"))
# An access log costs ~25% of throughput on 2 cores (TRAPS.md): off unless asked for.
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = _env("LOG_LEVEL", "info").lower()
# Never log request lines with query strings that could carry secrets.
limit_request_line = 8190
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl), which
# several gateways on one host would fight over: off unless a path is given.
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
else:
    control_socket_disable = True


class _OneSendResponse(gunicorn_wsgi.Response):
    """gunicorn's response writer, with fewer `send`s: the status line and headers leave with
    the first body bytes (gunicorn sends them alone first), and a chunked body's terminating
    chunk leaves with the last data when the app marks it (a bytes object whose `ends_body`
    is true: app/utils/streaming.py `FinalChunk`), instead of alone in `close()`. On loopback
    or a LAN every `send` costs a syscall and a wake-up of the peer. The edge cases (no body
    allowed, not bytes, empty, longer than Content-Length) stay with gunicorn. It relies on
    gunicorn's Response internals as of the version pinned in requirements.txt (27.0.1);
    Testing/test_gunicorn_config.py checks the bytes on the wire, so an upgrade that changes
    them fails there, not in production."""

    _ended = False  # the terminating chunk went out with the last data

    def write(self, arg):  # noqa: ANN001 - gunicorn's signature
        if self._ended:
            return
        if (self._omits_body or not isinstance(arg, bytes) or not arg
                or (self.response_length is not None and len(arg) > self.response_length - self.sent)):
            return super().write(arg)
        data = b""
        if not self.headers_sent:
            head = self.default_headers()
            head.extend(["%s: %s\r\n" % (k, v) for k, v in self.headers])
            data = gunicorn_util.to_bytestring("%s\r\n" % "".join(head), "latin-1")
            self.headers_sent = True
        self.sent += len(arg)
        if self.chunked:
            data += b"%X\r\n%s\r\n" % (len(arg), arg)
            if getattr(arg, "ends_body", False):
                data += b"0\r\n\r\n"
                self._ended = True
        else:
            data += arg
        self.sock.sendall(data)

    def close(self):
        if not self._ended:
            super().close()


def post_fork(server, worker):
    """Installed in the worker only (the master serves no request)."""
    gunicorn_wsgi.Response = _OneSendResponse


def _gateway(worker):
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("gateway") if app is not None else None


def post_worker_init(worker):
    """Start the usage writer and outbox flusher at once: a fresh worker replays what dead
    workers left in the outbox even before its first request."""
    gateway = _gateway(worker)
    if gateway is not None:
        gateway.usage_batcher.start()
        # Key events and models reloads reach a worker only while it listens: from the start.
        if gateway.key_events is not None:
            gateway.key_events.ensure_listening()


def worker_exit(server, worker):
    """After in-flight requests finished (or graceful_timeout passed): send the settlements and
    store the usage rows this worker still holds (in PostgreSQL, else in the outbox)."""
    gateway = _gateway(worker)
    if gateway is not None:
        gateway.limiter.flush(timeout=5)
        gateway.usage_batcher.close(timeout=float(_env("GRACEFUL_TIMEOUT", "30")))


def when_ready(server):
    """SIGHUP reloads data/models.json: gunicorn restarts the workers gracefully and the new
    ones load the file. The master first checks the file (`db_manager.py check-models`, in a
    child process: the master must not import the app before gevent patches the workers); an
    invalid file is refused with the error naming the entry, and the workers that serve the
    previous catalogue are left running. (`POST /v1/admin/reload` reloads without a restart.)"""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    restart_workers = server.handle_hup

    def handle_hup():
        path = os.environ.get("MODELS_FILE") or os.path.join(here, "data", "models.json")
        check = subprocess.run([sys.executable, os.path.join(here, "db_manager.py"), "check-models", path],
                               cwd=here, capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            server.log.error("SIGHUP: models file refused, the workers keep serving the previous "
                             "catalogue: %s", check.stderr.strip())
            return
        restart_workers()

    server.handle_hup = handle_hup
