"""One rank of the FSDP2 check in tests/test_distributed.py (not collected by pytest: no test_ prefix).

    torchrun --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR     # two ranks, fully_shard, gloo on CPU
    python tests/fsdp_worker.py OUT_DIR                           # the single-process reference, no sharding
    python tests/fsdp_worker.py OUT_DIR CHECKPOINT_DIR            # one process loading the 2-rank checkpoint
    torchrun --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR CHECKPOINT_DIR   # two ranks loading a 1-process one

Trains a tiny BERT (dropout off) with a Sparsifier for 6 AdamW steps on 8 fixed examples; each rank takes
its share of every batch, so the ranks' averaged gradient equals the single process's. The parameters under
FSDP2 are DTensors sharded on dim 0: masks, gradient hooks and weight masking run on the shards. At step 3 the
masks (gathered, written by rank 0) and the full weights are saved to `fsdp-checkpoint-world<N>`. A resume loads
the full weights, shards them when there are several ranks, then loads the masks (sharded like the weights).
"""

from __future__ import annotations

import faulthandler
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_semisparse import SparsityConfig  # noqa: E402
from hf_semisparse.distributed import full_tensor  # noqa: E402
from hf_semisparse.pruning import Sparsifier  # noqa: E402
from tests.conftest import ToyDataset  # noqa: E402
from tests.ddp_worker import build_model, finish  # noqa: E402

# a rank that waits for a peer forever prints where it waits and exits, so the test fails with a traceback
# instead of hanging until its timeout (tests/test_distributed.py)
faulthandler.dump_traceback_later(int(os.environ.get("HF_SEMISPARSE_WORKER_TIMEOUT", "180")), exit=True)


def full_state(model, sp) -> dict:
    return {
        "masks": {name: full_tensor(mask).clone() for name, mask in sp.masks.items()},
        "all": {k: full_tensor(v.detach()).clone() for k, v in model.state_dict().items()},
    }


def main(out_dir: str, resume: str | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = build_model()
    if resume:  # the other number of processes picks up a checkpoint: full weights, sharding, then masks
        model.load_state_dict(torch.load(os.path.join(resume, "weights.pt"), weights_only=True))
        shard(model, world)
        sp = Sparsifier(model, SparsityConfig())
        step = sp.load_masks(resume)
        state = {**full_state(model, sp), "step": step, "sharded": sp.sharded}
        torch.save(state, os.path.join(out_dir, f"fsdp-resumed-world{world}-rank{rank}.pt"))
        finish()
        return
    shard(model, world)
    sp = Sparsifier(model, SparsityConfig())
    sp.update_masks(level=1.0)
    sp.register_grad_hooks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = ToyDataset("bert", n=8)
    batch = torch.utils.data.default_collate([data[i] for i in range(rank, 8, world)])
    checkpoint = os.path.join(out_dir, f"fsdp-checkpoint-world{world}")
    for step in range(1, 7):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        sp.apply_masks()
        if step == 3:
            os.makedirs(checkpoint, exist_ok=True)
            sp.save_masks(checkpoint, step, write=rank == 0)  # every rank gathers, rank 0 writes
            weights = full_state(model, sp)["all"]
            if rank == 0:
                torch.save(weights, os.path.join(checkpoint, "weights.pt"))
    torch.save(
        {**full_state(model, sp), "sharded": sp.sharded},
        os.path.join(out_dir, f"fsdp-world{world}-rank{rank}.pt"),
    )
    finish()


def shard(model, world: int) -> None:
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    # everything is written and the group left: skip the interpreter's teardown, where gloo's threads were still
    # destroyed once while joinable and aborted rank 0 ("terminate called without an active exception", CI on 2
    # busy cores, 2026-12-01)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
