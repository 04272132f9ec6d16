"""Our own 2:4 GEMM for Hopper: CUTLASS 3 sparse kernels with a bias + exact-GELU or bias + residual epilogue.

cuSPARSELt 0.8 has no GELU epilogue for fp16/bf16, so a BERT up-projection on it pays a separate GELU pass over its
output (about 100 us per bert-base layer at batch 64 on an H100). `csrc/sm90_sparse_gemm.cu` fuses it, and on the
H100 its best tile configuration was also faster than cuSPARSELt's searched algorithm on most BERT shapes
(docs/performance.md).

The kernels are compiled once per machine and dtype (about 3 minutes each; nine tile configurations), into
`libhss_sm90_fp16.so` / `libhss_sm90_bf16.so` under `kernel_dir()` (`HF_SEMISPARSE_KERNEL_DIR`, by default
`~/.cache/hf_semisparse/kernels`). Where nvcc (CUDA toolkit 12.2 or newer) and CUTLASS's headers
(`pip install "hf-semisparse[cutlass]"`) are present, the first Hopper layer that would use them builds them
(`ensure_library`, with a progress bar; `HF_SEMISPARSE_AUTO_BUILD=0` turns that off); `hf-semisparse build-kernels`
builds them ahead of time. Where they cannot be built, one warning says what is lost and how to get them, and those
layers run on cuSPARSELt. Each library is a plain C library called through ctypes, like cuSPARSELt.

`CutlassHandle` and `CutlassPlan` have the interface of `cusparselt.Handle` and `cusparselt.MatmulPlan` that
`SemiSparseLinear` uses; a plan's `AlgConfig.alg_id` is the tile configuration's index.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import threading
import time

import torch

from .cusparselt import AlgConfig
from .nvcc_build import build_shared_library, find_built_library

logger = logging.getLogger(__name__)

KERNEL_DIR_ENV = "HF_SEMISPARSE_KERNEL_DIR"
AUTO_BUILD_ENV = "HF_SEMISPARSE_AUTO_BUILD"  # "0": never build on first use
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "sm90_sparse_gemm.cu")
DTYPES = {torch.float16: ("fp16", "cutlass::half_t"), torch.bfloat16: ("bf16", "cutlass::bfloat16_t")}
# the kernels' own constraints, checked by CUTLASS's can_implement too: 16-byte aligned rows, K in whole tiles
K_MULTIPLE = 128
N_MULTIPLE = 64
ALIGNMENT = 16
META_ALIGNMENT = 256  # the metadata starts this many bytes into the packed buffer, rounded up


_STALE: set[str] = set()  # libraries found built from another source, warned about once


class CutlassUnavailable(RuntimeError):
    """The CUTLASS kernels cannot run here (not built, not Hopper, unsupported dtype or shape)."""


def kernel_dir() -> str:
    value = os.environ.get(KERNEL_DIR_ENV)
    if value:
        return value
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "hf_semisparse", "kernels")


def library_name(dtype: torch.dtype) -> str:
    return f"libhss_sm90_{DTYPES[dtype][0]}.so"


@functools.cache
def source_digest() -> str:
    with open(SOURCE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def cutlass_include_dirs() -> list[str]:
    """CUTLASS's C++ headers: `CUTLASS_PATH` (a CUTLASS checkout) or the `nvidia-cutlass` package."""
    root = os.environ.get("CUTLASS_PATH")
    if not root:
        try:
            import cutlass_library
        except ImportError as exc:
            raise CutlassUnavailable(
                "CUTLASS's headers were not found: `pip install nvidia-cutlass`, or set CUTLASS_PATH to a "
                "CUTLASS checkout"
            ) from exc
        root = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    if not os.path.isfile(os.path.join(dirs[0], "cutlass", "cutlass.h")):
        raise CutlassUnavailable(f"no cutlass/cutlass.h under {dirs[0]}")
    return dirs


def build_command(dtype: torch.dtype, output: str, nvcc: str = "nvcc") -> list[str]:
    """The nvcc command that compiles the kernels for `dtype` into the shared library `output`."""
    return [
        nvcc,
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        f"-DHSS_DTYPE={DTYPES[dtype][1]}",
        "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90a,code=sm_90a",  # wgmma's sparse form needs the 90a target
        "-Xcompiler",
        "-fPIC",
        "-shared",
        *(f"-I{d}" for d in cutlass_include_dirs()),
        "-o",
        output,
        SOURCE,
    ]


