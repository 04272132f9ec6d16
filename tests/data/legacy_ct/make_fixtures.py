"""Writes the legacy compressed-tensors 2:4 checkpoints in this folder with the real compressed-tensors 0.14 writer.

compressed-tensors 0.14.0 was the last release with the "sparse-24-bitmask" compressor (0.15, April 2026, removed
it). The fixtures are committed so that the tests need neither it nor its writer. Each folder also holds
`expected.json`: the sha256 (see `digest`) of every tensor of the pruned dense model (as loaded: the model's dtype), which a
lossless load must reproduce bit for bit.

Run once from the repository root (needs compressed-tensors 0.14.0, e.g. `pip install --no-deps
compressed-tensors==0.14.0 loguru pydantic` in a scratch venv):

    PYTHONPATH=src python tests/data/legacy_ct/make_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import DenseSparsityConfig, Sparse24BitMaskConfig

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
from hf_semisparse import prune_24  # noqa: E402
from tests.conftest import make_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURES = {
    # name: (arch, sparsity config); targets use compressed-tensors' class names and "re:" regexes
    "bert_bitmask": (
        "bert",
        Sparse24BitMaskConfig(targets=["Linear"], ignore=["classifier", "re:.*pooler.*"]),
    ),
    "llama_bitmask": (
        "llama",
        Sparse24BitMaskConfig(
            targets=["re:.*self_attn\\..*_proj$", "re:.*mlp\\..*_proj$"], ignore=["lm_head"]
        ),
    ),
    "llama_dense": (
        "llama",
        DenseSparsityConfig(targets=["Linear"], ignore=["lm_head"], sparsity_structure="2:4"),
    ),
}


def digest(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's bytes, zeros counted as +0.0 (pruning leaves -0.0 where it zeroes a negative weight;
    a compressed format stores no zeros, so they come back as +0.0)."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = torch.where(tensor == 0, torch.zeros_like(tensor), tensor)
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    for name, (arch, sparsity) in FIXTURES.items():
        model = make_model(arch, tie_word_embeddings=False).eval().half()
        prune_24(model)
        del model.config.sparsity_config  # only what compressed-tensors itself writes
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        compressor = ModelCompressor(sparsity_config=sparsity)
        state = compressor.compress(model)
        model.save_pretrained(out, state_dict={k: v.contiguous() for k, v in state.items()})
        compressor.update_config(out)
        with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
            json.dump({k: digest(v) for k, v in sorted(model.state_dict().items())}, f, indent=1)
        print(name, sorted(os.listdir(out)), os.path.getsize(os.path.join(out, "model.safetensors")))


if __name__ == "__main__":
    main()
