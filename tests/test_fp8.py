"""FP8 (e4m3) 2:4 on the CPU: the quantisation math, the reference GEMM, the library's C signatures, building and
finding the library, refusals, `accelerate_24(weights="fp8")` validation and the checkpoint layout. The kernels
themselves run on a Hopper GPU only; tests/gpu/check_fp8_gpu.py checks them against float64 there."""

from __future__ import annotations

import ctypes
import os
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_semisparse import cli
from hf_semisparse.fp8_serialization import compress_fp8_24, decompress_fp8_24
from hf_semisparse.kernels import accelerate_24, cutlass_fp8, cutlass_sm90
from hf_semisparse.kernels.fp8_linear import Fp8SemiSparseLinear
from hf_semisparse.masks import compute_nm_mask, find_nm_violation
from hf_semisparse.serialization import SparseCheckpointError
from tests.conftest import make_model
from tests.test_cutlass_kernels import fake_cutlass, fake_nvcc  # noqa: F401 - fixture


def sparse_weight(n=64, k=256, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    return (w * compute_nm_mask(w)).to(dtype)


# ------------------------------------------------------------------------------------------ the math
def test_quantize_rows_scales_by_absmax_and_keeps_zeros():
    torch.manual_seed(0)
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0])[:, None]
    x[3] = 0.0
    x[4, 7] = -1000.0
    x[4, 0] = -1e-4  # underflows to zero in row 4's scale
    q, scale = cutlass_fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (5,)
    torch.testing.assert_close(scale[[0, 1, 2, 4]], x[[0, 1, 2, 4]].abs().amax(1) / 448.0)
    assert scale[3] == 1.0 and (q[3].float() == 0).all()
    assert q.float().abs().amax(1)[[0, 1, 2, 4]].eq(448.0).all()  # each row's absmax maps to e4m3's largest
    assert q[4, 7].float() == -448.0
    back = q.float() * scale[:, None]
    rel = (back - x).abs() / x.abs().clamp_min(1e-30)
    big = x.abs() > x.abs().amax(1, keepdim=True) / 64  # normal e4m3 range: 3 mantissa bits, error <= 2^-4
    assert rel[big].max() <= 2**-4 + 1e-6
    # -0.0 codes only where a negative value underflows to zero (row 4: -1000 makes its scale 2.2, so values
    # under about 1e-3 in magnitude round to zero keeping their sign, as the CUDA quantiser does); x has no -0.0
    negative_zero = q.view(torch.uint8) == 0x80
    assert negative_zero[4, 0]
    assert (x[negative_zero] < 0).all() and (
        x[negative_zero].abs() < scale[:, None].expand_as(x)[negative_zero] * 2**-10
    ).all()
    neg = cutlass_fp8.quantize_rows(torch.tensor([[-0.0, 1.0]]))[0].view(torch.uint8)
    assert neg.tolist() == [[0x80, 0x7E]]  # as the CUDA quantiser: the sign of -0.0 kept; 448 is 0x7E


def _round_to_grid(value: Fraction, mantissa_bits: int, min_exponent: int) -> Fraction:
    """`value` rounded to the nearest number of a binary float format (ties to even), subnormals included;
    no overflow handling (the callers stay in range)."""
    if value == 0:
        return Fraction(0)
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    step = Fraction(2) ** (max(exponent, min_exponent) - mantissa_bits)
    return round(value / step) * step  # Fraction's round(): ties to even


def to_float32(value: Fraction) -> Fraction:
    return _round_to_grid(value, 23, -126)


def to_e4m3(value: Fraction) -> Fraction:
    return _round_to_grid(value, 3, -6)