def build_library(
    dtype: torch.dtype, directory: str | None = None, nvcc: str | None = None, progress: str | None = None
) -> str:
    """Compile the kernels for `dtype` into `directory` (default `kernel_dir()`); returns the library's path.

    The library is written to a temporary file and renamed into place, with the source's digest beside it, so a
    reader never sees a half-written library and a changed source is rebuilt. `progress`: the description of a
    progress line shown while nvcc runs (None: silent).

    Raises:
        CutlassUnavailable: nvcc or CUTLASS's headers were not found, or nvcc failed (its error output is in the
            message).
    """
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise CutlassUnavailable("nvcc was not found on PATH; install the CUDA toolkit (12.2 or newer)")
    command_template = build_command(dtype, "OUTPUT", nvcc)  # finds the headers before anything is written
    directory = directory or kernel_dir()
    return build_shared_library(
        lambda output: [output if arg == "OUTPUT" else arg for arg in command_template],
        os.path.join(directory, library_name(dtype)),
        source_digest(),
        progress=progress,
        error=CutlassUnavailable,
    )


def find_library(dtype: torch.dtype) -> str | None:
    """The built library for `dtype`, or None (not built, or built from another version of the source)."""
    if dtype not in DTYPES:
        return None
    return find_built_library(
        os.path.join(kernel_dir(), library_name(dtype)),
        source_digest(),
        _STALE,
        "it is rebuilt on first use where nvcc is present, or by `hf-semisparse build-kernels`",
        logger,
    )


_LIBS: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


_AUTO_BUILD: dict[
    tuple[str, torch.dtype], str | None
] = {}  # (directory, dtype) -> why not built, this process
_BUILD_LOCK = threading.Lock()
# What a user without the kernels loses, measured on an H100 and an H200 (docs/performance.md,
# docs/guides/generation.md): the layers that use them
LOST = (
    "BERT-style up-projections with GELU and output projections with a residual add run on cuSPARSELt instead "
    "(1-19% slower per such layer on an H100; bert-large batch 256: 1.25x over dense instead of 1.31x), and so do "
    "the layers of bf16 decoder LLMs, whose decode GEMMs cuSPARSELt 0.8 ran 1.3-2.2x slower than dense on an H200 "
    "(fp16 decoders are unaffected)"
)


