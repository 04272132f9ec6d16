"""`Fp8SemiSparseLinear`: a 2:4 `nn.Linear` run as an FP8 (e4m3) 2:4 GEMM on Hopper (`cutlass_fp8.py`).

The weight is quantised once per output channel and compressed; per call the activations are quantised per token
by one kernel (absmax and cast), then one GEMM applies both scales and the bias in its epilogue and writes the
model's dtype. The compressed e4m3 weight takes 0.3125x the bytes of the bf16 weight (half the values at one byte,
then CUTLASS's metadata at one byte per 8 weights), plus one float32 scale per output channel; the dense weight is
not kept.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref

import torch
from torch import nn

from . import cutlass_fp8
from .tuning import compiled_call

logger = logging.getLogger(__name__)

_is_compiling = torch.compiler.is_compiling
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_LAYERS: weakref.WeakValueDictionary[int, Fp8SemiSparseLinear] = weakref.WeakValueDictionary()
_IDS = itertools.count()
# (device name, source version, n, k, padded m) -> the fastest tile configuration, shared by layers of one shape
_CONFIGS: dict[tuple, int] = {}
_HANDLES: dict[tuple[int, torch.dtype], cutlass_fp8.Fp8Handle] = {}
_LOCK = threading.Lock()
SMALL_M = 64  # without a search (inside a CUDA graph capture): the 64-token-wide tile up to this many tokens
DEFAULT_CONFIG, SMALL_M_CONFIG = 0, 3


def _stream(device_index: int) -> int:
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def fp8_handle(device: torch.device, dtype: torch.dtype) -> cutlass_fp8.Fp8Handle:
    """The process-wide `Fp8Handle` for (device, output dtype)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    handle = _HANDLES.get((index, dtype))
    if handle is None:
        with _LOCK:
            handle = _HANDLES.setdefault(
                (index, dtype), cutlass_fp8.Fp8Handle(torch.device("cuda", index), dtype)
            )
    return handle


