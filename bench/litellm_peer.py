"""The LiteLLM proxy as a peer for the benchmarks (bench/run_benchmark.py --litellm,
bench/open_loop.py): installed on first use into its own git-ignored virtualenv,
bench/.peers/litellm-venv (never into the project's requirements), and started with no
database and no Redis in front of a benchmark's fake upstream.

Standard library only, and nothing imported from the other bench scripts: run_benchmark.py
imports this module, and a module importing the script back would load a second copy of it
(its exception classes then differ from the running script's).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "bench" / ".peers"
LITELLM_VENV = PEERS / "litellm-venv"
# The version measured in docs/benchmark.md; BENCH_LITELLM_SPEC picks another.
LITELLM_SPEC = os.environ.get("BENCH_LITELLM_SPEC") or "litellm[proxy]==1.108.7"
LITELLM_MASTER_KEY = "sk-bench-litellm"
LITELLM_UPSTREAM_KEY = "sk-litellm-upstream"  # tells LiteLLM's upstream calls from the gateway's
CHAT_PATH = "/v1/chat/completions"
START_TIMEOUT_S = 180.0


class LiteLLMUnavailable(RuntimeError):
    """LiteLLM did not start (the message says why, with the end of its log)."""


class Starter(Protocol):
    """What starts a child process (bench/run_benchmark.py's `Processes`)."""

    def start(self, name: str, cmd: list[str], env: dict[str, str],
              log_path: Path) -> subprocess.Popen[bytes]: ...


def log(msg: str) -> None:
    print(f"[litellm] {msg}", flush=True)


def ensure_litellm() -> Path | None:
    """The litellm executable of bench/.peers/litellm-venv, installing it there on first use.
    None (and a message saying why) when it cannot be had: the run goes on without it."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"installing {LITELLM_SPEC} into {LITELLM_VENV.relative_to(REPO)} (first use only, "
        "takes minutes)")
    try:
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True,
                       capture_output=True, timeout=300)
        out = subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC],
                             capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"LiteLLM could not be installed ({exc}): continuing without it")
        return None
    if out.returncode != 0 or not exe.exists():
        tail = "\n".join(line[:300] for line in (out.stderr or out.stdout).strip().splitlines()[-3:])
        log(f"LiteLLM could not be installed (pip exit {out.returncode}; offline?):\n{tail}\n"
            "continuing without it")
        shutil.rmtree(LITELLM_VENV, ignore_errors=True)  # the next run tries again
        return None
    return exe


def litellm_config(upstream_port: int) -> dict[str, Any]:
    """LiteLLM proxy config (JSON is YAML): one model `bench` in front of the upstream, a master
    key (so requests are authenticated, as the gateway's are), no database, no Redis."""
    return {
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/bench", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": LITELLM_UPSTREAM_KEY}}],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }


def start_litellm(procs: Starter, exe: Path, upstream_port: int, workers: int,
                  tmp: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start the LiteLLM proxy with `workers` workers; (chat completions URL, its process) once
    it answers its liveness check. Raises LiteLLMUnavailable when it exits or stays silent."""
    config = tmp / "litellm.yaml"
    config.write_text(json.dumps(litellm_config(upstream_port), indent=2))
    port = _free_port()
    env = {"PATH": f"{exe.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "HOME": os.environ.get("HOME", "/tmp"), "LITELLM_LOG": "ERROR",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MODE": "PRODUCTION",
           "LITELLM_TELEMETRY": "False"}
    log_path = tmp / "litellm.log"
    proc = procs.start("litellm", [str(exe), "--config", str(config), "--host", "127.0.0.1",
                                   "--port", str(port), "--num_workers", str(workers),
                                   # uvicorn's own supervisor kills workers whose startup outlasts
                                   # its health check (on a busy machine, all of them): gunicorn,
                                   # as the gateway runs, with LiteLLM's uvicorn workers
                                   "--run_gunicorn"],
                       env, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LiteLLMUnavailable(f"litellm exited ({proc.returncode}):\n{_tail(log_path)}")
        if _answers(f"http://127.0.0.1:{port}/health/liveliness"):
            return f"http://127.0.0.1:{port}{CHAT_PATH}", proc
        time.sleep(0.5)
    raise LiteLLMUnavailable(f"litellm did not answer within {START_TIMEOUT_S:g} s:\n"
                             f"{_tail(log_path)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
