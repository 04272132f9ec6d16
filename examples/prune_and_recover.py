"""Prune a model to 2:4 and recover it by fine-tuning, in one swap: `Trainer` -> `SparsityTrainer`.

Runs anywhere in about a minute on CPU with a tiny BERT built from a config and a synthetic task (numbers
mean nothing; the SQuAD example is the real workload):

    python examples/prune_and_recover.py --output-dir outputs/demo

With a real model folder or Hub id (text-classification head added):

    python examples/prune_and_recover.py --model ../shared/models/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    TrainingArguments,
)

from hf_semisparse import SparsityConfig, SparsityTrainer, is_nm_sparse, select_targets


class RuleDataset(torch.utils.data.Dataset):
    """Label = whether the first token id is in the lower half of the vocabulary."""

    def __init__(self, vocab: int, n: int, seq: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] < (vocab // 2)).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        return (model(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (built from a config), a local folder or Hub id"
    )
    parser.add_argument("--output-dir", default="outputs/prune_and_recover")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--schedule", choices=["oneshot", "gradual"], default="gradual")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model == "tiny":
        model = BertForSequenceClassification(
            BertConfig(
                hidden_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=256,
                vocab_size=512,
                num_labels=2,
            )
        )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=2, dtype=torch.float32
        )
    vocab = model.config.vocab_size
    train, test = RuleDataset(vocab, 512, seed=0), RuleDataset(vocab, 256, seed=1)

    config = SparsityConfig(schedule=args.schedule, start_step=0, end_step=max(1, args.steps // 2))
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(
            args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
        ),
        train_dataset=train,
        sparsity_config=config,
    )
    trainer.train()
    trainer.save_model(args.output_dir)

    targets, report = select_targets(model, config)
    print(report)
    print(f"all {len(targets)} targets exactly 2:4: {all(is_nm_sparse(t.linear_view()) for t in targets)}")
    print(f"held-out accuracy after prune-and-recover: {accuracy(model, test):.3f}")
    print(f"saved to {args.output_dir} (config.json records the sparsity)")


if __name__ == "__main__":
    main()
