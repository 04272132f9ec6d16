"""Our CUTLASS 2:4 kernels' host side on the CPU: building, finding, refusing. The kernels themselves run on a
Hopper GPU only; tests/gpu/check_cutlass_gpu.py checks them against float64 there."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from hf_semisparse import cli
from hf_semisparse.kernels import cutlass_sm90
from hf_semisparse.kernels.linear import SemiSparseLinear, choose_kernel
from hf_semisparse.kernels.tuning import ShapeKey


@pytest.fixture
def fake_cutlass(tmp_path, monkeypatch):
    """A CUTLASS_PATH with the header the build looks for, and a kernel directory of our own."""
    root = tmp_path / "cutlass"
    (root / "include" / "cutlass").mkdir(parents=True)
    (root / "include" / "cutlass" / "cutlass.h").write_text("// stand-in\n")
    monkeypatch.setenv("CUTLASS_PATH", str(root))
    monkeypatch.setenv(cutlass_sm90.KERNEL_DIR_ENV, str(tmp_path / "kernels"))
    return root


def fake_nvcc(tmp_path, body: str) -> str:
    """An executable standing in for nvcc; `body` is shell code, "$out" the path after -o."""
    path = tmp_path / "nvcc"
    path.write_text(
        '#!/bin/sh\nout=""\nwhile [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n' + body + "\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_the_source_ships_with_the_package():
    assert os.path.isfile(cutlass_sm90.SOURCE)
    assert len(cutlass_sm90.source_digest()) == 16


def test_build_command_targets_sm90a_with_the_dtype_and_headers(fake_cutlass):
    cmd = cutlass_sm90.build_command(torch.bfloat16, "/tmp/out.so", nvcc="/opt/nvcc")
    assert cmd[0] == "/opt/nvcc" and cmd[-1] == cutlass_sm90.SOURCE
    assert "-gencode=arch=compute_90a,code=sm_90a" in cmd
    assert "-DHSS_DTYPE=cutlass::bfloat16_t" in cmd
    assert f"-I{fake_cutlass / 'include'}" in cmd
    assert cmd[cmd.index("-o") + 1] == "/tmp/out.so"


def test_missing_headers_are_a_clear_error(monkeypatch):
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "cutlass_library", None)  # import fails, as without nvidia-cutlass
    with pytest.raises(cutlass_sm90.CutlassUnavailable, match="pip install nvidia-cutlass"):
        cutlass_sm90.cutlass_include_dirs()


def test_build_writes_the_library_atomically_and_find_checks_the_source(fake_cutlass, tmp_path, caplog):
    nvcc = fake_nvcc(tmp_path, 'printf "ELF" > "$out"')
    assert cutlass_sm90.find_library(torch.float16) is None  # not built yet
    path = cutlass_sm90.build_library(torch.float16, nvcc=nvcc)
    directory = tmp_path / "kernels"
    assert path == str(directory / "libhss_sm90_fp16.so")
    assert Path(path).read_text() == "ELF"
    assert sorted(os.listdir(directory)) == ["libhss_sm90_fp16.so", "libhss_sm90_fp16.so.sha256"]  # no temp
    assert cutlass_sm90.find_library(torch.float16) == path
    assert cutlass_sm90.find_library(torch.bfloat16) is None
    assert cutlass_sm90.find_library(torch.float32) is None
    (directory / "libhss_sm90_fp16.so.sha256").write_text("another source")
    assert cutlass_sm90.find_library(torch.float16) is None
    assert "built from another source" in caplog.text


def test_a_failed_build_leaves_nothing_behind(fake_cutlass, tmp_path):
    nvcc = fake_nvcc(tmp_path, 'printf "half" > "$out"; echo "error: no sm_90a" >&2; exit 1')
    with pytest.raises(cutlass_sm90.CutlassUnavailable, match="no sm_90a"):
        cutlass_sm90.build_library(torch.float16, nvcc=nvcc)
    assert os.listdir(tmp_path / "kernels") == []


def test_without_nvcc_the_build_says_so(fake_cutlass, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(cutlass_sm90.CutlassUnavailable, match="nvcc was not found"):
        cutlass_sm90.build_library(torch.float16)


def test_cli_builds_both_dtypes_and_reports_errors(fake_cutlass, tmp_path, capsys):
    good = fake_nvcc(tmp_path, 'printf "ELF" > "$out"')
    out_dir = tmp_path / "elsewhere"
    assert cli.main(["build-kernels", "--directory", str(out_dir), "--nvcc", good]) == 0
    assert {"libhss_sm90_fp16.so", "libhss_sm90_bf16.so"} <= set(os.listdir(out_dir))
    assert f"HF_SEMISPARSE_KERNEL_DIR={out_dir}" in capsys.readouterr().out
    bad = fake_nvcc(tmp_path, "exit 3")
    assert cli.main(["build-kernels", "--dtypes", "float16", "--nvcc", bad]) == 2
    assert "nvcc failed (3)" in capsys.readouterr().err


def test_kernel_choice_off_hopper(backend):
    weight = torch.zeros(64, 128, dtype=torch.float16)
    assert cutlass_sm90.why_unavailable(weight.device, weight.dtype, 64, 128) == "on cpu"
    assert choose_kernel("auto", weight) == "cusparselt"
    assert choose_kernel("auto", weight, takes_epilogue=False) == "cusparselt"
    assert choose_kernel("cusparselt", weight) == "cusparselt"
    with pytest.raises(cutlass_sm90.CutlassUnavailable, match="on cpu"):
        choose_kernel("cutlass", weight)
    with pytest.raises(ValueError, match="kernel must be one of"):
        choose_kernel("triton", weight)
    lin = torch.nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.zero_()
    assert SemiSparseLinear(lin).kernel == "cusparselt"
    with pytest.raises(cutlass_sm90.CutlassUnavailable):
        SemiSparseLinear(lin, kernel="cutlass")


def test_tuning_keys_name_the_library():
    common = ("H100", 1, 3072, 768, 24576, "float16", True, True)
    assert str(ShapeKey(*common)).startswith("H100|cusparselt1|")  # earlier cache files keep their keys
    cutlass = str(ShapeKey(*common, library="cutlass-sm90"))
    assert cutlass == "H100|cutlass-sm90-1|float16|N3072xK768xM24576+bias+gelu"
