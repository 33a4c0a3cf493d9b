"""A real Redis Cluster of three masters on free loopback ports, for the tests that prove the
gateway's scripts, pub/sub, outbox and health board work on a cluster. Started with
`redis-server --cluster-enabled yes` and joined with `redis-cli --cluster create`; every
process and file is removed by `stop()`."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from Testing.support import free_port, wait_until


class LocalRedisCluster:
    def __init__(self, masters: int = 3) -> None:
        self.ports = [free_port() for _ in range(masters)]
        # The cluster bus port is named explicitly (its default, port + 10000, may be taken or
        # beyond 65535 for an ephemeral port).
        self.bus_ports = [free_port() for _ in range(masters)]
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-cluster-"))
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """The gateway's REDIS_URL for this cluster."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self) -> "LocalRedisCluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for port, bus_port in zip(self.ports, self.bus_ports):
            node_dir = self.dir / str(port)
            node_dir.mkdir()
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-port", str(bus_port),
                 "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "2000",
                 "--save", "", "--appendonly", "no", "--dir", str(node_dir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_until(lambda p=port: self._pings(p), timeout=10, message=f"redis-server :{port}")
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        wait_until(self._ready, timeout=30, interval=0.1, message="cluster_state:ok on every node")

    def _pings(self, port: int) -> bool:
        try:
            return bool(self.node(port).ping())
        except redis.RedisError:
            return False

    def _ready(self) -> bool:
        for port in self.ports:
            if self.node(port).cluster("INFO").get("cluster_state") != "ok":
                return False
        return True

    def flush(self) -> None:
        """Empty every master (FLUSHDB of a cluster client only reaches one node)."""
        for port in self.ports:
            self.node(port).flushall()

    def slot_owner(self, key: str) -> int:
        """The port of the master holding `key`'s slot."""
        slot = self.node(self.ports[0]).cluster("KEYSLOT", key)
        for start, end, primary, *_ in self.node(self.ports[0]).cluster("SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"no master owns slot {slot}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
