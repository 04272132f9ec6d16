"""Building cuSPARSELt plans in worker threads (`kernels/plan_threads.py`), with CPU stand-ins for the handle and
the plan: order, refusals, errors, one handle per worker at a time, and the thread count setting."""

from __future__ import annotations

import threading
import time

import pytest

from hf_semisparse.kernels import plan_threads
from hf_semisparse.kernels.cusparselt import CusparseLtError


class _Handle:
    """A stand-in handle that notices being used by two threads at once."""

    made = 0
    lock = threading.Lock()

    def __init__(self):
        with _Handle.lock:
            _Handle.made += 1
        self.busy = False
        self.threads: set[int] = set()

    def sibling(self):
        return _Handle()


class _Plan:
    def __init__(self, handle, n, k, m, alg=None):
        assert not handle.busy, "a handle built two plans at once"
        handle.busy = True
        handle.threads.add(threading.get_ident())
        time.sleep(0.01)  # long enough for the workers to overlap
        handle.busy = False
        if alg == "refused":
            raise CusparseLtError("this configuration does not exist")
        if alg == "broken":
            raise RuntimeError("something else went wrong")
        self.handle, self.n, self.k, self.m, self.alg = handle, n, k, m, alg


def _specs(algs):
    return [{"n": 64, "k": 128, "m": 16, "alg": a} for a in algs]


@pytest.fixture(autouse=True)
def _fresh_counts():
    _Handle.made = 0


def test_plans_come_back_in_order_with_none_where_cusparselt_refuses():
    handle = _Handle()
    algs = [0, 1, "refused", 3, 4, 5, "refused", 7]
    plans = plan_threads.build_plans(handle, _specs(algs), make=_Plan, threads=4)
    assert [p if p is None else p.alg for p in plans] == [None if a == "refused" else a for a in algs]


def test_workers_build_with_sibling_handles_that_are_kept_for_later_calls():
    handle = _Handle()
    together = threading.Barrier(3, timeout=10)

    def make(own, **spec):  # the first three builds wait for each other: three workers, three siblings
        if spec["alg"] < 3:
            together.wait()
        return _Plan(own, **spec)

    plans = plan_threads.build_plans(handle, _specs(range(12)), make=make, threads=3)
    owners = {id(p.handle) for p in plans}
    assert handle not in [p.handle for p in plans]  # the caller's handle stays free for its own plans
    assert len(owners) == 3  # three workers, each with one sibling at a time
    made = _Handle.made
    plan_threads.build_plans(handle, _specs(range(12)), make=_Plan, threads=3)
    assert _Handle.made == made  # the siblings were reused


def test_one_thread_builds_on_the_callers_handle_in_the_callers_thread():
    handle = _Handle()
    plans = plan_threads.build_plans(handle, _specs(range(3)), make=_Plan, threads=1)
    assert all(p.handle is handle for p in plans)
    assert handle.threads == {threading.get_ident()}


def test_other_errors_are_raised():
    with pytest.raises(RuntimeError, match="something else"):
        plan_threads.build_plans(_Handle(), _specs([0, "broken", 2]), make=_Plan, threads=2)


def test_thread_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(plan_threads.THREADS_ENV, "3")
    assert plan_threads.plan_threads() == 3
    monkeypatch.delenv(plan_threads.THREADS_ENV)
    assert 1 <= plan_threads.plan_threads() <= plan_threads.MAX_THREADS
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(plan_threads.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=plan_threads.THREADS_ENV):
            plan_threads.plan_threads()


def test_workers_take_the_callers_device_before_making_their_handles(monkeypatch):
    """A handle on `cuda` without an index means the caller's current device; a worker thread starts on device 0,
    so it is set (per thread) before the worker makes its sibling handle."""
    current = threading.local()
    monkeypatch.setattr(plan_threads.torch.cuda, "current_device", lambda: getattr(current, "index", 0))
    monkeypatch.setattr(plan_threads.torch.cuda, "set_device", lambda index: setattr(current, "index", index))
    seen = []

    class OnDevice(_Handle):
        device = plan_threads.torch.device("cuda")

        def sibling(self):
            seen.append(plan_threads.torch.cuda.current_device())
            return OnDevice()

    current.index = 1  # the caller's device
    plans = plan_threads.build_plans(OnDevice(), _specs(range(6)), make=_Plan, threads=3)
    assert len(plans) == 6 and seen and set(seen) == {1}
    assert current.index == 1


def test_a_worker_that_cannot_make_a_handle_falls_back_to_the_callers_from_then_on(caplog, monkeypatch):
    monkeypatch.setattr(plan_threads, "_SAID", set())
    tries = []

    class NoSiblings(_Handle):
        def sibling(self):
            tries.append(1)
            raise CusparseLtError("cusparseLtInit failed with cuSPARSELt status 7")

    handle = NoSiblings()
    with caplog.at_level("WARNING"):
        plans = plan_threads.build_plans(handle, _specs(range(4)), make=_Plan, threads=2)
    assert [p.alg for p in plans] == [0, 1, 2, 3] and all(p.handle is handle for p in plans)
    assert "one thread" in caplog.text
    before = len(tries)
    again = plan_threads.build_plans(handle, _specs(range(4)), make=_Plan, threads=2)
    assert all(p.handle is handle for p in again) and len(tries) == before  # not tried again
