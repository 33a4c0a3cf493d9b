#!/usr/bin/env bash
# Sets up and starts the gateway on a fresh Debian machine with Python 3.11:
#   ./scripts/serve.sh            development server (python run.py), http://127.0.0.1:8000
#   ./scripts/serve.sh --prod     gunicorn with gevent workers (gunicorn.config.py)
# Embedded default: SQLite under instance/, in-process limiter, the offline `demo` model.
# Set DATABASE_URL / REDIS_URL (in the environment or .env) for PostgreSQL and Redis.
# The first run creates .venv and installs the packages (about half a minute, every step printed).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[serve.sh] %s\n' "$*"; }
die() { printf '[serve.sh] ERROR: %s\n' "$*" >&2; exit 1; }
. scripts/venv.sh

ensure_venv requirements.txt

# A first run gets a .env with a random SYSTEM_SECRET, so the admin API works at once.
if [ ! -f .env ]; then
  secret=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))')
  sed "s|^SYSTEM_SECRET=.*|SYSTEM_SECRET=${secret}|" .env.example > .env
  chmod 600 .env
  say "created .env with a new SYSTEM_SECRET (read it there: it is the admin secret)"
fi

say "creating or migrating the database (db_manager.py create-db)"
.venv/bin/python db_manager.py create-db
if [ "${1:-}" = "--prod" ]; then
  say "starting gunicorn with gevent workers (gunicorn.config.py)"
  exec .venv/bin/gunicorn -c gunicorn.config.py "app:create_app()"
fi
say "starting the development server (run.py)"
exec .venv/bin/python run.py
