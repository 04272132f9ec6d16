"""Perplexity of FP8 (e4m3) 2:4 against bf16 2:4, with the FP8 GEMM's math emulated on CPU.

The model is pruned to 2:4 (magnitude, or SparseGPT calibrated on 128 random 512-token windows of the Gutenberg
plays, as `benchmarks/bench_pruning_llm.py` does), then evaluated in bf16 and
with every pruned linear layer replaced by the FP8 2:4 kernel's math in torch (`cutlass_fp8.fp8_linear_reference`:
weights quantised to e4m3 per output channel, activations per token, matmul in float32, output in bf16). The
"kernel-eligible" row quantises only the layers the FP8 kernels take (in_features % 256 == 0 and out_features %
64 == 0); on SmolLM2-135M (hidden size 576) that is the MLP down projections only, so the "all layers" row is the
one that stands for 8B-class models, whose every projection qualifies.

    python benchmarks/probes/probe_fp8_accuracy.py outputs/smollm2-135m --method magnitude
    python benchmarks/probes/probe_fp8_accuracy.py outputs/smollm2-135m --method sparsegpt

Perplexity: the first `--tokens` tokens of the EB1911 article on Shakespeare, non-overlapping windows of
`--window` tokens, mean token negative log-likelihood over all windows (the first token of each window is context
only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_pruning_llm import calibration_batches  # noqa: E402

from hf_semisparse import SparsityConfig, prune_24
from hf_semisparse.kernels import cutlass_fp8

SHARED = os.environ.get("HF_SEMISPARSE_SHARED", "/work/shared")
TEXT = os.path.join(SHARED, "data", "text", "eb1911-shakespeare.txt")
CALIBRATION_DIR = os.path.join(SHARED, "data", "text", "gutenberg-shakespeare")


class EmulatedFp8Linear(nn.Module):
    """The FP8 2:4 GEMM's math (`fp8_linear_reference`) in place of an `nn.Linear`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_fp8, self.scale_w = cutlass_fp8.quantize_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cutlass_fp8.fp8_linear_reference(x, self.weight_fp8, self.scale_w, self.bias)


def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - window + 1, window):
            chunk = ids[start : start + window][None]
            logits = model(chunk).logits.float()
            loss = nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll += loss.item()
            count += window - 1
    return math.exp(nll / count)


def emulate(model, names: list[str]) -> nn.Module:
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, EmulatedFp8Linear(modules[name]))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--method", default="magnitude", choices=["magnitude", "sparsegpt"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--only-all-layers", action="store_true", help="skip dense and the kernel-eligible row"
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(TEXT, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[0][: args.tokens]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    results = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "method": args.method,
        "tokens": ids.numel(),
        "window": args.window,
    }
    t0 = time.time()
    if not args.only_all_layers:
        results["dense_bf16"] = perplexity(model, ids, args.window)

    calibration = None
    if args.method == "sparsegpt":
        # the calibration of benchmarks/bench_pruning_llm.py: random 512-token windows of all the Gutenberg plays
        calibration, _ = calibration_batches(
            tokenizer, CALIBRATION_DIR, args.calibration_samples, 512, batch_size=8, seed=0
        )
        results["calibration"] = {
            "dir": CALIBRATION_DIR,
            "samples": args.calibration_samples,
            "seq": 512,
            "seed": 0,
        }
        model.float()  # SparseGPT's Hessian in float32, then back to bf16
    report = prune_24(
        model, SparsityConfig(method=args.method), calibration_data=calibration, show_progress=False
    )
    model.to(torch.bfloat16)
    targets = report.targets
    results["pruned_layers"] = len(targets)
    results["sparse24_bf16"] = perplexity(model, ids, args.window)
    print(json.dumps(results), flush=True)

    eligible = [
        name
        for name in targets
        if dict(model.named_modules())[name].in_features % cutlass_fp8.K_MULTIPLE == 0
        and dict(model.named_modules())[name].out_features % cutlass_fp8.N_MULTIPLE == 0
    ]
    results["fp8_layers_eligible"] = len(eligible)
    if not args.only_all_layers:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        results["sparse24_fp8_eligible"] = perplexity(emulate(model, eligible), ids, args.window)
        print(json.dumps(results), flush=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        model.load_state_dict(state)
    results["sparse24_fp8_all"] = perplexity(emulate(model, targets), ids, args.window)
    for key in ("sparse24_fp8_eligible", "sparse24_fp8_all"):
        if key in results:
            results[key + "_vs_bf16_pct"] = 100.0 * (results[key] / results["sparse24_bf16"] - 1.0)
    results["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