class Fp8SemiSparseLinear(nn.Module):
    """Drop-in replacement of a 2:4 `nn.Linear` (or transformers `Conv1D`) for inference on Hopper in FP8.

    `y = x @ W^T + b` computed as `scale_x * scale_w * (e4m3(x / scale_x) @ e4m3(W / scale_w)^T) + b` with
    per-token `scale_x` and per-output-channel `scale_w` (absmax / 448), accumulated in float32 with the FP8
    fast-accumulation mainloop, written in the model's dtype (fp16 or bf16). The tile configuration is searched
    per (shape, padded token count) on the first call and shared by layers of the same shape.

    Args:
        linear: a 2:4 `nn.Linear` / `Conv1D` on a Hopper GPU, fp16 or bf16, `in_features % 256 == 0`,
            `out_features % 64 == 0`; None to build from `weight_fp8` and `weight_scale` (a loaded checkpoint).
        weight_fp8: float8_e4m3fn `[out, in]`, 2:4 along `in` (with `weight_scale`, instead of `linear`).
        weight_scale: float32 `[out]`, the dequantisation scale of each output channel.
        bias: `[out]` in `dtype`, or None (with `weight_fp8`).
        dtype: the activations' and outputs' dtype (with `weight_fp8`).

    Raises:
        CutlassUnavailable: the FP8 kernels cannot run this layer here (`cutlass_fp8.why_unavailable`).
        ValueError: the weight is not 2:4, or the arguments are inconsistent.
    """

    def __init__(
        self,
        linear: nn.Module | None = None,
        *,
        weight_fp8: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from ..masks import find_nm_violation

        if linear is not None:
            weight = linear.weight.detach()
            if not isinstance(linear, nn.Linear):  # Conv1D stores [in, out]
                weight = weight.t()
            weight = weight.contiguous()
            dtype = weight.dtype
            bias = None if linear.bias is None else linear.bias.detach()
            bad = find_nm_violation(weight)
            if bad is not None:
                raise ValueError(
                    f"Fp8SemiSparseLinear: the weight is not 2:4: the group at {bad.index} ([out, in] layout) has "
                    f"{bad.nonzeros} non-zeros"
                )
            weight_fp8, weight_scale = cutlass_fp8.quantize_weight(weight)
        elif weight_fp8 is None or weight_scale is None or dtype is None:
            raise ValueError(
                "Fp8SemiSparseLinear needs `linear`, or `weight_fp8`, `weight_scale` and `dtype`"
            )
        if weight_fp8.dtype != cutlass_fp8.FP8_DTYPE or weight_fp8.dim() != 2:
            raise ValueError(
                f"weight_fp8 must be 2-D float8_e4m3fn, got {weight_fp8.dtype} {tuple(weight_fp8.shape)}"
            )
        self.out_features, self.in_features = weight_fp8.shape
        if tuple(weight_scale.shape) not in ((self.out_features,), (self.out_features, 1)):
            raise ValueError(
                f"weight_scale must have shape [{self.out_features}] (one per output channel), "
                f"got {tuple(weight_scale.shape)}"
            )
        why = cutlass_fp8.why_unavailable(weight_fp8.device, dtype, self.out_features, self.in_features)
        if why is not None:
            raise cutlass_fp8.CutlassUnavailable(
                f"FP8 2:4 kernels for a {self.out_features}x{self.in_features} weight: {why}"
            )
        self.compute_dtype = dtype
        handle = fp8_handle(weight_fp8.device, dtype)
        self.register_buffer("compressed", handle.compress(weight_fp8.contiguous()), persistent=False)
        self.register_buffer(
            "weight_scale",
            weight_scale.detach().reshape(-1).to(weight_fp8.device, torch.float32).contiguous(),
        )
        # a copy of its own: the epilogue reads the bias with 16-byte loads (a view could be misaligned)
        self.bias = (
            None
            if bias is None
            else nn.Parameter(
                bias.detach().to(weight_fp8.device, dtype, copy=True).contiguous(), requires_grad=False
            )
        )
        self._plans: dict[tuple[int, int], cutlass_fp8.Fp8Plan] = {}
        self._workspaces: dict[tuple[int, int], torch.Tensor] = {}
        self._id = next(_IDS)
        _LAYERS[self._id] = self

    @property
    def kernel(self) -> str:
        return cutlass_fp8.Fp8Handle.library_name

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights=fp8_e4m3 2:4, dtype={self.compute_dtype}"
        )

    def _apply(self, fn, recurse=True):
        self._plans.clear()
        self._workspaces.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_compiling():  # an opaque custom op: no graph break under torch.compile
            return torch.ops.hf_semisparse.linear_fp8_24(
                x, self.compressed, self.weight_scale, self.bias, self._id, self.out_features
            )
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` without the module call (and without torch.compile's custom op)."""
        if x.dtype is not self.compute_dtype:
            raise TypeError(
                f"Fp8SemiSparseLinear runs {self.compute_dtype} activations, got {x.dtype}; cast the input"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        if x.device.type != "cuda":
            raise RuntimeError("Fp8SemiSparseLinear runs on CUDA only (its weight is compressed for the GPU)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
            x2 = x2.contiguous() if x2.data_ptr() % 16 == 0 else x2.clone()
        m = x2.shape[0]
        if m == 0:
            return x.new_empty(*lead, self.out_features)
        padded = -(-m // cutlass_fp8.M_MULTIPLE) * cutlass_fp8.M_MULTIPLE
        index = x.get_device()
        stream = _stream(index)
        handle = fp8_handle(x.device, self.compute_dtype)
        q, scale_x = handle.quantize(x2, padded, stream)
        plan = self._plans.get((index, padded))
        if plan is None:
            plan = self._prepare(handle, index, padded, q, scale_x, stream)
        ws = self._workspace(x.device, stream, plan.workspace_size)
        out = torch.empty(padded, self.out_features, dtype=x.dtype, device=x.device)
        plan.run(self.compressed, self.weight_scale, q, scale_x, self.bias, out, ws, stream)
        return (out[:m] if padded != m else out).view(*lead, self.out_features)

    def _prepare(self, handle, index: int, padded: int, q, scale_x, stream: int) -> cutlass_fp8.Fp8Plan:
        """First call for this padded token count: the searched tile configuration's plan (searched once per
        shape per process; inside a CUDA graph capture a fixed choice, not remembered)."""
        key = (handle.device_name, handle.version, self.out_features, self.in_features, padded)
        config = _CONFIGS.get(key)
        capturing = torch.cuda.is_current_stream_capturing()
        if config is None and capturing:
            config = SMALL_M_CONFIG if padded <= SMALL_M else DEFAULT_CONFIG
        elif config is None:
            config, us, timings = cutlass_fp8.search_config(
                handle,
                self.out_features,
                self.in_features,
                padded,
                self.compressed,
                self.weight_scale,
                q,
                scale_x,
                self.bias,
                stream,
            )
            _CONFIGS[key] = config
            logger.info("FP8 2:4 N%d K%d M%d: config %d, %.1f us (%s)", *key[2:], config, us, timings)
        plan = cutlass_fp8.Fp8Plan(handle, self.out_features, self.in_features, padded, config)
        if not capturing or key in _CONFIGS:
            self._plans[(index, padded)] = plan
        return plan

    def _workspace(self, device: torch.device, stream: int, size: int) -> torch.Tensor | None:
        """The GEMM's workspace, kept outside every CUDA graph memory pool (`SparseGemmBackend.workspace`): a kept
        tensor allocated in a graph tree's pool breaks inductor's CUDA graph trees (compiled static-cache
        generate). During a capture a too small one serves that call only."""
        if size == 0:
            return None
        key = (device.index, stream)
        ws = self._workspaces.get(key)
        if ws is None or ws.numel() < size:
            from .linear import get_backend

            ws = get_backend().workspace(device, stream, size)
            if not torch.cuda.is_current_stream_capturing():
                self._workspaces[key] = ws
        return ws


@torch.library.custom_op("hf_semisparse::linear_fp8_24", mutates_args=())
def linear_fp8_24(
    x: torch.Tensor,
    compressed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    layer_id: int,
    out_features: int,
) -> torch.Tensor:
    """y = x @ W^T + b for an FP8 2:4 W (`Fp8SemiSparseLinear`), opaque to torch.compile."""
    layer = _LAYERS.get(layer_id)
    if layer is None:
        raise RuntimeError(f"Fp8SemiSparseLinear {layer_id} no longer exists")
    with compiled_call():  # a search here (an unprepared size) times eager calls, captures nothing
        return layer.run(x)


@linear_fp8_24.register_fake
def _(x, compressed, weight_scale, bias, layer_id, out_features):
    return x.new_empty(*x.shape[:-1], out_features)
