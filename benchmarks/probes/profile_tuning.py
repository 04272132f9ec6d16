"""Where the first call of a SemiSparseLinear spends its time: the per-shape algorithm search, broken down.

For each shape: wall time of `search_alg`, then per algorithm id the host time of building its plan and the
time of timing it (which includes its kernel time), and the dense timing. Prints a table, writes JSON.

    PYTHONPATH=src python benchmarks/probes/profile_tuning.py --json outputs/profile_tuning.json
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_semisparse import compute_nm_mask
from hf_semisparse.kernels import cusparselt, tuning
from hf_semisparse.kernels.cusparselt import Handle
from hf_semisparse.utils import write_json

# (N, K, M): MiniLM-L6 and bert-base layers at eval batch 64 x 384 tokens, and a small batch
SHAPES = [
    (1536, 384, 24576),
    (384, 1536, 24576),
    (384, 384, 24576),
    (3072, 768, 24576),
    (768, 3072, 24576),
    (3072, 768, 1536),
]


def profile_shape(handle: Handle, n: int, k: int, m: int) -> dict:
    dtype = torch.float16
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    w = w * compute_nm_mask(w)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    start = time.perf_counter()
    compressed = handle.compress(w)
    torch.cuda.synchronize()
    compress_s = time.perf_counter() - start
    stream = torch.cuda.current_stream().cuda_stream

    events: list[dict] = []
    original_init = cusparselt.MatmulPlan.__init__
    original_time = tuning.time_cuda_us

    def timed_init(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            original_init(self, *args, **kwargs)
        finally:
            alg = kwargs.get("alg")
            events.append(
                {
                    "what": "plan",
                    "alg": None if alg is None else alg.to_dict(),
                    "s": time.perf_counter() - start,
                }
            )

    def timed_time(fn, *args, **kwargs):
        start = time.perf_counter()
        us = original_time(fn, *args, **kwargs)
        events.append({"what": "time", "us": us, "s": time.perf_counter() - start})
        return us

    cusparselt.MatmulPlan.__init__ = timed_init
    tuning.time_cuda_us = timed_time
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        alg, us, _ = tuning.search_alg(handle, n, k, m, dtype, bias, False, compressed, x, stream)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        cusparselt.MatmulPlan.__init__ = original_init
        tuning.time_cuda_us = original_time
    dense_start = time.perf_counter()
    dense_us = original_time(lambda: torch.nn.functional.linear(x, w, bias))
    dense_s = time.perf_counter() - dense_start
    plans = [e for e in events if e["what"] == "plan"]
    timings = [e for e in events if e["what"] == "time"]
    slow = sorted(timings, key=lambda e: -e["s"])[:3]
    return {
        "shape": [n, k, m],
        "compress_s": compress_s,
        "search_s": total,
        "plans": len(plans),
        "plan_init_s": sum(e["s"] for e in plans),
        "max_plan_init_s": max(e["s"] for e in plans),
        "timing_s": sum(e["s"] for e in timings),
        "slowest_timings": slow,
        "best": {"alg": alg.to_dict(), "us": us},
        "dense_us": dense_us,
        "dense_timing_s": dense_s,
    }


def profile_steps(handle: Handle, n: int = 1536, k: int = 384, m: int = 24576, plans: int = 5) -> dict:
    """Host seconds per cuSPARSELt call while building `plans` plans, and torch's own per-call cost."""
    lib = handle.lib
    totals: dict[str, float] = {}
    names = [name for name in dir(lib) if name.startswith("cusparseLt")] + [
        "cusparseLtMatmulPlanInit",
        "cusparseLtMatmulAlgSelectionInit",
        "cusparseLtMatmulDescriptorInit",
        "cusparseLtDenseDescriptorInit",
        "cusparseLtStructuredDescriptorInit",
        "cusparseLtMatmulGetWorkspace",
        "cusparseLtMatmulAlgSetAttribute",
        "cusparseLtMatmulPlanDestroy",
    ]
    originals = {name: getattr(lib, name) for name in set(names)}

    def wrap(name, fn):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

        return timed

    for name, fn in originals.items():
        setattr(lib, name, wrap(name, fn))
    try:
        for alg_id in range(plans):
            cusparselt.MatmulPlan(handle, n, k, m, torch.float16, alg=cusparselt.AlgConfig(alg_id))
    finally:
        for name, fn in originals.items():
            setattr(lib, name, fn)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    w = w * compute_nm_mask(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    torch_s = None
    try:
        c = torch._cslt_compress(w)
        torch._cslt_sparse_mm(c, x.t())
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(plans):
            torch._cslt_sparse_mm(c, x.t())
        torch.cuda.synchronize()
        torch_s = (time.perf_counter() - start) / plans
    except (RuntimeError, AttributeError) as exc:
        print(f"torch._cslt_sparse_mm unavailable: {exc}")
    per_plan = {name: t / plans for name, t in sorted(totals.items(), key=lambda kv: -kv[1])}
    print(f"host seconds per plan, by cuSPARSELt call ({n}x{k}x{m}, {plans} plans):")
    for name, t in per_plan.items():
        print(f"  {name:40s} {t:.4f}")
    print(f"torch._cslt_sparse_mm, one call (plan built inside): {torch_s}")
    return {"shape": [n, k, m], "per_plan_s": per_plan, "torch_cslt_call_s": torch_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=None)
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="profile the first this many shapes")
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    handle = Handle(torch.device("cuda"))
    handle_s = time.perf_counter() - start
    steps = profile_steps(handle)
    rows = [profile_shape(handle, *shape) for shape in SHAPES[: args.shapes]]
    print(f"handle init {handle_s:.3f} s; GPU {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(
        "N x K x M          compress s search s  plans  plan init s  max plan s  timing s  best us  dense us"
    )
    for r in rows:
        n, k, m = r["shape"]
        print(
            f"{n}x{k}x{m:<10} {r['compress_s']:9.3f} {r['search_s']:9.2f} {r['plans']:6d} {r['plan_init_s']:12.3f} "
            f"{r['max_plan_init_s']:11.3f} {r['timing_s']:9.2f} {r['best']['us']:8.1f} {r['dense_us']:9.1f}"
        )
    if args.json:
        write_json(
            args.json,
            {"handle_init_s": handle_s, "steps": steps, "gpu": torch.cuda.get_device_name(), "rows": rows},
            indent=1,
        )


if __name__ == "__main__":
    main()
