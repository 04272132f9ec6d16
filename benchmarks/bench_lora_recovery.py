"""Recovery of a 2:4-pruned causal LM: masked LoRA against full fine-tuning, same data and steps.

Prunes the model to 2:4 (magnitude, one-shot at step 0 through `SparsityTrainer`), trains on Gutenberg plays, and
measures perplexity on the first `--eval-tokens` tokens of an EB1911 article in windows of `--window` tokens.
One method per process, so that the peak memory (`ru_maxrss` on CPU; on a GPU also `max_memory_allocated`)
belongs to that method alone. Runs on the GPU when there is one (fp32 weights, no mixed precision).

    python benchmarks/bench_lora_recovery.py --model outputs/smollm2-135m --method lora --steps 100

Methods: `dense` (no pruning), `pruned` (2:4, no training), `full` (every parameter trained, gradients of the
pruned weights masked), `lora` (base frozen at 2:4; LoRA on every projection, its update masked by the base's
2:4 mask; reported after `merge_sparse_lora`, checked exactly 2:4 and equal to the unmerged model).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_semisparse import SparsityTrainer, check_nm_sparse, prune_24, select_targets
from hf_semisparse.config import SparsityConfig

# the offline data beside the checkout, as for the tests (tests/conftest.py); override with HF_SEMISPARSE_SHARED
SHARED = os.environ.get(
    "HF_SEMISPARSE_SHARED", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Chunks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, seq: int) -> None:
        self.chunks = ids[: len(ids) // seq * seq].view(-1, seq)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids) - window + 1, window):
        chunk = ids[start : start + window].unsqueeze(0).to(model.device)
        loss = model(input_ids=chunk, labels=chunk).loss
        nll += float(loss) * (window - 1)
        count += window - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="a transformers causal LM folder (fp32 is best on CPU)"
    )
    parser.add_argument("--method", required=True, choices=["dense", "pruned", "full", "lora"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-5 (full), 5e-4 (lora)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--train-dir", default=os.path.join(SHARED, "data/text/gutenberg-shakespeare"))
    parser.add_argument("--eval-file", default=os.path.join(SHARED, "data/text/eb1911-shakespeare.txt"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/lora_recovery")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()  # fp32 weights either way; the Trainer places the model

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with open(args.eval_file, encoding="utf-8") as f:
        eval_ids = torch.tensor(tokenizer(f.read())["input_ids"][: args.eval_tokens])
    result = {"method": args.method, "model": args.model, "eval_tokens": len(eval_ids), "window": args.window}

    if args.method in ("full", "lora"):
        needed = args.steps * args.batch * args.seq
        pieces, count = [], 0
        for path in sorted(glob.glob(os.path.join(args.train_dir, "*.txt"))):  # whole plays until enough
            with open(path, encoding="utf-8") as f:
                pieces.append(torch.tensor(tokenizer(f.read())["input_ids"]))
            count += len(pieces[-1])
            if count >= 4 * needed:
                break
        ids = torch.cat(pieces)
        generator = torch.Generator().manual_seed(0)
        dataset = Chunks(ids, args.seq)
        order = torch.randperm(len(dataset), generator=generator)[: args.steps * args.batch]
        dataset.chunks = dataset.chunks[order]
        lr = args.lr or (5e-5 if args.method == "full" else 5e-4)
        train_model = model
        if args.method == "lora":
            from peft import LoraConfig, get_peft_model

            train_model = get_peft_model(
                model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS)
            )
        trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
        training = TrainingArguments(
            output_dir=os.path.join(args.out, f"run-{args.method}"),
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=lr,
            warmup_steps=max(1, args.steps // 10),
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=not cuda,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = SparsityTrainer(model=train_model, args=training, train_dataset=dataset)
        start = time.time()
        trainer.train()
        result.update(
            train_seconds=round(time.time() - start, 1),
            trainable_parameters=trainable,
            lr=lr,
            steps=args.steps,
            batch=args.batch,
            seq=args.seq,
            train_tokens=needed,
            losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        )
        if args.method == "lora":
            from hf_semisparse.lora import merge_sparse_lora

            result["rank"] = args.rank
            result["perplexity_unmerged"] = perplexity(train_model, eval_ids, args.window)
            model = merge_sparse_lora(train_model)
    elif args.method == "pruned":
        prune_24(model, SparsityConfig(), show_progress=False)

    if args.method != "dense":
        targets, _ = select_targets(model, SparsityConfig())
        for t in targets:
            check_nm_sparse(t.linear_view().detach(), t.name)
        result["targets_2_4"] = len(targets)
    if cuda:
        model.cuda()
    result["perplexity"] = perplexity(model, eval_ids, args.window)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if cuda:  # training's peak (the evaluation's is far lower)
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.method}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))


if __name__ == "__main__":
    main()
