"""bench/count_per_request.py: an `strace -c` table read as calls per request."""
from __future__ import annotations

from Testing.bench import load_bench_script

count = load_bench_script("count_per_request")

STRACE_C = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 41.10    0.081221           7     11520           sendto
 30.02    0.059330           4     13300      2100 recvfrom
 15.61    0.030850           2     11400           getsockopt
  0.10    0.000200          10        20           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.197601           5     36240      2100 total
"""


def test_calls_per_request_with_the_rare_ones_left_out():
    """Each call's count over the requests wrk completed; calls rarer than 0.05 per request
    (getpid: 20 over 2,000) are left out, the total of every call stays."""
    assert count.parse_strace_summary(STRACE_C, 2000) == {
        "sendto": 5.76, "recvfrom": 6.65, "getsockopt": 5.7, "total": 18.12}
