"""Per-shape decisions: cuSPARSELt's searched algorithm, and whether sparse beats dense at all.

A decision is measured once per (GPU, N, K, M, dtype, epilogue) on the real inputs, kept in memory, and
optionally in a JSON file so a restarted process neither searches nor times again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass

import torch

from ..utils import atomic_write_text
from .cusparselt import AlgConfig, CusparseLtError, Handle, MatmulPlan
from .plan_threads import build_plans

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_SEMISPARSE_TUNING_CACHE"  # a file path, or "0" to keep decisions in memory only
CACHE_VERSION = 1


def default_cache_path() -> str | None:
    value = os.environ.get(CACHE_ENV)
    if value == "0":
        return None
    if value:
        return value
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "hf_semisparse", "cusparselt_tuning.json")


@dataclass(frozen=True)
class ShapeKey:
    device_name: str
    library_version: int
    n: int
    k: int
    m: int
    dtype: str
    bias: bool
    gelu: bool
    residual: bool = False  # a residual added in the epilogue (C operand, beta = 1)
    library: str = "cusparselt"  # or "cutlass-sm90": our kernels (kernels/cutlass_sm90.py)

    def __str__(self) -> str:
        epilogue = ("+bias" if self.bias else "") + ("+gelu" if self.gelu else "")
        epilogue += "+residual" if self.residual else ""
        return (
            f"{self.device_name}|{self.library}{'' if self.library == 'cusparselt' else '-'}{self.library_version}|"
            f"{self.dtype}|"
            f"N{self.n}xK{self.k}xM{self.m}{epilogue}"
        )


@dataclass
class Decision:
    """For a plain shape: whether sparse beat dense (`dense_us`). For a shape with `residual`: whether the add in
    the epilogue beat the GEMM plus a separate add (whose time is then in `dense_us`)."""

    use_sparse: bool
    alg: AlgConfig
    sparse_us: float | None
    dense_us: float | None
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alg"] = self.alg.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Decision:
        return cls(d["use_sparse"], AlgConfig(**d["alg"]), d["sparse_us"], d["dense_us"], d["reason"])


class TuningCache:
    """Thread-safe map ShapeKey -> Decision, mirrored to a JSON file when `path` is set."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, Decision] = {}
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("version") == CACHE_VERSION:
                    self._entries = {k: Decision.from_dict(v) for k, v in data["entries"].items()}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring unreadable tuning cache %s (%s); it will be rewritten", path, exc)

    def get(self, key: ShapeKey) -> Decision | None:
        with self._lock:
            return self._entries.get(str(key))

    def put(self, key: ShapeKey, decision: Decision) -> None:
        with self._lock:
            self._entries[str(key)] = decision
            if self.path:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                text = json.dumps(
                    {"version": CACHE_VERSION, "entries": {k: v.to_dict() for k, v in self._entries.items()}},
                    indent=1,
                )
                try:
                    atomic_write_text(self.path, text)
                except OSError as exc:
                    logger.warning("could not write tuning cache %s: %s", self.path, exc)

    def __len__(self) -> int:
        return len(self._entries)


LONG_CALL_US = 1000.0  # a call this long is a timed sample by itself (`time_cuda_us`)
# torch registers its default CUDA generator with every capture, and two captures at once fail: searches in
# several threads (a server whose threads meet new token counts) capture one after the other
_CAPTURE_LOCK = threading.Lock()
_GENERATORS: dict[torch.device, torch.Generator] = {}
_GENERATORS_LOCK = threading.Lock()


