"""Where a CUDA-graph-replayed forward spends its GPU time, next to the eager forward of the same model: the
top kernels of each, from torch.profiler. Not a test.

    PYTHONPATH=src python benchmarks/probes/profile_graphs.py --batch 16
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForQuestionAnswering

from hf_semisparse.kernels import CUDAGraphedModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=384)
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    model = BertForQuestionAnswering(cfg).eval().half().cuda()
    print("attention implementation:", model.config._attn_implementation)
    graphed = CUDAGraphedModel(model)
    ids = torch.randint(1000, 30000, (a.batch, a.seq), device="cuda")
    for name, fn in (("eager", model), ("graphed", graphed)):
        with torch.inference_mode():
            for _ in range(3):
                fn(input_ids=ids)
            torch.cuda.synchronize()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                for _ in range(5):
                    fn(input_ids=ids)
                torch.cuda.synchronize()
        print(f"--- {name}, 5 forwards, batch {a.batch}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
