"""Building many cuSPARSELt plans at once, in host threads.

Nearly all of a plan's host time is `cusparseLtMatmulAlgSelectionInit`: 0.18 s per call on an H200 with
cuSPARSELt 0.8, against 0.3 ms for `cusparseLtMatmulPlanInit`. A warm-up of Llama-3-8B's four weight shapes needs
about a thousand of them (its kernel search builds a plan per candidate algorithm, and each prepared token count
needs a selection of its own). They are independent, ctypes releases the GIL during each call, and each worker
thread uses a cuSPARSELt handle of its own: 144 plans took 40.1 s one after the other and 2.7 s on 16 threads
(14.7x), and every plan a worker built ran correctly on the main thread
(`benchmarks/probes/probe_plan_threads.py`, `benchmarks/results/h200_probe_plan_threads_2026-12-03.json`).

Worker-built plans serve the kernel search's timing only, from CUDA graph replays, which time the GPU alone
(`tuning.search_alg`); the plans layers run are built on the caller's handle. In one run on the H200, a
Llama-3-8B-shaped model whose layers ran plans made from worker handles decoded about a quarter slower eager (29
against 39 tokens/s at batch 1, dense 33 in both runs; 2026-12-03,
`benchmarks/results/h200_bench_generate_8b_fp16_{worker_handles,main_handle}_2026-12-03.json`): the host time of a
call may depend on the handle, for reasons not known (eager decode of the version whose layers ran the main
handle's plans varied from 0.88x to 1.19x of dense between runs too), and an eager timing would include it.
"""

from __future__ import annotations

import logging
import os
import queue
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .cusparselt import CusparseLtError, MatmulPlan

THREADS_ENV = "HF_SEMISPARSE_PLAN_THREADS"  # worker threads that build plans; 1 builds them on the caller's
MAX_THREADS = 16  # the H200 machine measured had 16 cores; more would only add handles

logger = logging.getLogger(__name__)
_SAID: set[str] = set()

# handle -> spare sibling handles (same device) that worker threads borrow, one per thread at a time. They live
# as long as the handle (a cuSPARSELt handle holds "light hardware resources on the host", its documentation says)
_SPARES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# handles whose worker could not make a sibling: their plans are built on them, one after the other
_NO_SIBLINGS: weakref.WeakSet = weakref.WeakSet()


def plan_threads() -> int:
    """Worker threads for building plans: `HF_SEMISPARSE_PLAN_THREADS`, else the CPUs this process may use, at
    most `MAX_THREADS`.

    Raises:
        ValueError: the variable is not a positive integer.
    """
    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_THREADS))


class _NoSibling(Exception):
    """A worker could not make a handle of its own (`cusparseLtInit` failed)."""


def build_plans(
    handle,
    specs: Sequence[dict],
    make: Callable | None = None,
    threads: int | None = None,
) -> list:
    """`make(handle, **spec)` for each spec, in order; None where cuSPARSELt refuses the configuration
    (`CusparseLtError`: an algorithm id or split the shape does not have).

    With more than one thread, each worker builds with a sibling handle of `handle` (`handle.sibling()`, made in
    the worker with the handle's device current, kept for later calls), so the returned plans may hold different
    handles of the same device. Where a worker cannot make one, everything is built on `handle`, one plan after
    the other, from then on (said once). Any other error of a build is raised; builds not started by then are
    cancelled.

    Args:
        handle: the caller's `cusparselt.Handle` (or a stand-in with `sibling()`).
        specs: keyword arguments of `make` after the handle, one dict per plan.
        make: the plan's constructor, `MatmulPlan` by default.
        threads: worker threads; default `plan_threads()`.

    Raises:
        ValueError: `HF_SEMISPARSE_PLAN_THREADS` is set to something other than a positive integer.
    """
    make = MatmulPlan if make is None else make
    threads = plan_threads() if threads is None else threads
    threads = min(threads, len(specs))

    def build(own_handle, spec):
        try:
            return make(own_handle, **spec)
        except CusparseLtError:
            return None

    if threads <= 1 or handle in _NO_SIBLINGS:
        return [build(handle, spec) for spec in specs]
    spares = _SPARES.setdefault(handle, queue.SimpleQueue())
    device = getattr(handle, "device", None)
    index = None  # the caller's device index, resolved here: a worker thread starts on device 0
    if isinstance(device, torch.device) and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()

    def work(spec):
        if index is not None:
            torch.cuda.set_device(index)  # per thread: the caller's own current device is untouched
        try:
            own = spares.get_nowait()
        except queue.Empty:
            try:
                own = handle.sibling()
            except CusparseLtError as exc:
                raise _NoSibling(str(exc)) from exc
        try:
            return build(own, spec)
        finally:
            spares.put(own)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="hf_semisparse-plans")
    try:
        futures = [pool.submit(work, spec) for spec in specs]
        plans = [future.result() for future in futures]
    except _NoSibling as exc:
        pool.shutdown(wait=True, cancel_futures=True)
        _NO_SIBLINGS.add(handle)
        _SPARES.pop(handle, None)  # the siblings made before the failure are not used again
        message = f"hf_semisparse: building cuSPARSELt plans on one thread: a worker's handle failed ({exc})"
        if message not in _SAID:
            _SAID.add(message)
            logger.warning(message)
        return [build(handle, spec) for spec in specs]
    except BaseException:  # another error, or an interrupt: do not wait for builds nobody will use
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return plans
