"""A private PostgreSQL primary and its streaming replica, for the read-replica tests.

The primary is a fresh cluster (`initdb`, trust auth on loopback, replication allowed) on a free
port; the replica is made from it with `pg_basebackup -R` (a standby that streams the primary's
WAL) on another free port. Both run as child processes of the test (as the `postgres` user when
the tests run as root: PostgreSQL refuses to run as root), in a temporary directory removed at
the end. The shared test server is left untouched: a streaming replica of it would need a
replication rule in its pg_hba.conf and would copy every database of every test run."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from Testing.support import free_port, wait_until


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise AssertionError("PostgreSQL server binaries not found (apt-get install postgresql)")
    return Path(found[-1]).parent


class PostgresPair:
    def __init__(self) -> None:
        self.bin = pg_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-pair-"))
        self.primary_port, self.replica_port = free_port(), free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.procs: dict[str, subprocess.Popen] = {}

    def url(self, role: str, database: str = "postgres") -> str:
        port = self.primary_port if role == "primary" else self.replica_port
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run([str(self.bin / args[0]), *args[1:]], check=True, capture_output=True, timeout=120,
                       user=self.user, cwd=self.dir)

    def _start(self, role: str, port: int) -> None:
        data = self.dir / role
        log = open(self.dir / f"{role}.log", "ab")
        self.procs[role] = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(self.dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "wal_level=replica", "-c", "max_wal_senders=4",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "shared_buffers=16MB",
             "-c", "hot_standby_feedback=on"],
            stdout=log, stderr=log, user=self.user, cwd=self.dir)
        log.close()
        wait_until(lambda: self._accepts(role, port), timeout=60, interval=0.1, message=f"PostgreSQL {role}")

    def _accepts(self, role: str, port: int) -> bool:
        if self.procs[role].poll() is not None:
            raise AssertionError(f"PostgreSQL {role} exited: {self.log(role)[-2000:]}")
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def log(self, role: str) -> str:
        path = self.dir / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, prepare=None) -> "PostgresPair":
        """initdb and start the primary, run `prepare(primary_admin_url)` (create and migrate a
        database), then clone it with pg_basebackup and start the replica."""
        try:
            if self.user:
                pw = pwd.getpwnam(self.user)
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._run("initdb", "-D", str(self.dir / "primary"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
            self._start("primary", self.primary_port)
            if prepare is not None:
                prepare(self.url("primary"))
            self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
                      "-D", str(self.dir / "replica"), "-R", "-X", "stream", "-c", "fast", "--no-sync")
            self._start("replica", self.replica_port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop_replica(self) -> None:
        self._stop("replica")

    def _stop(self, role: str) -> None:
        proc = self.procs.get(role)
        if proc is not None and proc.poll() is None:
            proc.terminate()   # SIGTERM: PostgreSQL's smart shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        for role in ("replica", "primary"):
            self._stop(role)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostgresPair":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
