"""One-shot 2:4 mask methods side by side on SQuAD, and recovery with and without distillation.

One dense fine-tune, then for each method (magnitude, wanda, sparsegpt): a one-shot pruned copy (evaluated,
with the pruning's seconds and peak GPU memory), recovered without a teacher, and recovered with the dense
model as a teacher (KL on the start/end logits). Every recovery starts from the same one-shot copy, with the
same seed and data order. Prints one table and writes results.json and results.md to --output-dir.

Real run (GPU), offline data and model:
    python examples/squad/compare_methods.py --model ../shared/models/all-MiniLM-L6-v2 \\
        --train-file ../shared/data/squad/squad-v1.1-train-first11.json \\
        --validation-file ../shared/data/squad/xquad-en.json --output-dir outputs/squad-methods

Smoke run (CPU; its numbers mean nothing): add --smoke.
"""

from __future__ import annotations

import copy
import os
import sys

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

from hf_semisparse.config import METHODS  # noqa: E402


def parse_args(argv=None):
    p = build_parser(with_method=False)
    p.description = __doc__
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--no-recovery", action="store_true", help="one-shot only: skip both recovery fine-tunes")
    return finish_args(p.parse_args(argv))


def _write(args, squad, argv, dense: dict, rows: list[dict]) -> dict:
    """results.json and results.md for the rows so far (a run cut short keeps the methods it finished)."""
    command = run_command(argv, "compare_methods.py")
    lines = [
        f"Dense: EM {dense['exact_match']:.2f}, F1 {dense['f1']:.2f}. Cells are EM / F1.",
        "",
        "| method | one-shot | recovered | recovered + distillation | pruning s | pruning peak GPU MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {em_f1(r['one-shot'])} | {em_f1(r.get('recovered'))} | "
            f"{em_f1(r.get('recovered + distillation'))} | {r['seconds']} | {r['peak_gpu_mib'] or '-'} |"
        )
    out = {
        **run_header(squad, command),
        "epochs": args.epochs,
        "recovery_epochs": args.recovery_epochs,
        "learning_rate": args.learning_rate,
        "dense": dense,
        "methods": rows,
    }
    write_results(args.output_dir, out, lines)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    squad, model = prepare(args)
    fine_tune_dense(model, squad)
    dense = squad.evaluate(model, "eval dense")

    rows = []
    for method in args.methods:
        pruned, _, cost = one_shot(model, squad, method)
        row = {"method": method, "one-shot": squad.evaluate(pruned, f"eval one-shot {method}"), **cost}
        if not args.no_recovery:
            for name, distill in (("recovered", False), ("recovered + distillation", True)):
                student = copy.deepcopy(pruned)
                hidden = args.distill_hidden if distill else 0.0
                recipe = Recipe.from_args(args, method=method, distill=distill, distill_hidden=hidden)
                recover(student, squad, recipe, teacher=model, name=f"recover-{method}")
                row[name] = squad.evaluate(student, f"eval {name} {method}")
                row[f"{name} is 2:4"] = targets_all_24(student)
                del student
        rows.append(row)
        out = _write(args, squad, argv, dense, rows)
        del pruned
        if squad.device.type == "cuda":
            torch.cuda.empty_cache()

    return out


if __name__ == "__main__":
    try:
        main()
    except SquadDataError as exc:
        sys.exit(f"compare_methods.py: {exc}")
