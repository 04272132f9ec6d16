"""A thin ctypes binding to cuSPARSELt, the 2:4 sparse GEMM library that PyTorch already ships.

Why ctypes and not torch's `torch._cslt_sparse_mm`: torch builds and destroys a matmul plan on every call
(about 1.3 ms of host time on an H100, against a 41 us kernel) and uses algorithm 0. Here a plan is built once
per (weight, token count) and reused, with the algorithm our own search timed fastest for that shape
(`tuning.search_alg`; cuSPARSELt 0.8's `cusparseLtMatmulSearch` returns an internal error for this layout on
an H100). Why not a
compiled extension: nothing to build on the user's machine, and the library is already on disk wherever torch
has CUDA. The C API used is the documented one of cuSPARSELt 0.6+ (enums and struct sizes from its header).

Layout: y[M, N] = x[M, K] @ W[N, K]^T is computed as D = A @ op(B) with A = W (structured, row-major),
B = x described as a row-major [M, K] matrix with op = TRANSPOSE, and D described column-major [N, M] with
leading dimension N, which is exactly row-major y[M, N] in memory: no copies and no transposes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import glob
import os
import sys
import threading
from dataclasses import dataclass

import torch

# ---- enums (cusparseLt.h, library_types.h, cusparse.h) ----
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUSPARSE_ORDER_COL, CUSPARSE_ORDER_ROW = 1, 2
OP_N, OP_T = 0, 1
CUSPARSELT_SPARSITY_50_PERCENT = 0
CUSPARSE_COMPUTE_32F = 2
MATMUL_ACTIVATION_GELU = 3
MATMUL_BIAS_POINTER = 8
ALG_DEFAULT = 0
(
    ALG_CONFIG_ID,
    ALG_CONFIG_MAX_ID,
    ALG_SEARCH_ITERATIONS,
    ALG_SPLIT_K,
    ALG_SPLIT_K_MODE,
    ALG_SPLIT_K_BUFFERS,
) = range(6)

DTYPES = {torch.float16: CUDA_R_16F, torch.bfloat16: CUDA_R_16BF}
ALIGNMENT = 16  # bytes; every pointer torch's allocator returns is 512-byte aligned

_OPAQUE_BYTES = 1024  # the header says 512 bytes, 16-aligned; twice that costs nothing and is safe


_ALLOCATOR: concurrent.futures.ThreadPoolExecutor | None = None
_ALLOCATOR_LOCK = threading.Lock()


def persistent_empty(size: int, device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor of `size` elements that lives outside every CUDA graph memory pool.

    Under inductor's CUDA graph trees (`torch.compile(mode="reduce-overhead")`, transformers' static-cache
    generate) the warm-up run allocates from the graph's private pool: every allocation of the calling thread
    goes there (torch 2.11), and a buffer kept beyond the call (a workspace, a plan's placeholder) must not come
    from there ("tensor(s) in the cudagraph pool not tracked as outputs"). So it is allocated by a thread of our
    own, from the ordinary pool. The tensor is never freed while plans or captured graphs use it (callers keep
    it), so no stream ordering is needed at free time. During a stream capture, where no other allocation may
    happen, it comes from the capture's pool instead.
    """
    global _ALLOCATOR
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = torch.device("cuda", index)
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(size, dtype=dtype, device=target)
    with _ALLOCATOR_LOCK:
        if _ALLOCATOR is None:
            _ALLOCATOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf_semisparse-alloc")

    def allocate() -> torch.Tensor:
        tensor = torch.empty(size, dtype=dtype, device=target)
        # the block may have been freed on the default stream by kernels still running; it is used on others
        torch.cuda.default_stream(target).synchronize()
        return tensor

    return _ALLOCATOR.submit(allocate).result()


