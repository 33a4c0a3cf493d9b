# Sourced by serve.sh, test.sh and db_manager.sh (not run on its own): the project's virtual
# environment in .venv, created and filled on first use. Each step prints one line saying what it
# does, and pip shows its own progress, so a first run (about half a minute of it) is never silent.
#   ensure_venv requirements.txt        runtime packages
#   ensure_venv requirements-dev.txt    runtime + test packages
# Needs `say` (one progress line) and `die` (message and exit 1) from the sourcing script.

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# The file recording which requirements .venv holds: reinstall only when it changed.
_stamp_of() { case "$1" in requirements-dev.txt) echo .venv/.installed-dev ;; *) echo .venv/.installed ;; esac; }

_create_venv() {
  say "creating the virtual environment .venv ($("$PYTHON" --version 2>&1))"
  if "$PYTHON" -m venv .venv 2>/dev/null; then return; fi
  [ "$(id -u)" = 0 ] || die "'$PYTHON -m venv' failed: install python3-venv (sudo apt-get install python3-venv)"
  say "'$PYTHON -m venv' needs python3-venv: installing it with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
  rm -rf .venv && "$PYTHON" -m venv .venv
}

ensure_venv() {
  local requirements=$1 stamp started
  stamp=$(_stamp_of "$requirements")
  [ -x .venv/bin/python ] || _create_venv
  if cmp -s "$requirements" "$stamp" 2>/dev/null && { [ "$requirements" = requirements.txt ] \
      || cmp -s requirements.txt .venv/.installed 2>/dev/null; }; then
    _ensure_fast_parser
    return
  fi
  started=$(date +%s)
  say "installing the Python packages of $requirements into .venv (the first time: about half a minute)"
  .venv/bin/pip install --disable-pip-version-check --progress-bar on -r "$requirements"
  cp "$requirements" "$stamp"
  [ "$requirements" = requirements.txt ] || cp requirements.txt .venv/.installed
  say "packages installed in $(( $(date +%s) - started )) s"
  _ensure_fast_parser
}

# gunicorn's C request parser (requirements-fast.txt) is optional: it is built from source,
# which needs a C compiler and the Python headers. Without them the gateway runs all the same,
# with gunicorn's Python parser. Tried once per version of the file, not on every start.
_ensure_fast_parser() {
  cmp -s requirements-fast.txt .venv/.installed-fast 2>/dev/null && return
  say "building gunicorn's C HTTP parser (requirements-fast.txt, optional)"
  if .venv/bin/pip install --disable-pip-version-check -q -r requirements-fast.txt; then
    say "gunicorn_h1c installed: gunicorn parses requests in C"
  else
    say "gunicorn_h1c could not be built (no C compiler? apt-get install gcc python3-dev): gunicorn" \
        "parses requests in Python instead, at a little more CPU per request"
  fi
  cp requirements-fast.txt .venv/.installed-fast
}
