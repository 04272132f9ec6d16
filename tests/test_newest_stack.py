"""Our checkpoints against the newest transformers and compressed-tensors from PyPI (run by `.ci/newest`).

compressed-tensors 0.15+ has no 2:4 compressor, and with it installed transformers' compressed-tensors integration
loads a 2:4 checkpoint in the legacy layout with every sparse Linear left random (issue 20). These tests need
compressed-tensors >= 0.15 installed, so the default run deselects them (marker `newest`, pyproject addopts);
`.ci/newest` runs them in an overlay venv with `pytest -m newest`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from hf_semisparse import prune_24, save_sparse_pretrained
from tests.conftest import make_model
from tests.test_plain_loading import FIXTURES, digest

ct = pytest.importorskip("compressed_tensors", reason="run by .ci/newest, which installs compressed-tensors")
pytestmark = pytest.mark.newest


def test_the_environment_is_the_newest_one():
    major, minor = (int(v) for v in ct.__version__.split(".")[:2])
    assert (major, minor) >= (0, 15), f"compressed-tensors {ct.__version__} still has the 2:4 compressor"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ours_loads_exactly_with_the_import_and_stops_without(arch, tmp_path):
    model = make_model(arch).eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    code = (
        f"import transformers; transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "ignore_mismatched_sizes" in result.stderr


@pytest.mark.parametrize("name", ["llama_bitmask", "llama_dense"])
def test_legacy_checkpoints_load_exactly_with_the_import(name):
    path = os.path.join(FIXTURES, name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert (
        loaded.hf_quantizer.quantization_config.quant_method == "hf_semisparse"
    )  # ours, not compressed-tensors'
    with open(os.path.join(path, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    assert {k: digest(loaded.state_dict()[k]) for k in expected} == expected