def _opaque():
    # c_longdouble is 16-byte aligned on x86-64, so the array is too
    return (ctypes.c_longdouble * (_OPAQUE_BYTES // 16))()


class CusparseLtError(RuntimeError):
    pass


class CusparseLtUnavailable(RuntimeError):
    """cuSPARSELt cannot be used here; the message says why."""


def _candidate_paths() -> list[str]:
    paths = []
    env = os.environ.get("HF_SEMISPARSE_CUSPARSELT")
    if env:
        paths.append(env)
    # already loaded into this process (torch loads it with CUDA): reuse that copy
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcusparseLt.so" in line:
                    paths.append(line.split()[-1])
    except OSError:
        pass
    paths.append("libcusparseLt.so.0")
    for root in sys.path + [os.path.dirname(os.path.dirname(torch.__file__))]:
        for pattern in (
            "nvidia/cusparselt/lib/libcusparseLt.so*",
            "nvidia/cu*/lib/libcusparseLt.so*",
            "torch/lib/libcusparseLt.so*",
        ):
            paths.extend(sorted(glob.glob(os.path.join(root, pattern))))
    return list(dict.fromkeys(paths))


_LIB = None
_LIB_LOCK = threading.Lock()


def load_library() -> ctypes.CDLL:
    """Load libcusparseLt once; raise `CusparseLtUnavailable` with what was tried."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is not None:
            return _LIB
        tried = []
        for path in _candidate_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError as exc:
                tried.append(f"{path}: {exc}")
                continue
            _declare(lib)
            _LIB = lib
            return lib
        raise CusparseLtUnavailable(
            "libcusparseLt was not found (install torch with CUDA, or set "
            "HF_SEMISPARSE_CUSPARSELT to its path). Tried: " + "; ".join(tried[:6])
        )


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, u32, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t
    sigs = {
        "cusparseLtInit": [p],
        "cusparseLtDestroy": [p],
        "cusparseLtGetVersion": [p, ctypes.POINTER(i32)],
        "cusparseLtDenseDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32],
        "cusparseLtStructuredDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32, i32],
        "cusparseLtMatDescriptorDestroy": [p],
        "cusparseLtMatmulDescriptorInit": [p, p, i32, i32, p, p, p, p, i32],
        "cusparseLtMatmulDescSetAttribute": [p, p, i32, p, sz],
        "cusparseLtMatmulAlgSelectionInit": [p, p, p, i32],
        "cusparseLtMatmulAlgSetAttribute": [p, p, i32, p, sz],
        "cusparseLtMatmulAlgGetAttribute": [p, p, i32, p, sz],
        "cusparseLtMatmulGetWorkspace": [p, p, ctypes.POINTER(sz)],
        "cusparseLtMatmulPlanInit": [p, p, p, p],
        "cusparseLtMatmulPlanDestroy": [p],
        "cusparseLtMatmul": [p, p, p, p, p, p, p, p, p, p, i32],
        "cusparseLtSpMMACompressedSize2": [p, p, ctypes.POINTER(sz), ctypes.POINTER(sz)],
        "cusparseLtSpMMACompress2": [p, p, i32, i32, p, p, p, p],
    }
    for name, argtypes in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    if hasattr(lib, "cusparseLtMatmulAlgSelectionDestroy"):
        lib.cusparseLtMatmulAlgSelectionDestroy.argtypes = [p]
        lib.cusparseLtMatmulAlgSelectionDestroy.restype = ctypes.c_int
    if hasattr(lib, "cusparseLtGetErrorString"):
        lib.cusparseLtGetErrorString.argtypes = [ctypes.c_int]
        lib.cusparseLtGetErrorString.restype = ctypes.c_char_p


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        detail = ""
        if hasattr(lib, "cusparseLtGetErrorString"):
            detail = ": " + (lib.cusparseLtGetErrorString(status) or b"").decode(errors="replace")
        raise CusparseLtError(f"{what} failed with cuSPARSELt status {status}{detail}")


def _ref(obj) -> ctypes.c_void_p:
    return ctypes.cast(ctypes.byref(obj), ctypes.c_void_p)


@dataclass(frozen=True)
class AlgConfig:
    """One cuSPARSELt kernel configuration: algorithm id, and split-K (1: none; k > 1: k splits reduced in
    `split_k_mode` 1 (one kernel) or 2 (two kernels) with `split_k_buffers` buffers; -1: Segment-K, SM 9.0+)."""

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = 1
    split_k_buffers: int = 1

    def to_dict(self) -> dict:
        return {
            "alg_id": self.alg_id,
            "split_k": self.split_k,
            "split_k_mode": self.split_k_mode,
            "split_k_buffers": self.split_k_buffers,
        }


# Two ways to compute y[M, N] = x[M, K] @ W[N, K]^T without copies, W being 2:4 along K:
#   "sparse_a": D[N, M] = W @ x^T with W the structured A (row-major), x read as B = [M, K] row-major with op T,
#               D column-major with ld N, which is y row-major. Bias fuses (one value per row of D).
#   "sparse_b": D[M, N] = x @ W^T with x the dense A, W the structured B read as [K, N] column-major (W's own
#               row-major bytes), D row-major. Bias cannot fuse (it is per row of D = per token): added after.
LAYOUTS = ("sparse_a", "sparse_b")


def _structured_desc_args(layout: str, n: int, k: int) -> tuple[int, int, int, int]:
    """(rows, cols, ld, order) of the structured descriptor of W for `layout`."""
    return (n, k, k, CUSPARSE_ORDER_ROW) if layout == "sparse_a" else (k, n, k, CUSPARSE_ORDER_COL)


class Handle:
    """A cuSPARSELt handle for one device, used by one thread at a time (a worker thread's sibling handles build
    plans there, `plan_threads`; the plans then run on the caller's thread)."""

    def __init__(self, device: torch.device) -> None:
        self.lib = load_library()
        if device.index is None:  # the current device, named: worker threads start on device 0
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.handle = _opaque()
        with torch.cuda.device(device):
            _check(self.lib, self.lib.cusparseLtInit(_ref(self.handle)), "cusparseLtInit")
        version = ctypes.c_int(0)
        self.lib.cusparseLtGetVersion(_ref(self.handle), ctypes.byref(version))
        self.version = version.value
        self.device_name = torch.cuda.get_device_name(device)
        self.ref = _ref(self.handle)
        self._selections: dict[tuple, MatmulPlan] = {}

    def selection(
        self,
        n: int,
        k: int,
        m: int,
        dtype: torch.dtype,
        bias: bool,
        gelu: bool,
        alg: AlgConfig | None = None,
        layout: str = "sparse_a",
    ) -> MatmulPlan:
        """A plan whose algorithm selection (set to `alg`) every plan of this problem and algorithm shares.

        Made once per (problem, algorithm) and never changed afterwards: `cusparseLtMatmulAlgSelectionInit`
        costs about 0.2 s of host time per call on an H100 with cuSPARSELt 0.8, a plan made from an existing
        selection under 1 ms (`benchmarks/probes/probe_alg_selection.py`), and a model has many layers of one shape.
        """
        alg = alg or AlgConfig()
        key = (n, k, m, dtype, layout, bias, gelu, alg)
        proto = self._selections.get(key)
        if proto is None:
            placeholder = persistent_empty(n, self.device, dtype) if bias else None  # never read
            proto = MatmulPlan(self, n, k, m, dtype, bias=placeholder, gelu=gelu, alg=alg, layout=layout)
            proto.placeholder_bias = placeholder  # the prototype never runs; keep its pointer valid anyway
            self._selections[key] = proto
        return proto

    def sibling(self) -> Handle:
        """Another handle of this device, for a worker thread (`plan_threads.build_plans`)."""
        return Handle(self.device)

    def adopt_selection(self, plan: MatmulPlan, bias_tensor: torch.Tensor | None = None) -> None:
        """Keep `plan`'s own algorithm selection (a search's winner) as the shared one of its problem and
        algorithm, so that the plans that follow need no new selection (0.2 s each). Only a plan made with a
        selection of its own qualifies; an existing shared selection is kept."""
        if "alg" not in plan._alive:
            return
        n, k, m, dtype, layout, bias, gelu = plan.problem
        plan.placeholder_bias = bias_tensor  # the descriptor holds its address: keep it valid
        self._selections.setdefault((n, k, m, dtype, layout, bias, gelu, plan.selected_alg), plan)

    def compress(self, weight: torch.Tensor, layout: str = "sparse_a") -> torch.Tensor:
        """cuSPARSELt's compressed form of a 2:4 weight `[N, K]` for `layout` (values plus metadata, opaque)."""
        n, k = weight.shape
        rows, cols, ld, order = _structured_desc_args(layout, n, k)
        desc, lib = _opaque(), self.lib
        _check(
            lib,
            lib.cusparseLtStructuredDescriptorInit(
                self.ref,
                _ref(desc),
                rows,
                cols,
                ld,
                ALIGNMENT,
                DTYPES[weight.dtype],
                order,
                CUSPARSELT_SPARSITY_50_PERCENT,
            ),
            "StructuredDescriptorInit",
        )
        try:
            size, buf_size = ctypes.c_size_t(0), ctypes.c_size_t(0)
            _check(
                lib,
                lib.cusparseLtSpMMACompressedSize2(
                    self.ref, _ref(desc), ctypes.byref(size), ctypes.byref(buf_size)
                ),
                "CompressedSize2",
            )
            out = torch.empty(size.value, dtype=torch.uint8, device=weight.device)
            buf = torch.empty(max(buf_size.value, 1), dtype=torch.uint8, device=weight.device)
            stream = torch.cuda.current_stream(weight.device).cuda_stream
            _check(
                lib,
                lib.cusparseLtSpMMACompress2(
                    self.ref,
                    _ref(desc),
                    int(layout == "sparse_a"),
                    OP_N,
                    weight.data_ptr(),
                    out.data_ptr(),
                    buf.data_ptr(),
                    stream,
                ),
                "Compress2",
            )
        finally:
            lib.cusparseLtMatDescriptorDestroy(_ref(desc))
        return out

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.lib.cusparseLtDestroy(_ref(self.handle))


class MatmulPlan:
    """A reusable plan for y[M, N] = x[M, K] @ W^T (+ bias) (optionally GELU), for one weight and one M.

    With layout "sparse_b" a bias is not fused; `run` adds it after the GEMM.

    `selection`: another plan of the same problem (shape, dtype, layout, bias or not, GELU or not) whose
    algorithm selection this plan is built from, instead of making its own: cuSPARSELt's
    `cusparseLtMatmulAlgSelectionInit` costs about 0.2 s of host time per call on an H100 (cuSPARSELt 0.8),
    and a model has many layers of one shape (`Handle.selection`). The selection must hold `alg` already: a
    shared selection is never changed (changing one and planning from it again crashed the process on an H100
    with cuSPARSELt 0.8 inside the algorithm search, though not in `benchmarks/probes/probe_shared_selection.py`).
    """

    def __init__(
        self,
        handle: Handle,
        n: int,
        k: int,
        m: int,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
        gelu: bool = False,
        alg: AlgConfig | None = None,
        layout: str = "sparse_a",
        selection: MatmulPlan | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if gelu and bias is not None and layout == "sparse_b":
            raise ValueError("layout 'sparse_b' cannot fuse GELU after an unfused bias")
        self.handle, self.n, self.k, self.m, self.dtype, self.layout = handle, n, k, m, dtype, layout
        lib, h = handle.lib, handle.ref
        t = DTYPES[dtype]
        self.mat_w, self.mat_x, self.mat_c = _opaque(), _opaque(), _opaque()
        self.matmul, self.alg_sel, self.plan = _opaque(), _opaque(), _opaque()
        self._alive: list[str] = []
        rows, cols, ld, order = _structured_desc_args(layout, n, k)
        _check(
            lib,
            lib.cusparseLtStructuredDescriptorInit(
                h, _ref(self.mat_w), rows, cols, ld, ALIGNMENT, t, order, CUSPARSELT_SPARSITY_50_PERCENT
            ),
            "descriptor(W)",
        )
        self._alive.append("w")
        _check(
            lib,
            lib.cusparseLtDenseDescriptorInit(h, _ref(self.mat_x), m, k, k, ALIGNMENT, t, CUSPARSE_ORDER_ROW),
            "descriptor(x)",
        )
        self._alive.append("x")
        if layout == "sparse_a":
            c_args, op_a, op_b, mat_a, mat_b = (
                (n, m, n, CUSPARSE_ORDER_COL),
                OP_N,
                OP_T,
                self.mat_w,
                self.mat_x,
            )
        else:
            c_args, op_a, op_b, mat_a, mat_b = (
                (m, n, n, CUSPARSE_ORDER_ROW),
                OP_N,
                OP_N,
                self.mat_x,
                self.mat_w,
            )
        _check(
            lib,
            lib.cusparseLtDenseDescriptorInit(h, _ref(self.mat_c), *c_args[:3], ALIGNMENT, t, c_args[3]),
            "descriptor(y)",
        )
        self._alive.append("c")
        _check(
            lib,
            lib.cusparseLtMatmulDescriptorInit(
                h,
                _ref(self.matmul),
                op_a,
                op_b,
                _ref(mat_a),
                _ref(mat_b),
                _ref(self.mat_c),
                _ref(self.mat_c),
                CUSPARSE_COMPUTE_32F,
            ),
            "MatmulDescriptorInit",
        )
        self.bias_after = bias if (bias is not None and layout == "sparse_b") else None
        if bias is not None and layout == "sparse_a":
            self._bias_ptr = ctypes.c_void_p(bias.data_ptr())
            _check(
                lib,
                lib.cusparseLtMatmulDescSetAttribute(
                    h, _ref(self.matmul), MATMUL_BIAS_POINTER, ctypes.byref(self._bias_ptr), 8
                ),
                "bias pointer",
            )
        if gelu:
            one = ctypes.c_int(1)
            _check(
                lib,
                lib.cusparseLtMatmulDescSetAttribute(
                    h, _ref(self.matmul), MATMUL_ACTIVATION_GELU, ctypes.byref(one), 4
                ),
                "GELU epilogue",
            )
        self.problem = (n, k, m, dtype, layout, bias is not None, gelu)
        if selection is None:
            _check(
                lib,
                lib.cusparseLtMatmulAlgSelectionInit(h, _ref(self.alg_sel), _ref(self.matmul), ALG_DEFAULT),
                "AlgSelectionInit",
            )
            self._alive.append("alg")
            if alg is not None:
                self._set_alg(alg)
            self.selected_alg = alg or AlgConfig()
            _check(
                lib,
                lib.cusparseLtMatmulPlanInit(h, _ref(self.plan), _ref(self.matmul), _ref(self.alg_sel)),
                "PlanInit",
            )
        else:
            if selection.problem != self.problem or selection.handle is not handle:
                raise ValueError(
                    f"a plan for {self.problem} cannot share the selection of a plan for {selection.problem}"
                )
            self.selected_alg = alg or AlgConfig()
            if selection.selected_alg != self.selected_alg:
                raise ValueError(
                    f"a plan for algorithm {self.selected_alg} cannot share a selection of algorithm "
                    f"{selection.selected_alg}; a shared selection is never changed"
                )
            _check(
                lib,
                lib.cusparseLtMatmulPlanInit(h, _ref(self.plan), _ref(self.matmul), _ref(selection.alg_sel)),
                "PlanInit",
            )
        self._alive.append("plan")
        self.workspace_size = self._workspace_size()
        self._alpha, self._zero, self._one = ctypes.c_float(1.0), ctypes.c_float(0.0), ctypes.c_float(1.0)
        # everything the hot path passes, prepared once
        self._beta_zero, self._beta_one = ctypes.byref(self._zero), ctypes.byref(self._one)
        self._matmul_fn = lib.cusparseLtMatmul
        self._args = (h, _ref(self.plan), ctypes.byref(self._alpha))
        self._streams: dict[int, ctypes.Array] = {}

    def _set_alg(self, alg: AlgConfig) -> None:
        lib, h = self.handle.lib, self.handle.ref
        attrs = [(ALG_CONFIG_ID, alg.alg_id)]
        if alg.split_k != 1:  # > 1: that many splits; -1: Segment-K (compute capability 9.0+)
            attrs += [(ALG_SPLIT_K, alg.split_k), (ALG_SPLIT_K_MODE, alg.split_k_mode)]
        if alg.split_k > 1:
            attrs.append((ALG_SPLIT_K_BUFFERS, alg.split_k_buffers))
        for attr, value in attrs:
            v = ctypes.c_int(value)
            _check(
                lib,
                lib.cusparseLtMatmulAlgSetAttribute(h, _ref(self.alg_sel), attr, ctypes.byref(v), 4),
                f"AlgSetAttribute({attr}={value})",
            )

    def _workspace_size(self) -> int:
        size = ctypes.c_size_t(0)
        _check(
            self.handle.lib,
            self.handle.lib.cusparseLtMatmulGetWorkspace(
                self.handle.ref, _ref(self.plan), ctypes.byref(size)
            ),
            "GetWorkspace",
        )
        return size.value

    def max_alg_id(self) -> int:
        v = ctypes.c_int(0)
        _check(
            self.handle.lib,
            self.handle.lib.cusparseLtMatmulAlgGetAttribute(
                self.handle.ref, _ref(self.alg_sel), ALG_CONFIG_MAX_ID, ctypes.byref(v), 4
            ),
            "AlgGetAttribute(MAX_ID)",
        )
        return v.value

    def run(
        self,
        compressed: torch.Tensor,
        x: torch.Tensor,
        out: torch.Tensor,
        workspace: torch.Tensor | None,
        stream: int,
        c: torch.Tensor | None = None,
    ) -> None:
        """out[M, N] = x[M, K] @ W^T (+ bias) (+ c) on `stream`; all tensors contiguous, on the plan's device.

        `c` (optional, shaped and laid out like `out`, 16-byte aligned) is added in the epilogue: cuSPARSELt's
        C operand with beta = 1.
        """
        a, b = (compressed, x) if self.layout == "sparse_a" else (x, compressed)
        streams = self._streams.get(stream)
        if streams is None:
            streams = self._streams[stream] = (ctypes.c_void_p * 1)(stream)
        h, plan, alpha = self._args
        d = out.data_ptr()
        status = self._matmul_fn(
            h,
            plan,
            alpha,
            a.data_ptr(),
            b.data_ptr(),
            self._beta_zero if c is None else self._beta_one,
            d if c is None else c.data_ptr(),
            d,
            workspace.data_ptr() if workspace is not None else None,
            streams,
            1,
        )
        if status:
            _check(self.handle.lib, status, "cusparseLtMatmul")
        if self.bias_after is not None:
            out.add_(self.bias_after)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            lib = self.handle.lib
            if "plan" in self._alive:
                lib.cusparseLtMatmulPlanDestroy(_ref(self.plan))
            if "alg" in self._alive and hasattr(lib, "cusparseLtMatmulAlgSelectionDestroy"):
                lib.cusparseLtMatmulAlgSelectionDestroy(_ref(self.alg_sel))
            for name, desc in (("w", self.mat_w), ("x", self.mat_x), ("c", self.mat_c)):
                if name in self._alive:
                    lib.cusparseLtMatDescriptorDestroy(_ref(desc))
