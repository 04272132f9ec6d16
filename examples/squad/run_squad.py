"""The reference tutorial's BERT/SQuAD workflow through hf_semisparse's public API, in one command.

dense fine-tune -> evaluate -> one-shot 2:4 prune -> evaluate -> recovery fine-tune (SparsityTrainer) -> evaluate
-> save a compressed checkpoint with a model card -> load it with AutoSparseModel -> evaluate, and time dense
vs sparse (GPU only). Prints a results table and writes results.json and results.md to --output-dir.

Real run (GPU), offline data and model:
    python examples/squad/run_squad.py --model ../shared/models/all-MiniLM-L6-v2 \
        --train-file ../shared/data/squad/squad-v1.1-train-first11.json \
        --validation-file ../shared/data/squad/xquad-en.json --output-dir outputs/squad-minilm

Recommended recovery (recovered F1 within 1.0 of dense on the offline data, docs/guides/recovery.md): add
    --epochs 3 --learning-rate 1e-4 --method sparsegpt --distill --recovery-epochs 10

Tutorial setting (Hub reachable): python examples/squad/run_squad.py --model bert-base-cased --batch-size 64

Smoke run (CPU, minutes; a tiny model from a config and a few dozen examples; its numbers mean nothing):
    python examples/squad/run_squad.py --smoke --model ../shared/models/all-MiniLM-L6-v2 \
        --train-file ../shared/data/squad/squad-v1.1-train-first11.json \
        --validation-file ../shared/data/squad/xquad-en.json --output-dir outputs/squad-smoke
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    Trainer,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from squad_data import (  # noqa: E402
    SquadDataError,
    load_squad,
    postprocess,
    prepare_eval_features,
    prepare_train_features,
    squad_metric,
)

from hf_semisparse import (  # noqa: E402
    AutoSparseModel,
    SparsityConfig,
    SparsityTrainer,
    is_nm_sparse,
    prune_24,
    save_sparse_pretrained,
    select_targets,
)
from hf_semisparse.config import METHODS  # noqa: E402
from hf_semisparse.hub import check_repo_id, render_model_card  # noqa: E402
from hf_semisparse.utils import atomic_write_text, write_json  # noqa: E402


def build_parser(with_method: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base-cased", help="Hub id or local folder (with a tokenizer)")
    p.add_argument("--train-file", default=None, help="local SQuAD v1.1 JSON; default: the Hub's 'squad'")
    p.add_argument("--validation-file", default=None)
    p.add_argument("--output-dir", default="outputs/squad")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--epochs", type=float, default=1.0, help="epochs of the dense fine-tune")
    p.add_argument(
        "--recovery-epochs",
        type=float,
        default=None,
        help="epochs of the recovery fine-tune; default --epochs",
    )
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-eval", type=int, default=None)
    if with_method:
        p.add_argument(
            "--method",
            choices=list(METHODS),
            default="magnitude",
            help="one-shot mask selection; wanda/sparsegpt calibrate on the first training batches",
        )
        p.add_argument(
            "--distill",
            action="store_true",
            help="recover with the fine-tuned dense model as a teacher (KL on start/end logits)",
        )
        p.add_argument(  # the single-run script writes a model card; the comparisons write none
            "--base-model",
            default=None,
            help="the Hub id the model card names as the base model (default: --model where it is a Hub id; "
            "none for --smoke, whose model is a tiny random BERT)",
        )
        p.add_argument(
            "--license",
            default=None,
            help="the model card's license (a Hub license id); default: none written",
        )
    p.add_argument("--recovery-learning-rate", type=float, default=None, help="default --learning-rate")
    p.add_argument(
        "--recovery-scheduler",
        choices=["constant", "linear", "cosine"],
        default="constant",
        help="learning-rate schedule of the recovery fine-tune (the dense one is constant, as in the tutorial)",
    )
    p.add_argument("--recovery-warmup-ratio", type=float, default=0.0)
    p.add_argument("--distill-weight", type=float, default=0.5, help="w in (1 - w) * task + w * KL")
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument(
        "--distill-hidden",
        type=float,
        default=0.0,
        help="weight of an MSE loss on every layer's hidden states towards the teacher's (with --distill)",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="also recover a second copy of the pruned model with masked LoRA (base frozen at 2:4, LoRA on every "
        "2:4 layer, its update masked by the base's mask) for the same epochs; merged and checked 2:4",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-learning-rate", type=float, default=5e-4)
    p.add_argument("--smoke", action="store_true", help="tiny model, few examples: checks the pipeline only")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.base_model is not None:
        if args.smoke:
            parser.error(
                "--base-model: a --smoke run trains a tiny random BERT, which is pruned from no base model"
            )
        try:
            check_repo_id(args.base_model, f"--base-model {args.base_model!r}")
        except ValueError as exc:
            parser.error(str(exc))
    return finish_args(args)


def finish_args(args):
    if args.smoke:
        args.limit_train = args.limit_train or 48
        args.limit_eval = args.limit_eval or 24
        args.max_length, args.doc_stride, args.batch_size, args.eval_batch_size = 128, 32, 8, 16
    if args.recovery_epochs is None:
        args.recovery_epochs = args.epochs
    if args.recovery_learning_rate is None:
        args.recovery_learning_rate = args.learning_rate
    return args


@dataclass(frozen=True)
class Recipe:
    """How the recovery fine-tune runs: mask method, length, learning rate, and distillation from the dense model.
    Built from the command line (`from_args`), whose flags hold the defaults."""

    method: str
    epochs: float
    learning_rate: float
    scheduler: str
    warmup_ratio: float
    distill: bool
    distill_weight: float
    distill_temperature: float
    distill_hidden: float

    @classmethod
    def from_args(cls, args, **overrides) -> Recipe:
        recipe = cls(
            method=getattr(args, "method", "magnitude"),
            epochs=args.recovery_epochs,
            learning_rate=args.recovery_learning_rate,
            scheduler=args.recovery_scheduler,
            warmup_ratio=args.recovery_warmup_ratio,
            distill=getattr(args, "distill", False),
            distill_weight=args.distill_weight,
            distill_temperature=args.distill_temperature,
            distill_hidden=args.distill_hidden,
        )
        return dataclasses.replace(recipe, **overrides)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {list(METHODS)}")
        if self.scheduler not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose constant, linear or cosine")
        if self.distill_hidden and not self.distill:
            raise ValueError("a hidden-state distillation weight needs distillation (--distill)")


def load_tokenizer(name: str):
    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        # a path, not a Hub id: transformers would only say it is not a valid repo id
        raise SquadDataError(f"{name}: no such model folder (from {os.getcwd()})")
    if os.path.isdir(name) and not any(f.startswith(("tokenizer", "vocab")) for f in os.listdir(name)):
        raise SquadDataError(
            f"{name} has no tokenizer files (tokenizer.json / vocab.txt); add them or pass a "
            "folder that has them"
        )
    return AutoTokenizer.from_pretrained(name)


@dataclass
class Squad:
    """Everything a run needs besides the model: arguments, device, tokenizer, examples and features."""

    args: argparse.Namespace
    device: torch.device
    tokenizer: object
    train: object
    valid: object
    train_features: object
    eval_features: object
    eval_inputs: object

    def training_args(
        self,
        name: str,
        epochs: float,
        learning_rate: float | None = None,
        scheduler: str = "constant",
        warmup_ratio: float = 0.0,
    ) -> TrainingArguments:
        cuda = self.device.type == "cuda"
        return TrainingArguments(
            os.path.join(self.args.output_dir, name),
            per_device_train_batch_size=self.args.batch_size,
            learning_rate=learning_rate or self.args.learning_rate,
            num_train_epochs=epochs,
            # "constant" has no warm-up: with one, use the schedule that has
            lr_scheduler_type="constant_with_warmup"
            if scheduler == "constant" and warmup_ratio
            else scheduler,
            warmup_steps=warmup_ratio,  # below 1: a share of the training steps
            seed=self.args.seed,
            data_seed=self.args.seed,
            save_strategy="no",
            report_to=[],
            logging_steps=50,
            bf16=cuda,
            use_cpu=not cuda,
        )

    def calibration_batches(self, count: int) -> list[dict]:
        """The first `count` training batches, model inputs only (for wanda / sparsegpt)."""
        inputs = self.train_features.remove_columns(["start_positions", "end_positions"]).with_format("torch")
        size = self.args.batch_size
        return [inputs[i : i + size] for i in range(0, min(len(inputs), count * size), size)]

    def evaluate(self, model, desc: str) -> dict:
        start, end = predict(model, self.eval_inputs, self.args.eval_batch_size, self.device, desc)
        return squad_metric(postprocess(self.valid, self.eval_features, start, end), self.valid)


def prepare(args) -> tuple[Squad, torch.nn.Module]:
    """Load and check tokenizer, data and model; everything that can be wrong with the inputs fails here."""
    set_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model)
    train, valid = load_squad(args.train_file, args.validation_file, args.limit_train, args.limit_eval)
    if args.smoke:
        model = BertForQuestionAnswering(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
            )
        )
    else:
        model = AutoModelForQuestionAnswering.from_pretrained(args.model, dtype=torch.float32)
    fmt = {"tokenizer": tokenizer, "max_length": args.max_length, "stride": args.doc_stride}

    def windows(examples, prepare, desc):
        return examples.map(
            prepare, batched=True, remove_columns=examples.column_names, fn_kwargs=fmt, desc=desc
        )

    train_features = windows(train, prepare_train_features, "train features")
    eval_features = windows(valid, prepare_eval_features, "eval features")
    eval_inputs = eval_features.remove_columns(["example_id", "offset_mapping"])
    squad = Squad(args, device, tokenizer, train, valid, train_features, eval_features, eval_inputs)
    return squad, model


def predict(
    model, features, batch_size: int, device: torch.device, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    loader = torch.utils.data.DataLoader(features.with_format("torch"), batch_size=batch_size)
    starts, ends = [], []
    autocast = device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        for batch in tqdm(loader, desc=desc, leave=False):
            out = model(**{k: v.to(device) for k, v in batch.items()})
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
    return torch.cat(starts).numpy(), torch.cat(ends).numpy()


def fine_tune_dense(model, squad: Squad) -> None:
    Trainer(
        model=model, args=squad.training_args("dense", squad.args.epochs), train_dataset=squad.train_features
    ).train()


def one_shot(model, squad: Squad, method: str) -> tuple[torch.nn.Module, object, dict]:
    """A pruned copy of `model` (2:4, `method`), its report, and the pruning's seconds and peak GPU memory."""
    pruned = copy.deepcopy(model).to(squad.device)
    config = SparsityConfig(method=method)
    calibration = squad.calibration_batches(config.calibration_batches) if method != "magnitude" else None
    cuda = squad.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = prune_24(pruned, config, calibration_data=calibration)
    if cuda:
        torch.cuda.synchronize()
    cost = {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
    }
    return pruned, report, cost


