"""Production server: gunicorn with gevent workers.

    gunicorn -c gunicorn.config.py "app:create_app()"

No `preload_app`: the gevent worker monkey-patches *before* it imports the app, which is what
makes psycopg 3 cooperative. Preloading would import psycopg in the unpatched master and every
query would block its whole worker (measured: docs/traps.md). If you ever need preloading, the
first lines of this file must be `from gevent import monkey; monkey.patch_all()`.
"""
import multiprocessing
import os

from dotenv import load_dotenv
from gunicorn.workers.base import Worker
from gunicorn.workers.ggevent import GeventWorker

load_dotenv(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env"), override=False)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


bind = f"{_env('HOST', '0.0.0.0')}:{_env('PORT', '8000')}"
workers = int(_env("WEB_CONCURRENCY", str(multiprocessing.cpu_count())))
# Without REDIS_URL the limiter lives in each worker's memory: N workers would each admit the
# key's full rpm/tpm/budget/concurrency (N times the limit). Embedded mode runs one worker.
EMBEDDED_LIMITER_ONE_WORKER = not os.environ.get("REDIS_URL", "").strip() and workers > 1
if EMBEDDED_LIMITER_ONE_WORKER:
    requested_workers, workers = workers, 1


class DrainingGeventWorker(GeventWorker):
    """gunicorn's gevent worker, except when its master disappears (SIGKILLed, crashed).

    The stock worker then calls sys.exit() from its heartbeat at once: requests it is serving
    are dropped, and while `worker_exit` closes the runtime the worker still accepts and
    answers new requests, whose usage rows can reach a writer that has already stopped (answered,
    never recorded). This one leaves its run loop the way SIGTERM makes it: it stops
    accepting (nginx sends new connections to another replica), finishes the requests and
    streams it holds within graceful_timeout, and only then runs `worker_exit`, which stores
    every row it holds (docs/replicas.md, "Killing a replica: what is lost")."""

    def notify(self):
        Worker.notify(self)   # the heartbeat, without GeventWorker's sys.exit on a new parent
        if self.alive and self.ppid != os.getppid():
            self.log.warning("Worker %s: master %s is gone; no longer accepting, finishing the requests "
                             "in flight, then exiting", self.pid, self.ppid)
            self.alive = False


worker_class = DrainingGeventWorker
worker_connections = int(_env("WORKER_CONNECTIONS", "1000"))
preload_app = False
# Streams can last minutes: the worker heartbeat is not tied to request time under gevent.
timeout = int(_env("WORKER_TIMEOUT", "60"))
graceful_timeout = int(_env("GRACEFUL_TIMEOUT", "30"))
keepalive = int(_env("KEEPALIVE", "5"))
# An access log costs ~25% of throughput on 2 cores (docs/traps.md): off unless asked for.
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = _env("LOG_LEVEL", "info").lower()
# Never log request lines with query strings that could carry secrets.
limit_request_line = 8190
# auto: gunicorn's C parser (gunicorn_h1c, requirements-fast.txt) when installed, else its
# Python parser; python: always the Python one; fast: refuse to start without the C one.
http_parser = _env("HTTP_PARSER", "auto").strip().lower()
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl), which
# several gateways on one host would fight over: off unless a path is given.
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
else:
    control_socket_disable = True


# Metrics (docs/metrics.md): prometheus_client's multiprocess mode. Each worker writes its
# figures to files of PROMETHEUS_MULTIPROC_DIR; any worker's /metrics sums them all. The master
# empties the directory when it starts (figures of a previous run are not this run's), or makes
# a private temporary one when none is given; a dead worker's live gauges are dropped
# (`mark_process_dead`), its counters kept (they were counted). The variable is set before any
# worker starts: prometheus_client chooses its mode when a worker first imports it.
METRICS_ENABLED = _env("METRICS_ENABLED", "1").strip().lower() in ("1", "true", "yes", "on")
METRICS_STARTED_FILE = "gateway-started"  # read by app/services/metrics_summary.py
_metrics_tempdir = None


def _prepare_metrics_dir(server):
    global _metrics_tempdir
    import tempfile
    import time

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db") or name == METRICS_STARTED_FILE:
                os.remove(os.path.join(path, name))
    else:
        path = _metrics_tempdir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    with open(os.path.join(path, METRICS_STARTED_FILE), "w") as f:
        f.write(f"{time.time():.3f}\n")
    server.log.info("metrics: multiprocess directory %s", path)


def on_starting(server):
    if METRICS_ENABLED:
        _prepare_metrics_dir(server)
    if EMBEDDED_LIMITER_ONE_WORKER:
        server.log.warning("REDIS_URL is not set: the rate limiter is embedded in each worker's memory, "
                           "so %d workers would each admit every key's full limits; starting 1 worker "
                           "instead of %d. Set REDIS_URL to run several.", requested_workers, requested_workers)


def _runtime(worker):
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("gateway") if app is not None else None


def post_worker_init(worker):
    """The app was built in this worker (after the fork and gevent's patching), no request
    served yet: start its runtime's background threads (usage writer, outbox flusher,
    settlement sender, key-event listener, health publisher). A fresh worker replays what
    dead workers left in the outbox even before its first request."""
    runtime = _runtime(worker)
    if runtime is not None:
        runtime.start()
    worker.log.info("worker %s: HTTP parser: %s", worker.pid, _http_parser_in_use(worker.cfg))
    worker.log.info("worker %s: %d start-up objects frozen (gc.freeze)", worker.pid, _freeze_startup_objects())


def _http_parser_in_use(cfg) -> str:
    """Which request parser this worker's gunicorn uses, as gunicorn itself decides it (its
    check also refuses a gunicorn_h1c too old for its limits, and compatibility flags the C
    parser lacks)."""
    from importlib import metadata

    from gunicorn.http import message

    decide = getattr(message, "_check_fast_parser", None)
    if decide is None:
        return f"unknown (gunicorn {metadata.version('gunicorn')} does not say)"
    if decide(cfg):
        return f"gunicorn_h1c {metadata.version('gunicorn_h1c')} (C)"
    reason = "HTTP_PARSER=python" if cfg.http_parser == "python" else "gunicorn_h1c not installed or not usable"
    return f"python ({reason})"


def _freeze_startup_objects() -> int:
    """Move everything the worker built at start-up (modules, the app, the catalogue, compiled
    SQL) into the collector's permanent generation: a full collection then no longer walks it.
    Measured (gc.callbacks in a worker, 64 streaming connections): each full collection took
    ~80 ms of CPU, about once per 2 s of worker CPU (~4%); frozen, none in the same run."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def worker_exit(server, worker):
    """After in-flight requests finished (or graceful_timeout passed), on SIGTERM as when the
    master is gone (DrainingGeventWorker): close the runtime, which sends the settlements and
    stores the usage rows this worker still holds (in PostgreSQL, else in the outbox)."""
    runtime = _runtime(worker)
    if runtime is not None:
        runtime.close(timeout=float(_env("GRACEFUL_TIMEOUT", "30")))


def child_exit(server, worker):
    """A worker is gone (exited, killed, replaced): its live gauges (rows queued, write lag) no
    longer count; its counters and histograms stay in the sums."""
    if METRICS_ENABLED and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """The temporary metrics directory the master made goes with it."""
    if _metrics_tempdir:
        import shutil

        shutil.rmtree(_metrics_tempdir, ignore_errors=True)


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
