#!/usr/bin/env bash
# db_manager.py with the project's virtual environment (created on first use, like serve.sh):
#   ./scripts/db_manager.sh --help
#   ./scripts/db_manager.sh create-key --name me --tenant demo-team
# Arguments go to db_manager.py unchanged (relative paths are from where you are); the database
# is DATABASE_URL (environment, else the repository's .env, else the embedded SQLite file).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '[db_manager.sh] %s\n' "$*" >&2; }
die() { printf '[db_manager.sh] ERROR: %s\n' "$*" >&2; exit 1; }
(cd "$ROOT" && . scripts/venv.sh && ensure_venv requirements.txt >&2)
exec "$ROOT/.venv/bin/python" "$ROOT/db_manager.py" "$@"