def recover(pruned, squad: Squad, recipe: Recipe, teacher=None, name: str = "recover") -> None:
    """Recovery fine-tune in place; the one-shot masks are kept (magnitude re-selection finds their zeros).
    `teacher` (the dense model) is used when `recipe.distill` is set."""
    if recipe.distill:
        if teacher is None:
            raise ValueError("recipe.distill needs the dense model as teacher")
        teacher = copy.deepcopy(teacher)  # the dense model goes on being used; fp16 on the GPU
        teacher = teacher.half() if squad.device.type == "cuda" else teacher
    SparsityTrainer(
        model=pruned,
        args=squad.training_args(
            name, recipe.epochs, recipe.learning_rate, recipe.scheduler, recipe.warmup_ratio
        ),
        train_dataset=squad.train_features,
        sparsity_config=SparsityConfig(),
        teacher_model=teacher if recipe.distill else None,
        distillation_weight=recipe.distill_weight,
        distillation_temperature=recipe.distill_temperature,
        distillation_hidden_weight=recipe.distill_hidden,
    ).train()


def measured(fn, squad: Squad) -> dict:
    """Run `fn()`; its seconds and peak GPU memory (MiB, None on CPU)."""
    cuda = squad.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
    }


def recover_lora(pruned, squad: Squad, recipe: Recipe, teacher=None) -> tuple[torch.nn.Module, dict]:
    """Masked-LoRA recovery of a copy of `pruned`: the same recipe but the base frozen and LoRA (rank
    `--lora-rank`, learning rate `--lora-learning-rate`) on every 2:4 layer, the QA head trained in full. Returns
    the merged model (exactly 2:4) and its trainable parameters and cost."""
    from peft import LoraConfig, get_peft_model

    from hf_semisparse.lora import merge_sparse_lora

    args = squad.args
    targets = select_targets(pruned, SparsityConfig())[1].targets  # full names: only the 2:4 layers
    model = get_peft_model(
        copy.deepcopy(pruned),
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            target_modules=targets,
            modules_to_save=["qa_outputs"],
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_recipe = dataclasses.replace(recipe, learning_rate=args.lora_learning_rate)
    cost = measured(lambda: recover(model, squad, lora_recipe, teacher=teacher, name="recover-lora"), squad)
    return merge_sparse_lora(model), {"trainable_parameters": trainable, **cost}


def time_forwards_ms(models: dict, batch: dict, rounds: int = 30) -> dict[str, float]:
    """Median ms of one forward of each model, timed in turn round after round (so clock drift hits all alike),
    after 3 warm-up forwards each (where 2:4 layers tune a new token count)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(**batch)
        for _ in range(rounds):
            for name, model in models.items():
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                model(**batch)
                e.record()
                e.synchronize()
                times[name].append(s.elapsed_time(e))
    return {name: statistics.median(t) for name, t in times.items()}


def run_command(argv, script: str) -> str:
    if argv is None:
        return " ".join([os.path.basename(sys.executable), *sys.argv])
    return f"{script} " + " ".join(argv)


def smoke_label(args) -> str:
    return "SMOKE RUN: tiny model, few examples; these numbers mean nothing" if args.smoke else ""


def run_header(squad: Squad, command: str) -> dict:
    """What every results.json of the SQuAD scripts starts with: label, command, seed, device and data sizes."""
    return {
        "label": smoke_label(squad.args),
        "command": command,
        "seed": squad.args.seed,
        "device": str(squad.device),
        "gpu": torch.cuda.get_device_name() if squad.device.type == "cuda" else None,
        "train_questions": len(squad.train),
        "eval_questions": len(squad.valid),
    }


def em_f1(result: dict | None) -> str:
    """A table cell: 'EM / F1', or '-' for a result not measured."""
    return "-" if result is None else f"{result['exact_match']:.2f} / {result['f1']:.2f}"


def targets_all_24(model) -> bool:
    """Whether every weight the default config targets is exactly 2:4."""
    return all(is_nm_sparse(t.linear_view()) for t in select_targets(model, SparsityConfig())[0])


def write_results(output_dir: str, out: dict, table_lines: list[str]) -> None:
    """results.json (`out`) and results.md (the table, under the smoke label if any, over the command)."""
    label = [f"**{out['label']}**", ""] if out["label"] else []
    markdown = "\n".join(label + table_lines + ["", f"Command: `{out['command']}`"]) + "\n"
    write_json(os.path.join(output_dir, "results.json"), out)
    atomic_write_text(os.path.join(output_dir, "results.md"), markdown)
    print(markdown)


def main(argv=None) -> dict:
    args = parse_args(argv)
    squad, model = prepare(args)
    device = squad.device

    results = {}
    fine_tune_dense(model, squad)
    results["dense"] = squad.evaluate(model, "eval dense")

    pruned, report, prune_cost = one_shot(model, squad, args.method)
    results["one-shot 2:4"] = squad.evaluate(pruned, "eval one-shot")
    recipe = Recipe.from_args(args)
    lora_merged, lora_cost, lora_result = None, None, None
    if args.lora:  # from the same one-shot model, before the full recovery changes it
        lora_merged, lora_cost = recover_lora(pruned, squad, recipe, teacher=model)
        lora_result = squad.evaluate(lora_merged, "eval LoRA")
        lora_merged.cpu()  # off the GPU while the full recovery's memory is measured
    full_trainable = sum(p.numel() for p in pruned.parameters() if p.requires_grad)
    full_cost = measured(lambda: recover(pruned, squad, recipe, teacher=model), squad)
    results["recovered 2:4"] = squad.evaluate(pruned, "eval recovered")
    if lora_result is not None:
        results["recovered 2:4, masked LoRA (merged)"] = lora_result

    sparse_dir = os.path.join(args.output_dir, "sparse")
    summary = save_sparse_pretrained(pruned.cpu(), sparse_dir)
    squad.tokenizer.save_pretrained(sparse_dir)
    half = device.type == "cuda"
    loaded = AutoSparseModel.from_pretrained(
        sparse_dir, torch_dtype=torch.float16 if half else None, device_map=str(device)
    )
    results["loaded sparse checkpoint"] = squad.evaluate(loaded, "eval loaded")

    speed = []
    if device.type == "cuda":
        dense_fp16 = copy.deepcopy(pruned).half().to(device).eval()
        for batch_size in (16, 64):
            rows = squad.eval_inputs.with_format("torch")[:batch_size]
            batch = {k: v.to(device) for k, v in rows.items()}
            ms = time_forwards_ms({"dense": dense_fp16, "2:4": loaded}, batch)
            d, s = ms["dense"], ms["2:4"]
            speed.append(
                {
                    "name": f"batch {len(batch['input_ids'])}, seq {args.max_length}",
                    "dense ms": f"{d:.2f}",
                    "2:4 ms": f"{s:.2f}",
                    "speedup": f"{d / s:.2f}x",
                }
            )

    command = run_command(argv, "run_squad.py")
    table = [
        {"name": name, "EM": f"{r['exact_match']:.2f}", "F1": f"{r['f1']:.2f}"} for name, r in results.items()
    ]
    card = render_model_card(
        checkpoint_dir=sparse_dir,
        # the snippet loads the folder itself, not a Hub id (`hf-semisparse push` points it at the repo)
        repo_id=Path(os.path.abspath(sparse_dir)).as_posix(),
        model_name=os.path.basename(os.path.abspath(args.output_dir)),
        # a smoke run's model is a tiny random BERT with --model's tokenizer: no base model
        base_model=args.base_model or (None if args.smoke or os.path.isdir(args.model) else args.model),
        license=args.license,
        datasets=["squad"],
        results=table,
        results_command=command,
        speedups=speed or None,
        recovered=True,
        notice=smoke_label(args) or None,
    )
    atomic_write_text(os.path.join(sparse_dir, "README.md"), card)

    out = {
        **run_header(squad, command),
        "method": args.method,
        "distill": args.distill,
        "recovery": dataclasses.asdict(recipe),
        "results": results,
        "prune_cost": prune_cost,
        "speed": speed,
        "sparsified_layers": len(report.targets),
        "checkpoint": sparse_dir,
        "target_bytes_ratio": summary["target_ratio"],
        "targets_all_24": targets_all_24(pruned),
        "recovery_cost": {"trainable_parameters": full_trainable, **full_cost},
    }
    if lora_merged is not None:
        out["lora"] = {
            "rank": args.lora_rank,
            "learning_rate": args.lora_learning_rate,
            **lora_cost,
            "targets_all_24": targets_all_24(lora_merged),
        }
    lines = ["| model | EM | F1 |", "| --- | --- | --- |"]
    lines += [f"| {row['name']} | {row['EM']} | {row['F1']} |" for row in table]
    write_results(args.output_dir, out, lines)
    for row in speed:
        print(row)
    return out


if __name__ == "__main__":
    try:
        main()
    except SquadDataError as exc:
        sys.exit(f"run_squad.py: {exc}")
