"""Draw the performance page's figures from the JSON that `bench_inference.py` and `bench_generate.py` write.

    python benchmarks/plot_results.py            # every figure of docs/performance.md, into docs/img/
    python benchmarks/plot_results.py --inputs my_run.json --output my_run.png   # your own run

Per model, two panels: the speed-up over dense (dense median time / ours) against the batch size, eager and
replayed from CUDA graphs; and the median forward time of dense and ours. For generation (`kind="generate"`), per
dtype: decode tokens/s of dense and ours on the compiled static-cache path against the batch size, and the ratio. Each figure's caption names the GPU
and the versions recorded in the JSON, and the date and command of the run.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
IMG = os.path.join(HERE, "..", "docs", "img")

# variant in the JSON -> (label, its dense baseline, line style)
SERIES = {
    "ours": ("ours, eager (tune_dispatch)", "dense", "o-"),
    "ours+graphs": ("ours, CUDA graphs", "dense+graphs", "s-"),
    "ours-cusparselt": ("cuSPARSELt only, eager", "dense", "^--"),
}


@dataclass
class Figure:
    output: str  # file name under docs/img/
    inputs: list[str]  # files under benchmarks/results/
    date: str
    command: str
    kind: str = "inference"  # or "generate": a bench_generate.py result


# The figures on docs/performance.md. A new run: add its JSON to benchmarks/results/ and a line here.
FIGURES = [
    Figure(
        "generate_llama3-8b_bf16_h200_2026-12-01.png",
        ["h200_bench_generate_8b_bf16_cutlass_2026-12-01.json"],
        "2026-12-01",
        "PYTHONPATH=src HF_SEMISPARSE_KERNEL_DIR=build/kernels python benchmarks/bench_generate.py --layers 32 "
        "--dtypes bf16 --batches 1 8 32 128 --eager-batches 1 --new-tokens 256 --ttft 1x2048 8x2048 --gemm-table "
        "--reference-batches 1 --out OUT.json",
        kind="generate",
    ),
    Figure(
        "generate_llama3-8b_fp16_h200_2026-12-03.png",
        ["h200_bench_generate_8b_fp16_prefill_threads_2026-12-03.json"],
        "2026-12-03",
        "PYTHONPATH=src python benchmarks/bench_generate.py --layers 32 --dtypes fp16 --batches 1 8 32 "
        "--eager-batches 1 --new-tokens 256 --ttft 1x2048 8x2048 --reference-batches 1 --out OUT.json",
        kind="generate",
    ),
    Figure(
        "generate_llama3-8b_h200_2026-12-01.png",
        ["h200_bench_generate_8b_fp16_compiled_2026-12-01.json"],
        "2026-12-01",
        "PYTHONPATH=src python benchmarks/bench_generate.py --layers 32 --dtypes fp16 --batches 1 8 32 128 "
        "--eager-batches --new-tokens 128 --ttft --gemm-table --out OUT.json",
        kind="generate",
    ),
    Figure(
        "inference_bert_h100_2026-11-24.png",
        ["h100_2026-11-24_inference_bert-base.json", "h100_2026-11-24_inference_bert-large.json"],
        "2026-11-24",
        "PYTHONPATH=src python benchmarks/bench_inference.py --models bert-base --batches 4 16 64 256 "
        "--max-stock-batch 16 --budget-ms 2000 --skip-gemms --no-ablations --json OUT.json (and --models bert-large)",
    ),
]


def load_rows(paths: list[str]) -> tuple[dict, dict[str, list[dict]]]:
    """(env of the first file, model name -> its rows sorted by batch); all files must share GPU and versions."""
    env, models = None, {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if "models" not in data or "env" not in data:
            raise ValueError(
                f"{path}: not a bench_inference.py result (no 'models'/'env'); got {sorted(data)}"
            )
        if env is not None and data["env"] != env:
            raise ValueError(f"{path}: measured on {data['env']}, the other files on {env}; plot them apart")
        env = data["env"]
        for row in data["models"]:
            models.setdefault(row["model"], []).append(row)
    if not models:
        raise ValueError(f"no model rows in {paths}")
    return env, {name: sorted(rows, key=lambda r: r["batch"]) for name, rows in models.items()}


def median(row: dict, variant: str) -> float | None:
    value = row.get(variant)
    return value["median_ms"] if isinstance(value, dict) and "median_ms" in value else None


def plot(paths: list[str], output: str, date: str | None = None, command: str | None = None) -> str:
    env, models = load_rows(paths)
    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 7.4), squeeze=False)
    for col, (name, rows) in enumerate(models.items()):
        batches = [r["batch"] for r in rows]
        top, bottom = axes[0][col], axes[1][col]
        for variant, (label, baseline, style) in SERIES.items():
            points = [
                (r["batch"], median(r, baseline) / median(r, variant))
                for r in rows
                if median(r, variant) and median(r, baseline)
            ]
            if points:
                top.plot(*zip(*points, strict=True), style, label=label)
        top.axhline(1.0, color="grey", linewidth=1)
        top.set_title(f"{name}, seq {rows[0]['seq']}: speed-up over dense")
        top.set_ylabel("dense time / ours")
        for variant, label, style in (("dense", "dense, eager", "k.-"), ("ours", "ours, eager", "o-")):
            points = [(r["batch"], median(r, variant)) for r in rows if median(r, variant)]
            bottom.plot(*zip(*points, strict=True), style, label=label)
        bottom.set_yscale("log")
        bottom.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        bottom.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        bottom.set_ylabel("median forward time, ms")
        bottom.set_title(f"{name}: dense vs ours")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    return save_figure(fig, output, caption(env, date, command, "fp16"), fontsize=7, bottom=0.06)


def plot_generate(path: str, output: str, date: str | None = None, command: str | None = None) -> str:
    """Decode tokens/s of dense and ours (compiled static cache) against the batch size, per dtype, and ours/dense."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "runs" not in data or "env" not in data or not all("decode" in run for run in data["runs"]):
        raise ValueError(
            f"{path}: not a bench_generate.py result (no 'runs' with 'decode'); got {sorted(data)}"
        )
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 7.4))
    for run, style in zip(data["runs"], ("o-", "s-", "^-"), strict=False):
        rows = [
            r
            for r in run["decode"]
            if r.get("compiled_dense_tokens_per_s") and r.get("compiled_ours_tokens_per_s")
        ]
        batches = [r["batch"] for r in rows]
        dense = [r["compiled_dense_tokens_per_s"] for r in rows]
        ours = [r["compiled_ours_tokens_per_s"] for r in rows]
        top.plot(
            batches,
            [o / d for o, d in zip(ours, dense, strict=True)],
            style,
            label=f"{run['dtype']}: ours / dense",
        )
        bottom.plot(batches, dense, "k.-", label=f"{run['dtype']}: dense")
        bottom.plot(batches, ours, style, label=f"{run['dtype']}: ours (2:4)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
    top.axhline(1.0, color="grey", linewidth=1)
    top.set_ylim(0.5, 1.6)  # the same scale for every run: parity and a 1.5x gain both readable
    top.set_ylabel("decode tokens/s, ours / dense")
    top.set_title(
        f"{data.get('layers')}-block Llama-3-8B shapes, prompt {data.get('prompt')},\n"
        f"{data.get('new_tokens')} new tokens, compiled static-cache decode"
    )
    bottom.set_yscale("log")
    bottom.set_ylabel("decode tokens/s")
    for ax in (top, bottom):
        ax.set_xlabel("batch size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, output, caption(data["env"], date, command), fontsize=6, bottom=0.07)


def caption(env: dict, date: str | None, command: str | None, dtype: str | None = None) -> str:
    """The line under a figure: GPU, driver and library versions, dtype, date, then the command of the run."""
    cusparselt = env.get("cusparselt")
    text = f"{env.get('gpu')}, driver {env.get('driver')}, torch {env.get('torch')}"
    if isinstance(cusparselt, int):  # cuSPARSELt's version number: 800 is 0.8.0
        text += f", cuSPARSELt {cusparselt // 1000}.{cusparselt // 100 % 10}.{cusparselt % 100}"
    text += f", transformers {env.get('transformers')}"
    text += "".join(f", {part}" for part in (dtype, date) if part)
    return text + (f"\n{command}" if command else "")


def save_figure(fig, output: str, text: str, fontsize: int, bottom: float) -> str:
    """`text` under the figure, then the PNG written atomically to `output` (no version string in its metadata:
    reruns give the same file); returns `output`."""
    fig.text(0.01, 0.005, text, fontsize=fontsize, family="monospace", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp.png"
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", nargs="+", help="bench_inference.py JSON files of one machine")
    parser.add_argument("--output", help="PNG to write (with --inputs)")
    parser.add_argument("--date", default=None)
    parser.add_argument("--command", default=None, help="the command of the run, printed under the figure")
    args = parser.parse_args(argv)
    if args.inputs:
        if not args.output:
            parser.error("--inputs needs --output")
        print(plot(args.inputs, args.output, args.date, args.command))
        return
    for figure in FIGURES:
        paths = [os.path.join(RESULTS, name) for name in figure.inputs]
        output = os.path.join(IMG, figure.output)
        if figure.kind == "generate":
            print(plot_generate(paths[0], output, figure.date, figure.command))
        else:
            print(plot(paths, output, figure.date, figure.command))


if __name__ == "__main__":
    main()
