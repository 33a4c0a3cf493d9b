"""Production server: gunicorn with gevent workers.

    gunicorn -c gunicorn.config.py "app:create_app()"

No `preload_app`: the gevent worker monkey-patches *before* it imports the app, which is what
makes psycopg 3 cooperative. Preloading would import psycopg in the unpatched master and every
query would block its whole worker (measured in TRAPS.md). If you ever need preloading, the
first lines of this file must be `from gevent import monkey; monkey.patch_all()`.
"""
import multiprocessing
import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
worker_class = "gevent"
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
preload_app = False
# Streams can last minutes: the worker heartbeat is not tied to request time under gevent.
timeout = int(os.environ.get("WORKER_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("KEEPALIVE", "5"))
# An access log costs ~25% of throughput on 2 cores (TRAPS.md): off unless asked for.
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Never log request lines with query strings that could carry secrets.
limit_request_line = 8190
