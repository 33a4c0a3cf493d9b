#!/usr/bin/env bash
# Sets up and starts the gateway on a fresh Debian machine with Python 3.11:
#   ./scripts/serve.sh            development server (python run.py), http://127.0.0.1:8000
#   ./scripts/serve.sh --prod     gunicorn with gevent workers (gunicorn.config.py)
# Embedded default: SQLite under instance/, in-process limiter, the offline `demo` model.
# Set DATABASE_URL / REDIS_URL (in the environment or .env) for PostgreSQL and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[serve.sh] %s\n' "$*"; }

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      say "installing python3-venv with apt-get"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf .venv && "$PYTHON" -m venv .venv
    else
      echo "[serve.sh] ERROR: '$PYTHON -m venv' failed: install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
if ! cmp -s requirements.txt .venv/.installed 2>/dev/null; then
  say "installing Python dependencies"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.installed
fi

# A first run gets a .env with a random SYSTEM_SECRET, so the admin API works at once.
if [ ! -f .env ]; then
  secret=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))')
  sed "s|^SYSTEM_SECRET=.*|SYSTEM_SECRET=${secret}|" .env.example > .env
  chmod 600 .env
  say "created .env with a new SYSTEM_SECRET (read it there: it is the admin secret)"
fi

.venv/bin/python db_manager.py create-db
if [ "${1:-}" = "--prod" ]; then
  exec .venv/bin/gunicorn -c gunicorn.config.py "app:create_app()"
fi
exec .venv/bin/python run.py
