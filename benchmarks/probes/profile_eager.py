"""Where an eager bert-base forward at small batches spends its host time: dense against ours (issue 4).

    PYTHONPATH=src python benchmarks/probes/profile_eager.py --json $OUT/profile_eager.json

For each batch: the median wall-clock time of a synchronized forward for the dense model, ours with the per-GEMM
dispatch, ours with every layer forced dense, ours with every layer forced sparse; then cProfile of 20 forwards
of the dense model and of ours, top functions by own time.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertForQuestionAnswering

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from hf_semisparse import prune_24  # noqa: E402
from hf_semisparse.kernels import accelerate_24  # noqa: E402
from hf_semisparse.kernels.linear import SemiSparseLinear  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402


def wall_ms(model, ids, n: int = 30) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def force(model, m: int, use_sparse: bool | None) -> None:
    """None: back to what the per-GEMM decision said (recorded in `decided`)."""
    for layer in model.modules():
        if isinstance(layer, SemiSparseLinear):
            want = layer.decided if use_sparse is None else use_sparse
            layer.set_dispatch(m, want)


def top(model, ids, n: int = 20, lines: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        model(input_ids=ids)
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    dense = BertForQuestionAnswering(cfg).eval().half().cuda()
    prune_24(dense)
    ours = copy.deepcopy(dense)
    accelerate_24(ours)
    result = {}
    with torch.inference_mode():
        for batch in args.batches:
            ids = torch.randint(1000, 30000, (batch, 384), device="cuda")
            m = batch * 384
            for model in (dense, ours):
                for _ in range(3):
                    model(input_ids=ids)
            layers = [x for x in ours.modules() if isinstance(x, SemiSparseLinear)]
            for layer in layers:
                layer.decided = layer.runs_sparse(m)
            row = {"sparse_layers_by_decision": sum(layer.decided for layer in layers), "layers": len(layers)}
            for name, setting in (("per-GEMM", None), ("all dense", False), ("all sparse", True)):
                force(ours, m, setting)
                row[f"ours {name} ms"] = wall_ms(ours, ids)
                row[f"dense ms (after ours {name})"] = wall_ms(dense, ids)
            force(ours, m, None)
            row["profile dense"] = top(dense, ids)
            row["profile ours"] = top(ours, ids)
            result[f"b{batch}"] = row
            print(f"\n### batch {batch}")
            for k, v in row.items():
                print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
