"""GPU check of masked-LoRA training (`_MaskedLoraLinear`, its own backward) on CUDA: the output and the gradients
of x, A and B against plain autograd through the same formula (`tests/test_lora.py::plain_formula`), under CUDA
autocast (fp16, bf16), with fp16/bf16 weights and no autocast, and in float32. Not collected by the CPU suite
(where the same comparison runs in float64 and under CPU autocast); run on a CUDA machine with:

    PYTHONPATH=src python -m pytest -q tests/gpu/check_lora_training_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from tests.test_lora import grad_graph_names, masked_lora_layer, plain_formula

if not torch.cuda.is_available():
    pytest.fail("these checks need a CUDA GPU", pytrace=False)

MODES = {  # name: (weights' dtype, autocast dtype or None)
    "fp32": (torch.float32, None),
    "autocast-bf16": (torch.float32, torch.bfloat16),
    "autocast-fp16": (torch.float32, torch.float16),
    "bf16-weights": (torch.bfloat16, None),
    "fp16-weights": (torch.float16, None),
}


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal to a few roundings of `dtype` (the same GEMMs, which cuBLAS may split or order differently), relative
    to the reference's largest element."""
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, ref, rtol=4 * eps, atol=4 * eps * ref.abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", list(MODES))
def test_masked_update_on_cuda_computes_as_plain_autograd(arch, mode):
    weights, autocast = MODES[mode]
    layer = masked_lora_layer(arch, weights).cuda()
    x = torch.randn(3, 5, layer.in_features, device="cuda", dtype=weights, requires_grad=True)
    inputs = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    outputs = []
    for forward in (layer, lambda x: plain_formula(layer, x)):
        with torch.autocast("cuda", dtype=autocast or torch.float16, enabled=autocast is not None):
            y = forward(x)
        grad_y = torch.randn(
            y.shape, device="cuda", dtype=y.dtype, generator=torch.Generator("cuda").manual_seed(0)
        )
        outputs.append((y, torch.autograd.grad(y, inputs, grad_y)))
    (y, grads), (y_ref, grads_ref) = outputs
    assert "_MaskedLoraLinearBackward" in grad_graph_names(y)
    compute = autocast or weights
    assert y.dtype == y_ref.dtype == compute
    close(y, y_ref, compute)
    for grad, grad_ref, tensor in zip(grads, grads_ref, inputs, strict=True):
        assert grad.dtype == grad_ref.dtype == tensor.dtype
        close(grad, grad_ref, compute)
