"""Where a compiled static-cache decode step spends its GPU time, dense vs 2:4, per dtype (fp16, bf16).

A diagnosis for `bench_generate.py`, whose bf16 rows ran at about half of dense's speed on an H200 (4 blocks,
2026-12-01) while fp16 was at parity, and whose bf16 warm-up took 3 s against 23 s for fp16. In one run:
1. per dtype, the warm-up's decisions of one block's 2:4 layers at decode sizes (token counts up to 256):
   sparse or dense, the algorithm, both times, the reason;
2. decode tokens/s of dense and ours on the compiled static-cache path (`--layers` blocks of Llama-3-8B's shapes),
   then torch.profiler over `--profile-steps` decode steps of each: the CUDA kernels by total time;
3. every cuSPARSELt algorithm id up to `--max-alg`, timed from CUDA graph replays at `--alg-tokens` tokens for
   two shapes, per dtype, with the dense GEMM (cuBLAS) beside them.

    PYTHONPATH=src python benchmarks/probes/probe_decode_profile.py --layers 2 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_generate import DTYPES, build_model, generate  # noqa: E402

from hf_semisparse.kernels import accelerate_24, prepare_token_counts  # noqa: E402
from hf_semisparse.kernels.cusparselt import AlgConfig, CusparseLtError, MatmulPlan  # noqa: E402
from hf_semisparse.kernels.linear import get_backend  # noqa: E402
from hf_semisparse.kernels.tuning import time_cuda_us  # noqa: E402
from hf_semisparse.masks import compute_nm_mask  # noqa: E402


def decisions(dtype_name: str) -> list[dict]:
    rows = []
    for key, decision in get_backend().cache._entries.items():
        if f"|{dtype_name}|" not in key:
            continue
        m = int(key.split("xM")[-1].split("+")[0])
        if m <= 256:
            rows.append({"key": key, **decision.to_dict()})
    return rows


def kernel_table(model, ids, steps: int) -> list[dict]:
    generate(model, ids, steps, compiled=True)  # graphs recorded for this length already: replays only
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, ids, steps, compiled=True)
    rows = []
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if cuda_us > 0:
            rows.append({"name": event.key[:110], "calls": event.count, "cuda_us": cuda_us})
    rows.sort(key=lambda r: -r["cuda_us"])
    return rows[:25]


def alg_table(dtype: torch.dtype, tokens: int, max_alg: int) -> list[dict]:
    backend = get_backend()
    handle = backend.handle(torch.device("cuda"))
    rows = []
    for n, k in ((4096, 4096), (28672, 4096)):
        w = torch.randn(n, k, dtype=dtype, device="cuda")
        w = w * compute_nm_mask(w, 2, 4)
        compressed = handle.compress(w)
        x = torch.randn(tokens, k, dtype=dtype, device="cuda")
        out = torch.empty(tokens, n, dtype=dtype, device="cuda")
        dense_us = time_cuda_us(lambda x=x, w=w: F.linear(x, w), graph=True, inner=20)
        row = {"n": n, "k": k, "m": tokens, "dtype": str(dtype), "dense_us": dense_us, "algs": {}}
        probe = MatmulPlan(handle, n, k, tokens, dtype)
        row["max_alg_id"] = probe.max_alg_id()
        for alg_id in range(min(max_alg, row["max_alg_id"]) + 1):
            try:
                plan = MatmulPlan(handle, n, k, tokens, dtype, alg=AlgConfig(alg_id))
                ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")

                def run(plan=plan, ws=ws, x=x, out=out, compressed=compressed):
                    plan.run(compressed, x, out, ws, torch.cuda.current_stream().cuda_stream)

                us = time_cuda_us(run, graph=True, inner=20)
                torch.testing.assert_close(out.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-1)
                row["algs"][alg_id] = us
            except (CusparseLtError, AssertionError) as exc:
                row["algs"][alg_id] = repr(exc)[:120]
        rows.append(row)
        best = min((v for v in row["algs"].values() if isinstance(v, float)), default=float("nan"))
        print(
            f"  {dtype} N{n} K{k} M{tokens}: max alg id {row['max_alg_id']}, dense {dense_us:.1f} us, best 2:4 "
            f"{best:.1f} us; per id: "
            + ", ".join(
                f"{i}:{v:.1f}" if isinstance(v, float) else f"{i}:err" for i, v in row["algs"].items()
            ),
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--alg-tokens", type=int, default=16)
    p.add_argument("--max-alg", type=int, default=11)
    p.add_argument("--json", default="outputs/probe_decode_profile.json")
    args = p.parse_args()
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    for name in args.dtypes:
        dtype = DTYPES[name]
        print(f"=== {name}", flush=True)
        results[name] = {"alg_table": alg_table(dtype, args.alg_tokens, args.max_alg)}
        dense = build_model(args.layers, dtype)
        ours = copy.deepcopy(dense)
        results[name]["accelerate"] = str(accelerate_24(ours))
        results[name]["warmup"] = str(prepare_token_counts(ours, args.batch * args.prompt))
        results[name]["decisions"] = decisions(str(dtype).split(".")[-1])
        for row in results[name]["decisions"]:
            print(f"  {row['key']}: {row['reason']} alg {row['alg']}", flush=True)
        ids = torch.randint(1, dense.config.vocab_size, (args.batch, args.prompt), device="cuda")
        for label, model in (("dense", dense), ("ours", ours)):
            counters.clear()
            generate(model, ids, args.new_tokens, compiled=True)  # compiles
            tps = generate(model, ids, args.new_tokens, compiled=True)["tokens_per_s"]
            table = kernel_table(model, ids, args.profile_steps)
            skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
            results[name][label] = {
                "tokens_per_s": tps,
                "kernels": table,
                "inductor_cudagraph_counters": skips,
            }
            print(f"  [{name} {label}] inductor cudagraph counters: {skips}", flush=True)
            print(f"  [{name} {label}] {tps:.1f} tokens/s; top kernels over {args.profile_steps} steps:")
            for row in table[:14]:
                print(f"    {row['cuda_us']:9.0f} us {row['calls']:6d}x  {row['name']}", flush=True)
        del dense, ours
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
