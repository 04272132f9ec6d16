"""On a Hopper GPU: our CUTLASS kernels are built on first use where nvcc is present, once, and then run; without
nvcc one warning says what is lost and the layer runs on cuSPARSELt.

    PYTHONPATH=src:tests/gpu python -m pytest -q -s tests/gpu/check_autobuild_gpu.py

Needs nvcc (CUDA toolkit >= 12.2) on PATH and `pip install nvidia-cutlass` (or CUTLASS_PATH) for the first check;
takes one nvcc build of the fp16 library (about 4 minutes with one core), into a temporary directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import torch
from check_kernels_gpu import DEV, TOL, fresh_backend, rel_err, sparse_linear  # noqa: F401  (tests/gpu on sys.path)

from hf_semisparse.kernels import cutlass_sm90
from hf_semisparse.kernels.linear import SemiSparseLinear, choose_kernel

if torch.cuda.get_device_capability(DEV) != (9, 0):
    pytest.fail("these checks need a Hopper GPU (compute capability 9.0)", pytrace=False)


@pytest.fixture
def empty_kernel_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cutlass_sm90.KERNEL_DIR_ENV, str(tmp_path / "kernels"))
    monkeypatch.delenv(cutlass_sm90.AUTO_BUILD_ENV, raising=False)
    monkeypatch.setattr(cutlass_sm90, "_AUTO_BUILD", {})
    return tmp_path / "kernels"


def test_first_use_builds_the_kernels_once_and_they_run(empty_kernel_dir, caplog):
    if shutil.which("nvcc") is None:
        pytest.fail("nvcc is not on PATH: install the CUDA toolkit to run this check", pytrace=False)
    caplog.set_level(logging.WARNING)
    lin = sparse_linear(3072, 768, torch.float16)
    start = time.monotonic()
    assert choose_kernel("auto", lin.weight) == "cutlass"  # builds here
    seconds = time.monotonic() - start
    library = empty_kernel_dir / "libhss_sm90_fp16.so"
    assert library.is_file()
    assert "building our CUTLASS 2:4 kernels" in caplog.text and f"built {library}" in caplog.text
    print(f"first-use build of the fp16 kernels: {seconds:.0f} s")
    built_at = os.stat(library).st_mtime_ns
    layer = SemiSparseLinear(lin, kernel="cutlass")
    x = torch.randn(4096, 768, device=DEV, dtype=torch.float16)
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    assert rel_err(layer(x), ref) < TOL[torch.float16]
    assert choose_kernel("auto", sparse_linear(768, 3072, torch.float16).weight) == "cutlass"
    assert os.stat(library).st_mtime_ns == built_at  # found, not built again


def test_without_nvcc_one_warning_and_cusparselt_runs(empty_kernel_dir, monkeypatch, caplog):
    monkeypatch.setenv("PATH", "")
    caplog.set_level(logging.WARNING)
    lin = sparse_linear(3072, 768, torch.float16)
    layer = SemiSparseLinear(lin, kernel="auto")  # asks for the kernels: this is where the warning comes from
    assert layer.kernel == "cusparselt"
    assert SemiSparseLinear(sparse_linear(768, 3072, torch.float16), kernel="auto").kernel == "cusparselt"
    warnings = [r.getMessage() for r in caplog.records if "are not available" in r.getMessage()]
    assert len(warnings) == 1 and "nvcc was not found" in warnings[0], warnings
    x = torch.randn(4096, 768, device=DEV, dtype=torch.float16)
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    assert rel_err(layer(x), ref) < TOL[torch.float16]
    assert not (empty_kernel_dir / "libhss_sm90_fp16.so").exists()
