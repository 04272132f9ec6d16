"""Which algorithm ids can be set, one after another, on ONE cuSPARSELt selection and planned from it.

Each variant runs in a child process (a bad combination can crash the process); the child prints the id before
each plan, so the parent reports the id that crashed. Variants: writing split-K 1 explicitly with each id
("reset") or not ("no-reset"), and setting each id on a fresh selection ("fresh", the reference).

    PYTHONPATH=src python benchmarks/probes/probe_shared_selection.py [n k m]
"""

from __future__ import annotations

import json
import subprocess
import sys


def child(variant: str, n: int, k: int, m: int) -> None:
    import ctypes

    import torch

    from hf_semisparse.kernels import cusparselt as cl
    from hf_semisparse.kernels.tuning import SAFE_MAX_ALG_ID

    dt = torch.float16
    handle = cl.Handle(torch.device("cuda"))
    lib = handle.lib
    bias = torch.randn(n, device="cuda", dtype=dt)
    scratch = cl.MatmulPlan(handle, n, k, m, dt, bias=bias)
    for alg_id in range(min(scratch.max_alg_id(), SAFE_MAX_ALG_ID) + 1):
        print(f"TRY {alg_id}", flush=True)
        try:
            if variant == "fresh":
                cl.MatmulPlan(handle, n, k, m, dt, bias=bias, alg=cl.AlgConfig(alg_id))
            else:
                scratch._set_alg(cl.AlgConfig(alg_id))
                if variant == "reset":  # also write split-K 1 explicitly
                    one = ctypes.c_int(1)
                    status = lib.cusparseLtMatmulAlgSetAttribute(
                        handle.ref, cl._ref(scratch.alg_sel), cl.ALG_SPLIT_K, ctypes.byref(one), 4
                    )
                    if status:
                        raise cl.CusparseLtError(f"split-K status {status}")
                # a plan with descriptors of its own, re-planned from the scratch selection
                plan = cl.MatmulPlan(handle, n, k, m, dt, bias=bias)
                lib.cusparseLtMatmulPlanDestroy(cl._ref(plan.plan))
                status = lib.cusparseLtMatmulPlanInit(
                    handle.ref, cl._ref(plan.plan), cl._ref(plan.matmul), cl._ref(scratch.alg_sel)
                )
                if status:
                    raise cl.CusparseLtError(f"status {status}")
            print(f"OK {alg_id}", flush=True)
        except cl.CusparseLtError as exc:
            print(f"ERR {alg_id} {exc}", flush=True)
    print("DONE", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(int, sys.argv[3:6]))
        return
    n, k, m = map(int, sys.argv[1:4]) if len(sys.argv) > 3 else (768, 768, 1536)
    report = {}
    for variant in ("fresh", "no-reset", "reset"):
        cmd = [sys.executable, __file__, "--child", variant, str(n), str(k), str(m)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        lines = proc.stdout.splitlines()
        tried = [int(x.split()[1]) for x in lines if x.startswith("TRY ")]
        report[variant] = {
            "returncode": proc.returncode,
            "ok": [int(x.split()[1]) for x in lines if x.startswith("OK ")],
            "errors": [x for x in lines if x.startswith("ERR ")],
            "crashed_at": tried[-1] if proc.returncode != 0 and tried else None,
            "stderr_tail": proc.stderr[-300:] if proc.returncode else "",
        }
    print(json.dumps({"shape": [n, k, m], **report}, indent=1))


if __name__ == "__main__":
    main()
