"""Scale of the block-by-block Wanda/SparseGPT pipeline: a Llama-3-8B-shaped model kept in CPU memory, pruned
one block at a time on one GPU; plus Llama-3-70B-shaped blocks timed to extrapolate to 80 blocks.

The models have random bf16 weights (built on the meta device, then materialised once on the CPU: no double
allocation; every block gets a copy of one random block, which does not change the timing). Calibration is
`--samples` random token sequences of `--seq` tokens (timing does not depend on the tokens). Reported per
method: wall time (capture of the first block's inputs + every block), peak GPU memory (allocated and reserved),
host peak RSS. With `--layers N` smaller than 32 the 8B-shaped model has N blocks and the wall time for 32
blocks is EXTRAPOLATED (capture + 32 x mean block time) and marked so in the table and JSON.

    # the lead's H200 run (about 5 minutes: 8 of 32 blocks timed, 32 extrapolated; one 70B-shaped block):
    PYTHONPATH=src python benchmarks/bench_prune_scale.py --layers 8 --out benchmarks/results/prune_scale_h200.json
    # full 32 blocks, SparseGPT only:
    PYTHONPATH=src python benchmarks/bench_prune_scale.py --methods sparsegpt --blocks-70b 0 --out ...
    # with block-wise reconstruction (time and memory of the Adam steps):
    PYTHONPATH=src python benchmarks/bench_prune_scale.py --layers 4 --reconstruct-epochs 2 --out ...
    # CPU smoke test at tiny size (what tests/test_bench_prune_scale.py runs):
    PYTHONPATH=src python benchmarks/bench_prune_scale.py --tiny --device cpu --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_semisparse import SparsityConfig, is_nm_sparse, select_targets
from hf_semisparse.pruning.calibrated import calibrated_prune_
from hf_semisparse.pruning.reconstruction import DEFAULT_LR
from hf_semisparse.utils import write_json

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        full_layers=32,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        full_layers=80,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        full_layers=4,
    ),
}


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build(shape: str, layers: int, dtype: torch.dtype) -> LlamaForCausalLM:
    """A Llama-shaped model with `layers` blocks of random weights on the CPU, allocated once."""
    dims = {k: v for k, v in SHAPES[shape].items() if k != "full_layers"}
    config = LlamaConfig(
        **dims,
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    first = model.model.layers[0]
    with torch.no_grad():
        for name, p in first.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
        for block in model.model.layers[1:]:
            for (_, p), (_, q) in zip(block.named_parameters(), first.named_parameters(), strict=True):
                p.copy_(q)
        for p in (model.model.embed_tokens.weight, model.lm_head.weight):
            p.normal_(0.0, 0.02, generator=g)
        model.model.norm.weight.fill_(1.0)
    # non-persistent buffers (rotary frequencies) were left uninitialised by to_empty: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def calibration(vocab: int, samples: int, seq: int, batch_size: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (samples, seq), generator=g)
    return [{"input_ids": ids[i : i + batch_size]} for i in range(0, samples, batch_size)]


def prune(
    model,
    method: str,
    batches,
    device: str,
    true_sequential: bool,
    epochs: int = 0,
    lr: float = DEFAULT_LR,
    offload: bool | None = None,
) -> dict:
    targets, _ = select_targets(model, SparsityConfig(method=method))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stats = calibrated_prune_(
        model,
        targets,
        method,
        batches,
        device=device,
        true_sequential=true_sequential,
        show_progress=True,
        reconstruct_epochs=epochs,
        reconstruct_lr=lr,
        offload_activations=offload,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    out = {
        "method": method,
        "pipeline": stats["pipeline"],
        "blocks_timed": stats["blocks"],
        "wall_s": wall,
        "capture_s": stats.get("capture_s"),
        "block_s": stats.get("block_s"),
        "mean_block_s": sum(stats["block_s"]) / max(1, len(stats["block_s"])),
        "host_peak_rss_gib": host_peak_gib(),
        "all_24": all(is_nm_sparse(t.linear_view()) for t in targets),
        "reconstruct_epochs": epochs,
        "offload_activations": offload,
    }
    if epochs:
        out["reconstruction"] = stats.get("reconstruction")
        out["blocks_tuned"] = stats.get("blocks_tuned")
    if device.startswith("cuda"):
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"], choices=["sparsegpt", "wanda"])
    p.add_argument("--layers", type=int, default=None, help="blocks of the 8B-shaped model (default 32)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4, help="calibration samples per forward")
    p.add_argument("--blocks-70b", type=int, default=1, help="70B-shaped blocks to time (0: skip)")
    p.add_argument("--true-sequential", action="store_true")
    p.add_argument("--reconstruct-epochs", type=int, default=0, help="block-wise reconstruction epochs")
    p.add_argument("--reconstruct-lr", type=float, default=DEFAULT_LR)
    p.add_argument(
        "--offload-activations",
        action="store_const",
        const=True,
        help="keep the cached block inputs (and reconstruction targets) on the CPU (default: decided from free "
        "GPU memory)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes instead of 8B/70B (CPU smoke test)")
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args(argv)
    dtype = torch.bfloat16
    small, large = ("tiny", "tiny") if args.tiny else ("llama3-8b", "llama3-70b")
    full = SHAPES[small]["full_layers"]
    layers = args.layers or full
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "settings": vars(args),
        "runs": [],
    }
    start = time.perf_counter()
    model = build(small, layers, dtype)
    build_s = time.perf_counter() - start
    print(f"built {small} with {layers} blocks on the CPU in {build_s:.0f} s", flush=True)
    batches = calibration(model.config.vocab_size, args.samples, args.seq, args.batch_size)
    for method in args.methods:  # the second method prunes the first one's (already 2:4) weights: same timing
        run = {
            "shape": small,
            "layers": layers,
            "build_s": build_s,
            **prune(
                model,
                method,
                batches,
                args.device,
                args.true_sequential,
                args.reconstruct_epochs,
                args.reconstruct_lr,
                args.offload_activations,
            ),
        }
        run["estimated_full_s"] = run["capture_s"] + run["mean_block_s"] * full
        run["extrapolated"] = layers != full
        results["runs"].append(run)
        write_json(args.out, results)
    del model
    if args.blocks_70b:
        start = time.perf_counter()
        model = build(large, args.blocks_70b, dtype)
        build_s = time.perf_counter() - start
        full_70 = SHAPES[large]["full_layers"]
        batches = calibration(model.config.vocab_size, args.samples, args.seq, args.batch_size)
        run = {
            "shape": large,
            "layers": args.blocks_70b,
            "build_s": build_s,
            **prune(
                model,
                "sparsegpt",
                batches,
                args.device,
                args.true_sequential,
                args.reconstruct_epochs,
                args.reconstruct_lr,
                args.offload_activations,
            ),
        }
        run["estimated_full_s"] = run["capture_s"] + run["mean_block_s"] * full_70
        run["extrapolated"] = True
        results["runs"].append(run)
        del model
    write_json(args.out, results)
    print(
        f"{'shape':<12} {'method':<10} {'blocks':>6} {'wall s':>8} {'s/block':>8} {'full est. s':>12} "
        f"{'GPU GiB':>8} {'host GiB':>9}"
    )
    for r in results["runs"]:
        est = f"{r['estimated_full_s']:.0f}" + (" (extrap.)" if r["extrapolated"] else "")
        gpu = r.get("peak_gpu_allocated_gib")
        print(
            f"{r['shape']:<12} {r['method']:<10} {r['blocks_timed']:>6} {r['wall_s']:>8.1f} "
            f"{r['mean_block_s']:>8.2f} {est:>12} {gpu if gpu is None else round(gpu, 2)!s:>8} "
            f"{r['host_peak_rss_gib']:>9.1f}"
        )
    return results


if __name__ == "__main__":
    main()
