"""Prune a decoder LLM to 2:4 and recover it, on real text: the LLM workflow end to end.

Dense perplexity; one-shot 2:4 pruning (SparseGPT by default, with block-wise reconstruction) on calibration
windows of `--train-text`; perplexity; recovery with `SparsityTrainer`, distilling the dense model, on windows of
the same text mixed with sequences the dense model samples (`--teacher-fraction`); perplexity; a compressed
checkpoint with its tokenizer and a model card; that checkpoint loaded back with plain `from_pretrained` and
evaluated again. Perplexity is measured on the first `--eval-tokens` tokens of `--eval-text` (keep it disjoint
from the training text). The checkpoint goes to `--output-dir`, with results.json and results.md beside its
files (a table of the same, printed).

The defaults are the recipe measured on SmolLM2-135M at 1.49x dense perplexity (SparseGPT, 8 epochs of
reconstruction at 1e-3, 2,000 recovery steps of 16 x 512 tokens at 5e-4, half of them sampled from a pool of 3,072
teacher sequences), about 8 minutes end to end on one NVIDIA H200 (docs/guides/pruning.md):

    python ../shared/models/smollm2-135m-instruct-q4_1/to_hf.py outputs/smollm2-135m   # once
    python examples/llm/prune_and_recover_llm.py --model outputs/smollm2-135m \\
        --train-text ../shared/data/text/gutenberg-shakespeare \\
        --eval-text ../shared/data/text/eb1911-shakespeare.txt --output-dir outputs/smollm2-135m-24

A quick look on a CPU (about 3 minutes for SmolLM2-135M on 2 cores, torch 2.13.0, 2026-12-03; more on a busy
machine; the numbers then say little): add
`--calibration-samples 8 --reconstruct-epochs 0 --recover-steps 4 --recover-batch 2 --eval-tokens 1024
--teacher-pool 4 --teacher-batch 4`.

The work runs in float32 (bf16 mixed precision for the recovery on a GPU); the checkpoint is saved in
`--save-dtype`, by default the dtype the model's config records (e.g. float16), and the "loaded checkpoint" row
evaluates what was saved. Inputs are read and checked before any model is changed or file written.
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
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_semisparse
from hf_semisparse import SparsityConfig, prune_24, save_sparse_pretrained
from hf_semisparse.hub import check_repo_id, render_model_card
from hf_semisparse.save_destination import SaveDestinationError, check_save_destination
from hf_semisparse.utils import atomic_write_text, write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_recipe import (  # noqa: E402
    distillation_trainer,
    perplexity,
    random_windows,
    read_text,
    recovery_rows,
)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("--model", required=True, help="a causal-LM folder or Hub id (decoder-only)")
    p.add_argument(
        "--base-model",
        default=None,
        help="the Hub id the model card names as the base model (default: --model where it is a Hub id)",
    )
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
        "--reconstruct-epochs",
        type=int,
        help="block-wise reconstruction after pruning (0: none; default 8, and 0 for magnitude)",
    )
    p.add_argument("--reconstruct-lr", type=float, default=1e-3)
    p.add_argument(
        "--recover-steps", type=int, default=2000, help="recovery optimizer steps (0: no recovery)"
    )
    p.add_argument("--recover-batch", type=int, default=16)
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument(
        "--teacher-fraction",
        type=float,
        default=0.5,
        help="share of recovery windows the dense model samples",
    )
    p.add_argument(
        "--teacher-pool",
        type=int,
        default=3072,
        help="at most this many distinct sampled sequences, repeated",
    )
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
    p.add_argument(
        "--license",
        help="the model card's license (default: the base model card's, if a local one says, else 'other')",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="write into an --output-dir that holds a checkpoint already"
    )
    args = p.parse_args(argv)
    if args.base_model is not None:
        try:
            check_repo_id(args.base_model, f"--base-model {args.base_model!r}")
        except ValueError as exc:
            p.error(str(exc))
    if args.reconstruct_epochs is None:
        args.reconstruct_epochs = 0 if args.method == "magnitude" else 8
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
        # the Trainer trains on cuda:0 and wraps the model in DataParallel over every visible GPU
        if args.device not in ("cuda", "cuda:0") or torch.cuda.device_count() > 1:
            p.error(
                "this example runs on one GPU: make it the only visible one (e.g. CUDA_VISIBLE_DEVICES=1) and "
                "pass --device cuda, or pass --device cpu"
            )
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
    if os.path.isdir(args.model) and os.path.realpath(args.output_dir) == os.path.realpath(args.model):
        p.error("--output-dir is the --model folder: the pruned checkpoint would replace the dense one")
    # never the current folder or one above it, one above the model's, or a folder of other files; the
    # library's hint names its own overwrite=, which this example does not pass
    try:
        check_save_destination(args.output_dir, source=args.model if os.path.isdir(args.model) else None)
        # nor a checkpoint in another format (a dense model's), even with --overwrite
        check_save_destination(args.output_dir, source=args.output_dir)
    except SaveDestinationError as exc:
        p.error(f"--output-dir: {str(exc).split('; choose')[0]}; choose a new folder")
    visible = os.path.isdir(args.output_dir) and [n for n in os.listdir(args.output_dir) if n[:1] != "."]
    if visible and not args.overwrite:
        p.error(f"--output-dir {args.output_dir} holds a 2:4 checkpoint: give another folder, or --overwrite")
    return args


@dataclass
class Inputs:
    """Everything read and checked before any model is changed or file written."""

    tokenizer: object
    train_ids: torch.Tensor  # 1-D int64, the whole training text
    eval_ids: torch.Tensor  # 1-D int64, at most --eval-tokens
    calibration: list[dict]  # batches {"input_ids": [batch, seq]}
    save_dtype: torch.dtype
    license: str


def read_inputs(args) -> Inputs:
    """The tokenizer, texts, calibration batches and settings, each checked; a bad input exits with one line."""
    try:
        return _read_inputs(args)
    except (OSError, ValueError) as exc:  # a missing file or model, a text too short, ...
        raise SystemExit(f"error: {exc}") from exc


def _read_inputs(args) -> Inputs:
    config = AutoConfig.from_pretrained(args.model)
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (architectures and not set(architectures) & causal):
        raise ValueError(
            f"{args.model} is a {', '.join(architectures) or config.model_type} model, not a decoder-only causal "
            "LM (e.g. a ...ForCausalLM): this example prunes those"
        )
    context = getattr(config, "max_position_embeddings", None)
    for name in ("seq", "eval_window"):
        if isinstance(context, int) and getattr(args, name) > context:
            raise ValueError(
                f"--{name.replace('_', '-')} {getattr(args, name)} is longer than the model's context "
                f"(max_position_embeddings {context})"
            )
    if args.recover_steps and args.teacher_fraction > 0 and start_token(args.model, config) is None:
        raise ValueError(
            f"{args.model} records no bos_token_id to start the teacher's samples from: use --teacher-fraction 0"
        )
    if os.path.realpath(args.train_text) == os.path.realpath(args.eval_text):
        print("warning: --train-text and --eval-text are the same: the perplexity is not on held-out text")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_ids = tokenizer(read_text(args.train_text), return_tensors="pt").input_ids[0]
    eval_ids = tokenizer(read_text(args.eval_text), return_tensors="pt").input_ids[0][: args.eval_tokens]
    if len(eval_ids) < 2:
        raise ValueError(f"{args.eval_text} has fewer than 2 tokens")
    if len(eval_ids) < min(args.eval_tokens, 1024):
        print(f"warning: the evaluation text has only {len(eval_ids)} tokens: its perplexity says little")
    windows = random_windows(train_ids, args.calibration_samples, args.seq, args.seed)
    calibration = [
        {"input_ids": windows[i : i + args.calibration_batch]}
        for i in range(0, len(windows), args.calibration_batch)
    ]
    return Inputs(
        tokenizer, train_ids, eval_ids, calibration, saved_dtype(config, args.save_dtype), card_license(args)
    )


def saved_dtype(config, choice: str) -> torch.dtype:
    """`choice` as a torch dtype; 'auto': the dtype the model's `config` records, else float32."""
    if choice != "auto":
        return getattr(torch, choice)
    recorded = getattr(config, "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) and recorded.is_floating_point else torch.float32


def start_token(model: str, config) -> int | None:
    """The token the teacher's samples start with (`bos_token_id` of `model`'s generation config, else of its
    `config`), as `sample_teacher_sequences` takes it; None if neither records one."""
    sources = [config]
    with contextlib.suppress(OSError):  # no generation_config.json
        sources.insert(0, GenerationConfig.from_pretrained(model))
    for source in sources:
        token = getattr(source, "bos_token_id", None)
        token = token[0] if isinstance(token, list) and token else token
        if isinstance(token, int):
            return token
    return None


def card_license(args) -> str:
    """--license, else the license a local base model's card (README.md) declares, else 'other'."""
    if args.license:
        return args.license
    card = os.path.join(args.model, "README.md")
    if os.path.isfile(card):
        from huggingface_hub import ModelCard

        with contextlib.suppress(Exception):  # a README that is not a model card: no license known
            license_ = ModelCard.load(card).data.license
            if isinstance(license_, str) and license_:
                return license_
    return "other"


def load_dense(model: str, device: str):
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()


def evaluate(results: list[dict], name: str, model, inputs: Inputs, args) -> None:
    results.append(
        {"name": name, "perplexity": perplexity(model, inputs.eval_ids, args.eval_window, args.device)}
    )
    print(f"{name}: perplexity {results[-1]['perplexity']:.2f}", flush=True)


def prune(model, inputs: Inputs, args) -> tuple[object, str, float]:
    """One-shot 2:4 in place; returns the report, the row's name and the seconds it took."""
    start = time.perf_counter()
    options = {}
    if args.reconstruct_epochs:
        options = {"reconstruct_epochs": args.reconstruct_epochs, "reconstruct_lr": args.reconstruct_lr}
    report = prune_24(
        model,
        SparsityConfig(method=args.method),
        calibration_data=None if args.method == "magnitude" else inputs.calibration,
        **options,
    )
    seconds = time.perf_counter() - start
    for decision in report.skipped:  # the per-weight table is in results.json
        print(f"kept dense: {decision.name} ({decision.reason})")
    print(f"{str(report).splitlines()[-1]} ({seconds:.0f} s)", flush=True)
    name = f"{args.method} 2:4" + (f" + reconstruction ({args.reconstruct_epochs} epochs)" if options else "")
    return report, name, seconds


def recover(model, dense, inputs: Inputs, args) -> dict:
    """Distillation from the dense model on text windows and teacher samples, in place; returns what it did."""
    rows, sample_seconds = recovery_rows(
        dense,
        inputs.train_ids,
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
    model.eval()
    return {
        "steps": args.recover_steps,
        "tokens": args.recover_steps * args.recover_batch * args.seq,
        "teacher_fraction": args.teacher_fraction,
        "teacher_pool": args.teacher_pool,
        "sample_seconds": sample_seconds,
        "train_seconds": time.perf_counter() - start,
        "bf16": bf16,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    inputs = read_inputs(args)
    dense = load_dense(args.model, args.device)
    results: list[dict] = []
    evaluate(results, "dense", dense, inputs, args)
    model = copy.deepcopy(dense)
    report, name, prune_seconds = prune(model, inputs, args)
    evaluate(results, name, model, inputs, args)
    recovery = recover(model, dense, inputs, args) if args.recover_steps else None
    if recovery is not None:
        evaluate(results, "+ distillation", model, inputs, args)
    del dense

    checkpoint = args.output_dir
    summary = save_sparse_pretrained(
        model.cpu().to(inputs.save_dtype), checkpoint, tokenizer=inputs.tokenizer
    )  # the destination was checked before any work
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(args.device).eval()
    evaluate(results, "loaded checkpoint", loaded, inputs, args)

    command = shlex.join(["python", "examples/llm/prune_and_recover_llm.py", *(argv or sys.argv[1:])])
    dense_ppl = results[0]["perplexity"]
    table = [
        {
            "name": r["name"],
            "perplexity": f"{r['perplexity']:.2f}",
            "x dense": f"{r['perplexity'] / dense_ppl:.2f}",
        }
        for r in results
    ]
    card = render_model_card(  # from the saved folder: its config.json says what the files hold
        checkpoint_dir=checkpoint,
        repo_id=Path(os.path.abspath(checkpoint)).as_posix(),  # `hf-semisparse push` points it at the repo
        base_model=args.base_model or (None if os.path.isdir(args.model) else args.model),
        license=inputs.license,
        results=table,
        results_command=command,
        recovered=recovery is not None,
    )
    atomic_write_text(os.path.join(checkpoint, "README.md"), card)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    out = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {device}",
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
