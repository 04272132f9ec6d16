"""How far from exact is the dense fp16 model itself? Logits error of dense fp16 and of ours, both against float32.

    PYTHONPATH=src python benchmarks/probes/probe_logits_error.py --json $OUT/probe_logits_error.json

bench_inference.py reports ours against the dense fp16 model (issue 4 asks for under 2e-3); for bert-large that
has been 4.4e-3 to 4.7e-3 in every run reported on the H100. This probe puts both fp16 models against the same
pruned model in float32 (TF32 off), so it shows whether that figure is our kernels' error or the fp16 model's own
spread: per model, ||a - b|| / ||b|| of the start logits, batch 4, sequence 384, random weights pruned to 2:4.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from transformers import BertConfig, BertForQuestionAnswering

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from hf_semisparse import prune_24  # noqa: E402
from hf_semisparse.kernels import accelerate_24, semi_sparse_layers  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402

MODELS = {
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "bert-large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[name])
        exact = BertForQuestionAnswering(cfg).eval().cuda()
        prune_24(exact)
        half = copy.deepcopy(exact).half()
        ours = copy.deepcopy(half)
        report = accelerate_24(ours)
        ids = torch.randint(1000, 30000, (args.batch, 384), device="cuda")
        m = args.batch * 384
        with torch.inference_mode():
            ref = exact(input_ids=ids).start_logits
            dense = half(input_ids=ids).start_logits
            ours(input_ids=ids)
            for layer in semi_sparse_layers(ours):  # every layer on its 2:4 kernel
                layer.set_dispatch(m, True)
            sparse = ours(input_ids=ids).start_logits
        row = {
            "model": name,
            "kernels": report.kernels,
            "dense_fp16_vs_fp32": rel(dense, ref),
            "ours_vs_fp32": rel(sparse, ref),
            "ours_vs_dense_fp16": rel(sparse, dense),
        }
        rows.append(row)
        print(row, flush=True)
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(), "rows": rows})


if __name__ == "__main__":
    main()
