"""Recovery recipes side by side on SQuAD: one dense fine-tune, one one-shot copy per mask method, then each
recipe's recovery fine-tune from that copy, evaluated. For finding the recipe that brings a 2:4 model back to
the dense model's F1. Prints a table and writes results.json and results.md (after every recipe, so a run cut
short keeps what it finished).

A recipe is `name:key=value,key=value`, keys being the fields of `run_squad.Recipe` (method, epochs,
learning_rate, scheduler, warmup_ratio, distill, distill_weight, distill_temperature, distill_hidden); unset
fields come from the command line's flags. Without --recipe the built-in RECIPES run.

Real run (GPU), offline data and model:
    python examples/squad/sweep_recovery.py --model ../shared/models/all-MiniLM-L6-v2 \\
        --train-file ../shared/data/squad/squad-v1.1-train-first11.json \\
        --validation-file ../shared/data/squad/xquad-en.json --epochs 3 --learning-rate 1e-4 \\
        --output-dir outputs/squad-sweep

Smoke run (CPU; its numbers mean nothing): add --smoke.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run_squad import (  # noqa: E402
    Recipe,
    build_parser,
    em_f1,
    fine_tune_dense,
    finish_args,
    one_shot,
    prepare,
    recover,
    run_command,
    run_header,
    targets_all_24,
    write_results,
)
from squad_data import SquadDataError  # noqa: E402

RECIPES = [
    "tutorial:method=magnitude",
    "wanda-kd:method=wanda,distill=true",
    "wanda-kd-linear:method=wanda,distill=true,scheduler=linear,warmup_ratio=0.1",
    "wanda-kd-hidden:method=wanda,distill=true,distill_hidden=1.0,scheduler=linear,warmup_ratio=0.1",
    "wanda-kdonly-hidden:method=wanda,distill=true,distill_weight=1.0,distill_hidden=1.0,scheduler=linear,"
    "warmup_ratio=0.1",
    "sparsegpt-kd-hidden:method=sparsegpt,distill=true,distill_hidden=1.0,scheduler=linear,warmup_ratio=0.1",
    "magnitude-kd-hidden-2xlr:method=magnitude,distill=true,distill_hidden=1.0,scheduler=linear,"
    "warmup_ratio=0.1,learning_rate=2e-4",
    "wanda-kd-hidden-6ep:method=wanda,distill=true,distill_hidden=1.0,scheduler=linear,warmup_ratio=0.1,"
    "epochs=6",
]


def _convert(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{field.name} must be true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if kind == "float":
        return float(text)
    return text


def parse_recipe(spec: str, args) -> tuple[str, Recipe]:
    """`name:key=value,...` -> (name, Recipe), unset fields from the command line's flags."""
    name, sep, body = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"recipe {spec!r} is not 'name:key=value,...'")
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    overrides = {"distill_hidden": 0.0}  # a flag meant for distilling recipes must not break the others
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"recipe {name!r}: {item!r} is not key=value with key in {sorted(fields)}")
        overrides[key] = _convert(fields[key], value)
    return name, Recipe.from_args(args, **overrides)


def parse_args(argv=None):
    p = build_parser(with_method=False)
    p.description = __doc__
    p.add_argument("--recipe", action="append", default=None, help="name:key=value,... (repeatable)")
    args = finish_args(p.parse_args(argv))
    try:  # a bad recipe fails here, before any training
        args.recipes = [parse_recipe(spec, args) for spec in (args.recipe or RECIPES)]
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    squad, model = prepare(args)
    fine_tune_dense(model, squad)
    dense = squad.evaluate(model, "eval dense")

    one_shots: dict[str, tuple] = {}
    rows: list[dict] = []
    command = run_command(argv, "sweep_recovery.py")
    for name, recipe in args.recipes:
        if recipe.method not in one_shots:
            pruned = one_shot(model, squad, recipe.method)[0]
            one_shots[recipe.method] = (pruned, squad.evaluate(pruned, f"eval one-shot {recipe.method}"))
        pruned, before = one_shots[recipe.method]
        student = copy.deepcopy(pruned)
        start = time.perf_counter()
        recover(student, squad, recipe, teacher=model, name=f"recover-{name}")
        seconds = round(time.perf_counter() - start, 1)
        after = squad.evaluate(student, f"eval {name}")
        rows.append(
            {
                "name": name,
                "recipe": dataclasses.asdict(recipe),
                "one-shot": before,
                "recovered": after,
                "f1 gap to dense": round(after["f1"] - dense["f1"], 2),
                "recovery seconds": seconds,
                "all 2:4": targets_all_24(student),
            }
        )
        del student
        if squad.device.type == "cuda":
            torch.cuda.empty_cache()
        lines = [
            f"Dense: EM {dense['exact_match']:.2f}, F1 {dense['f1']:.2f}. Cells are EM / F1.",
            "",
            "| recipe | one-shot | recovered | F1 - dense | recovery s | all 2:4 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['name']} | {em_f1(r['one-shot'])} | {em_f1(r['recovered'])} | {r['f1 gap to dense']:+.2f} | "
            f"{r['recovery seconds']} | {'yes' if r['all 2:4'] else 'NO'} |"
            for r in rows
        ]
        out = {
            **run_header(squad, command),
            "dense_epochs": args.epochs,
            "dense_learning_rate": args.learning_rate,
            "dense": dense,
            "recipes": rows,
        }
        write_results(args.output_dir, out, lines)
    return out


if __name__ == "__main__":
    try:
        main()
    except SquadDataError as exc:
        sys.exit(f"sweep_recovery.py: {exc}")
