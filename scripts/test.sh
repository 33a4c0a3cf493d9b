#!/usr/bin/env bash
# Sets up and runs the test suite on a fresh Debian machine with Python 3.11:
#   ./scripts/test.sh                          the whole suite (Testing/)
#   ./scripts/test.sh -q                       the whole suite, options passed to pytest (.ci/run)
#   ./scripts/test.sh Testing/test_x.py -k y   only what the arguments select (paths from the repo root)
# 1. a virtualenv in .venv with requirements-dev.txt (first time: about half a minute, progress shown);
# 2. PostgreSQL and Redis: used where already reachable, otherwise installed with apt-get
#    (when root) and started; otherwise a clear message and exit 1; nginx installed when missing
#    (the replica tests run it as a child process);
# 3. Debian's chromium for the console's browser tests (installed with apt-get when root);
# 4. pytest with the arguments given; without a path it collects Testing/ (pytest.ini's
#    testpaths). Each run creates and drops its own fresh databases.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_HOST=${TEST_PG_HOST:-127.0.0.1}
PG_PORT=${TEST_PG_PORT:-5432}
REDIS_HOST=${TEST_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${TEST_REDIS_PORT:-6379}
export TEST_PG_URL=${TEST_PG_URL:-postgresql://postgres:postgres@${PG_HOST}:${PG_PORT}/postgres}
export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://${REDIS_HOST}:${REDIS_PORT}/15}

say() { printf '[test.sh] %s\n' "$*"; }
die() { printf '[test.sh] ERROR: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  is_root || die "$1 is not reachable and I am not root: start it yourself (see docs/testing.md)."
  say "installing $1 with apt-get (${*:2})"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${@:2}"
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# --- Python -------------------------------------------------------------------------------
. scripts/venv.sh
ensure_venv requirements-dev.txt

# --- PostgreSQL -----------------------------------------------------------------------------
say "checking PostgreSQL at $PG_HOST:$PG_PORT"
if ! port_open "$PG_HOST" "$PG_PORT"; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install PostgreSQL postgresql
  fi
  say "starting PostgreSQL"
  for v in $(ls /etc/postgresql); do pg_ctlcluster --skip-systemctl-redirect "$v" main start || true; done
  for _ in $(seq 1 30); do port_open "$PG_HOST" "$PG_PORT" && break; sleep 1; done
  port_open "$PG_HOST" "$PG_PORT" || die "PostgreSQL did not come up on $PG_HOST:$PG_PORT"
  # A fresh Debian cluster uses password auth on TCP: give 'postgres' the password of TEST_PG_URL.
  if is_root && command -v runuser >/dev/null; then
    runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null || true
  fi
fi
.venv/bin/python - <<'PY' || die "PostgreSQL at $PG_HOST:$PG_PORT refuses $TEST_PG_URL (set TEST_PG_URL)"
import os, psycopg
psycopg.connect(os.environ["TEST_PG_URL"], connect_timeout=5).close()
PY

# --- Redis ----------------------------------------------------------------------------------
say "checking Redis at $REDIS_HOST:$REDIS_PORT"
if ! command -v redis-server >/dev/null; then
  apt_install Redis redis-server   # tests also start private redis-servers (restart tests)
fi
if ! port_open "$REDIS_HOST" "$REDIS_PORT"; then
  say "starting Redis on $REDIS_HOST:$REDIS_PORT"
  redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --logfile /tmp/gateway-test-redis.log
  for _ in $(seq 1 20); do port_open "$REDIS_HOST" "$REDIS_PORT" && break; sleep 0.5; done
  port_open "$REDIS_HOST" "$REDIS_PORT" || die "Redis did not come up on $REDIS_HOST:$REDIS_PORT"
fi

# --- nginx (the load balancer of Testing/e2e/test_replicas.py) ---------------------------------
# The replica tests run the Debian package's nginx as a child process with the configuration
# docker-compose.yml ships (deploy/nginx/gateway.conf); it is never started as a service here.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt_install nginx nginx
fi

# --- Chromium (browser tests of the web console) ------------------------------------------------
# Debian's own package, driven by playwright through executable_path: no browser is downloaded.
# Without it (and not root) the console's browser tests are skipped with a message.
if [ ! -x /usr/bin/chromium ]; then
  if is_root; then
    say "installing chromium with apt-get (browser tests of the console)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    say "chromium is not installed and I am not root: the console's browser tests will be skipped"
  fi
fi

# --- pytest ---------------------------------------------------------------------------------
say "running pytest (PostgreSQL $PG_HOST:$PG_PORT, Redis $REDIS_HOST:$REDIS_PORT)"
exec .venv/bin/python -m pytest "$@"
