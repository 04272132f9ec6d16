"""Time and peak GPU memory of one-shot 2:4 pruning with each method on a bert-base-shaped model.

The model is BertForQuestionAnswering with bert-base shapes and random weights (fp32, on the GPU); wanda and
sparsegpt calibrate on `--batches` batches of `--batch-size` x `--seq` random tokens (the SQuAD example's
default: 16 batches of 32 x 384). "model only" is the memory of the dense model before pruning, the baseline
every method adds to. Prints a table and writes JSON.

    PYTHONPATH=src python benchmarks/bench_pruning_methods.py --json outputs/pruning_methods.json
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig, BertForQuestionAnswering

from hf_semisparse import SparsityConfig, is_nm_sparse, prune_24, select_targets
from hf_semisparse.config import METHODS
from hf_semisparse.utils import write_json


def run(method: str, args) -> dict:
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig()).to("cuda").eval()
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "input_ids": torch.randint(0, 30522, (args.batch_size, args.seq), generator=g),
            "attention_mask": torch.ones(args.batch_size, args.seq, dtype=torch.long),
        }
        for _ in range(args.batches)
    ]
    torch.cuda.synchronize()
    model_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    config = SparsityConfig(method=method, calibration_batches=args.batches)
    prune_24(model, config, calibration_data=None if method == "magnitude" else batches, show_progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    ok = all(is_nm_sparse(t.linear_view()) for t in select_targets(model, config)[0])
    return {
        "method": method,
        "seconds": seconds,
        "model_mib": model_bytes / 2**20,
        "peak_mib": peak / 2**20,
        "extra_mib": (peak - model_bytes) / 2**20,
        "all_24": ok,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = [run(method, args) for method in args.methods]
    print(
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, bert-base shapes, fp32, "
        f"calibration {args.batches} x {args.batch_size} x {args.seq} tokens"
    )
    print("| method | seconds | model MiB | peak MiB | peak - model MiB | exactly 2:4 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {r['model_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{r['extra_mib']:.0f} | {r['all_24']} |"
        )
    if args.json:
        write_json(
            args.json,
            {
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "args": vars(args),
                "rows": rows,
            },
            indent=1,
        )


if __name__ == "__main__":
    main()
