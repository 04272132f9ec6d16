"""Where a compiled static-cache decode step spends its GPU time, dense vs 2:4, per dtype (fp16, bf16).

A diagnosis for `bench_generate.py`, whose bf16 rows ran at about half of dense's speed on an H200 (4 blocks,
2026-12-01) while fp16 was at parity, and whose bf16 warm-up took 3 s against 23 s for fp16. In one run:
1. per dtype, the warm-up's decisions of one block's 2:4 layers at decode sizes (token counts up to 256):
   sparse or dense, the algorithm, both times, the reason;
2. decode tokens/s of dense and ours on the compiled static-cache path (`--layers` blocks of Llama-3-8B's shapes),
   then torch.profiler over `--profile-steps` decode steps of each: the CUDA kernels by total time;
3. every cuSPARSELt algorithm id up to `--max-alg` (and split-K variants of the fastest), timed from CUDA graph
   replays at `--alg-tokens` tokens for Llama-3-8B's four GEMM shapes, per dtype, with the dense GEMM (cuBLAS) and
   the time of reading the weight at copy bandwidth beside them.

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
from bench_generate import DTYPES, build_model, copy_bandwidth, generate  # noqa: E402

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
    return rows


GEMM_KERNEL_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "splitkreduce")


def time_split(rows: list[dict], steps: int) -> dict:
    """CUDA time per decode step, in GEMM kernels (cuBLAS, cuSPARSELt, CUTLASS) and in everything else."""
    gemm = sum(r["cuda_us"] for r in rows if any(n in r["name"].lower() for n in GEMM_KERNEL_NAMES))
    total = sum(r["cuda_us"] for r in rows)
    return {
        "gemm_us_per_step": gemm / steps,
        "other_us_per_step": (total - gemm) / steps,
        "kernels": len(rows),
    }


# Llama-3-8B's 2:4 GEMMs at decode, as accelerate_24 runs them: q/k/v joined, o, gate/up joined, down
SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


def time_alg(handle, w, compressed, x, out, alg: AlgConfig) -> float | str:
    """Microseconds of one cuSPARSELt GEMM with `alg` (CUDA graph replays), or why it could not run."""
    (n, k), tokens = w.shape, x.shape[0]
    try:
        plan = MatmulPlan(handle, n, k, tokens, w.dtype, alg=alg)
        ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")

        def run():
            plan.run(compressed, x, out, ws, torch.cuda.current_stream().cuda_stream)

        us = time_cuda_us(run, graph=True, inner=20)
        torch.testing.assert_close(out.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-1)
        return us
    except (CusparseLtError, AssertionError) as exc:
        return repr(exc)[:120]


def alg_table(dtype: torch.dtype, tokens: int, max_alg: int, bandwidth: float | None) -> list[dict]:
    """Every cuSPARSELt algorithm id up to `max_alg` (and split-K / Segment-K variants of the fastest) at `tokens`
    tokens, per shape, from CUDA graph replays, beside dense; `bandwidth` (bytes/s, measured by a copy): the time
    reading the weight once would take, dense and compressed (0.5625x the bytes)."""
    from hf_semisparse.kernels.tuning import SEGMENT_K_CANDIDATES, SPLIT_K_CANDIDATES

    backend = get_backend()
    handle = backend.handle(torch.device("cuda"))
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, dtype=dtype, device="cuda")
        w = w * compute_nm_mask(w, 2, 4)
        compressed = handle.compress(w)
        x = torch.randn(tokens, k, dtype=dtype, device="cuda")
        out = torch.empty(tokens, n, dtype=dtype, device="cuda")
        dense_us = time_cuda_us(lambda x=x, w=w: F.linear(x, w), graph=True, inner=20)
        row = {"n": n, "k": k, "m": tokens, "dtype": str(dtype), "dense_us": dense_us, "algs": {}}
        if bandwidth:
            row["dense_bound_us"] = n * k * w.element_size() / bandwidth * 1e6
            row["sparse_bound_us"] = row["dense_bound_us"] * 0.5625
        probe = MatmulPlan(handle, n, k, tokens, dtype)
        row["max_alg_id"] = probe.max_alg_id()

        for alg_id in range(min(max_alg, row["max_alg_id"]) + 1):
            row["algs"][str(alg_id)] = time_alg(handle, w, compressed, x, out, AlgConfig(alg_id))
        timed = {i: v for i, v in row["algs"].items() if isinstance(v, float)}
        if timed:
            best = int(min(timed, key=timed.get))
            for split_k, mode in (*SPLIT_K_CANDIDATES, *SEGMENT_K_CANDIDATES):
                buffers = split_k - 1 if split_k > 1 else 1
                alg = AlgConfig(best, split_k, mode, buffers)
                row["algs"][f"{best}/split{split_k}/mode{mode}"] = time_alg(
                    handle, w, compressed, x, out, alg
                )
        rows.append(row)
        best_us = min((v for v in row["algs"].values() if isinstance(v, float)), default=float("nan"))
        row["best_us"] = best_us
        bound = f", compressed-bytes bound {row['sparse_bound_us']:.1f} us" if bandwidth else ""
        print(
            f"  {dtype} N{n} K{k} M{tokens}: max alg id {row['max_alg_id']}, dense {dense_us:.1f} us, best 2:4 "
            f"{best_us:.1f} us{bound}; per id: "
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
    p.add_argument("--max-alg", type=int, default=35)
    p.add_argument("--json", default="outputs/probe_decode_profile.json")
    args = p.parse_args()
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    results["copy_bandwidth_bytes_per_s"] = bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    for name in args.dtypes:
        dtype = DTYPES[name]
        print(f"=== {name}", flush=True)
        results[name] = {"alg_table": alg_table(dtype, args.alg_tokens, args.max_alg, bandwidth)}
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
            split = time_split(table, args.profile_steps)
            skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
            results[name][label] = {
                "tokens_per_s": tps,
                "kernels": table[:25],
                "cuda_time_split": split,
                "inductor_cudagraph_counters": skips,
            }
            print(f"  [{name} {label}] inductor cudagraph counters: {skips}", flush=True)
            print(
                f"  [{name} {label}] {tps:.1f} tokens/s = {1e3 / tps * args.batch:.2f} ms/step; CUDA time per step: "
                f"GEMMs {split['gemm_us_per_step']:.0f} us, other {split['other_us_per_step']:.0f} us; top kernels "
                f"over {args.profile_steps} steps:"
            )
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
