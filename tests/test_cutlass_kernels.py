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
    assert choose_kernel("auto", weight, prefer_cutlass=False) == "cusparselt"
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


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA device of compute capability 9.0 as far as `why_unavailable` can tell, on a machine without one."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cutlass_sm90, "_AUTO_BUILD", {})
    monkeypatch.delenv(cutlass_sm90.AUTO_BUILD_ENV, raising=False)
    return torch.device("cuda", 0)


def _path_with(monkeypatch, tmp_path, nvcc: str | None) -> None:
    """PATH holding only `nvcc` (a fake one made by `fake_nvcc`), or nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvcc is not None:
        os.replace(nvcc, bin_dir / "nvcc")
    monkeypatch.setenv("PATH", str(bin_dir))


def test_kernels_are_built_on_first_use_with_a_message(fake_cutlass, tmp_path, monkeypatch, hopper, caplog):
    _path_with(
        monkeypatch, tmp_path, fake_nvcc(tmp_path, 'echo built >> "${out%/*}/../calls"; printf ELF > "$out"')
    )
    caplog.set_level("WARNING")
    assert cutlass_sm90.why_unavailable(hopper, torch.float16, 3072, 768) is None  # built, so usable
    library = tmp_path / "kernels" / "libhss_sm90_fp16.so"
    assert library.read_text() == "ELF"
    assert "building our CUTLASS 2:4 kernels for torch.float16" in caplog.text
    assert f"built {library}" in caplog.text
    # the next layers find it: no second build
    assert cutlass_sm90.why_unavailable(hopper, torch.float16, 768, 3072) is None
    assert (tmp_path / "calls").read_text() == "built\n"
    # another dtype is built only when a layer of that dtype asks
    assert not (tmp_path / "kernels" / "libhss_sm90_bf16.so").exists()


def test_without_nvcc_one_warning_says_what_is_lost_and_how_to_get_it(
    fake_cutlass, tmp_path, monkeypatch, hopper, caplog
):
    _path_with(monkeypatch, tmp_path, None)
    caplog.set_level("WARNING")
    why = cutlass_sm90.why_unavailable(hopper, torch.float16, 3072, 768)
    assert "nvcc was not found" in why
    assert choose_kernel("auto", torch.empty(3072, 768, dtype=torch.float16, device="meta")) == "cusparselt"
    for _ in range(3):  # every layer of a model asks
        assert cutlass_sm90.why_unavailable(hopper, torch.float16, 768, 3072) == why
    warnings = [r.getMessage() for r in caplog.records if "not available" in r.getMessage()]
    assert len(warnings) == 1
    assert "bf16 decoder LLMs" in warnings[0] and "fp16 decoders are unaffected" in warnings[0]
    assert "install the CUDA toolkit" in warnings[0] and "hf-semisparse[cutlass]" in warnings[0]
    assert not (tmp_path / "kernels").exists() or os.listdir(tmp_path / "kernels") == []


def test_without_cutlass_headers_the_warning_asks_for_the_extra(tmp_path, monkeypatch, hopper, caplog):
    monkeypatch.setenv(cutlass_sm90.KERNEL_DIR_ENV, str(tmp_path / "kernels"))
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "cutlass_library", None)
    _path_with(monkeypatch, tmp_path, fake_nvcc(tmp_path, 'printf ELF > "$out"'))
    why = cutlass_sm90.why_unavailable(hopper, torch.bfloat16, 3072, 768)
    assert "headers were not found" in why
    assert 'pip install "hf-semisparse[cutlass]"' in caplog.text
    assert not (tmp_path / "kernels" / "libhss_sm90_bf16.so").exists()


def test_auto_build_can_be_turned_off(fake_cutlass, tmp_path, monkeypatch, hopper, caplog):
    _path_with(monkeypatch, tmp_path, fake_nvcc(tmp_path, 'printf ELF > "$out"'))
    monkeypatch.setenv(cutlass_sm90.AUTO_BUILD_ENV, "0")
    why = cutlass_sm90.why_unavailable(hopper, torch.float16, 3072, 768)
    assert f"{cutlass_sm90.AUTO_BUILD_ENV}=0" in why
    assert "hf-semisparse build-kernels" in caplog.text
    assert not (tmp_path / "kernels" / "libhss_sm90_fp16.so").exists()


def test_a_failed_first_use_build_is_reported_once_and_not_retried(
    fake_cutlass, tmp_path, monkeypatch, hopper, caplog
):
    _path_with(
        monkeypatch,
        tmp_path,
        fake_nvcc(tmp_path, 'echo x >> "${out%/*}/../calls"; echo "error: ptxas died" >&2; exit 1'),
    )
    why = cutlass_sm90.why_unavailable(hopper, torch.float16, 3072, 768)
    assert "failed" in why and "nvcc failed (1)" in why and "ptxas died" in why
    assert cutlass_sm90.why_unavailable(hopper, torch.float16, 768, 3072) == why
    assert (tmp_path / "calls").read_text() == "x\n"  # one attempt per process
    assert "run `hf-semisparse build-kernels` to see the whole error" in caplog.text
    with pytest.raises(cutlass_sm90.CutlassUnavailable, match="not built"):
        cutlass_sm90.load_library(torch.float16)


def test_shape_and_device_are_refused_before_any_build(fake_cutlass, tmp_path, monkeypatch, hopper):
    _path_with(
        monkeypatch, tmp_path, fake_nvcc(tmp_path, 'echo x >> "${out%/*}/../calls"; printf ELF > "$out"')
    )
    assert "needs in_features % 128" in cutlass_sm90.why_unavailable(hopper, torch.float16, 64, 96)
    assert cutlass_sm90.why_unavailable(torch.device("cpu"), torch.float16, 3072, 768) == "on cpu"
    assert cutlass_sm90.why_unavailable(hopper, torch.float32, 3072, 768) == "dtype torch.float32"
    assert not (tmp_path / "calls").exists()


def test_a_library_from_another_source_is_rebuilt_on_first_use(fake_cutlass, tmp_path, monkeypatch, hopper):
    _path_with(
        monkeypatch,
        tmp_path,
        fake_nvcc(tmp_path, 'echo x >> "${out%/*}/../calls"; printf ELF > "$out"'),
    )
    path = cutlass_sm90.build_library(torch.float16)
    Path(path + ".sha256").write_text("another source")
    assert cutlass_sm90.why_unavailable(hopper, torch.float16, 3072, 768) is None
    assert (tmp_path / "calls").read_text() == "x\nx\n"
    assert Path(path + ".sha256").read_text() == cutlass_sm90.source_digest()


def test_a_built_library_answers_its_host_functions():
    """With the library built (HF_SEMISPARSE_KERNEL_DIR), its host-only functions run without a GPU.

    Every tile configuration's workspace query, the Stream-K ones included (their workspace size divides by
    the SM count): sized on a GPU, refused with status 15 without one, never a division by zero that kills the
    process."""
    import ctypes
    import re

    if cutlass_sm90.find_library(torch.float16) is None:
        pytest.skip("the fp16 library is not built here (hf-semisparse build-kernels)")
    lib = cutlass_sm90.load_library(torch.float16)
    with open(cutlass_sm90.SOURCE, encoding="utf-8") as f:
        built = int(re.search(r"kNumConfigs = (\d+);", f.read()).group(1))
    assert lib.hss_num_configs() == built
    expect = 0 if torch.cuda.is_available() else 15
    for config in range(built):
        for gelu in (0, 1):
            size = ctypes.c_size_t(7)
            assert lib.hss_gemm_workspace(config, gelu, 4096, 16, 14336, ctypes.byref(size)) == expect, config
            assert (size.value != 7) == (expect == 0), config
    size = ctypes.c_size_t(7)
    assert lib.hss_gemm_workspace(99, 0, 4096, 16, 4096, ctypes.byref(size)) == 1  # no such configuration
