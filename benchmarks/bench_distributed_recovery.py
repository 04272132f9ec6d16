"""Recovery fine-tuning of a bert-base-shaped QA model with SparsityTrainer on 1 GPU, under DDP and under FSDP2
(through the Trainer and accelerate), in one run: throughput, final loss and a 2:4 check of every target weight
on every rank. Prints a table and writes JSON. Not a test: timings depend on the machine.

    python benchmarks/bench_distributed_recovery.py --gpus 2 --json outputs/distributed.json

Every configuration trains the same model on the same data with the same global batch (`--global-batch`), so
the final losses are comparable; each is launched with `torchrun --nproc-per-node=<gpus>` running this file
with `--worker`. With `--gpus 1` the DDP and FSDP rows run one rank: that checks the code paths, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

MODES = ("single", "ddp", "fsdp", "fsdp1")  # fsdp: FSDP2 (fully_shard); fsdp1: FullyShardedDataParallel


# ---------------------------------------------------------------------------------------------- one rank
def build_model(a):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64,
        intermediate_size=4 * a.hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForQuestionAnswering(cfg)


class RandomSquad(torch.utils.data.Dataset):
    """Fixed random token ids and answer spans: speed does not depend on the values, and every run sees the same
    examples in the same order."""

    def __init__(self, n: int, seq: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, 30000, (n, seq), generator=g)
        self.start = torch.randint(0, seq - 8, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "start_positions": self.start[i],
            "end_positions": self.start[i] + 4,
        }


def worker(a) -> None:
    from bench_callback_overhead import StepTimer  # this folder is on sys.path when run as a script
    from transformers import TrainingArguments

    from hf_semisparse import SparsityTrainer, is_nm_sparse
    from hf_semisparse.distributed import full_tensor

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    fsdp = {}
    if a.mode.startswith("fsdp"):
        version = 1 if a.mode == "fsdp1" else 2
        fsdp = {
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": version,
                "transformer_layer_cls_to_wrap": ["BertLayer"],
                **({"use_orig_params": True} if version == 1 else {}),
            },
        }
    args = TrainingArguments(
        a.output_dir,
        per_device_train_batch_size=a.global_batch // world,
        max_steps=a.warmup + a.steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=2,
        average_tokens_across_devices=False,
        **fsdp,
    )
    timer = StepTimer(a.warmup)
    data = RandomSquad(a.global_batch * (a.warmup + a.steps), a.seq)
    trainer = SparsityTrainer(model=build_model(a), args=args, train_dataset=data, callbacks=[timer])
    trainer.train()
    sp = trainer.sparsity_callback.sparsifier
    bad = [t.name for t in sp.targets if not is_nm_sparse(full_tensor(t.weight.detach()))]  # collective
    flags = torch.tensor([len(bad)], device="cuda")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if rank == 0:
        result = {
            "mode": a.mode,
            "gpus": world,
            "wrapped_as": type(trainer.model_wrapped).__name__,
            "sharded_masks": sp.sharded,
            "parameter_type": type(next(trainer.model.parameters())).__name__,
            "samples_per_s": a.global_batch * a.steps / timer.seconds,
            "ms_per_step": 1e3 * timer.seconds / a.steps,
            "losses": losses,
            "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "targets": len(sp.targets),
            "targets_not_24_summed_over_ranks": int(flags.item()),
            "skipped_weight_passes": trainer.sparsity_callback.skipped_weight_passes,
        }
        with open(a.result, "w") as f:
            json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver
def launch(a, mode: str, gpus: int, tmp: str) -> dict:
    result = os.path.join(tmp, f"{mode}-{gpus}.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={gpus}",
        "--master-port=29533",
        os.path.abspath(__file__),
        "--worker",
        "--mode",
        mode,
        "--result",
        result,
        "--output-dir",
        os.path.join(tmp, f"{mode}-{gpus}"),
    ]
    for key in ("hidden", "layers", "seq", "global_batch", "steps", "warmup"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"mode": mode, "gpus": gpus, "error": proc.stderr[-4000:]}
    with open(result) as f:
        out = json.load(f)
    out["wall_s"] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--modes", nargs="+", default=["single", "ddp", "fsdp"], choices=MODES)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default="outputs/bench_distributed_recovery.json")
    # worker side (set by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    if a.gpus < 1:
        p.error("needs at least one CUDA GPU (--gpus)")
    if a.global_batch % a.gpus:
        p.error(f"--global-batch {a.global_batch} does not split over {a.gpus} GPUs")
    import transformers

    from hf_semisparse.utils import write_json

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            gpus = 1 if mode == "single" else a.gpus
            runs.append(launch(a, mode, gpus, tmp))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "losses"})[:2000], flush=True)
    single = next((r for r in runs if r["mode"] == "single" and "error" not in r), None)
    print(
        f"\n{'mode':<8}{'GPUs':>5}{'samples/s':>11}{'vs 1 GPU':>10}{'final loss':>12}{'vs 1 GPU':>10}{'2:4':>6}"
    )
    for r in runs:
        if "error" in r:
            print(f"{r['mode']:<8}{r['gpus']:>5}  failed: {r['error'][-300:]}")
            continue
        speed = f"{r['samples_per_s'] / single['samples_per_s']:.2f}x" if single else "-"
        dloss = f"{r['final_loss'] - single['final_loss']:+.4f}" if single else "-"
        ok = "yes" if r["targets_not_24_summed_over_ranks"] == 0 else "NO"
        print(
            f"{r['mode']:<8}{r['gpus']:>5}{r['samples_per_s']:>11.1f}{speed:>10}{r['final_loss']:>12.4f}{dloss:>10}{ok:>6}"
        )
    write_json(
        a.json,
        {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "gpus_visible": torch.cuda.device_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "args": vars(a),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
