"""Where usage records wait when PostgreSQL cannot take them: a Redis list, else a local spool.

Both stores hold opaque lines (one JSON usage event each) and are replayed at least once;
the writer's insert is idempotent, so a line replayed twice is billed once.

- `RedisOutbox`: `RPUSH` onto one list. A replaying worker *claims* a batch by moving it
  atomically (Lua) into its own claim list with a lease; it deletes the claim only after the
  rows are committed. A worker that dies mid-replay leaves its claim behind; once the lease
  has expired the next claimer moves those lines back onto the outbox. Durable as far as
  Redis's own persistence goes (AOF recommended).
- `SpoolOutbox`: append-only files in a local directory, written with one `write` and one
  `fsync` per batch, so a line is on disk before the call returns. Each worker appends to its
  own file and holds an exclusive `flock` on it while it lives; any worker may replay a file
  whose lock it can take (its writer exited, was killed, or sealed it), and deletes it after.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("gateway.usage")

DEFAULT_NAME = "usage"

# KEYS: 1 outbox, 2 leases hash, 3 this consumer's claim list
# ARGV: 1 consumer id, 2 batch size, 3 lease ms, 4 claim-list prefix
_CLAIM_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  if leases[i] ~= ARGV[1] and tonumber(leases[i + 1]) < now then
    local orphan = ARGV[4] .. leases[i]
    while redis.call('LMOVE', orphan, KEYS[1], 'RIGHT', 'LEFT') do end
    redis.call('HDEL', KEYS[2], leases[i])
  end
end
local mine = redis.call('LRANGE', KEYS[3], 0, -1)
if #mine == 0 then
  for i = 1, tonumber(ARGV[2]) do
    local v = redis.call('LMOVE', KEYS[1], KEYS[3], 'LEFT', 'RIGHT')
    if not v then break end
    mine[#mine + 1] = v
  end
end
if #mine > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], now + tonumber(ARGV[3]))
end
return mine
"""

# Give a claim back (the replay failed for a passing reason): lines return to the outbox head.
_RELEASE_LUA = """
while redis.call('LMOVE', KEYS[3], KEYS[1], 'RIGHT', 'LEFT') do end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


def consumer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def outbox_key(name: str = DEFAULT_NAME) -> str:
    return f"gw:{{{name}}}:outbox"


class RedisOutbox:
    """The shared outbox list in Redis (all replicas of one deployment push to and replay from
    the same list, `gw:{<name>}:outbox`; the name is the hash tag of its keys, so the scripts
    also run on Redis Cluster). Deployments sharing one Redis need different names."""

    def __init__(self, client, name: str = DEFAULT_NAME, consumer: str | None = None,
                 lease_ms: int = 60_000) -> None:
        self.client = client
        self.key = outbox_key(name)
        self._leases_key = self.key + ":leases"
        self._claim_prefix = self.key + ":claim:"
        self.consumer = consumer or consumer_id()
        self.lease_ms = lease_ms
        self._claim_key = self._claim_prefix + self.consumer
        self._claim = client.register_script(_CLAIM_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def push(self, lines: list[bytes]) -> int:
        """Append the lines; returns the outbox length after the push. Raises when Redis is down."""
        return int(self.client.rpush(self.key, *lines))

    def depth(self) -> int:
        return int(self.client.llen(self.key))

    def claim(self, batch: int) -> list[bytes]:
        """Up to `batch` lines, moved into this consumer's claim list (or its unfinished claim)."""
        return list(self._claim(keys=[self.key, self._leases_key, self._claim_key],
                                args=[self.consumer, batch, self.lease_ms, self._claim_prefix]))

    def ack(self) -> None:
        """The claimed lines are committed: forget them."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._claim_key)
        pipe.hdel(self._leases_key, self.consumer)
        pipe.execute()

    def release(self) -> None:
        self._release(keys=[self.key, self._leases_key, self._claim_key], args=[self.consumer])


class SpoolOutbox:
    """Append-only spool files in `directory` (local disk of this machine)."""

    SUFFIX = ".spool"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self._fd: int | None = None
        self._path: Path | None = None
        self._records = 0
        self._lock = threading.Lock()

    def append(self, lines: list[bytes]) -> None:
        """Write the lines and fsync them before returning. Raises OSError (disk full...)."""
        data = b"".join(line + b"\n" for line in lines)
        with self._lock:
            if self._fd is None:
                self._open()
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            self._records += len(lines)

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"usage-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{self.SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while we live; the kernel drops it on death
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name survives a machine crash too
        finally:
            os.close(dir_fd)
        self._fd, self._path, self._records = fd, path, 0

    def seal(self) -> None:
        """Close this worker's current file (releasing its lock) so that it can be replayed;
        the next append starts a new file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd, self._path, self._records = None, None, 0

    def has_own_records(self) -> bool:
        return self._records > 0

    def files(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.iterdir() if p.name.endswith(self.SUFFIX))
        except FileNotFoundError:
            return []

    def depth(self) -> dict[str, int]:
        files = self.files()
        size = 0
        for p in files:
            try:
                size += p.stat().st_size
            except FileNotFoundError:
                pass
        return {"files": len(files), "bytes": size}

    def replay(self, write: Callable[[list[bytes]], object], batch: int = 500) -> int:
        """Feed every replayable file to `write` in batches, deleting each file once all of it
        was written. Returns the number of lines replayed. An exception from `write` stops the
        replay and leaves the file (replayed again later; the writes are idempotent)."""
        if self._records:
            self.seal()
        replayed = 0
        for path in self.files():
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # replayed and deleted by another worker meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive, or another worker is replaying it
                if os.fstat(fd).st_nlink == 0:
                    continue  # deleted after a replay that finished while we waited
                for lines in _line_batches(fd, path, batch):
                    write(lines)
                    replayed += len(lines)
                os.unlink(path)
            finally:
                os.close(fd)
        return replayed

    def close(self) -> None:
        self.seal()


def _line_batches(fd: int, path: Path, batch: int) -> Iterator[list[bytes]]:
    """The file's complete lines in batches, read 1 MiB at a time (a long outage's spool can
    be large)."""
    rest, lines = b"", []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        *complete, rest = (rest + chunk).split(b"\n")
        for line in complete:
            if line:
                lines.append(line)
                if len(lines) >= batch:
                    yield lines
                    lines = []
    if lines:
        yield lines
    if rest:
        # A write cut short by the writer's death: its fsync never returned, so that batch was
        # still in flight in the dead worker (the window docs/durability.md says SIGKILL can lose).
        log.warning("usage spool %s ends with an incomplete line (%d bytes): skipped", path.name, len(rest))
