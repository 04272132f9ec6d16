"""Why building a cuSPARSELt plan is slow, and whether an algorithm selection can be shared between plans.

1. Host time of `cusparseLtMatmulAlgSelectionInit` per layout ("sparse_a": column-major output, ours;
   "sparse_b": row-major output, bias not fused), and of torch's `_cslt_sparse_mm` (which builds a plan per call).
2. Sharing: a selection made for one layer's problem (`Handle.selection`) used for the plan of another layer
   (other weight, other bias): is the plan right (float64 reference), does it run at its algorithm's speed,
   and how long does it take to build?

    PYTHONPATH=src python benchmarks/probes/probe_alg_selection.py
"""

from __future__ import annotations

import json
import sys
import time

import torch

from hf_semisparse import compute_nm_mask
from hf_semisparse.kernels import cusparselt as cl
from hf_semisparse.kernels.tuning import time_cuda_us
from hf_semisparse.utils import write_json


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    n, k, m = 1536, 384, 24576
    dt = torch.float16
    handle = cl.Handle(torch.device("cuda"))
    lib = handle.lib
    out = {}

    def weight(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(n, k, device="cuda", dtype=dt, generator=g)
        return w * compute_nm_mask(w)

    x = torch.randn(m, k, device="cuda", dtype=dt)
    w_a, w_b = weight(1), weight(2)
    b_a, b_b = torch.randn(n, device="cuda", dtype=dt), torch.randn(n, device="cuda", dtype=dt)
    stream = torch.cuda.current_stream().cuda_stream

    # 1. AlgSelectionInit per layout (it is inside MatmulPlan.__init__; time the call itself)
    orig = lib.cusparseLtMatmulAlgSelectionInit
    spent = []

    def timed_init(*args):
        start = time.perf_counter()
        r = orig(*args)
        spent.append(time.perf_counter() - start)
        return r

    lib.cusparseLtMatmulAlgSelectionInit = timed_init
    for layout, bias in (("sparse_a", b_a), ("sparse_a", None), ("sparse_b", None)):
        spent.clear()
        for _ in range(3):
            cl.MatmulPlan(handle, n, k, m, dt, bias=bias, layout=layout)
        out[f"alg_selection_init_s {layout} bias={bias is not None}"] = sum(spent) / len(spent)
    lib.cusparseLtMatmulAlgSelectionInit = orig
    c = torch._cslt_compress(w_a)
    torch._cslt_sparse_mm(c, x.t())
    torch.cuda.synchronize()
    _, s = timed(lambda: [torch._cslt_sparse_mm(c, x.t()) for _ in range(5)] and torch.cuda.synchronize())
    out["torch _cslt_sparse_mm call s"] = s / 5

    # 2. sharing one selection between plans
    ref_b = (x.double() @ w_b.double().t() + b_b.double()).float()
    comp_b = handle.compress(w_b)
    proto = cl.MatmulPlan(handle, n, k, m, dt, bias=b_a)
    times = {}
    for alg_id in range(min(proto.max_alg_id(), 20) + 1):
        try:
            p = cl.MatmulPlan(handle, n, k, m, dt, bias=b_b, alg=cl.AlgConfig(alg_id))
        except cl.CusparseLtError:
            continue
        ws = torch.empty(max(p.workspace_size, 1), dtype=torch.uint8, device="cuda")
        y = torch.empty(m, n, device="cuda", dtype=dt)
        times[alg_id] = time_cuda_us(lambda p=p, ws=ws, y=y: p.run(comp_b, x, y, ws, stream))
    slow, fast = max(times, key=times.get), min(times, key=times.get)
    out["alg times us"] = times

    # layer B's plans made from selections that layer A's plans made (cached per problem and algorithm)
    start = time.perf_counter()
    proto_slow = handle.selection(n, k, m, dt, True, False, cl.AlgConfig(slow))
    proto_fast = handle.selection(n, k, m, dt, True, False, cl.AlgConfig(fast))
    out["selection build s"] = (time.perf_counter() - start) / 2
    start = time.perf_counter()
    p_slow = cl.MatmulPlan(handle, n, k, m, dt, bias=b_b, alg=cl.AlgConfig(slow), selection=proto_slow)
    p_fast = cl.MatmulPlan(handle, n, k, m, dt, bias=b_b, alg=cl.AlgConfig(fast), selection=proto_fast)
    out["borrowed plan build s"] = (time.perf_counter() - start) / 2
    plans = [("slow-id plan", p_slow), ("fast-id plan", p_fast)]
    ws = torch.empty(max(p.workspace_size for _, p in plans) + 1, dtype=torch.uint8, device="cuda")
    results = {}
    for name, p in plans:
        y = torch.empty(m, n, device="cuda", dtype=dt)
        p.run(comp_b, x, y, ws, stream)
        torch.cuda.synchronize()
        err = ((y.float() - ref_b).norm() / ref_b.norm()).item()
        results[name] = {
            "rel_err": err,
            "us": time_cuda_us(lambda p=p, y=y: p.run(comp_b, x, y, ws, stream)),
        }
    out["shared selection"] = {"slow_id": slow, "fast_id": fast, **results}
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        write_json(sys.argv[1], out, indent=1)


if __name__ == "__main__":
    main()
