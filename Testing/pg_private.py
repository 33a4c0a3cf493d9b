"""A private PostgreSQL cluster the tests may stop and restart (never the shared server).

A fresh cluster (`initdb`, trust auth on loopback) on a free port, run as a child process
(as the `postgres` user when the tests run as root: PostgreSQL refuses to run as root), in a
temporary directory removed by `destroy`."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from Testing.pg_replica import pg_bindir
from Testing.support import free_port, wait_until


class PrivatePostgres:
    def __init__(self) -> None:
        self.bin = pg_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-private-"))
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.proc: subprocess.Popen | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create(self) -> "PrivatePostgres":
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True, timeout=120, user=self.user, cwd=self.dir)
        return self.start()

    def start(self) -> "PrivatePostgres":
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port), "-k", str(self.dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "shared_buffers=16MB", "-c", "max_connections=100"],
            stdout=log, stderr=log, user=self.user, cwd=self.dir)
        log.close()
        wait_until(self.accepts, timeout=60, interval=0.1, message="private PostgreSQL")
        return self

    def accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"private PostgreSQL exited: {(self.dir / 'server.log').read_text()[-2000:]}")
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """A fast shutdown (SIGINT): every session is terminated, like a restart or a failover."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            self.proc.wait(60)

    def execute(self, sql: str) -> None:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(sql)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
