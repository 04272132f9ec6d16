"""Which cuSPARSELt algorithm ids run, which are right, and which crash, per layout and shape.

Some (layout, algorithm) pairs raise "illegal instruction" on an H100 with cuSPARSELt 0.8, which kills the CUDA
context; so each (layout, shape) runs in a child process that tries the ids in turn, and the parent restarts it
after the id that crashed. Prints a table and writes JSON.

    PYTHONPATH=src python benchmarks/probes/probe_cusparselt_algs.py --json outputs/probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = [
    (1536, 768, 768),
    (6144, 768, 3072),
    (6144, 3072, 768),
    (24576, 768, 3072),
    (24576, 3072, 768),
    (24576, 1024, 4096),
    (24576, 4096, 1024),
]


def child(layout: str, m: int, k: int, n: int, start: int, dtype_name: str) -> None:
    import torch

    from hf_semisparse import compute_nm_mask
    from hf_semisparse.kernels.cusparselt import AlgConfig, CusparseLtError, Handle, MatmulPlan
    from hf_semisparse.kernels.tuning import time_cuda_us

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    w = w * compute_nm_mask(w)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = (x.double() @ w.double().t()) + bias.double()
    handle = Handle(torch.device("cuda"))
    compressed = handle.compress(w, layout)
    stream = torch.cuda.current_stream().cuda_stream
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    if start == 0:
        dense_us = time_cuda_us(lambda: torch.nn.functional.linear(x, w, bias), repeats=7)
        print("DENSE " + json.dumps({"us": dense_us}), flush=True)
    max_id = MatmulPlan(handle, n, k, m, dtype, bias=bias, layout=layout).max_alg_id()
    for alg_id in range(start, max_id + 1):
        print(f"TRY {alg_id}", flush=True)
        try:
            plan = MatmulPlan(handle, n, k, m, dtype, bias=bias, alg=AlgConfig(alg_id), layout=layout)
        except CusparseLtError as exc:
            print(
                "RESULT " + json.dumps({"alg": alg_id, "status": "no plan", "detail": str(exc)}), flush=True
            )
            continue
        ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")
        out.fill_(float("nan"))
        plan.run(compressed, x, out, ws, stream)
        torch.cuda.synchronize()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        us = time_cuda_us(lambda plan=plan, ws=ws: plan.run(compressed, x, out, ws, stream), repeats=7)
        print("RESULT " + json.dumps({"alg": alg_id, "status": "ok", "rel_err": err, "us": us}), flush=True)
    print("DONE", flush=True)


def probe(layout: str, shape: tuple[int, int, int], dtype: str) -> dict:
    m, k, n = shape
    results, crashed, dense_us, start = [], [], None, 0
    while True:
        cmd = [sys.executable, __file__, "--child", layout, str(m), str(k), str(n), str(start), dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        last_try = None
        for line in proc.stdout.splitlines():
            if line.startswith("TRY "):
                last_try = int(line.split()[1])
            elif line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                last_try = None
            elif line.startswith("DENSE "):
                dense_us = json.loads(line[6:])["us"]
        if "DONE" in proc.stdout:
            break
        if last_try is None:
            raise RuntimeError(f"child failed before any algorithm: {proc.stderr[-2000:]}")
        crashed.append({"alg": last_try, "error": proc.stderr.strip().splitlines()[-1:]})
        start = last_try + 1
    return {
        "layout": layout,
        "M": m,
        "K": k,
        "N": n,
        "dtype": dtype,
        "dense_us": dense_us,
        "results": results,
        "crashed": crashed,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        layout, m, k, n, start, dtype = sys.argv[2:8]
        child(layout, int(m), int(k), int(n), int(start), dtype)
        return
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", nargs="+", default=["sparse_a", "sparse_b"])
    p.add_argument("--shapes", nargs="+", default=None, help="MxKxN, e.g. 1536x768x768")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--json", default="outputs/probe_cusparselt_algs.json")
    a = p.parse_args()
    rows = []
    print(
        f"{'layout':<9}{'M x K x N':<20}{'dense us':>9}{'best us':>9}{'best alg':>9}{'max err':>9}  crashed ids"
    )
    for layout in a.layouts:
        for shape in [tuple(map(int, s.split("x"))) for s in a.shapes] if a.shapes else SHAPES:
            r = probe(layout, shape, a.dtype)
            rows.append(r)
            ok = [x for x in r["results"] if x["status"] == "ok"]
            best = min(ok, key=lambda x: x["us"]) if ok else None
            max_err = max((x["rel_err"] for x in ok), default=float("nan"))
            print(
                f"{layout:<9}{'x'.join(map(str, shape)):<20}{r['dense_us'] or float('nan'):>9.1f}"
                f"{best['us'] if best else float('nan'):>9.1f}{best['alg'] if best else -1:>9}{max_err:>9.1e}  "
                f"{[c['alg'] for c in r['crashed']]}",
                flush=True,
            )
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
