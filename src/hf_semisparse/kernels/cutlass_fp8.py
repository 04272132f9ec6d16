"""FP8 (e4m3) 2:4 GEMM for Hopper: our CUTLASS 3 kernels with per-channel and per-token scales, and the
quantisation of weights and activations they take.

    y[tokens, out] = (scale_x[tokens, None] * scale_w[None, out]) * (x_fp8 @ W_fp8^T) + bias

`W_fp8` is the 2:4 weight quantised per output channel (`scale_w = absmax(row) / 448`, zeros stay zeros, so the
2:4 pattern is kept) and compressed with CUTLASS's 2:4 compressor; `x_fp8` is the activations quantised per token
at run time (`scale_x = absmax(token) / 448`; `quantize_rows` gives the exact float32 steps, with the scale held at
2^-126 or more) by a one-pass kernel of the same library. The scales and the bias are
applied in the GEMM's epilogue (a CUTLASS epilogue visitor tree, as vLLM's former `scaled_mm_c3x` sparse kernels
did), which writes fp16 or bf16. The source is `csrc/sm90_fp8_sparse_gemm.cu`; it is compiled once per machine
(about 2 minutes of CPU time and up to 8 GB of memory per output dtype) by `hf-semisparse build-kernels --fp8` into `libhss_sm90_fp8_fp16.so` and
`libhss_sm90_fp8_bf16.so` under `cutlass_sm90.kernel_dir()`.

`quantize_weight`, `quantize_rows` and `fp8_linear_reference` are the same math in plain torch (CPU or GPU): the
reference the GPU checks compare against, and the emulation the perplexity of FP8 2:4 is measured with on CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import threading

import torch

from .cutlass_sm90 import CutlassUnavailable, cutlass_include_dirs, kernel_dir
from .nvcc_build import build_shared_library, find_built_library

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "sm90_fp8_sparse_gemm.cu")
OUT_DTYPES = {torch.float16: ("fp16", "cutlass::half_t"), torch.bfloat16: ("bf16", "cutlass::bfloat16_t")}
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
# the kernels' constraints: in_features in whole 256-element K tiles (the largest tile K), out_features in whole
# 64-row blocks of the compressed layout; token counts are free (the quantiser pads them to M_MULTIPLE)
K_MULTIPLE = 256
N_MULTIPLE = 64
M_MULTIPLE = 16
META_ALIGNMENT = 256  # the metadata starts this many bytes into the packed buffer, rounded up

_STALE: set[str] = set()


# ------------------------------------------------------------------------------------------ the math in torch
# the smallest per-row scale: 1 / scale stays finite (rows of bf16 values under 448 * 2^-126 in magnitude)
MIN_SCALE = torch.finfo(torch.float32).tiny


def quantize_rows(x: torch.Tensor, positive_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric e4m3 quantisation, bit for bit what the CUDA quantiser of the activations writes (which
    keeps the sign of a -0.0 input), on any device. For finite inputs, in float32 with every step correctly rounded:

        scale = max(absmax(row) / 448, 2^-126)   (1 for an all-zero row)
        q     = e4m3(clamp(x * (1 / scale), -448, 448))   (round to nearest, ties to even)

    Both quotients are IEEE divisions of tensors: a Python number as divisor would not do, since CUDA torch divides
    by one as a multiplication by its reciprocal, which rounds differently for about half of all absmax values
    (the cause of the codes that differed from the kernel's on an H200, 2026-12-01). `2^-126` keeps `1 / scale`
    finite; it changes the scale of rows whose absmax is under about 5e-36 only.

    Args:
        x: `[rows, cols]`, any float dtype, any device.
        positive_zero: write -0.0 as +0.0 (code 0x00), so that zero has one code.

    Returns:
        `(q, scale)`: `q` float8_e4m3fn `[rows, cols]`, `scale` float32 `[rows]`.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_min(MIN_SCALE)
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    inv_scale = torch.ones_like(scale) / scale
    scaled = (xf * inv_scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
    if positive_zero:
        scaled = scaled + 0.0  # -0.0 + 0.0 == +0.0
    return scaled.to(FP8_DTYPE), scale


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 quantisation of a `[out, in]` weight (`quantize_rows`); zeros stay zeros (code
    0x00, also for the -0.0 that masking a negative weight leaves), so a 2:4 weight stays 2:4 for the
    compressor."""
    return quantize_rows(weight, positive_zero=True)


