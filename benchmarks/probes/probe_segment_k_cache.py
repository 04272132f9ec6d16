"""A copy of a tuning cache without Segment-K at decode sizes, to A/B it in `bench_generate.py`.

Each decision at 256 tokens or fewer whose kernel is cuSPARSELt's Segment-K (`split_k` -1) becomes the plain
kernel of the same algorithm id (split_k 1, mode 1, one buffer); everything else is copied as it is. This is how
`benchmarks/results/h200_bench_generate_8b_fp16_no_segment_k_2026-12-03.json` was made from
`h200_tuning_cache_prefill_threads_2026-12-03.json`:

    python benchmarks/probes/probe_segment_k_cache.py --cache CACHE.json --out NO_SEGMENT_K.json
    HF_SEMISPARSE_TUNING_CACHE=NO_SEGMENT_K.json PYTHONPATH=src python benchmarks/bench_generate.py --layers 32 \\
        --dtypes fp16 --batches 1 --eager-batches 1 --new-tokens 64 --ttft --gemm-table --reference-batches \\
        --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
from hf_semisparse.kernels.buckets import DECODE_MAX  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402


def without_segment_k(cache: dict) -> tuple[dict, int]:
    """`cache` (the tuning cache's JSON) with decode-size Segment-K decisions made plain; and how many were."""
    changed = 0
    entries = {}
    for key, entry in cache["entries"].items():
        entry = dict(entry)
        tokens = int(key.rsplit("xM", 1)[1])
        if tokens <= DECODE_MAX and entry["alg"]["split_k"] == -1:
            entry["alg"] = {
                "alg_id": entry["alg"]["alg_id"],
                "split_k": 1,
                "split_k_mode": 1,
                "split_k_buffers": 1,
            }
            changed += 1
        entries[key] = entry
    return {**cache, "entries": entries}, changed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache", required=True, help="a tuning cache JSON (HF_SEMISPARSE_TUNING_CACHE's file)"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.cache, encoding="utf-8") as f:
        cache, changed = without_segment_k(json.load(f))
    write_json(args.out, cache)
    print(f"{changed} Segment-K decisions at {DECODE_MAX} tokens or fewer made plain: {args.out}")


if __name__ == "__main__":
    main()
