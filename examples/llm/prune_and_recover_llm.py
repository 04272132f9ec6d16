"""Prune a decoder LLM to 2:4 and recover it, on real text: the LLM workflow end to end.

Dense perplexity; one-shot 2:4 pruning (SparseGPT by default, with optional block-wise reconstruction) on
calibration windows of `--train-text`; perplexity; recovery with `SparsityTrainer`, distilling the dense model, on
windows of the same text mixed with sequences the dense model samples (`--teacher-fraction`); perplexity; a
compressed checkpoint with its tokenizer and a model card; that checkpoint loaded back with plain
`from_pretrained` and evaluated again. Perplexity is measured on the first `--eval-tokens` tokens of `--eval-text`
(keep it disjoint from the training text). Prints a table and writes results.json and results.md to
`--output-dir`; the checkpoint goes to `--output-dir`/model.

SmolLM2-135M on the project's texts, the recipe measured at 1.49x dense perplexity on one NVIDIA H200 in about
8 minutes (docs/guides/pruning.md):

    python ../shared/models/smollm2-135m-instruct-q4_1/to_hf.py outputs/smollm2-135m   # once
    python examples/llm/prune_and_recover_llm.py --model outputs/smollm2-135m \\
        --train-text ../shared/data/text/gutenberg-shakespeare \\
        --eval-text ../shared/data/text/eb1911-shakespeare.txt \\
        --reconstruct-epochs 8 --reconstruct-lr 1e-3 \\
        --recover-steps 2000 --recover-batch 16 --recover-lr 5e-4 \\
        --teacher-fraction 0.5 --teacher-pool 3072 --output-dir outputs/smollm2-135m-24

A quick look on a CPU (about 10 minutes for SmolLM2-135M on 2 cores; the numbers then say little):
`--calibration-samples 8 --recover-steps 4 --recover-batch 2 --eval-tokens 1024 --teacher-pool 4
--teacher-batch 4`.

The work runs in float32 (bf16 mixed precision for the recovery on a GPU); the checkpoint is saved in
`--save-dtype`, by default the dtype the model's config records (e.g. float16), and the "loaded checkpoint" row
evaluates what was saved.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import shlex
import sys
import tempfile
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import hf_semisparse
from hf_semisparse import SparsityConfig, prune_24, save_sparse_pretrained
from hf_semisparse.hub import render_model_card
from hf_semisparse.utils import atomic_write_text, write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_recipe import (  # noqa: E402
    distillation_trainer,
    perplexity,
    random_windows,
    read_text,
    recovery_rows,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a causal-LM folder or Hub id (decoder-only)")
    p.add_argument(
        "--train-text", required=True, help="a .txt file or a folder of them: calibration and recovery"
    )
    p.add_argument("--eval-text", required=True, help="a .txt file or a folder of them: perplexity")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--method", choices=["sparsegpt", "wanda", "magnitude"], default="sparsegpt")
    p.add_argument("--calibration-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq", type=int, default=512, help="tokens per calibration and training window")
    p.add_argument("--calibration-batch", type=int, default=8, help="calibration windows per forward")
    p.add_argument(
        "--reconstruct-epochs", type=int, default=0, help="block-wise reconstruction after pruning (0: none)"
    )
    p.add_argument("--reconstruct-lr", type=float, default=1e-3)
    p.add_argument("--recover-steps", type=int, default=0, help="recovery optimizer steps (0: no recovery)")
    p.add_argument("--recover-batch", type=int, default=16)
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument(
        "--teacher-fraction",
        type=float,
        default=0.5,
        help="share of recovery windows the dense model samples",
    )
    p.add_argument("--teacher-pool", type=int, help="at most this many distinct sampled sequences, repeated")
    p.add_argument("--teacher-batch", type=int, default=512, help="sequences sampled together")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--save-dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="dtype of the saved checkpoint ('auto': the one the model's config records, else float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")
    args = p.parse_args(argv)
    for name, low in [
        ("calibration_samples", 1), ("seq", 2), ("calibration_batch", 1), ("recover_batch", 1),
        ("teacher_batch", 1), ("eval_window", 2),
    ]:  # fmt: skip
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("recover_lr", "reconstruct_lr", "distill_temperature"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    for name in ("reconstruct_epochs", "recover_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.eval_tokens < 2:
        p.error(f"--eval-tokens must be at least 2, got {args.eval_tokens}")
    if not 0.0 <= args.teacher_fraction <= 1.0:
        p.error(f"--teacher-fraction is a fraction in [0, 1], got {args.teacher_fraction}")
    if args.teacher_pool is not None and args.teacher_pool < 1:
        p.error(f"--teacher-pool must be at least 1, got {args.teacher_pool}")
    if args.method == "magnitude" and args.reconstruct_epochs:
        p.error("--reconstruct-epochs needs calibration data: use --method sparsegpt or wanda")
    if os.path.isfile(args.output_dir):
        p.error(f"--output-dir {args.output_dir} is a file")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        p.error(f"--output-dir {args.output_dir} is not empty: give another folder, or --overwrite")
    return args


def load_dense(model: str, device: str):
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if getattr(dense.config, "is_encoder_decoder", False):
        raise SystemExit(f"{model} is an encoder-decoder model; this example prunes decoder-only causal LMs")
    return dense.to(device).eval()


def saved_dtype(model: str, choice: str) -> torch.dtype:
    """`choice` as a torch dtype; 'auto': the dtype `model`'s config records, else float32."""
    if choice != "auto":
        return getattr(torch, choice)
    recorded = getattr(AutoConfig.from_pretrained(model), "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) and recorded.is_floating_point else torch.float32


def start_token(model: str) -> int | None:
    """The token the teacher's samples start with (`bos_token_id` of the generation config, else the config), as
    `sample_teacher_sequences` takes it; None if neither records one."""
    sources = [AutoConfig.from_pretrained(model)]
    with contextlib.suppress(OSError):  # no generation_config.json
        sources.insert(0, GenerationConfig.from_pretrained(model))
    for source in sources:
        token = getattr(source, "bos_token_id", None)
        token = token[0] if isinstance(token, list) and token else token
        if isinstance(token, int):
            return token
    return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    # every input read and checked before any model is changed or any file written
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_ids = tokenizer(read_text(args.train_text), return_tensors="pt").input_ids[0]
    eval_ids = tokenizer(read_text(args.eval_text), return_tensors="pt").input_ids[0][: args.eval_tokens]
    if len(eval_ids) < 2:
        raise SystemExit(f"{args.eval_text} has fewer than 2 tokens")
    windows = random_windows(train_ids, args.calibration_samples, args.seq, args.seed)
    calibration = [
        {"input_ids": windows[i : i + args.calibration_batch]}
        for i in range(0, len(windows), args.calibration_batch)
    ]
    save_dtype = saved_dtype(args.model, args.save_dtype)
    if args.recover_steps and args.teacher_fraction > 0 and start_token(args.model) is None:
        raise SystemExit(
            f"{args.model} records no bos_token_id to start the teacher's samples from: use --teacher-fraction 0"
        )
    dense = load_dense(args.model, args.device)
    results = [{"name": "dense", "perplexity": perplexity(dense, eval_ids, args.eval_window, args.device)}]
    print(f"dense perplexity {results[-1]['perplexity']:.2f}", flush=True)

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    options = {}
    if args.reconstruct_epochs:
        options = {"reconstruct_epochs": args.reconstruct_epochs, "reconstruct_lr": args.reconstruct_lr}
    report = prune_24(
        model,
        SparsityConfig(method=args.method),
        calibration_data=None if args.method == "magnitude" else calibration,
        **options,
    )
    prune_seconds = time.perf_counter() - start
    for decision in report.skipped:  # the per-weight table is in results.json
        print(f"kept dense: {decision.name} ({decision.reason})")
    print(str(report).splitlines()[-1], flush=True)
    name = f"{args.method} 2:4" + (f" + reconstruction ({args.reconstruct_epochs} epochs)" if options else "")
    results.append({"name": name, "perplexity": perplexity(model, eval_ids, args.eval_window, args.device)})
    print(f"{name}: perplexity {results[-1]['perplexity']:.2f} ({prune_seconds:.0f} s)", flush=True)

    recovery = None
    if args.recover_steps:
        rows, sample_seconds = recovery_rows(
            dense,
            train_ids,
            args.recover_steps * args.recover_batch,
            args.seq,
            teacher_fraction=args.teacher_fraction,
            teacher_pool=args.teacher_pool,
            batch_size=args.teacher_batch,
            seed=args.seed + 1,
        )
        bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output_dir: it saves nothing here
            trainer = distillation_trainer(
                model,
                dense,
                rows,
                output_dir=scratch,
                steps=args.recover_steps,
                batch_size=args.recover_batch,
                learning_rate=args.recover_lr,
                bf16=bf16,
                device=args.device,
                temperature=args.distill_temperature,
            )
            start = time.perf_counter()
            trainer.train()
        recovery = {
            "steps": args.recover_steps,
            "tokens": args.recover_steps * args.recover_batch * args.seq,
            "teacher_fraction": args.teacher_fraction,
            "teacher_pool": args.teacher_pool,
            "sample_seconds": sample_seconds,
            "train_seconds": time.perf_counter() - start,
            "bf16": bf16,
        }
        model.eval()
        results.append(
            {
                "name": "+ distillation",
                "perplexity": perplexity(model, eval_ids, args.eval_window, args.device),
            }
        )
        print(f"recovered: perplexity {results[-1]['perplexity']:.2f}", flush=True)

    command = shlex.join(["python", "examples/llm/prune_and_recover_llm.py", *(argv or sys.argv[1:])])
    dense_ppl = results[0]["perplexity"]
    table = [{"name": r["name"], "perplexity": f"{r['perplexity']:.2f}"} for r in results]
    for row, r in zip(table, results, strict=True):
        row["x dense"] = f"{r['perplexity'] / dense_ppl:.2f}"
    card = render_model_card(
        model,
        repo_id=os.path.basename(os.path.abspath(args.output_dir)),
        base_model=None if os.path.isdir(args.model) else args.model,
        results=table,
        results_command=command,
        recovered=recovery is not None,
    )
    checkpoint = os.path.join(args.output_dir, "model")
    summary = save_sparse_pretrained(
        model.cpu().to(save_dtype),
        checkpoint,
        tokenizer=tokenizer,
        extra_files={"README.md": card},
        overwrite=args.overwrite,
    )
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(args.device).eval()
    results.append(
        {
            "name": "loaded checkpoint",
            "perplexity": perplexity(loaded, eval_ids, args.eval_window, args.device),
        }
    )
    table.append(
        {
            "name": "loaded checkpoint",
            "perplexity": f"{results[-1]['perplexity']:.2f}",
            "x dense": f"{results[-1]['perplexity'] / dense_ppl:.2f}",
        }
    )
    out = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hf_semisparse": hf_semisparse.__version__,
        },
        "args": vars(args),
        "results": results,
        "prune_seconds": prune_seconds,
        "recovery": recovery,
        "checkpoint": checkpoint,
        "target_bytes_ratio": summary["target_ratio"],
        "sparsity_report": report.to_dict(),
    }
    lines = ["| model | perplexity | x dense |", "| --- | --- | --- |"]
    lines += [f"| {row['name']} | {row['perplexity']} | {row['x dense']} |" for row in table]
    markdown = "\n".join([*lines, "", f"Command: `{command}`"]) + "\n"
    write_json(os.path.join(args.output_dir, "results.json"), out)
    atomic_write_text(os.path.join(args.output_dir, "results.md"), markdown)
    print(markdown)
    return out


if __name__ == "__main__":
    main()
