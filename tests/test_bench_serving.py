"""benchmarks/bench_serving.py's helpers that do not need a server: the run-queue readout."""
import importlib.util
import os
import sys
import time

import pytest

pytest.importorskip("httpx", reason="bench_serving.py needs httpx")

from conftest import REPO  # noqa: E402


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "benchmarks" / "bench_serving.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/task/*/schedstat is Linux's")
def test_sched_seconds_counts_this_process_cpu():
    b = _bench()
    r0, w0 = b.sched_seconds(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.2:            # 0.2 s of CPU
        pass
    r1, w1 = b.sched_seconds(os.getpid())
    assert r1 - r0 >= 0.15 and w1 >= w0 >= 0.0


def test_sched_seconds_of_a_missing_process_is_none():
    b = _bench()
    assert b.sched_seconds(2 ** 22 + 12345) is None   # above Linux's largest pid
