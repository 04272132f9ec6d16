"""Training-step time of masked LoRA against plain LoRA and full training, on a tiny 2:4 Llama (CPU or GPU).

One forward and backward of a random-weight Llama (hidden 256, intermediate 1024, 4 layers by default), pruned
to 2:4 with `prune_24`; LoRA of rank 16 on every projection. Methods: `masked` (`mask_lora`, the update masked by
the base's 2:4 mask), `plain` (PEFT's LoRA, not masked) and `full` (every parameter trained, no LoRA). Prints the
median and minimum wall-clock step time, and the median process CPU time per step, over `--steps` steps after
`--warmup`. Not a test.

    PYTHONPATH=src python benchmarks/probes/probe_lora_step.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_semisparse import prune_24

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(method: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(config)
    prune_24(model, show_progress=False)
    if method == "full":
        return model.to(args.device)
    from peft import LoraConfig, get_peft_model

    from hf_semisparse.lora import mask_lora

    model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS, lora_dropout=0.0)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; any values make the timing the trained one's
            torch.nn.init.normal_(p, std=0.02)
    if method == "masked":
        assert mask_lora(model), "no layer was masked"
    return model.to(args.device)


def step_times(model: torch.nn.Module, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each timed step (CPU time: unaffected by other processes taking
    the cores, on a shared CPU machine)."""
    ids = torch.randint(0, 1024, (args.batch, args.seq), device=args.device)
    model.train()
    wall, cpu = [], []
    for i in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        model.zero_grad(set_to_none=True)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods", nargs="+", default=["masked", "plain", "full"], choices=["masked", "plain", "full"]
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'method':<8} {'median ms':>10} {'min ms':>8} {'median CPU ms':>14}")
    for method in args.methods:
        wall, cpu = step_times(build(method, args), args)
        print(
            f"{method:<8} {1e3 * statistics.median(wall):>10.1f} {1e3 * min(wall):>8.1f} "
            f"{1e3 * statistics.median(cpu):>14.1f}"
        )


if __name__ == "__main__":
    main()