def fp8_linear_reference(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    scale_w: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """What the FP8 2:4 GEMM computes, in torch: `x` quantised per token, times the dequantised e4m3 weight, in
    `compute_dtype` (float32 for the CPU emulation, float64 for the GPU checks' reference).

    Args:
        x: `[..., in]` activations (fp16/bf16/fp32).
        weight_fp8: float8_e4m3fn `[out, in]`; scale_w: float32 `[out]`; bias: `[out]` or None.
        out_dtype: the result's dtype (default `x.dtype`).
    """
    lead = x.shape[:-1]
    q, scale_x = quantize_rows(x.reshape(-1, x.shape[-1]))
    acc = q.to(compute_dtype) @ weight_fp8.to(compute_dtype).t()
    y = acc * scale_x.to(compute_dtype)[:, None] * scale_w.to(compute_dtype)[None, :]
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(out_dtype or x.dtype).reshape(*lead, weight_fp8.shape[0])


# ------------------------------------------------------------------------------------------ the library
def library_name(dtype: torch.dtype) -> str:
    """The library file for outputs of `dtype` (fp16 or bf16)."""
    return f"libhss_sm90_fp8_{OUT_DTYPES[dtype][0]}.so"


@functools.cache
def source_digest() -> str:
    with open(SOURCE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def build_command(dtype: torch.dtype, output: str, nvcc: str = "nvcc") -> list[str]:
    """The nvcc command that compiles the FP8 kernels with `dtype` outputs into the shared library `output`."""
    return [
        nvcc,
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "-ftz=false",  # subnormal floats kept, as quantize_rows keeps them (the default; fast math would not)
        f"-DHSS_OUT_DTYPE={OUT_DTYPES[dtype][1]}",
        "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90a,code=sm_90a",  # sparse wgmma needs the 90a target
        "-Xcompiler",
        "-fPIC",
        "-shared",
        *(f"-I{d}" for d in cutlass_include_dirs()),
        "-o",
        output,
        SOURCE,
    ]


def build_library(dtype: torch.dtype, directory: str | None = None, nvcc: str | None = None) -> str:
    """Compile the FP8 kernels for `dtype` outputs into `directory` (default `kernel_dir()`); the library's path.

    Written to a temporary file and renamed into place, with the source's digest beside it (a changed source is
    rebuilt, a half-written library never read).

    Raises:
        CutlassUnavailable: no nvcc, no CUTLASS headers, or nvcc failed (its last 4000 characters of stderr).
    """
    if dtype not in OUT_DTYPES:
        raise ValueError(f"FP8 kernels write float16 or bfloat16, not {dtype}")
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise CutlassUnavailable("nvcc was not found on PATH; install the CUDA toolkit (12.4 or newer)")
    directory = directory or kernel_dir()
    return build_shared_library(
        lambda output: build_command(dtype, output, nvcc),
        os.path.join(directory, library_name(dtype)),
        source_digest(),
        error=CutlassUnavailable,
    )


def find_library(dtype: torch.dtype) -> str | None:
    """The built FP8 library for `dtype` outputs, or None (not built, or built from another source)."""
    if dtype not in OUT_DTYPES:
        return None
    return find_built_library(
        os.path.join(kernel_dir(), library_name(dtype)),
        source_digest(),
        _STALE,
        "run hf-semisparse build-kernels --fp8",
        logger,
    )


_LIBS: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the C signatures of the library's functions (`csrc/sm90_fp8_sparse_gemm.cu`) on `lib`."""
    p, i, sz, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int64
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.hss_fp8_num_configs.argtypes = []
    lib.hss_fp8_num_configs.restype = i
    lib.hss_fp8_out_is_bf16.argtypes = []
    lib.hss_fp8_out_is_bf16.restype = i
    lib.hss_fp8_compressed_sizes.argtypes = [i, i, i64p, i64p]
    lib.hss_fp8_compressed_sizes.restype = i
    lib.hss_fp8_compress.argtypes = [p, p, p, i, i, p, sz, p]
    lib.hss_fp8_compress.restype = i
    lib.hss_fp8_compress_workspace.argtypes = [i, i]
    lib.hss_fp8_compress_workspace.restype = sz
    lib.hss_fp8_gemm_workspace.argtypes = [i, i, i, i, ctypes.POINTER(sz)]
    lib.hss_fp8_gemm_workspace.restype = i
    # config, a_c, e, b, scale_w, scale_x, bias, d, m, n, k, ws, ws_bytes, stream
    lib.hss_fp8_gemm.argtypes = [i, p, p, p, p, p, p, p, i, i, i, p, sz, p]
    lib.hss_fp8_gemm.restype = i
    # x, q, scale, m, m_padded, k, ld_x, stream
    lib.hss_fp8_quantize.argtypes = [p, p, p, i, i, i, i64, p]
    lib.hss_fp8_quantize.restype = i
    return lib


def load_library(dtype: torch.dtype) -> ctypes.CDLL:
    """The FP8 library for `dtype` outputs, loaded once per process.

    Raises:
        CutlassUnavailable: not built in `kernel_dir()` for this source.
    """
    path = find_library(dtype)
    if path is None:
        raise CutlassUnavailable(
            f"the FP8 2:4 CUTLASS kernels for {dtype} outputs are not built in {kernel_dir()} "
            "(run `hf-semisparse build-kernels --fp8`)"
        )
    with _LOCK:
        lib = _LIBS.get(path)
        if lib is None:
            lib = declare(ctypes.CDLL(path))
            if lib.hss_fp8_out_is_bf16() != int(dtype is torch.bfloat16):
                raise CutlassUnavailable(f"{path} was not built for {dtype} outputs")
            _LIBS[path] = lib
    return lib


def why_unavailable(device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
    """None if the FP8 kernels can run an `n` x `k` weight for a `dtype` model on `device`, else the reason."""
    if device.type != "cuda":
        return f"on {device.type}"
    if torch.cuda.get_device_capability(device) != (9, 0):
        cap = torch.cuda.get_device_capability(device)
        return f"the FP8 2:4 kernels are built for compute capability 9.0 (Hopper), this GPU is {cap[0]}.{cap[1]}"
    if dtype not in OUT_DTYPES:
        return f"dtype {dtype} (FP8 2:4 runs float16 or bfloat16 models)"
    if k % K_MULTIPLE or n % N_MULTIPLE:
        return f"shape {n}x{k}: needs in_features % {K_MULTIPLE} == 0 and out_features % {N_MULTIPLE} == 0"
    if find_library(dtype) is None:
        return f"not built in {kernel_dir()} (run `hf-semisparse build-kernels --fp8`)"
    return None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CutlassUnavailable(f"CUTLASS FP8 {what} failed (status {status})")


class Fp8Handle:
    """The FP8 library of one output dtype on one device: compression, quantisation, workspace sizes."""

    library_name = "cutlass-sm90-fp8"

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.dtype = dtype
        self.lib = load_library(dtype)
        self.num_configs = self.lib.hss_fp8_num_configs()
        self.version = int(source_digest()[:7], 16)
        self.device_name = torch.cuda.get_device_name(self.device)

    def layout(self, n: int, k: int) -> tuple[int, int]:
        """(offset of the metadata, total bytes) of the packed buffer of an `n` x `k` weight."""
        values, meta = ctypes.c_int64(), ctypes.c_int64()
        _check(self.lib.hss_fp8_compressed_sizes(n, k, ctypes.byref(values), ctypes.byref(meta)), "sizes")
        offset = -(-values.value // META_ALIGNMENT) * META_ALIGNMENT  # one byte per e4m3 value
        return offset, offset + meta.value

    def compress(self, weight_fp8: torch.Tensor) -> torch.Tensor:
        """One uint8 buffer: the kept e4m3 values, then (at `layout`'s offset) CUTLASS's metadata."""
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.dim() != 2 or not weight_fp8.is_contiguous():
            raise ValueError(
                f"expected a contiguous 2-D float8_e4m3fn weight, got {weight_fp8.dtype} {tuple(weight_fp8.shape)}"
            )
        n, k = weight_fp8.shape
        offset, total = self.layout(n, k)
        packed = torch.empty(total, dtype=torch.uint8, device=weight_fp8.device)
        ws = torch.empty(
            max(1, self.lib.hss_fp8_compress_workspace(n, k)), dtype=torch.uint8, device=weight_fp8.device
        )
        with torch.cuda.device(weight_fp8.device):
            status = self.lib.hss_fp8_compress(
                weight_fp8.data_ptr(),
                packed.data_ptr(),
                packed.data_ptr() + offset,
                n,
                k,
                ws.data_ptr(),
                ws.numel(),
                torch.cuda.current_stream(weight_fp8.device).cuda_stream,
            )
        _check(status, "compress")
        return packed

    def quantize(self, x2: torch.Tensor, padded: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token quantisation of `x2` (`[m, k]`, this handle's dtype, rows 16-byte aligned) on the device:
        `(q [padded, k] e4m3, scale [padded] float32)`, rows past `m` zeros with scale 1."""
        m, k = x2.shape
        q = torch.empty(padded, k, dtype=FP8_DTYPE, device=x2.device)
        scale = torch.empty(padded, dtype=torch.float32, device=x2.device)
        status = self.lib.hss_fp8_quantize(
            x2.data_ptr(), q.data_ptr(), scale.data_ptr(), m, padded, k, x2.stride(0), stream
        )
        _check(status, f"quantize {m}x{k}")
        return q, scale


class Fp8Plan:
    """One (weight shape, padded token count, tile configuration): `run` computes the scaled FP8 2:4 GEMM."""

    def __init__(self, handle: Fp8Handle, n: int, k: int, m: int, config: int = 0) -> None:
        if not 0 <= config < handle.num_configs:
            raise CutlassUnavailable(f"no FP8 tile configuration {config}")
        self.handle, self.n, self.k, self.m, self.config = handle, n, k, m, config
        self.offset = handle.layout(n, k)[0]
        size = ctypes.c_size_t()
        _check(handle.lib.hss_fp8_gemm_workspace(config, n, m, k, ctypes.byref(size)), "workspace")
        self.workspace_size = size.value

    def run(
        self,
        compressed: torch.Tensor,
        scale_w: torch.Tensor,
        q: torch.Tensor,
        scale_x: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        workspace: torch.Tensor | None,
        stream: int,
    ) -> None:
        """out[m, n] = scale_x[:, None] * scale_w[None, :] * (q @ W^T) + bias, all device tensors."""
        base = compressed.data_ptr()
        status = self.handle.lib.hss_fp8_gemm(
            self.config,
            base,
            base + self.offset,
            q.data_ptr(),
            scale_w.data_ptr(),
            scale_x.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            self.n,
            self.m,
            self.k,
            None if workspace is None else workspace.data_ptr(),
            0 if workspace is None else workspace.numel(),
            stream,
        )
        if status:
            _check(status, f"GEMM N{self.n} K{self.k} M{self.m} config {self.config}")


def search_config(
    handle: Fp8Handle,
    n: int,
    k: int,
    m: int,
    compressed: torch.Tensor,
    scale_w: torch.Tensor,
    q: torch.Tensor,
    scale_x: torch.Tensor,
    bias: torch.Tensor | None,
    stream: int,
) -> tuple[int, float, dict[int, float]]:
    """Every tile configuration timed on this problem, the three fastest again in turn (as `tuning.search_alg`):
    the fastest configuration, its median time (us), and the first pass's times of all that ran.

    Decode sizes (`tuning.GRAPH_TIMING_MAX_M` tokens or fewer) are timed from CUDA graph replays, as
    `cutlass_sm90.search_config` times them: eager calls of a 10-us GEMM time the host's ctypes launch. On an
    H200 (2026-12-02) eager searches picked configurations 5 and 6 for q/k/v and o at 128 tokens, which then
    measured 21% and 10% slower in graph replays than the configuration 3 an earlier search had picked.

    Raises:
        CutlassUnavailable: no configuration runs this shape.
    """
    from .tuning import GRAPH_TIMING_MAX_M, graph_timing_allowed, pick_finalist, time_cuda_us

    out = torch.empty(m, n, dtype=handle.dtype, device=q.device)
    graph = m <= GRAPH_TIMING_MAX_M and graph_timing_allowed()
    runners, timings = {}, {}
    for config in range(handle.num_configs):
        try:
            plan = Fp8Plan(handle, n, k, m, config)
            ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=q.device)

            def fn(plan=plan, ws=ws):
                # captured for graph timing: launched on the capturing stream
                launch = torch.cuda.current_stream(q.device).cuda_stream if graph else stream
                plan.run(compressed, scale_w, q, scale_x, bias, out, ws, launch)

            timings[config] = time_cuda_us(fn, warmup=1, repeats=3, inner=10 if graph else 3, graph=graph)
        except CutlassUnavailable:
            continue
        runners[config] = fn
    if not timings:
        raise CutlassUnavailable(f"no FP8 CUTLASS configuration runs N{n} K{k} M{m}")
    best, best_us, _ = pick_finalist(timings, runners, graph=graph)
    return best, best_us, timings
