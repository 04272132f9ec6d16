"""Whether the kernel search's decode timings rank cuSPARSELt's algorithms as serving does.

`tuning.search_alg` times each candidate from CUDA graph replays of one weight. At Llama-3-8B's q/k/v and o
shapes the compressed weight (28 and 19 MB in fp16) fits in an H200's 50 MB L2, so the replays read it from L2;
a model of 32 blocks reads every weight from memory. For each shape and decode size this times every algorithm
id both ways: on one weight, and rotating over enough compressed copies that they do not fit in L2 together
(as `bench_generate.py --gemm-table` does), and reports each way's winner and what the one-weight winner costs
in the rotating timing.

    PYTHONPATH=src python benchmarks/probes/probe_decode_l2.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from hf_semisparse import compute_nm_mask
from hf_semisparse.kernels import cusparselt as cl
from hf_semisparse.kernels.plan_threads import build_plans
from hf_semisparse.utils import write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from bench_generate import graph_us  # noqa: E402  (the GEMM table's timing: a graph rotating over copies)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    handle = cl.Handle(device)
    out: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cusparselt": handle.version,
    }
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        copies = max(2, -(-256 * 2**20 // (n * k)))  # ~256 MB of compressed copies
        weights = []
        for _ in range(copies):
            w = torch.randn(n, k, device=device, dtype=torch.float16)
            weights.append(handle.compress(w * compute_nm_mask(w)))
        for m in args.tokens:
            xs = [torch.randn(m, k, device=device, dtype=torch.float16) for _ in range(copies)]
            y = torch.empty(m, n, device=device, dtype=torch.float16)
            specs = [
                {"n": n, "k": k, "m": m, "dtype": torch.float16, "alg": cl.AlgConfig(i)} for i in range(36)
            ]
            plans = build_plans(handle, specs)
            max_id = next(p.max_alg_id() for p in plans if p is not None)
            one, rotating = {}, {}
            for alg_id, plan in enumerate(plans):
                if plan is None or alg_id > max_id:
                    continue
                ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=device)

                def call(i, plan=plan, ws=ws, xs=xs, ws_c=weights, y=y):
                    plan.run(ws_c[i], xs[i], y, ws, torch.cuda.current_stream().cuda_stream)

                try:
                    one[alg_id] = graph_us(lambda i, call=call: call(0), 1)
                    rotating[alg_id] = graph_us(call, copies)
                except cl.CusparseLtError:
                    continue
            best_one, best_rot = min(one, key=one.get), min(rotating, key=rotating.get)
            row = {
                "shape": name,
                "tokens": m,
                "copies": copies,
                "one_weight_best": best_one,
                "rotating_best": best_rot,
                "rotating_us_of_one_weight_best": rotating[best_one],
                "rotating_us_best": rotating[best_rot],
                "loss": rotating[best_one] / rotating[best_rot] - 1,
                "one_weight_us": one,
                "rotating_us": rotating,
            }
            rows.append(row)
            print(
                f"{name} M{m}: one-weight best id {best_one} ({rotating[best_one]:.1f} us rotating), rotating best "
                f"id {best_rot} ({rotating[best_rot]:.1f} us): {row['loss']:.0%} lost",
                flush=True,
            )
            del plans
        if args.json:
            out["rows"] = rows
            write_json(args.json, out, indent=1)
    print(json.dumps([{k: r[k] for k in ("shape", "tokens", "loss")} for r in rows]))


if __name__ == "__main__":
    main()
