"""What a 2:4 `lm_head` costs in perplexity, on a real LLM with every other layer dense.

hf_semisparse leaves the output head dense by default (`exclude_modules`), as SparseGPT and Wanda do: for
Llama-3-8B's shapes that keeps the model's weights at 0.62x of dense after 2:4 (the head is 6.5% of the
parameters); a 2:4 head would bring them to 0.59x. This probe unties the head (SmolLM2 shares it with the input
embedding), prunes only the head 2:4 by magnitude, Wanda and SparseGPT (calibrated on the inputs the head sees on
the Gutenberg plays), and evaluates as `bench_pruning_llm.py` does (the first 8,192 tokens of the EB1911 article,
windows of 512):

    PYTHONPATH=src python benchmarks/probes/probe_lm_head_24.py --model outputs/smollm2-135m \\
        --json outputs/probe_lm_head_24.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_semisparse import compute_nm_mask
from hf_semisparse.pruning.calibrated import sparsegpt_nm, wanda_scores
from hf_semisparse.utils import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/: the LLM benchmark's data and evaluation helpers
import bench_pruning_llm as bench  # noqa: E402
from bench_pruning_llm import perplexity  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--samples", type=int, default=32, help="calibration windows of --seq tokens")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches, _ = bench.calibration_batches(
        tokenizer, os.path.join(bench.SHARED, "data/text/gutenberg-shakespeare"), args.samples, args.seq, 4, 0
    )
    eval_text = Path(os.path.join(bench.SHARED, "data/text/eb1911-shakespeare.txt")).read_text(
        encoding="utf-8"
    )
    eval_ids = tokenizer(eval_text, return_tensors="pt").input_ids[0][: args.eval_tokens]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    dense_head = head.weight.detach().clone()
    # untied: the embedding stays dense
    head.weight = torch.nn.Parameter(dense_head.clone(), requires_grad=False)

    features = head.in_features
    hessian = torch.zeros(features, features, dtype=torch.float64)
    tokens = 0

    def record(module, inputs):
        nonlocal hessian, tokens
        x = inputs[0].reshape(-1, features).double()
        hessian += x.t() @ x
        tokens += x.shape[0]

    handle = head.register_forward_pre_hook(record)
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    hessian /= tokens

    results = {"dense": perplexity(model, eval_ids, 512, "cpu")}
    print(f"dense: {results['dense']:.2f}", flush=True)
    pruned = {
        "magnitude": dense_head * compute_nm_mask(dense_head),
        "wanda": dense_head * compute_nm_mask(wanda_scores(dense_head, torch.diag(hessian).float() * tokens)),
        "sparsegpt": sparsegpt_nm(dense_head, hessian.float()),
    }
    for method, weight in pruned.items():
        with torch.no_grad():
            head.weight.copy_(weight)
        results[method] = perplexity(model, eval_ids, 512, "cpu")
        print(
            f"lm_head 2:4 by {method}: {results[method]:.2f} ({results[method] / results['dense']:.3f}x)",
            flush=True,
        )
    write_json(
        args.json,
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}",
            "settings": vars(args),
            "head_tied_to_input_embedding": tied,
            "calibration_tokens": tokens,
            "perplexity": results,
        },
    )


if __name__ == "__main__":
    main()
