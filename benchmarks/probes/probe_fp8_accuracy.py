"""Perplexity of FP8 (e4m3) 2:4 against bf16 2:4, with the FP8 GEMM's math emulated on CPU.

The model is pruned to 2:4 (magnitude, or SparseGPT calibrated on 128 random 512-token windows of the Gutenberg
plays, as `benchmarks/bench_pruning_llm.py` does), then evaluated in bf16 and
with every pruned linear layer replaced by the FP8 2:4 kernel's math in torch (`cutlass_fp8.fp8_linear_reference`:
weights quantised to e4m3 per output channel, activations per token, matmul in float32, output in bf16). The
"kernel-eligible" row quantises only the layers the FP8 kernels take (in_features % 256 == 0 and out_features %
64 == 0); on SmolLM2-135M (hidden size 576) that is the MLP down projections only, so the "all layers" row is the
one that stands for 8B-class models, whose every projection qualifies.

    python benchmarks/probes/probe_fp8_accuracy.py outputs/smollm2-135m --method magnitude
    python benchmarks/probes/probe_fp8_accuracy.py outputs/smollm2-135m --method sparsegpt \
        --parts --pruned-dir outputs/smollm2-135m-sparsegpt

`--fp8-rounding` prunes with SparseGPT's FP8 rounding (`prune_24(..., fp8_rounding=True)`). `--parts` adds two
rows: every layer with only its weights quantised (activations exact), then only its activations (weights exact),
to tell which costs the perplexity. `--pruned-dir` saves the pruned bf16 model there
(with the method it was pruned by) and loads it from there on later runs, skipping the pruning. The rotary
frequencies are recomputed in float32 after the cast to bf16 (`model.to()` rounds them too, `from_pretrained` does
not; the run of 2026-12-01 kept them rounded in its bf16 2:4 and kernel-eligible rows but not in its all-layers
row, which reloads the model).

Perplexity: the first `--tokens` tokens of the EB1911 article on Shakespeare, non-overlapping windows of
`--window` tokens, mean token negative log-likelihood over all windows (the first token of each window is context
only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_pruning_llm import calibration_batches  # noqa: E402

from hf_semisparse import SparsityConfig, is_nm_sparse, prune_24
from hf_semisparse.kernels import cutlass_fp8

SHARED = os.environ.get("HF_SEMISPARSE_SHARED", "/work/shared")
TEXT = os.path.join(SHARED, "data", "text", "eb1911-shakespeare.txt")
CALIBRATION_DIR = os.path.join(SHARED, "data", "text", "gutenberg-shakespeare")


class EmulatedFp8Linear(nn.Module):
    """The FP8 2:4 GEMM's math (`fp8_linear_reference`) in place of an `nn.Linear`; `part` "weights" or
    "activations" quantises only that operand (the other one exact, the product in float32), to tell which of the
    two costs the perplexity."""

    def __init__(self, linear: nn.Linear, part: str = "both") -> None:
        super().__init__()
        self.part = part
        self.weight = linear.weight.detach()
        self.weight_fp8, self.scale_w = cutlass_fp8.quantize_weight(self.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part == "both":
            return cutlass_fp8.fp8_linear_reference(x, self.weight_fp8, self.scale_w, self.bias)
        if self.part == "weights":
            weight = self.weight_fp8.float() * self.scale_w[:, None]
            xf = x.float()
        else:
            q, scale_x = cutlass_fp8.quantize_rows(x.reshape(-1, x.shape[-1]))
            xf = (q.float() * scale_x[:, None]).reshape(x.shape)
            weight = self.weight.float()
        y = xf @ weight.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


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


def emulate(model, names: list[str], part: str = "both") -> nn.Module:
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, EmulatedFp8Linear(modules[name], part))
    return model


def restore(model, names: list[str]) -> nn.Module:
    """Put back the bf16 2:4 layers that `emulate` replaced (each wrapper keeps its layer's weight)."""
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        wrapper = modules[name]
        linear = nn.Linear(wrapper.weight.shape[1], wrapper.weight.shape[0], bias=wrapper.bias is not None)
        linear.weight = nn.Parameter(wrapper.weight, requires_grad=False)
        if wrapper.bias is not None:
            linear.bias = nn.Parameter(wrapper.bias, requires_grad=False)
        setattr(modules[parent_name], child, linear)
    return model


PRUNING_RECORD = "probe_pruning.json"


def _check_pruned_dir(path: str, pruning: dict) -> bool:
    """Whether `path` holds a pruned model to reuse (it must have been pruned as `pruning` says); False where the
    pruned model is to be saved there (a missing or empty folder). Exits with a message before any work for a
    file, a folder of something else (nothing in it is overwritten), or a model pruned otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        sys.exit(f"--pruned-dir {path} is a file, not a folder")
    if not os.path.isdir(path) or not os.listdir(path):
        return False
    record = os.path.join(path, PRUNING_RECORD)
    if not os.path.isfile(record):
        sys.exit(
            f"--pruned-dir {path} is not empty and holds no {PRUNING_RECORD} (not this probe's cache, or a save "
            "that was interrupted): pass an empty or new folder"
        )
    with open(record, encoding="utf-8") as f:
        saved = json.load(f)
    if saved != pruning:
        sys.exit(
            f"--pruned-dir {path} holds a model pruned as {saved} (a record of an older format, or another "
            f"pruning), not {pruning}: pass another folder"
        )
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a local transformers model folder (e.g. the output of to_hf.py)")
    parser.add_argument("--method", default="magnitude", choices=["magnitude", "sparsegpt"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--only-all-layers", action="store_true", help="skip dense and the kernel-eligible row"
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also every layer with only its weights, then only its activations, quantised",
    )
    parser.add_argument(
        "--fp8-rounding",
        action="store_true",
        help="(sparsegpt) prune with prune_24(..., fp8_rounding=True): weights rounded to the FP8 grid in the solve",
    )
    parser.add_argument(
        "--pruned-dir",
        default=None,
        help="keep the pruned bf16 model here (save_pretrained) and load it from here when it exists",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"{args.model} is not a transformers model folder (no config.json)")
    if args.window < 2 or args.tokens < args.window:
        sys.exit(
            f"--tokens ({args.tokens}) must cover one window of --window ({args.window}, at least 2) tokens"
        )
    # what a cached pruned model must have been pruned with (calibration only counts for SparseGPT)
    pruning = {"model": os.path.abspath(args.model), "method": args.method}
    if args.fp8_rounding and args.method != "sparsegpt":
        sys.exit("--fp8-rounding is part of SparseGPT's solve: use it with --method sparsegpt")
    if args.method == "sparsegpt":
        pruning["fp8_rounding"] = args.fp8_rounding
        pruning |= {
            "calibration_dir": CALIBRATION_DIR,
            "calibration_samples": args.calibration_samples,
            "seq": 512,
        }
    cached = _check_pruned_dir(args.pruned_dir, pruning) if args.pruned_dir is not None else False

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(TEXT, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[0][: args.tokens]
    if ids.numel() < args.window:
        sys.exit(f"{TEXT} has {ids.numel()} tokens, fewer than one window of {args.window}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "model": args.model,
        "method": args.method,
        "fp8_rounding": args.fp8_rounding,
        "tokens": ids.numel(),
        "window": args.window,
    }
    t0 = time.time()
    if not args.only_all_layers:
        results["dense_bf16"] = perplexity(model, ids, args.window)

    calibration = None
    if cached:
        model = AutoModelForCausalLM.from_pretrained(args.pruned_dir, dtype=torch.bfloat16).eval()
        results["pruned_from"] = {"dir": args.pruned_dir, **pruning}
    elif args.method == "sparsegpt":
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
    if cached:
        targets = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head" and is_nm_sparse(module.weight)
        ]
    else:
        options = {"fp8_rounding": True} if args.fp8_rounding else {}
        report = prune_24(
            model,
            SparsityConfig(method=args.method),
            calibration_data=calibration,
            show_progress=False,
            **options,
        )
        model.to(torch.bfloat16)
        # .to() rounded the rotary frequencies (a non-persistent buffer) to bf16 too; from_pretrained builds them
        # in float32, as a user's model has them (the runs before 2026-12-02 kept them rounded)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
        targets = report.targets
        if args.pruned_dir is not None:
            model.save_pretrained(args.pruned_dir)
            tokenizer.save_pretrained(args.pruned_dir)
            # written last: a folder without it is an interrupted save, refused by the next run
            with open(os.path.join(args.pruned_dir, PRUNING_RECORD), "w", encoding="utf-8") as f:
                json.dump(pruning, f)
    results["pruned_layers"] = len(targets)
    # rows whose weights the FP8 path's quantiser reproduces (same e4m3 codes; bf16 storage rounds by under 0.4%,
    # an e4m3 step is over 6%): all rows of a model pruned with --fp8-rounding whose largest weight sits at the top
    # of its grid
    modules = dict(model.named_modules())
    kept = total = 0
    for name in targets:
        w = modules[name].weight.detach().float()
        q, s = cutlass_fp8.quantize_weight(w)
        kept += int(torch.isclose(q.float() * s[:, None], w, rtol=5e-3, atol=0).all(dim=1).sum())
        total += w.shape[0]
    results["fp8_rows_unchanged_share"] = kept / total
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
    print(json.dumps(results), flush=True)
    if args.parts:
        for part in ("weights", "activations"):
            restore(model, targets)
            results[f"sparse24_fp8_{part}_only"] = perplexity(emulate(model, targets, part), ids, args.window)
            print(json.dumps(results), flush=True)
    for key in (
        "sparse24_fp8_eligible",
        "sparse24_fp8_all",
        "sparse24_fp8_weights_only",
        "sparse24_fp8_activations_only",
    ):
        if key in results:
            results[key + "_vs_bf16_pct"] = 100.0 * (results[key] / results["sparse24_bf16"] - 1.0)
    results["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
