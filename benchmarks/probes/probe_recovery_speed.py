"""How fast distillation recovery and teacher sampling run on one GPU, at the shape of a given model (random
weights: speed only). Recovery is `bench_pruning_llm.py`'s (`SparsityTrainer`, logits distillation from the dense
model, bf16 mixed precision), timed per optimizer step at several batch sizes; sampling is
`sample_teacher_sequences`, timed per batch (the first batch includes transformers' compilation of the decode step):

    PYTHONPATH=src python benchmarks/probes/probe_recovery_speed.py --config outputs/smollm2-135m \\
        --batches 16 32 64 --json outputs/probe_recovery_speed.json

`--profile` adds a `torch.profiler` table of one batch size's steps (the most expensive operators).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from hf_semisparse import SparsityConfig, prune_24, sample_teacher_sequences
from hf_semisparse.utils import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/: the LLM benchmark's recovery
import bench_pruning_llm as bench  # noqa: E402


class StepClock(TrainerCallback):
    """perf_counter at the end of every optimizer step (the device synchronised, so a step's time is its own)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a folder with the model's config.json")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="recovery batch sizes")
    p.add_argument(
        "--steps", type=int, default=30, help="recovery steps per batch size (the first 5 not timed)"
    )
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--sample-batches", type=int, nargs="*", default=[512], help="sampling batch sizes")
    p.add_argument("--profile", type=int, help="profile the recovery at this batch size")
    p.add_argument("--device", default="cuda", help="'cpu' only to try the script out")
    p.add_argument("--json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("this probe times GPU work: no CUDA device (--device cpu to try it out)")
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device).eval()
    pruned = copy.deepcopy(teacher)
    prune_24(pruned, SparsityConfig(method="magnitude"))
    results = {
        "config": args.config,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "versions": f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}",
        "protocol": vars(args),
        "recovery": [],
        "sampling": [],
    }
    for batch in args.batches:
        run_args = argparse.Namespace(
            recover_batch=batch,
            recover_steps=args.steps,
            recover_lr=5e-4,
            recover_bf16=args.device == "cuda",
            distill_weight=1.0,
            distill_temperature=1.0,
            device=args.device,
        )
        ids = torch.randint(0, config.vocab_size, (batch * args.steps, args.seq))
        data = [{"input_ids": row, "labels": row} for row in ids]
        clock = StepClock()
        model = copy.deepcopy(pruned)
        profile = args.profile == batch
        if profile:
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                bench.recover(model, teacher, data, run_args, callbacks=[clock])
        else:
            bench.recover(model, teacher, data, run_args, callbacks=[clock])
        steps = torch.tensor(clock.times, dtype=torch.float64).diff()[5:]
        row = {
            "batch": batch,
            "median_step_s": float(steps.median()),
            "tokens_per_s": batch * args.seq / float(steps.median()),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
            "profiled": profile,
        }
        results["recovery"].append(row)
        print(
            f"recovery batch {batch} x {args.seq}: {row['median_step_s'] * 1e3:.0f} ms/step, "
            f"{row['tokens_per_s']:,.0f} tokens/s{' (profiled)' if profile else ''}",
            flush=True,
        )
        if profile:
            if args.device == "cuda":
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if args.json:
            write_json(args.json, results)
    for dtype in (torch.bfloat16, torch.float32):
        sampler = copy.deepcopy(teacher).to(dtype)
        for batch in args.sample_batches:
            for call in ("first", "second"):
                sync()
                start = time.perf_counter()
                sample_teacher_sequences(sampler, batch, args.seq, batch_size=batch, show_progress=False)
                sync()
                secs = time.perf_counter() - start
                name = str(dtype).removeprefix("torch.")
                results["sampling"].append({"batch": batch, "call": call, "dtype": name, "seconds": secs})
                print(f"sampling {batch} x {args.seq} tokens, {name}, {call} call: {secs:.1f} s", flush=True)
                if args.json:
                    write_json(args.json, results)
        del sampler


if __name__ == "__main__":
    main()
