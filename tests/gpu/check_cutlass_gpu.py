"""GPU-only checks of our CUTLASS 2:4 kernels (`kernels/cutlass_sm90.py`), on a Hopper GPU with the kernels built:

    hf-semisparse build-kernels --directory /tmp/kernels
    HF_SEMISPARSE_KERNEL_DIR=/tmp/kernels PYTHONPATH=src python -m pytest -q tests/gpu/check_cutlass_gpu.py

Numerical checks compare against a float64 reference: ||y - ref|| / ||ref|| under 2e-3 for fp16 and 1e-2 for
bf16 (fp32 accumulation in both); outputs are poisoned with NaN first, so every element must be written.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from check_kernels_gpu import (
    DEV,
    TOL,
    assert_compiled_and_replayed_match,
    rel_err,
    sparse_linear,
    tiny_bert,
)  # tests/gpu is on sys.path

from hf_semisparse.kernels import accelerate_24, semi_sparse_layers
from hf_semisparse.kernels import linear as linear_mod
from hf_semisparse.kernels.cusparselt import AlgConfig
from hf_semisparse.kernels.cutlass_sm90 import CutlassHandle, CutlassPlan, CutlassUnavailable, why_unavailable
from hf_semisparse.kernels.linear import SemiSparseLinear, SparseGemmBackend, choose_kernel
from hf_semisparse.kernels.residual import FusedGeluIntermediate
from hf_semisparse.kernels.tuning import TuningCache

if why_unavailable(DEV, torch.float16, 64, 128):
    pytest.fail(
        f"the CUTLASS kernels cannot run: {why_unavailable(DEV, torch.float16, 64, 128)}", pytrace=False
    )


@pytest.fixture(autouse=True)
def fresh_backend(tmp_path):
    linear_mod._BACKEND = SparseGemmBackend(cache=TuningCache(str(tmp_path / "tuning.json")))
    yield
    linear_mod._BACKEND = None


def reference(lin, x, residual=None, gelu=False):
    y = x.double() @ lin.weight.double().t()
    if lin.bias is not None:
        y = y + lin.bias.double()
    if residual is not None:
        y = y + residual.double()
    return F.gelu(y) if gelu else y


def poisoned(plan, compressed, x, c=None):
    out = torch.full((x.shape[0], plan.n), float("nan"), device=DEV, dtype=x.dtype)
    ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=DEV)
    plan.run(compressed, x, out, ws, torch.cuda.current_stream().cuda_stream, c=c)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", [(768, 768, 1536), (3072, 768, 100), (768, 3072, 4096), (64, 128, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_every_configuration_and_epilogue_matches_float64(dtype, n, k, m, bias):
    lin = sparse_linear(n, k, dtype, bias)
    handle = CutlassHandle(DEV, dtype)
    compressed = handle.compress(lin.weight.detach())
    assert compressed.numel() < lin.weight.numel() * 2 * 0.6  # bytes: values + metadata < 0.6x dense
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    r = torch.randn(m, n, device=DEV, dtype=dtype)
    for config in range(handle.num_configs):
        alg = AlgConfig(config)
        plain = CutlassPlan(handle, n, k, m, bias=lin.bias, alg=alg)
        assert rel_err(poisoned(plain, compressed, x), reference(lin, x)) < TOL[dtype], config
        assert rel_err(poisoned(plain, compressed, x, c=r), reference(lin, x, r)) < TOL[dtype], config
        gelu = CutlassPlan(handle, n, k, m, bias=lin.bias, gelu=True, alg=alg)
        assert rel_err(poisoned(gelu, compressed, x), reference(lin, x, gelu=True)) < TOL[dtype], config


def test_semisparse_linear_on_cutlass_fuses_gelu_and_residual():
    lin = sparse_linear(3072, 768, torch.float16)
    layer = SemiSparseLinear(lin, kernel="cutlass")
    assert layer.kernel == "cutlass"
    with torch.inference_mode():
        for m in (4096, 37):  # 37 is padded to 48 for the GEMM: GELU and residual then run after it
            x = torch.randn(m, 768, device=DEV, dtype=torch.float16)
            r = torch.randn(m, 3072, device=DEV, dtype=torch.float16)
            layer(x)  # decides sparse or dense for this token count
            layer.set_dispatch(m, True)
            assert rel_err(layer(x), reference(lin, x)) < 2e-3
            assert rel_err(layer(x, gelu=True), reference(lin, x, gelu=True)) < 2e-3
            assert rel_err(layer(x, residual=r), reference(lin, x, r)) < 2e-3
    assert layer.applies_gelu_in_epilogue(4096) is not None  # decided from timings, either way
    keys = list(linear_mod.get_backend().cache._entries)
    assert any("cutlass-sm90" in key and key.endswith("+bias+gelu") for key in keys)
    assert any("cutlass-sm90" in key and key.endswith("+bias+residual") for key in keys)
    with pytest.raises(ValueError, match="not both"):
        layer(torch.randn(16, 768, device=DEV, dtype=torch.float16), residual=r[:16], gelu=True)


def test_unsupported_shape_falls_back_or_refuses():
    lin = sparse_linear(768, 96, torch.float16)  # in_features not a multiple of 128
    assert choose_kernel("auto", lin.weight) == "cusparselt"
    assert choose_kernel("auto", sparse_linear(768, 128, torch.float16).weight) == "cutlass"
    assert (
        choose_kernel("auto", sparse_linear(768, 128, torch.float16).weight, prefer_cutlass=False)
        == "cusparselt"
    )
    with pytest.raises(CutlassUnavailable, match="in_features"):
        SemiSparseLinear(lin, kernel="cutlass")


def test_accelerated_bert_on_cutlass_matches_dense_eager_compiled_and_replayed():
    model = tiny_bert().to(DEV, torch.float16)
    fast = copy.deepcopy(model)
    report = accelerate_24(fast)
    # per layer: attention output, intermediate and output on CUTLASS (epilogues), joined q/k/v on cuSPARSELt
    assert report.kernels == {"cutlass": 6, "cusparselt": 2}
    assert len(report.fused_gelu) == 2
    assert all(
        isinstance(m, FusedGeluIntermediate) for m in fast.modules() if "Intermediate" in type(m).__name__
    )
    ids = torch.randint(0, 1000, (16, 128), device=DEV)
    with torch.inference_mode():
        ref = model(input_ids=ids).start_logits.double()
        fast(input_ids=ids)
        for layer in semi_sparse_layers(fast):
            layer.set_dispatch(16 * 128, True)
        assert rel_err(fast(input_ids=ids).start_logits, ref) < 2e-3
    assert_compiled_and_replayed_match(fast, ids, ref)


def test_load_state_dict_compresses_the_new_weights_for_cutlass():
    lin = sparse_linear(512, 512, torch.float16)
    layer = SemiSparseLinear(lin, kernel="cutlass")
    x = torch.randn(256, 512, device=DEV, dtype=torch.float16)
    layer(x)
    layer.set_dispatch(256, True)
    other = sparse_linear(512, 512, torch.float16, seed=1)
    layer.load_state_dict(other.state_dict())
    assert rel_err(layer(x), reference(other, x)) < 2e-3