def auto_build_enabled() -> bool:
    return os.environ.get(AUTO_BUILD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_library(dtype: torch.dtype) -> tuple[str | None, str | None]:
    """The kernels for `dtype`, built now if they are missing and can be: `(path, None)` or `(None, why not)`.

    Called the first time a layer on a Hopper GPU could use them. Where nvcc and CUTLASS's headers are present it
    compiles them into `kernel_dir()` (a few minutes, once per machine; a warning and a progress line say so), under
    a file lock so that several processes (one per GPU) build once. Where they cannot be built (no nvcc, no
    headers, `HF_SEMISPARSE_AUTO_BUILD=0`, a failed build) one warning says what is lost and how to get them,
    and the answer is remembered for this process: a model's other layers do not try again.
    """
    path = find_library(dtype)
    if path is not None or dtype not in DTYPES:
        return path, None if path else f"dtype {dtype}"
    directory = kernel_dir()
    key = (directory, dtype)
    with _BUILD_LOCK:
        if key in _AUTO_BUILD:
            why = _AUTO_BUILD[key]
            return (find_library(dtype), None) if why is None else (None, why)
        why = _build_or_explain(dtype, directory)
        _AUTO_BUILD[key] = why
    if why is None:
        return find_library(dtype), None
    logger.warning(
        "hf_semisparse: our CUTLASS 2:4 kernels for %s are not available (%s), so %s. To get them: %s",
        dtype,
        why,
        LOST,
        _how_to_get(why),
    )
    return None, why


def _how_to_get(why: str) -> str:
    if "nvcc" in why and "failed" not in why:
        return (
            'install the CUDA toolkit (12.2 or newer, nvcc on PATH) and `pip install "hf-semisparse[cutlass]"`; '
            "they are then built on first use, or ahead of time with `hf-semisparse build-kernels`"
        )
    if "header" in why or "cutlass.h" in why:
        return '`pip install "hf-semisparse[cutlass]"` (or set CUTLASS_PATH to a CUTLASS checkout)'
    if AUTO_BUILD_ENV in why:
        return "run `hf-semisparse build-kernels` once (about 3 minutes per dtype)"
    return "run `hf-semisparse build-kernels` to see the whole error"


def _build_or_explain(dtype: torch.dtype, directory: str) -> str | None:
    """Build the library for `dtype` into `directory`; None when built, else why not (one line)."""
    if not auto_build_enabled():
        return f"not built in {directory}, and {AUTO_BUILD_ENV}=0 turns building on first use off"
    if shutil.which("nvcc") is None:
        return f"not built in {directory}, and nvcc was not found on PATH to build them"
    try:
        cutlass_include_dirs()
    except CutlassUnavailable as exc:
        return f"not built in {directory}, and CUTLASS's headers were not found: {exc}"
    from filelock import FileLock

    os.makedirs(directory, exist_ok=True)
    with FileLock(os.path.join(directory, f".{library_name(dtype)}.lock")):
        if find_library(dtype) is not None:  # another process built it while we waited
            return None
        logger.warning(
            "hf_semisparse: building our CUTLASS 2:4 kernels for %s into %s: first use on this machine, about 4 "
            "minutes, once (`hf-semisparse build-kernels` does it ahead of time; %s=0 turns this off)",
            dtype,
            directory,
            AUTO_BUILD_ENV,
        )
        start = time.monotonic()
        try:
            path = build_library(
                dtype, directory, progress=f"hf_semisparse: nvcc, CUTLASS 2:4 kernels, {dtype}"
            )
        except CutlassUnavailable as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            summary = (
                lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
            )  # nvcc's last words
            return f"building them in {directory} failed: {summary}"
    logger.warning("hf_semisparse: built %s in %.0f s", path, time.monotonic() - start)
    return None


def load_library(dtype: torch.dtype) -> ctypes.CDLL:
    path = find_library(dtype) or ensure_library(dtype)[0]
    if path is None:
        raise CutlassUnavailable(
            f"the CUTLASS 2:4 kernels for {dtype} are not built in {kernel_dir()} (run `hf-semisparse build-kernels`)"
        )
    with _LOCK:
        lib = _LIBS.get(path)
        if lib is None:
            lib = ctypes.CDLL(path)
            p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
            i64p = ctypes.POINTER(ctypes.c_int64)
            lib.hss_num_configs.restype = i
            lib.hss_compressed_sizes.argtypes = [i, i, i64p, i64p]
            lib.hss_compress.argtypes = [p, p, p, i, i, p, sz, p]
            lib.hss_compress_workspace.argtypes = [i, i]
            lib.hss_compress_workspace.restype = sz
            lib.hss_gemm_workspace.argtypes = [i, i, i, i, i, ctypes.POINTER(sz)]
            lib.hss_gemm.argtypes = [i, i, p, p, p, p, p, p, i, i, i, ctypes.c_float, p, sz, p]
            _LIBS[path] = lib
    return lib


def why_unavailable(device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
    """None if the CUTLASS kernels can run an `n` x `k` weight of `dtype` on `device`, else the reason."""
    if device.type != "cuda":
        return f"on {device.type}"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "the kernels are built for compute capability 9.0 (Hopper)"
    if dtype not in DTYPES:
        return f"dtype {dtype}"
    if k % K_MULTIPLE or n % N_MULTIPLE:
        return f"shape {n}x{k}: needs in_features % {K_MULTIPLE} == 0 and out_features % {N_MULTIPLE} == 0"
    path, why = ensure_library(dtype)  # builds them on first use where nvcc and the headers are present
    if path is None:
        return why
    return None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CutlassUnavailable(f"CUTLASS {what} failed (status {status})")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CutlassHandle:
    """The CUTLASS library of one dtype on one device, with `cusparselt.Handle`'s `compress` and identity."""

    library_name = "cutlass-sm90"

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.dtype = dtype
        self.lib = load_library(dtype)
        self.num_configs = self.lib.hss_num_configs()
        self.version = int(source_digest()[:7], 16)  # tuning decisions belong to this source
        self.device_name = torch.cuda.get_device_name(device)

    def layout(self, n: int, k: int) -> tuple[int, int]:
        """(offset of the metadata, total bytes) of the packed buffer of an `n` x `k` weight."""
        values, meta = ctypes.c_int64(), ctypes.c_int64()
        _check(self.lib.hss_compressed_sizes(n, k, ctypes.byref(values), ctypes.byref(meta)), "sizes")
        offset = -(-values.value * 2 // META_ALIGNMENT) * META_ALIGNMENT
        return offset, offset + meta.value

    def compress(self, weight: torch.Tensor) -> torch.Tensor:
        """One uint8 buffer: the kept values, then (at `layout`'s offset) CUTLASS's metadata."""
        if weight.dtype != self.dtype or not weight.is_contiguous():
            raise ValueError(f"expected a contiguous {self.dtype} weight, got {weight.dtype}")
        n, k = weight.shape
        offset, total = self.layout(n, k)
        packed = torch.empty(total, dtype=torch.uint8, device=weight.device)
        ws = torch.empty(
            max(1, self.lib.hss_compress_workspace(n, k)), dtype=torch.uint8, device=weight.device
        )
        with torch.cuda.device(weight.device):  # the library launches on the current device
            status = self.lib.hss_compress(
                weight.data_ptr(),
                packed.data_ptr(),
                packed.data_ptr() + offset,
                n,
                k,
                ws.data_ptr(),
                ws.numel(),
                _stream(weight.device),
            )
        _check(status, "compress")
        return packed


class CutlassPlan:
    """One (weight shape, token count, tile configuration, epilogue): `run` as `cusparselt.MatmulPlan.run`."""

    def __init__(
        self,
        handle: CutlassHandle,
        n: int,
        k: int,
        m: int,
        bias: torch.Tensor | None = None,
        gelu: bool = False,
        alg: AlgConfig | None = None,
    ) -> None:
        config = (alg or AlgConfig()).alg_id
        if not 0 <= config < handle.num_configs:
            raise CutlassUnavailable(f"no CUTLASS tile configuration {config}")
        self.handle, self.n, self.k, self.m, self.config, self.gelu = handle, n, k, m, config, gelu
        self.device_index = handle.device.index
        self.bias = bias
        self.offset = handle.layout(n, k)[0]
        size = ctypes.c_size_t()
        _check(handle.lib.hss_gemm_workspace(config, int(gelu), n, m, k, ctypes.byref(size)), "workspace")
        self.workspace_size = size.value

    def run(self, compressed, x, out, workspace, stream: int, c: torch.Tensor | None = None) -> None:
        """out = act(x @ W^T + bias [+ c]); act is GELU for a `gelu` plan (which takes no `c`)."""
        if torch.cuda.current_device() != self.device_index:  # the library launches on the current device
            with torch.cuda.device(self.device_index):
                self._run(compressed, x, out, workspace, stream, c)
        else:
            self._run(compressed, x, out, workspace, stream, c)

    def _run(self, compressed, x, out, workspace, stream: int, c: torch.Tensor | None) -> None:
        base = compressed.data_ptr()
        status = self.handle.lib.hss_gemm(
            self.config,
            int(self.gelu),
            base,
            base + self.offset,
            x.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            None if c is None else c.data_ptr(),
            out.data_ptr(),
            self.n,
            self.m,
            self.k,
            1.0,
            None if workspace is None else workspace.data_ptr(),
            0 if workspace is None else workspace.numel(),
            stream,
        )
        if status:
            _check(status, f"GEMM N{self.n} K{self.k} M{self.m} config {self.config}")


def search_config(
    handle: CutlassHandle,
    n: int,
    k: int,
    m: int,
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    gelu: bool,
    compressed: torch.Tensor,
    x: torch.Tensor,
    stream: int,
    dense=None,
    c: torch.Tensor | None = None,
) -> tuple[AlgConfig, float, float | None]:
    """`tuning.search_alg` for the CUTLASS kernels: every tile configuration timed, the three fastest again in
    turn with `dense`; the fastest configuration, its median time (us) and that of `dense` (None without it).
    Decode sizes are timed from CUDA graph replays, as `search_alg` times them."""
    from .tuning import GRAPH_TIMING_MAX_M, graph_timing_allowed, pick_finalist, time_cuda_us

    out = torch.empty(m, n, dtype=dtype, device=x.device)
    graph = m <= GRAPH_TIMING_MAX_M and graph_timing_allowed()
    runners, timings = {}, {}
    for config in range(handle.num_configs):
        alg = AlgConfig(config)
        try:
            plan = CutlassPlan(handle, n, k, m, bias=bias, gelu=gelu, alg=alg)
            ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=x.device)

            def fn(plan=plan, ws=ws):
                # captured for graph timing: launched on the capturing stream
                plan.run(compressed, x, out, ws, _stream(x.device) if graph else stream, c=c)

            timings[alg] = time_cuda_us(fn, warmup=1, repeats=3, inner=10 if graph else 3, graph=graph)
        except CutlassUnavailable:
            continue
        runners[alg] = fn
    if not timings:
        raise CutlassUnavailable(f"no CUTLASS configuration runs N{n} K{k} M{m} {dtype}")
    return pick_finalist(timings, runners, dense, graph=graph)