def exact_quantize_rows(x: torch.Tensor) -> tuple[list[list[Fraction]], list[Fraction]]:
    """The documented math of the activations' quantiser (`cutlass_fp8.quantize_rows`, the CUDA kernel), in exact
    rational arithmetic with each step rounded once: the values of the e4m3 codes and the scales."""
    values, scales = [], []
    for row in x.double().tolist():
        row = [Fraction(v) for v in row]
        amax = max(abs(v) for v in row)
        scale = max(to_float32(amax / 448), Fraction(2) ** -126) if amax > 0 else Fraction(1)
        inverse = to_float32(1 / scale)
        values.append(
            [to_e4m3(min(max(to_float32(v * inverse), Fraction(-448)), Fraction(448))) for v in row]
        )
        scales.append(scale)
    return values, scales


def quantizer_inputs() -> list[torch.Tensor]:
    """Rows as the GPU check draws them (scaled random tokens) in both activation dtypes, and rows whose scales
    are exact or tiny."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(48, 64, generator=g) * torch.rand(48, 1, generator=g) * 10
        rows.append(x.to(dtype))
    exact = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    exact[:, 0] = torch.tensor([3.5, 7.0, 56.0, 0.4375])  # absmax / 448 a power of two: exact ties
    rows.append(exact)
    tiny = (torch.randn(2, 64, generator=g) * 1e-37).to(torch.bfloat16)  # absmax / 448 under 2^-126
    rows.append(tiny)
    return rows


def assert_quantized_exactly(x: torch.Tensor) -> None:
    q, scale = cutlass_fp8.quantize_rows(x)
    values, scales = exact_quantize_rows(x)
    assert [Fraction(s) for s in scale.double().tolist()] == scales
    got = [[Fraction(v) for v in row] for row in q.double().tolist()]
    assert got == values
    assert torch.equal(torch.signbit(q.float()), torch.signbit(x.float()))  # zero keeps the input's sign


def test_quantize_rows_is_the_documented_float32_math_exactly():
    for x in quantizer_inputs():
        assert_quantized_exactly(x)


class ScalarDivisionAsOnCuda(TorchDispatchMode):
    """Division of a tensor by a Python number as CUDA torch computes it: a multiplication by the number's
    reciprocal rounded to float32 (ATen's div_true_kernel_cuda), which is not always the correctly rounded
    quotient that the CPU computes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is torch.ops.aten.div.Tensor
            and isinstance(args[1], (int, float))
            and args[0].is_floating_point()
        ):
            reciprocal = torch.tensor(1.0 / args[1], dtype=args[0].dtype)
            return torch.ops.aten.mul.Tensor(args[0], reciprocal)
        return func(*args, **kwargs)


def test_quantize_rows_gives_the_same_codes_whatever_the_device_divides_by_a_number_with():
    """The torch reference must not depend on how a device divides by a Python number: on an H200 (2026-12-01)
    `amax / 448` computed as `amax * fl(1 / 448)` gave other scales for about half of the rows and so other codes
    for the inputs that fall on e4m3 ties."""
    inputs = quantizer_inputs()
    with ScalarDivisionAsOnCuda():
        x = torch.rand(1000) + 1.0  # the emulation does round differently from the CPU's division
        assert not torch.equal(x / 448.0, x / torch.full_like(x, 448.0))
        results = [cutlass_fp8.quantize_rows(x) for x in inputs]
    for x, (q, scale) in zip(inputs, results, strict=True):
        ref_q, ref_scale = cutlass_fp8.quantize_rows(x)
        assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_quantize_rows_rounds_ties_to_even():
    # absmax 56: scale 1/8 and 1/scale 8 are exact, so x * 8 lands exactly on the values below
    on_grid = [1.0625, 1.1875, -1.0625, 2**-10, 3 * 2**-10, 432.0, 400.0, 0.0, 448.0]
    x = torch.tensor([[v / 8 for v in on_grid]])
    q, scale = cutlass_fp8.quantize_rows(x)
    assert scale.tolist() == [0.125]
    # ties go to the even 3-bit mantissa: 1.0625 between 1.0 (000) and 1.125 (001) -> 1.0; 1.1875 between
    # 1.125 (001) and 1.25 (010) -> 1.25; the subnormal 2^-10 between 0 and 2^-9 -> 0; 3 * 2^-10 between
    # 2^-9 (001) and 2^-8 (010) -> 2^-8; 432 between 416 (101) and 448 (110) -> 448; 400 between 384 (100) and
    # 416 (101) -> 384
    expected = [1.0, 1.25, -1.0, 0.0, 2**-8, 448.0, 384.0, 0.0, 448.0]
    assert q.float()[0].tolist() == expected
    assert_quantized_exactly(x)


