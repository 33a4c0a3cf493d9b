"""`pass_turn`: under gevent a greenlet that does no I/O still lets a greenlet whose socket is
ready run (a worker's other connections are served while hot-copy cache hits go on); without
gevent it does nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.utils.cooperative import pass_turn

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import gevent.monkey; gevent.monkey.patch_all()
import socket, sys, gevent
sys.path.insert(0, {root!r})
from app.utils.cooperative import pass_turn
order = []
left, right = socket.socketpair()

def reader():                # a connection whose request arrives while the other greenlet works
    right.recv(1)
    order.append("reader")

def busy():                  # a run of requests with no I/O of their own
    left.send(b"x")
    for i in range(20):
        {turn}
        order.append(i)

gevent.joinall([gevent.spawn(reader), gevent.spawn(busy)])
print(order.index("reader"))
"""


def reader_position(turn: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), turn=turn)],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


def test_a_greenlet_with_a_ready_socket_runs_between_two_turns():
    """With pass_turn the reader runs within the busy greenlet's first turns (the loop polls
    for I/O before the busy greenlet resumes); without any turn (a request path with no I/O) it waits
    until all 20 are done."""
    assert reader_position("pass_turn()") in (0, 1, 2)
    assert reader_position("pass") == 20


def test_without_gevent_it_does_nothing():
    """Threads or the test process (sockets not patched): no effect, no error."""
    assert pass_turn() is None
