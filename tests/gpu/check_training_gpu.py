"""GPU check of the skipped weight pass: torch's CUDA AdamW kernels (fused, the Trainer's default, and foreach)
keep pruned weights exactly zero under bf16 mixed precision, so skipping the pass changes no weight. Not
collected by the CPU suite; run on a CUDA machine with:

    PYTHONPATH=src python -m pytest -q tests/gpu/check_training_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from hf_semisparse import SparsityConfig
from tests.test_weight_pass import train

if not torch.cuda.is_available():
    pytest.fail("these checks need a CUDA GPU", pytrace=False)


@pytest.mark.parametrize("optimizer", ["adamw-fused", "adamw", "sgd-nesterov"])
@pytest.mark.parametrize("config", [None, SparsityConfig(start_step=4)], ids=["oneshot", "after-dense-steps"])
def test_cuda_optimizers_keep_pruned_weights_zero(tmp_path, optimizer, config):
    gpu = {"use_cpu": False, "bf16": True}
    always, _, _ = train(tmp_path / "always", optimizer, "always", config, **gpu)
    auto, callback, spy = train(tmp_path / "auto", optimizer, "auto", config, **gpu)
    assert next(auto.parameters()).is_cuda
    assert callback.skipped_weight_passes >= 4
    assert spy.worst and max(spy.worst) == 0.0
    for (name, p), (_, q) in zip(always.named_parameters(), auto.named_parameters(), strict=True):
        assert torch.equal(p, q), name