def search_generator(device: torch.device | str) -> torch.Generator:
    """The random number generator of search inputs on `device`: one of our own per device (seeded 0), never the
    default one, which torch puts in capture state during every CUDA graph capture: a draw from it while another
    thread's search captures fails ("Offset increment outside graph capture")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _GENERATORS_LOCK:
        generator = _GENERATORS.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(0)
            _GENERATORS[device] = generator
        return generator


def time_cuda_us(fn, warmup: int = 3, repeats: int = 15, inner: int = 5, graph: bool = False) -> float:
    """Median over `repeats` of the CUDA-event time of `inner` back-to-back calls of `fn()`, per call, in us.

    Several calls between the events keep the GPU busy, so host launch cost shows only where it exceeds the
    kernel time, as it would inside a model. `graph`: the calls are captured in a CUDA graph and replayed, so
    the time is the GPU's alone, as in CUDA-graph serving; for kernels shorter than their launch (decode sizes,
    where eager timings measured the host: on an H200 every 2:4 GEMM of Llama-3-8B's shapes at 16 tokens
    "took" 15-34 us eager, near the ctypes launch cost).

    After the `warmup` calls (which may pay first-use costs, such as loading a kernel), one more call is timed:
    where it takes `LONG_CALL_US` or more (large prefill sizes), each sample is one call (more would only add
    GPU time), and an eager sample starts behind one untimed call, which keeps the GPU busy while the timed one
    is launched, so no launch gap enters it (a graph replay has one launch, whose few microseconds of host time
    against a millisecond or more are the same for every candidate: it has none).
    """
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    long_call = start.elapsed_time(end) * 1e3 >= LONG_CALL_US
    if long_call:
        inner = 1
    run = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            fn()  # the side stream's own warm-up (per-stream workspaces)
            # one capture at a time in the process (searches in several threads); "thread_local": what other
            # threads do meanwhile (allocate, synchronise their streams) neither fails nor breaks this capture
            with _CAPTURE_LOCK, torch.cuda.graph(captured, stream=stream, capture_error_mode="thread_local"):
                for _ in range(inner):
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        run = captured.replay
    times = []
    for _ in range(repeats):
        if long_call and not graph:
            fn()  # untimed: the GPU is busy while the timed call is launched
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph:
            run()
        else:
            for _ in range(inner):
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


def choose(sparse_us: float, dense_us: float | None, margin: float) -> tuple[bool, str]:
    """Sparse only where it measured faster than dense by at least `margin` (a fraction)."""
    if dense_us is None:
        return True, "no dense weight kept: sparse always"
    if sparse_us < dense_us * (1.0 - margin):
        return True, f"sparse {sparse_us:.1f} us < dense {dense_us:.1f} us"
    return False, f"sparse {sparse_us:.1f} us >= dense {dense_us:.1f} us (margin {margin:.0%})"


SPLIT_K_CANDIDATES = ((2, 1), (4, 1), (2, 2), (4, 2))  # (split_k, mode: 1 one kernel, 2 two kernels)
# split_k -1 is cuSPARSELt's Segment-K, on compute capability 9.0 and newer; tried for the two fastest ids
SEGMENT_K_CANDIDATES = ((-1, 1), (-1, 2))

# On an H100 with cuSPARSELt 0.8, algorithm ids 36-49 of the "sparse_a" layout (column-major output) raise an
# illegal instruction, which kills the CUDA context (benchmarks/probes/probe_cusparselt_algs.py, CHANGELOG.md).
# The search never tries ids above this; HF_SEMISPARSE_MAX_ALG_ID overrides it.
SAFE_MAX_ALG_ID = int(os.environ.get("HF_SEMISPARSE_MAX_ALG_ID", "35"))
QUICK_ALG_IDS = 4  # ids a quick search at a prefill size takes from the shape's first prefill search
# Decode sizes (M <= 256) always try every id: on an H200 (cuSPARSELt 0.8, fp16, Llama-3-8B's shapes; 2026-12-03,
# benchmarks/results/h200_probe_plan_threads_2026-12-03.json) the fastest ids at 16-64 tokens were 16-25, but at
# 128 and 256 tokens, in 7 of the 8 cases of the four shapes, ids outside the 16-token search's 4 fastest (7-9,
# 25-31): keeping to those (as warm-ups did before) made those GEMMs 14-69% slower. Building the candidates in
# worker threads (`plan_threads`) made the full searches affordable.
# prefill sizes (M > 256): compute-bound, where cuSPARSELt's first ids win most searches (ids 0-7: 84% of 144 BERT
# searches on an H100; ids 1-13 at 512 and 2,048 tokens on the H200); 16 ids at a shape's first prefill size,
# the 4 fastest of those later
FIRST_PREFILL_MAX_ALG_ID = 15
QUICK_PREFILL_HEURISTIC_IDS = 2  # later quick searches at prefill sizes also try ids 0-1
# (GPU, N, K, dtype, bias, GELU, residual) -> the ids of its first prefill search, fastest first
_SHAPE_RANKING: dict[tuple, list[int]] = {}
QUICK_SPLIT_K_MAX_M = 256  # a quick search tries split-K at these token counts only (decode)
# decode sizes: a search times dense and its finalists from CUDA graph replays too (`time_cuda_us(graph=True)`);
# above, the candidates and finalists are graph-timed, and the winner is timed eagerly against dense where a
# dense weight is kept
GRAPH_TIMING_MAX_M = 256


_STATE = threading.local()


def graph_timing_allowed() -> bool:
    """False inside a compiled model's call (`linear.linear_24`, `fp8_linear.linear_fp8_24`): inductor's CUDA
    graph trees may be warming up there, with every allocation routed to their pool, where a capture of our own
    must not start."""
    return not getattr(_STATE, "compiled_call", False)


@contextlib.contextmanager
def compiled_call():
    """Marks the body of a custom op that compiled graphs call: a search there times eager calls only."""
    previous = getattr(_STATE, "compiled_call", False)
    _STATE.compiled_call = True
    try:
        yield
    finally:
        _STATE.compiled_call = previous


def time_interleaved(fns: dict, rounds: int = 5, graph: bool = False, inner: int | None = None) -> dict:
    """Median per key of `rounds` short timings of each function, taken in turn, so that clock and power drift
    (large on an H100: one kernel timed 241 us, then 292 us a few seconds later) hits every candidate alike.
    `inner`: calls per sample (`time_cuda_us`); default 10 replayed from a CUDA graph (`graph`), else 5."""
    samples: dict = {key: [] for key in fns}
    calls = inner or (10 if graph else 5)
    for _ in range(rounds):
        for key, fn in fns.items():
            samples[key].append(time_cuda_us(fn, warmup=1, repeats=3, inner=calls, graph=graph))
    return {key: sorted(ts)[len(ts) // 2] for key, ts in samples.items()}


def search_alg(
    handle: Handle,
    n: int,
    k: int,
    m: int,
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    gelu: bool,
    compressed: torch.Tensor,
    x: torch.Tensor,
    stream: int,
    dense=None,
    c: torch.Tensor | None = None,
    quick: bool = False,
) -> tuple[AlgConfig, float, float | None]:
    """Time every cuSPARSELt algorithm id on these inputs, then split-K and Segment-K variants of the best ones.

    `quick`: fewer candidates, for warm-ups over many sizes (`candidate_alg_ids`): every id at decode sizes, ids
    0-15 at a shape's first prefill size and that search's fastest ids (plus ids 0-1) at later ones; split-K (not
    on compute capability 9.0, where cuSPARSELt 0.8 refused it) and Segment-K (9.0 and newer) only at decode
    sizes, for the best id. Each candidate's plan costs about 0.18 s of host time (its algorithm selection).

    Outside a compiled model's call the candidates are built in worker threads (`plan_threads.build_plans`), each
    with a cuSPARSELt handle of its own, and ranked by CUDA graph replays, which time the GPU alone: a plan from
    a worker's handle may cost more host time per eager call (`plan_threads`), and the plans layers run are built
    on `handle`. At decode sizes the finalists and `dense` are then timed from graph replays too (their kernels
    are shorter than a launch), and the layers' plans get a selection of their own (`Handle.selection`). At
    prefill sizes the winner is built again on `handle` and timed eagerly against `dense`, as serving calls run
    there (without `dense`, its GPU time is returned), and its selection is kept for the plans that follow.
    Inside a compiled call (no capture may start) every candidate is built on `handle`, one after the other, and
    timed eagerly.

    `dense`: the computation to compare with, called without arguments; the finalists and it are re-timed in turn
    (`time_interleaved`). `c`: search for out = x @ W^T (+ bias) + c, the C operand read in the epilogue (the best
    algorithm for it can differ). Returns the fastest configuration, its median time in microseconds, and the
    time of `dense` measured alongside (None without `dense`).

    Raises:
        CusparseLtError: no algorithm runs this problem.
        ValueError: `HF_SEMISPARSE_PLAN_THREADS` is not a positive integer (a search outside compiled calls reads
            it).
    """
    out = torch.empty(m, n, dtype=dtype, device=x.device)
    # outside compiled calls: candidates built in worker threads, ranked by CUDA graph replays (GPU time alone)
    outside_compiled = graph_timing_allowed()
    # decode sizes: graph replays for dense and the finalists too
    graph = m <= GRAPH_TIMING_MAX_M and outside_compiled
    inner = 10 if graph else 3  # calls per timed sample

    # each candidate gets a selection of its own: planning from one selection whose algorithm changed in between
    # crashed the process once (CHANGELOG.md)
    plans: dict[AlgConfig, MatmulPlan] = {}
    runners: dict[AlgConfig, object] = {}
    timings: dict[AlgConfig, float] = {}
    max_id = SAFE_MAX_ALG_ID

    def spec(alg: AlgConfig) -> dict:
        return {"n": n, "k": k, "m": m, "dtype": dtype, "bias": bias, "gelu": gelu, "alg": alg}

    def runner(plan: MatmulPlan, captured: bool):
        ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=x.device)
        if captured:  # launch on the capturing stream

            def fn(plan=plan, ws=ws):
                plan.run(compressed, x, out, ws, torch.cuda.current_stream(x.device).cuda_stream, c=c)
        else:

            def fn(plan=plan, ws=ws):
                plan.run(compressed, x, out, ws, stream, c=c)

        return fn

    def measure(algs: list[AlgConfig]) -> None:
        nonlocal max_id
        threads = None if outside_compiled else 1
        built = build_plans(handle, [spec(a) for a in algs], make=MatmulPlan, threads=threads)
        for plan in built:
            if plan is not None:  # ids above the shape's own maximum are never run (some crash on an H100)
                max_id = min(max_id, plan.max_alg_id())
                break
        for alg, plan in zip(algs, built, strict=True):
            if plan is None or alg.alg_id > max_id:
                continue
            fn = runner(plan, outside_compiled)
            try:
                timings[alg] = time_cuda_us(fn, warmup=1, repeats=3, inner=inner, graph=outside_compiled)
            except CusparseLtError:
                continue
            plans[alg], runners[alg] = plan, fn

    decode = (
        m <= QUICK_SPLIT_K_MAX_M
    )  # decode sizes try every id; prefill sizes narrow on the shape's ranking
    shape = (getattr(handle, "device_name", None), n, k, str(dtype), bias is not None, gelu, c is not None)
    measure(
        [AlgConfig(i) for i in candidate_alg_ids(SAFE_MAX_ALG_ID, quick, _SHAPE_RANKING.get(shape), decode)]
    )
    if not timings:
        raise CusparseLtError(f"no cuSPARSELt algorithm runs N{n} K{k} M{m} {dtype}")
    ranked = sorted(timings, key=timings.get)
    if not decode and shape not in _SHAPE_RANKING:  # decode sizes always try every id
        _SHAPE_RANKING[shape] = [alg.alg_id for alg in ranked]
    capability = torch.cuda.get_device_capability(x.device)
    # split-K: cuSPARSELt 0.8 refused it for every id tried on an H200 ("invalid value"), after the 0.18 s
    # selection each candidate costs; Segment-K is Hopper's form. Newer GPUs: not measured, both are tried
    variants = []
    if capability != (9, 0) and (not quick or m <= QUICK_SPLIT_K_MAX_M):
        for split_k, mode in SPLIT_K_CANDIDATES:
            if k // split_k >= 64:
                variants.append(AlgConfig(ranked[0].alg_id, split_k, mode, split_k - 1))
    if capability >= (9, 0) and (not quick or decode):  # Segment-K tied plain kernels at 2,048 tokens (H200)
        for alg in ranked[: 1 if quick else 2]:
            for split_k, mode in SEGMENT_K_CANDIDATES:
                variants.append(AlgConfig(alg.alg_id, split_k, mode))
    if variants:
        measure(variants)
    prefill_outside_compiled = outside_compiled and not graph
    if prefill_outside_compiled:  # the GPU's fastest, built again on `handle`, then against dense eagerly
        best, best_us, _ = pick_finalist(timings, runners, graph=True, inner=inner)
        plan = plans[best]
        if plan.handle is not handle:
            (plan,) = build_plans(handle, [spec(best)], make=MatmulPlan, threads=1)
            if plan is None:
                raise CusparseLtError(f"cuSPARSELt refused {best} for N{n} K{k} M{m} on the caller's handle")
        dense_us, run_here = None, runner(plan, captured=False)
        run_here()  # the plan built here runs once before any layer uses it
        if dense is not None:  # without dense there is nothing to decide: the GPU time is the one kept
            final = time_interleaved({"sparse": run_here, "dense": dense})
            best_us, dense_us = final["sparse"], final["dense"]
    else:
        best, best_us, dense_us = pick_finalist(timings, runners, dense, graph=graph)
        plan = plans[best]
    if plan.handle is handle:  # a worker thread's plan only times: layers plan on the caller's handle
        handle.adopt_selection(plan, bias)
    return best, best_us, dense_us


def candidate_alg_ids(max_id: int, quick: bool, ranking: list[int] | None, decode: bool = True) -> list[int]:
    """The cuSPARSELt algorithm ids a search times, ascending: all up to `max_id` for a full search, and for a
    quick one at decode sizes (`decode`: M <= 256).

    A quick search at a prefill size (warm-ups over many sizes) tries ids up to `FIRST_PREFILL_MAX_ALG_ID` at the
    shape's first prefill size; later ones try that first search's `QUICK_ALG_IDS` fastest (`ranking`, fastest
    first), plus the first `QUICK_PREFILL_HEURISTIC_IDS` ids (cuSPARSELt's own heuristic order, which won most
    large searches)."""
    if not quick or decode:
        return list(range(max_id + 1))
    if ranking is None:
        return list(range(min(max_id, FIRST_PREFILL_MAX_ALG_ID) + 1))
    ids = {i for i in ranking[:QUICK_ALG_IDS] if i <= max_id}
    ids |= set(range(min(max_id + 1, QUICK_PREFILL_HEURISTIC_IDS if ids else QUICK_ALG_IDS)))
    return sorted(ids)


def pick_finalist(
    timings: dict,
    runners: dict,
    dense=None,
    finalists: int = 3,
    graph: bool = False,
    inner: int | None = None,
) -> tuple:
    """The `finalists` fastest candidates of a first timing pass, timed again in turn with `dense` (one noisy
    sample should not pick the kernel or the path; `graph` and `inner` as in `time_interleaved`): the fastest,
    its median time (us), and `dense`'s (or None)."""
    ranked = sorted(timings, key=timings.get)[:finalists]
    candidates = {key: runners[key] for key in ranked}
    if dense is not None:
        candidates["dense"] = dense
    final = time_interleaved(candidates, graph=graph, inner=inner)
    best = min(ranked, key=final.get)
    return best, final[best], final.get("dense")
