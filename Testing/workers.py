"""One keep-alive connection per gunicorn worker, so a test can ask every worker of every
gateway process in turn (gunicorn hands a connection to one worker for its whole life)."""
from __future__ import annotations

import http.client
import json
import time
from typing import Any

from Testing.support import GatewayProcess


class Worker:
    """A keep-alive connection that always reaches the same gunicorn worker."""

    def __init__(self, proc: GatewayProcess, conn: http.client.HTTPConnection, pid: int) -> None:
        self.proc, self.conn, self.pid = proc, conn, pid

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple[int, Any]:
        data = json.dumps(body) if body is not None else None
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = self.conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def status(self, key: str, path: str = "/v1/models") -> int:
        return self.request("GET", path, headers={"Authorization": f"Bearer {key}"})[0]

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def close(self) -> None:
        self.conn.close()


def connect_every_worker(procs: list[GatewayProcess], timeout: float = 20) -> list[Worker]:
    """One connection per worker of each process (found by asking /health for the pid)."""
    found: dict[int, Worker] = {}
    spare = []
    for proc in procs:
        expected = set(proc.worker_pids())
        deadline = time.monotonic() + timeout
        while not expected <= set(found) and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            pid = json.loads(resp.read())["worker"]["pid"]
            if pid in found:
                spare.append(conn)
            else:
                found[pid] = Worker(proc, conn, pid)
        assert expected <= set(found), f"could not reach every worker of {proc.base_url}"
    for conn in spare:
        conn.close()
    return list(found.values())
