"""The real dense all-MiniLM-L6-v2 folder (written by transformers 4.8, with `embeddings.position_ids`) loads and
converts as transformers loads it."""

import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertModel

from hf_semisparse import AutoSparseModel, prune_24
from hf_semisparse.cli import main
from tests.conftest import SHARED

MINILM = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")
pytestmark = pytest.mark.skipif(not os.path.isdir(MINILM), reason=f"needs {MINILM} (HF_SEMISPARSE_SHARED)")


def embed(model):
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_loads_like_transformers():
    with safe_open(os.path.join(MINILM, "model.safetensors"), framework="pt") as f:
        assert "embeddings.position_ids" in f.keys()  # the key transformers tolerates  # noqa: SIM118
    ours = AutoSparseModel.from_pretrained(MINILM)
    theirs = BertModel.from_pretrained(MINILM).eval()
    assert type(ours) is BertModel and ours.dtype == theirs.dtype == torch.float16
    assert torch.equal(embed(ours), embed(theirs))


def test_convert_dense_and_pruned_copies(tmp_path, capsys):
    # unpruned: refused because nothing is 2:4, not because of position_ids
    assert main(["convert", MINILM, str(tmp_path / "none")]) == 2
    assert "prune the model first" in capsys.readouterr().err
    # a 2:4 copy that keeps every original key, position_ids included
    copy = tmp_path / "minilm-24"
    shutil.copytree(MINILM, copy)
    model = BertModel.from_pretrained(MINILM)
    prune_24(model)
    tensors = load_file(os.path.join(MINILM, "model.safetensors"))
    pruned = model.state_dict()
    tensors.update({k: pruned[k].contiguous() for k in tensors if k in pruned})
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(copy), str(tmp_path / "sparse")]) == 0
    assert "36 2:4 layers" in capsys.readouterr().out  # 6 layers x (q, k, v, o, up, down)
    assert main(["inspect", str(tmp_path / "sparse")]) == 0
    reference = BertModel.from_pretrained(copy).eval()
    loaded = AutoSparseModel.from_pretrained(tmp_path / "sparse")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(embed(loaded), embed(reference))
