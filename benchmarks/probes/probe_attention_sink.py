"""How much of each block's output sits at the first token (the attention sink) on a real LLM.

Block-wise reconstruction fits the sum of squared differences of a block's outputs over all calibration tokens;
where most of the outputs' squared norm sits at the first position, that sum is mostly the first token's
(`probe_reconstruction_loss.py` tries losses that weigh the tokens otherwise). For each block of the dense model:
the share of the squared norm of its outputs at position 0, over calibration windows drawn as in
`bench_pruning_llm.py`:

    PYTHONPATH=src python benchmarks/probes/probe_attention_sink.py --model outputs/smollm2-135m \\
        --json outputs/probe_attention_sink.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_semisparse.pruning.sequential import locate_blocks
from hf_semisparse.utils import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/: the LLM benchmark's data and evaluation helpers
import bench_pruning_llm as bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches, _ = bench.calibration_batches(
        tokenizer, os.path.join(bench.SHARED, "data/text/gutenberg-shakespeare"), args.samples, args.seq, 4, 0
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    from hf_semisparse import SparsityConfig, select_targets

    (_, blocks), _ = locate_blocks(model, select_targets(model, SparsityConfig())[0])
    sums = [[0.0, 0.0] for _ in blocks]

    def hook(index):
        def record(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            norms = (out.float() ** 2).sum(-1)  # [batch, seq]
            sums[index][0] += float(norms[:, 0].sum())
            sums[index][1] += float(norms.sum())

        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    shares = [first / total for first, total in sums]
    for i, share in enumerate(shares):
        print(f"block {i:2d}: {share:.3f} of the squared output norm at the first token")
    write_json(
        args.json,
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
            "settings": vars(args),
            "first_token_share": shares,
        },
    )


if __name__ == "__main__":
    main()