def test_quantize_rows_keeps_rows_of_tiny_values_finite():
    """absmax / 448 under 2^-126 (bf16 activations can be that small): the scale is held at 2^-126, so 1 / scale
    is finite, zeros stay zero and no code saturates or becomes NaN."""
    x = (torch.randn(3, 256, generator=torch.Generator().manual_seed(1)) * 1e-37).to(torch.bfloat16)
    x[:, :8] = 0.0
    q, scale = cutlass_fp8.quantize_rows(x)
    assert (scale == torch.finfo(torch.float32).tiny).all()
    assert not q.float().isnan().any() and (q.float()[:, :8] == 0).all()
    assert q.float().abs().max() < 448  # the finer steps of a larger scale are lost, nothing saturates
    back = q.double() * scale.double()[:, None]
    big = x.double().abs() > 2**-6 * 2**-126  # in e4m3's normal range at this scale
    assert ((back - x.double()).abs()[big] <= 2**-4 * x.double().abs()[big]).all()


def test_quantized_2_4_weight_stays_2_4():
    w = sparse_weight()
    w_neg_zero = torch.where(w == 0, torch.full_like(w, -0.0), w)
    wq, scale = cutlass_fp8.quantize_weight(w_neg_zero)
    assert find_nm_violation(wq.float()) is None
    assert ((wq.view(torch.uint8) != 0) <= (w != 0)).all()  # zeros stay zero (code 0x00)
    assert scale.shape == (w.shape[0],)


