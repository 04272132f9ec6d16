"""Which loss block-wise reconstruction should fit on a real LLM: the sum over all tokens (what
`reconstruct_block_` uses), the same without each sequence's first token, or a loss normalised per token.

On SmolLM2-135M most of a block's output norm sits at the first position (the attention-sink token), so the
summed loss is mostly that token's; this probe checks whether leaving it out, or weighing every token alike,
gives a better model (the loss chosen also measures the error that decides whether a block keeps its tuned
weights). Wanda (fast on a CPU) with and without reconstruction, perplexity on the first
`--eval-tokens` tokens of the EB1911 text (windows of 512), calibration from the Gutenberg plays as in
`bench_pruning_llm.py`:

    python /work/shared/models/smollm2-135m-instruct-q4_1/to_hf.py outputs/smollm2-135m   # once
    PYTHONPATH=src python benchmarks/probes/probe_reconstruction_loss.py --model outputs/smollm2-135m \\
        --json outputs/probe_reconstruction_loss.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_semisparse import SparsityConfig, prune_24
from hf_semisparse.pruning import reconstruction
from hf_semisparse.utils import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/: the LLM benchmark's data and evaluation helpers
import bench_pruning_llm as bench  # noqa: E402

summed_error = reconstruction._error


def error_without_first_token(outputs, wanted, token_mask):
    mask = torch.ones(outputs.shape[:2], dtype=torch.bool) if token_mask is None else token_mask.clone()
    mask[:, 0] = False
    return summed_error(outputs, wanted, mask)


def error_per_token(outputs, wanted, token_mask):
    """Each token's difference divided by its wanted norm (times sqrt(hidden), so it stays on the same scale)."""
    w = wanted.to(outputs.device).float()
    diff = (outputs.float() - w) / w.norm(dim=-1, keepdim=True).clamp_min(1e-6) * w.shape[-1] ** 0.5
    diff = diff.reshape(-1, outputs.shape[-1])
    if token_mask is not None and token_mask.numel() == diff.shape[0]:
        diff = diff[token_mask.reshape(-1).to(diff.device)]
    return (diff * diff).sum(), diff.numel()


LOSSES = {"sum": summed_error, "skip_first": error_without_first_token, "per_token": error_per_token}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches, _ = bench.calibration_batches(
        tokenizer,
        os.path.join(bench.SHARED, "data/text/gutenberg-shakespeare"),
        args.samples,
        args.seq,
        args.batch_size,
        0,
    )
    with open(os.path.join(bench.SHARED, "data/text/eb1911-shakespeare.txt"), encoding="utf-8") as f:
        eval_ids = tokenizer(f.read(), return_tensors="pt").input_ids[0][: args.eval_tokens]
    runs = []
    for loss in ["none", *LOSSES]:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        options = {} if loss == "none" else dict(reconstruct_epochs=args.epochs, reconstruct_lr=args.lr)
        reconstruction._error = LOSSES.get(loss, summed_error)
        try:
            start = time.perf_counter()
            report = prune_24(
                model, SparsityConfig(method=args.method), batches, show_progress=False, **options
            )
            seconds = time.perf_counter() - start
        finally:
            reconstruction._error = summed_error
        ppl = bench.perplexity(model, eval_ids, 512, "cpu")
        runs.append(
            {
                "loss": loss,
                "perplexity": ppl,
                "prune_seconds": seconds,
                "blocks_tuned": (report.calibration or {}).get("blocks_tuned"),
            }
        )
        print(f"{loss:>10}  ppl {ppl:8.2f}  {seconds:6.1f} s", flush=True)
    write_json(
        args.json,
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
            "settings": vars(args),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
