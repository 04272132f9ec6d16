"""Where a prefill (time to first token) spends its GPU time: dense vs 2:4, fp16 and FP8 2:4.

A diagnosis for `bench_generate.py --ttft`: at 1x2048 tokens on an H200 (2026-12-03) fp16 2:4 ran 1.13-1.17x
dense and FP8 2:4 1.51x dense bf16, while their GEMMs alone (graph replays, `tests/gpu/check_fp8_gpu.py` and the
GEMM table) were 1.3-1.6x and 2.1-2.6x faster: what else a prefill spends, and whether the 2:4 models spend more
of it than dense. Per model (`--layers` blocks of Llama-3-8B's shapes, random weights pruned 2:4, prepared for
the prefill's token count): the median of 5 timed `generate(max_new_tokens=1)` calls (CUDA events, as
`bench_generate.ttft_ms`, which takes the median of 3), then torch.profiler over one more: the GPU time of every CUDA kernel, summed by kind
(GEMM, attention, FP8 quantisation, elementwise and the rest, by the kernel's name) and the top kernels.
The gap between the wall time and the kernels' sum is time the GPU waited for the host.

    PYTHONPATH=src HF_SEMISPARSE_KERNEL_DIR=build/kernels python benchmarks/probes/probe_prefill_profile.py \\
        --layers 4 --tokens 2048 --json outputs/probe_prefill_profile.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_generate import (  # noqa: E402
    DEVICE,
    build_model,
    env_info,
    fp8_unavailable,
    generate,
    prepare_fp8,
    write_json,
)

from hf_semisparse.kernels import accelerate_24, prepare_token_counts  # noqa: E402
from hf_semisparse.kernels.gated_mlp import unfuse_gated_mlps  # noqa: E402

# substrings of CUDA kernel names, first match wins (lower case)
KINDS = (
    ("quantise (FP8)", ("quantize",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("GEMM", ("gemm", "cutlass", "sm90_", "sm80_", "cublas", "xmma", "nvjet", "cusparse", "matmul")),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(needle in low for needle in needles):
            return kind
    return "elementwise and other"


def profile(model, ids) -> dict:
    """Median wall time of 5 prefills (ms), then the kernels of one more."""
    generate(model, ids, 1, compiled=False)  # warm-up
    wall = statistics.median(generate(model, ids, 1, compiled=False)["first_step_ms"] for _ in range(5))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, ids, 1, compiled=False)
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us > 0:
            kernels.append(
                {"name": event.key[:140], "calls": event.count, "us": us, "kind": kind_of(event.key)}
            )
    kernels.sort(key=lambda row: -row["us"])
    kinds: dict[str, float] = {}
    for row in kernels:
        kinds[row["kind"]] = kinds.get(row["kind"], 0.0) + row["us"] / 1e3
    return {
        "wall_ms": wall,
        "kernels_ms": sum(kinds.values()),
        "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top_kernels": kernels[:25],
    }


def variants(name: str, layers: int, tokens: int):
    """(label, model) of one run: dense and ours, built from the same 2:4 weights, ours prepared up to `tokens`;
    then, where ours has gated MLPs that compute the SiLU product in one pass (`kernels/gated_mlp.py`), ours again
    with the model's own MLP forward (the A/B of that pass)."""
    dtype = torch.bfloat16 if name == "fp8" else torch.float16
    dense = build_model(layers, dtype)
    ours = copy.deepcopy(dense)
    report = accelerate_24(ours, weights="fp8" if name == "fp8" else "native")
    if name == "fp8":
        prepare_fp8(ours, [1, tokens // 8, tokens])
    else:
        prepare_token_counts(ours, tokens, progress=False)
    yield ("dense bf16" if name == "fp8" else "dense fp16"), dense
    del dense
    yield f"ours {name}", ours
    if report.fused_gated_mlps:
        unfuse_gated_mlps(ours)
        yield f"ours {name}, MLP's own forward", ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length of one sequence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="prompts per prefill")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp8"], choices=["fp16", "fp8"])
    parser.add_argument("--json", default="outputs/probe_prefill_profile.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_prefill_profile.py needs a CUDA GPU")
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "env": env_info(),
        "layers": args.layers,
        "tokens": args.tokens,
        "batches": args.batches,
        "runs": {},
    }
    for name in args.dtypes:
        if name == "fp8" and fp8_unavailable():
            results["runs"][name] = {"skipped": fp8_unavailable()}
            continue
        ids = {}
        for label, model in variants(name, args.layers, max(args.batches) * args.tokens):
            for batch in args.batches:
                if batch not in ids:
                    ids[batch] = torch.randint(
                        1, model.config.vocab_size, (batch, args.tokens), device=DEVICE
                    )
                key = label if args.batches == [1] else f"{label}, {batch}x{args.tokens}"
                row = results["runs"][key] = profile(model, ids[batch])
                write_json(args.json, results)
                kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in row["by_kind_ms"].items())
                print(f"{key}: wall {row['wall_ms']:.2f} ms, kernels {row['kernels_ms']:.2f} ms ({kinds})")
                for kernel in row["top_kernels"][:8]:
                    print(f"    {kernel['us'] / 1e3:8.3f} ms {kernel['calls']:4d}x {kernel['name'][:100]}")
                sys.stdout.flush()
            del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
