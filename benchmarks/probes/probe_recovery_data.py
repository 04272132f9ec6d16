"""Which recovery data brings a 2:4 LLM's general perplexity back faster: windows of the Gutenberg plays (the
calibration text), sequences sampled from the dense model (`sample_teacher_sequences`, LLM-QAT's data-free
distillation), or half of each. Same pruned start, steps, batch and learning rate; distillation from the dense
model as in `bench_pruning_llm.py`; perplexity on the first `--eval-tokens` tokens of the EB1911 text. Wanda
(fast on a CPU) makes the pruned start:

    python /work/shared/models/smollm2-135m-instruct-q4_1/to_hf.py outputs/smollm2-135m   # once
    PYTHONPATH=src python benchmarks/probes/probe_recovery_data.py --model outputs/smollm2-135m \\
        --json outputs/probe_recovery_data.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_semisparse import SparsityConfig, prune_24
from hf_semisparse.utils import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/: the LLM benchmark's data and evaluation helpers
import bench_pruning_llm as bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 1.0, 0.5], help="generated fractions")
    p.add_argument("--samples", type=int, default=32, help="calibration windows for Wanda")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the calibration and recovery windows and sampling"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    args = p.parse_args()
    run_args = argparse.Namespace(
        seed=args.seed,
        recover_seed=None,
        recover_steps=args.steps,
        recover_batch=args.batch,
        recover_lr=args.lr,
        seq=args.seq,
        recover_generated=0.0,
        generate_batch=64,
        generate_temperature=1.0,
        generate_sequences=None,
        device=args.device,
        recover_bf16=False,
        distill_weight=1.0,
        distill_temperature=1.0,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches, train_ids = bench.calibration_batches(
        tokenizer,
        os.path.join(bench.SHARED, "data/text/gutenberg-shakespeare"),
        args.samples,
        args.seq,
        8,
        args.seed,
    )
    eval_text = Path(bench.SHARED, "data/text/eb1911-shakespeare.txt").read_text(encoding="utf-8")
    eval_ids = tokenizer(eval_text, return_tensors="pt").input_ids[0][: args.eval_tokens]
    teacher = bench.load(args.model, args.device)
    dense = bench.perplexity(teacher, eval_ids, 512, args.device)
    pruned = bench.load(args.model, args.device)
    prune_24(pruned, SparsityConfig(method="wanda"), calibration_data=batches)
    start_ppl = bench.perplexity(pruned, eval_ids, 512, args.device)
    print(f"dense {dense:.2f}  wanda {start_ppl:.2f}", flush=True)
    results = {
        "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.device}",
        "protocol": vars(args),
        "dense": dense,
        "wanda": start_ppl,
        "runs": [],
    }
    for fraction in args.fractions:
        run_args.recover_generated = fraction
        model = copy.deepcopy(pruned)
        data, sample_secs = bench.recovery_windows(teacher, train_ids, run_args)
        secs = bench.recover(model, teacher, data, run_args)
        model.eval()
        ppl = bench.perplexity(model, eval_ids, 512, args.device)
        results["runs"].append(
            {
                "generated_fraction": fraction,
                "perplexity": ppl,
                "train_seconds": secs,
                "sample_seconds": sample_secs,
            }
        )
        print(
            f"generated {fraction:.2f}: ppl {ppl:.2f} (train {secs:.0f} s, sampling {sample_secs:.0f} s)",
            flush=True,
        )
        if args.json:
            write_json(args.json, results)


if __name__ == "__main__":
    main()
