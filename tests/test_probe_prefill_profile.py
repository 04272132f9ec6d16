"""The prefill profile probe's kernel kinds, from kernel names of the libraries a prefill runs (CPU)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probes"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import probe_prefill_profile as probe  # noqa: E402


@pytest.mark.parametrize(
    "name, kind",
    [
        (
            "void hss_fp8::quantize_rows(cutlass::bfloat16_t const*, __nv_fp8_e4m3*, float*, int, int, long)",
            "quantise (FP8)",
        ),
        ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>(...)", "GEMM"),
        ("sm90_xmma_sparse_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>",
            "elementwise and other",
        ),
        (
            "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps>>",
            "elementwise and other",
        ),
    ],
)
def test_kernels_are_sorted_by_kind(name, kind):
    assert probe.kind_of(name) == kind


def test_the_probe_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(probe.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        probe.main(["--layers", "1"])