def test_reference_gemm_is_the_dequantized_math_and_close_to_bf16():
    w = sparse_weight(128, 512)
    bias = torch.randn(128, dtype=torch.bfloat16)
    x = torch.randn(3, 7, 512, dtype=torch.bfloat16)
    wq, sw = cutlass_fp8.quantize_weight(w)
    y = cutlass_fp8.fp8_linear_reference(x, wq, sw, bias, compute_dtype=torch.float64)
    assert y.shape == (3, 7, 128) and y.dtype == torch.bfloat16
    q, sx = cutlass_fp8.quantize_rows(x.reshape(21, 512))
    manual = (q.double() @ wq.double().t()) * sx.double()[:, None] * sw.double() + bias.double()
    torch.testing.assert_close(y.reshape(21, 128), manual.to(torch.bfloat16))
    exact = x.double() @ w.double().t() + bias.double()
    err = ((y.double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 6e-2  # FP8's quantisation error: visible, and a few percent at most


# ------------------------------------------------------------------------------------------ the C ABI
def c_signatures() -> dict[str, list[str]]:
    """The extern "C" functions of the source: name -> parameter types (pointer types as 'ptr')."""
    with open(cutlass_fp8.SOURCE, encoding="utf-8") as f:
        text = f.read()
    body = text[text.index('extern "C" {') :]
    sigs = {}
    for ret, name, params in re.findall(r"^(int|size_t) (hss_fp8_\w+)\(([^)]*)\)", body, flags=re.M):
        types = []
        for param in filter(None, (p.strip() for p in params.replace("\n", " ").split(","))):
            kind = param.rsplit(" ", 1)[0] if "*" not in param else "ptr"
            types.append(kind)
        sigs[name] = [ret, *types]
    return sigs


def test_ctypes_declarations_match_the_c_signatures():
    class Fake:
        def __getattr__(self, name):
            fn = type("Fn", (), {})()
            object.__setattr__(self, name, fn)
            return fn

    lib = cutlass_fp8.declare(Fake())
    mapping = {
        ctypes.c_void_p: "ptr",
        ctypes.POINTER(ctypes.c_int64): "ptr",
        ctypes.POINTER(ctypes.c_size_t): "ptr",
        ctypes.c_int: "int",
        ctypes.c_size_t: "size_t",
        ctypes.c_int64: "int64_t",
    }
    sigs = c_signatures()
    assert set(sigs) == {
        "hss_fp8_num_configs",
        "hss_fp8_out_is_bf16",
        "hss_fp8_compressed_sizes",
        "hss_fp8_compress",
        "hss_fp8_compress_workspace",
        "hss_fp8_gemm_workspace",
        "hss_fp8_gemm",
        "hss_fp8_quantize",
    }
    for name, (ret, *params) in sigs.items():
        fn = getattr(lib, name)
        assert [mapping[t] for t in fn.argtypes] == params, name
        assert mapping[fn.restype] == ret, name


def test_every_tile_configuration_is_dispatched():
    with open(cutlass_fp8.SOURCE, encoding="utf-8") as f:
        text = f.read()
    n = int(re.search(r"kNumConfigs = (\d+);", text).group(1))
    listed = re.search(r"#define HSS_FP8_CONFIGS\(X\) ((?:.*\\\n)*.*)", text).group(1)  # continued lines too
    assert re.findall(r"X\((\d+), Config(\d+)\)", listed) == [(str(i), str(i)) for i in range(n)]
    for i in range(n):
        assert f"using Config{i} = Config<" in text


# ------------------------------------------------------------------------------------------ build and find
def test_build_command_and_library_names(fake_cutlass):  # noqa: F811
    cmd = cutlass_fp8.build_command(torch.bfloat16, "/tmp/o.so", nvcc="/opt/nvcc")
    assert cmd[0] == "/opt/nvcc" and cmd[-1] == cutlass_fp8.SOURCE
    assert "-gencode=arch=compute_90a,code=sm_90a" in cmd
    assert "-ftz=false" in cmd and not any(
        "fast_math" in arg for arg in cmd
    )  # quantize_rows keeps subnormals
    assert "-DHSS_OUT_DTYPE=cutlass::bfloat16_t" in cmd
    assert cutlass_fp8.library_name(torch.float16) == "libhss_sm90_fp8_fp16.so"
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        cutlass_fp8.build_library(torch.float32)


def test_build_writes_atomically_and_find_checks_the_source(fake_cutlass, tmp_path):  # noqa: F811
    nvcc = fake_nvcc(tmp_path, 'printf "ELF" > "$out"')
    assert cutlass_fp8.find_library(torch.bfloat16) is None
    path = cutlass_fp8.build_library(torch.bfloat16, nvcc=nvcc)
    directory = tmp_path / "kernels"
    assert sorted(os.listdir(directory)) == ["libhss_sm90_fp8_bf16.so", "libhss_sm90_fp8_bf16.so.sha256"]
    assert cutlass_fp8.find_library(torch.bfloat16) == path
    assert cutlass_fp8.find_library(torch.float16) is None
    (directory / "libhss_sm90_fp8_bf16.so.sha256").write_text("other")
    assert cutlass_fp8.find_library(torch.bfloat16) is None
    with pytest.raises(cutlass_fp8.CutlassUnavailable, match="build-kernels --fp8"):
        cutlass_fp8.load_library(torch.bfloat16)


def test_a_library_from_another_source_is_warned_about_once(fake_cutlass, tmp_path, caplog):  # noqa: F811
    path = cutlass_fp8.build_library(torch.bfloat16, nvcc=fake_nvcc(tmp_path, 'printf "ELF" > "$out"'))
    Path(path + ".sha256").write_text("another source")
    with caplog.at_level("WARNING", logger=cutlass_fp8.__name__):
        assert cutlass_fp8.find_library(torch.bfloat16) is None
        assert cutlass_fp8.find_library(torch.bfloat16) is None  # every layer asks; said once
    said = [r for r in caplog.records if "built from another source" in r.getMessage()]
    assert [(r.name, r.getMessage()) for r in said] == [
        (
            cutlass_fp8.__name__,
            f"hf_semisparse: {path} was built from another source; run hf-semisparse build-kernels --fp8",
        )
    ]


def test_failed_build_leaves_nothing(fake_cutlass, tmp_path):  # noqa: F811
    nvcc = fake_nvcc(tmp_path, 'printf "half" > "$out"; echo "error: boom" >&2; exit 2')
    with pytest.raises(cutlass_fp8.CutlassUnavailable, match="boom"):
        cutlass_fp8.build_library(torch.float16, nvcc=nvcc)
    assert os.listdir(tmp_path / "kernels") == []


def test_cli_builds_fp8_libraries_too(fake_cutlass, tmp_path, capsys):  # noqa: F811
    nvcc = fake_nvcc(tmp_path, 'printf "ELF" > "$out"')
    out_dir = tmp_path / "out"
    assert (
        cli.main(
            ["build-kernels", "--fp8", "--dtypes", "bfloat16", "--nvcc", nvcc, "--directory", str(out_dir)]
        )
        == 0
    )
    assert sorted(p.name for p in out_dir.iterdir() if p.suffix == ".so") == [
        "libhss_sm90_bf16.so",
        "libhss_sm90_fp8_bf16.so",
    ]


def test_why_unavailable_names_each_reason(fake_cutlass, tmp_path, monkeypatch):  # noqa: F811
    cuda = torch.device("cuda", 0)
    assert "on cpu" in cutlass_fp8.why_unavailable(torch.device("cpu"), torch.bfloat16, 64, 256)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "9.0 (Hopper)" in cutlass_fp8.why_unavailable(cuda, torch.bfloat16, 64, 256)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "float32" in cutlass_fp8.why_unavailable(cuda, torch.float32, 64, 256)
    assert "in_features % 256" in cutlass_fp8.why_unavailable(cuda, torch.bfloat16, 64, 576)
    assert "out_features % 64" in cutlass_fp8.why_unavailable(cuda, torch.bfloat16, 96, 256)
    assert "build-kernels --fp8" in cutlass_fp8.why_unavailable(cuda, torch.bfloat16, 64, 256)
    cutlass_fp8.build_library(torch.bfloat16, nvcc=fake_nvcc(tmp_path, 'printf "ELF" > "$out"'))
    assert cutlass_fp8.why_unavailable(cuda, torch.bfloat16, 64, 256) is None


# ------------------------------------------------------------------------------------------ the layer
def test_layer_refuses_cpu_and_non_2_4_with_clear_errors():
    lin = nn.Linear(256, 64).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(sparse_weight())
    with pytest.raises(cutlass_fp8.CutlassUnavailable, match="64x256 weight: on cpu"):
        Fp8SemiSparseLinear(lin)
    dense = nn.Linear(256, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="not 2:4"):
        Fp8SemiSparseLinear(dense)
    with pytest.raises(ValueError, match="needs `linear`"):
        Fp8SemiSparseLinear(weight_fp8=torch.zeros(64, 256, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="one per output channel"):
        Fp8SemiSparseLinear(
            weight_fp8=torch.zeros(64, 256, dtype=torch.float8_e4m3fn),
            weight_scale=torch.ones(32),
            dtype=torch.bfloat16,
        )


def test_accelerate_24_validates_weights_and_leaves_cpu_models_alone():
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="weights must be one of"):
        accelerate_24(model, weights="int4")
    report = accelerate_24(model, weights="fp8")
    assert not report.ok and "cpu" in report.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ checkpoint layout
def test_fp8_checkpoint_layout_round_trips():
    w = sparse_weight(64, 256, dtype=torch.float16)
    values, bitmask, scale = compress_fp8_24(w, "layer.weight")
    assert values.dtype == torch.float8_e4m3fn and values.shape == (64, 128)
    assert scale.dtype == torch.float32 and scale.shape == (64, 1)
    assert bitmask.dtype == torch.uint8 and bitmask.shape == (64, 32)
    wq, row_scale = decompress_fp8_24(values, bitmask, scale, "layer.weight")
    ref_q, ref_s = cutlass_fp8.quantize_weight(w)
    assert torch.equal(wq.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(row_scale, ref_s)


def test_fp8_checkpoint_errors_name_the_tensor():
    values, bitmask, scale = compress_fp8_24(sparse_weight(64, 256), "m.weight")
    with pytest.raises(SparseCheckpointError, match="m.weight: FP8 values are torch.bfloat16"):
        decompress_fp8_24(values.float().bfloat16(), bitmask, scale, "m.weight")
    bad_scale = scale.clone()
    bad_scale[5] = float("nan")
    with pytest.raises(SparseCheckpointError, match=r"m.weight_scale\[5\] is nan"):
        decompress_fp8_24(values, bitmask, bad_scale, "m.weight")
    with pytest.raises(SparseCheckpointError, match="expected float32"):
        decompress_fp8_24(values, bitmask, scale.half(), "m.weight")
    with pytest.raises(SparseCheckpointError, match="not 2:4|claims 2:4"):
        compress_fp8_24(torch.randn(8, 16), "dense.weight")


def test_the_source_ships_with_the_package():
    assert Path(cutlass_fp8.SOURCE).is_file() and cutlass_fp8.SOURCE != cutlass_sm90.SOURCE
    assert len(cutlass_fp8.source_digest()) == 16


def test_a_built_library_answers_its_host_functions():
    """With the library built (HF_SEMISPARSE_KERNEL_DIR), its host-only functions run without a GPU: the ctypes
    declarations against the real binary."""
    path = cutlass_fp8.find_library(torch.bfloat16)
    if path is None:
        pytest.skip("the FP8 library is not built here (hf-semisparse build-kernels --fp8)")
    lib = cutlass_fp8.load_library(torch.bfloat16)
    with open(cutlass_fp8.SOURCE, encoding="utf-8") as f:
        built = int(re.search(r"kNumConfigs = (\d+);", f.read()).group(1))
    assert lib.hss_fp8_num_configs() == built and lib.hss_fp8_out_is_bf16() == 1
    values, meta = ctypes.c_int64(), ctypes.c_int64()
    assert lib.hss_fp8_compressed_sizes(6144, 4096, ctypes.byref(values), ctypes.byref(meta)) == 0
    assert values.value == 6144 * 4096 // 2 and meta.value == 6144 * 4096 // 8
    size = ctypes.c_size_t(7)
    assert lib.hss_fp8_gemm_workspace(99, 4096, 2048, 4096, ctypes.byref(size)) == 1  # no such configuration
    # every configuration, the Stream-K ones too (their workspace size divides by the SM count): sized on a GPU,
    # refused with status 15 without one, never a division by zero that kills the process
    expect = 0 if torch.cuda.is_available() else 15
    for config in range(built):
        for m in (16, 2048):
            size = ctypes.c_size_t(7)
            assert lib.hss_fp8_gemm_workspace(config, 4096, m, 14336, ctypes.byref(size)) == expect, config
            assert (size.value != 7) == (expect == 0), config


def test_fp8_layers_keep_their_workspace_outside_cuda_graph_pools(monkeypatch):
    """The GEMM workspace comes from the backend's allocator outside every graph pool, is kept across calls, and a
    larger one needed during a capture serves that call only (as the fp16/bf16 layers' workspaces)."""
    import types

    from hf_semisparse.kernels import linear
    from hf_semisparse.kernels.fp8_linear import Fp8SemiSparseLinear

    sizes = []

    class Backend:
        def workspace(self, device, stream, size):
            sizes.append(size)
            return torch.empty(size, dtype=torch.uint8)

    monkeypatch.setattr(linear, "get_backend", lambda: Backend())
    layer = types.SimpleNamespace(_workspaces={})
    device = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    kept = Fp8SemiSparseLinear._workspace(layer, device, 7, 100)
    assert sizes == [100] and layer._workspaces[(None, 7)] is kept
    assert Fp8SemiSparseLinear._workspace(layer, device, 7, 50) is kept and sizes == [100]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    during = Fp8SemiSparseLinear._workspace(layer, device, 7, 200)
    assert during.numel() == 200 and sizes == [100, 200] and layer._workspaces[(None, 7)] is kept
    assert Fp8SemiSparseLinear._workspace(layer, device, 7, 0) is None


def test_the_compiled_ops_time_searches_without_a_capture_of_their_own():
    """Inside the custom ops that compiled graphs call, a tile search (an unprepared token count) must not start
    a CUDA graph capture of its own (inductor's graph trees may be warming up there): `graph_timing_allowed()` is
    False in the op's body, and True again after it."""
    from hf_semisparse.kernels import fp8_linear, tuning
    from hf_semisparse.kernels import linear as linear_module

    seen = []

    class Recorder:  # stands in for the layer the op looks up by id
        def run(self, x):
            seen.append(tuning.graph_timing_allowed())
            return x.new_zeros(x.shape[0], 8)

    recorder = Recorder()
    x = torch.zeros(2, 4)
    fp8_linear._LAYERS[-1] = recorder
    linear_module._LAYERS[-1] = recorder
    try:
        torch.ops.hf_semisparse.linear_fp8_24(
            x, torch.zeros(1, dtype=torch.uint8), torch.ones(8), None, -1, 8
        )
        torch.ops.hf_semisparse.linear_24(x, torch.zeros(1), None, None, -1, 8)
    finally:
        fp8_linear._LAYERS.pop(-1, None)
        linear_module._LAYERS.pop(-1, None)
    assert seen == [False, False]
    assert tuning.graph_timing_allowed()


def test_the_fp8_search_times_decode_sizes_from_graph_replays_outside_compiled_calls(monkeypatch):
    """`cutlass_fp8.search_config` times decode sizes (up to `GRAPH_TIMING_MAX_M` tokens) from CUDA graph
    replays, larger ones eagerly, and inside a compiled call (`compiled_call`) always eagerly; the finalists are
    re-timed the same way."""
    from types import SimpleNamespace

    from hf_semisparse.kernels import tuning

    class FakePlan:  # no library here: the search's timing mode is what is tested
        workspace_size = 0

        def __init__(self, handle, n, k, m, config=0):
            self.config = config

        def run(self, *args):
            raise AssertionError("the fake timer never runs a plan")

    seen = []
    monkeypatch.setattr(cutlass_fp8, "Fp8Plan", FakePlan)
    monkeypatch.setattr(
        tuning, "time_cuda_us", lambda fn, **kw: seen.append(("time", kw.get("graph"))) or 1.0
    )

    def pick(timings, runners, dense=None, graph=False):
        seen.append(("pick", graph))
        return min(timings), 1.0, None

    monkeypatch.setattr(tuning, "pick_finalist", pick)
    handle = SimpleNamespace(num_configs=2, dtype=torch.bfloat16)

    def search(m):
        seen.clear()
        q = torch.zeros(m, 256, dtype=torch.uint8)
        cutlass_fp8.search_config(handle, 64, 256, m, q, torch.ones(64), q, torch.ones(m), None, 0)
        return sorted(set(seen))

    assert search(16) == [("pick", True), ("time", True)]
    assert search(tuning.GRAPH_TIMING_MAX_M + 16) == [("pick", False), ("time", False)]
    with tuning.compiled_call():
        assert search(16) == [("pick", False), ("time", False)]
