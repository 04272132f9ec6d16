"""One rank of the DDP check in tests/test_distributed.py (not collected by pytest: no test_ prefix).

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR     # two ranks, gloo on CPU
    python tests/ddp_worker.py OUT_DIR                           # the single-process reference
    python tests/ddp_worker.py OUT_DIR CHECKPOINT                # one process resuming a checkpoint

Trains a tiny BERT (dropout off) with SparsityCallback on 8 examples: the global batch is the whole dataset at
every step, so the two-rank run and the single-process run compute the same averaged gradient
(`average_tokens_across_devices=False`: otherwise the Trainer scales the loss by the world size).
"""

from __future__ import annotations

import faulthandler
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_semisparse import SparsityCallback, SparsityConfig  # noqa: E402
from tests.conftest import ToyDataset, make_model  # noqa: E402

# a rank that waits for a peer forever prints where it waits and exits, so the test fails with a traceback
# instead of hanging until its timeout (tests/test_distributed.py)
faulthandler.dump_traceback_later(int(os.environ.get("HF_SEMISPARSE_WORKER_TIMEOUT", "180")), exit=True)


def build_model() -> torch.nn.Module:
    """conftest's tiny BERT with dropout off, so every run computes the same function."""
    return make_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def finish() -> None:
    """Leave the process group cleanly: leaving a gloo group alive at exit can abort a rank ("terminate called
    without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(out_dir: str, resume: str | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = build_model()
    callback = SparsityCallback(
        SparsityConfig(), resume_from_checkpoint=resume
    )  # a plain Trainer cannot tell it
    args = TrainingArguments(
        os.path.join(out_dir, f"run-{world}"),
        per_device_train_batch_size=8 // world,
        max_steps=6,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        average_tokens_across_devices=False,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset("bert", n=8), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    sp = callback.sparsifier
    state = {
        "weights": {t.name: t.weight.detach().clone() for t in sp.targets},
        "masks": {name: mask.clone() for name, mask in sp.masks.items()},
        "all": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    tag = "-resumed" if resume else ""
    torch.save(state, os.path.join(out_dir, f"world{world}{tag}-rank{rank}.pt"))
    finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    # everything is written and the group left: skip the interpreter's teardown, where gloo's threads were still
    # destroyed once while joinable and aborted rank 0 ("terminate called without an active exception", CI on 2
    # busy cores, 2026-12-01)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
