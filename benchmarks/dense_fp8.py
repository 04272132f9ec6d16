"""Dense FP8 (e4m3) linear layers on `torch._scaled_mm` with rowwise scales: the baseline FP8 2:4 is measured against.

    from dense_fp8 import to_dense_fp8            # benchmarks/ on sys.path
    report = to_dense_fp8(model)                  # every eligible nn.Linear except the LM head, in place

`DenseFp8Linear` does what `Fp8SemiSparseLinear` (src/hf_semisparse/kernels/fp8_linear.py) does, without 2:4:
the weight is quantised once per output channel (`cutlass_fp8.quantize_weight`: `scale_w = absmax(row) / 448`),
the activations per token at run time by the same formula (`cutlass_fp8.quantize_rows`; in eager calls compiled
once by `torch.compile(dynamic=True)` into fused kernels, as ours is one kernel; inside a compiled model inductor
fuses it with the rest), then

    y = torch._scaled_mm(x_fp8, W_fp8^T, scale_a=scale_x [tokens, 1], scale_b=scale_w [1, out],
                         out_dtype=model dtype, use_fast_accum=True) + bias

(FP8 fast accumulation, as our kernels'; the bias is added after the GEMM, in the model's dtype). The dense
weight is not kept: e4m3 weights take half the bytes of bf16 ones, plus one float32 scale per output channel.

`scaled_mm` is the one call of `torch._scaled_mm` the benchmarks and tests/gpu/check_fp8_gpu.py share.
`emulate=True` computes the same formula in float32 torch ops on any device: for the CPU tests only, never timed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hf_semisparse.config import DEFAULT_EXCLUDE_MODULES  # noqa: E402
from hf_semisparse.kernels import cutlass_fp8  # noqa: E402
from hf_semisparse.targets import is_linear_module  # noqa: E402

SHAPE_MULTIPLE = 16  # torch._scaled_mm: in_features and out_features multiples of 16
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada and Hopper or newer
OUT_DTYPES = (torch.float16, torch.bfloat16)
DEVICE_TYPE = "cuda"  # where torch._scaled_mm runs (the CPU tests stand in for it)
FAST_ACCUM = [True]  # False once this torch refused use_fast_accum=True with rowwise scales
_FUSED_QUANTIZER: list = []  # quantize_rows compiled once, for eager calls


def fused_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cutlass_fp8.quantize_rows(x)` compiled once by `torch.compile(dynamic=True)` (fused GPU kernels instead of
    one pass per torch op) for eager calls; the plain function while torch.compile traces (inductor fuses it)."""
    if torch.compiler.is_compiling():
        return cutlass_fp8.quantize_rows(x)
    if not _FUSED_QUANTIZER:
        _FUSED_QUANTIZER.append(torch.compile(cutlass_fp8.quantize_rows, dynamic=True))
    return _FUSED_QUANTIZER[0](x)


def scaled_mm(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`a @ b * scale_a * scale_b` in `dtype` by `torch._scaled_mm` with rowwise scales and FP8 fast accumulation,
    or without fast accumulation where this torch refuses it (said once, and `FAST_ACCUM[0]` becomes False).

    Args:
        a: float8_e4m3fn `[m, k]`, row-major; b: float8_e4m3fn `[k, n]`, column-major (a `[n, k]` weight's `.t()`).
        scale_a: float32 `[m, 1]`; scale_b: float32 `[1, n]`.
        dtype: the output's dtype (float16 or bfloat16).

    Returns:
        `[m, n]` in `dtype`.

    Raises:
        RuntimeError / ValueError: what `torch._scaled_mm` raises for these inputs without fast accumulation too.
    """
    if torch.compiler.is_compiling():  # settled eagerly before (`settle_fast_accum`); no try under tracing
        return torch._scaled_mm(
            a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype, use_fast_accum=FAST_ACCUM[0]
        )
    try:
        return torch._scaled_mm(
            a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype, use_fast_accum=FAST_ACCUM[0]
        )
    except (RuntimeError, ValueError) as first:
        if not FAST_ACCUM[0]:
            raise
        try:
            out = torch._scaled_mm(
                a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype, use_fast_accum=False
            )
        except (RuntimeError, ValueError):
            raise first from None  # not about fast accumulation
        FAST_ACCUM[0] = False
        print(
            f"torch._scaled_mm refused use_fast_accum=True with rowwise scales ({first}): dense FP8 without it"
        )
        return out


def emulated_scaled_mm(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """What `scaled_mm` computes, in float32 torch ops on any device (the e4m3 values are exact in float32; the
    sums are in another order than the tensor cores'). For the CPU tests; never timed."""
    return ((a.float() @ b.float()) * scale_a * scale_b).to(dtype)


def settle_fast_accum(device: torch.device, dtype: torch.dtype) -> bool:
    """One small `scaled_mm` on `device`, eagerly, so that `FAST_ACCUM` is decided before torch.compile traces a
    call (a refusal cannot be caught inside a compiled graph). Returns `FAST_ACCUM[0]`."""
    a = torch.zeros(16, 16, device=device, dtype=cutlass_fp8.FP8_DTYPE)
    ones_a = torch.ones(16, 1, device=device)
    scaled_mm(a, a.t(), ones_a, ones_a.t().contiguous(), dtype)
    return FAST_ACCUM[0]


def why_not_dense_fp8(module: nn.Module, emulate: bool = False) -> str | None:
    """None if `module` can become a `DenseFp8Linear`, else the reason (shape, dtype, device, GPU)."""
    if not is_linear_module(module):
        return f"{type(module).__name__} is not nn.Linear or Conv1D"
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
    out_f, in_f = weight.shape
    if weight.dtype not in OUT_DTYPES:
        return f"dtype {weight.dtype}: dense FP8 here runs float16 or bfloat16 models (cast the model first)"
    if out_f % SHAPE_MULTIPLE or in_f % SHAPE_MULTIPLE:
        return (
            f"shape {out_f}x{in_f}: torch._scaled_mm needs in_features and out_features multiples of "
            f"{SHAPE_MULTIPLE}"
        )
    if emulate:
        return None
    if weight.device.type != DEVICE_TYPE:
        return f"on {weight.device.type}: torch._scaled_mm runs on CUDA GPUs (emulate=True for CPU tests)"
    capability = torch.cuda.get_device_capability(weight.device)
    if capability < MIN_CAPABILITY:
        return (
            f"compute capability {capability[0]}.{capability[1]}: FP8 tensor cores need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer"
        )
    return None


class DenseFp8Linear(nn.Module):
    """A dense `nn.Linear` (or transformers `Conv1D`) run in FP8 by `torch._scaled_mm`, for inference.

    `y = scale_x * scale_w * (e4m3(x / scale_x) @ e4m3(W / scale_w)^T) + b`, per-token `scale_x` and
    per-output-channel `scale_w` (absmax / 448, `cutlass_fp8.quantize_rows`), written in the model's dtype.

    Args:
        linear: fp16/bf16 `nn.Linear` / `Conv1D` on a CUDA GPU of compute capability 8.9 or newer,
            `in_features % 16 == 0` and `out_features % 16 == 0`.
        emulate: compute in float32 torch ops instead of `torch._scaled_mm`, on any device (CPU tests only).
        fused_quantizer: quantise the activations with `fused_quantize_rows` (compiled) in eager calls; False runs
            `quantize_rows`' torch ops one by one (always so with `emulate`).

    Shapes: input `[..., in_features]` in the layer's dtype, output `[..., out_features]` in the same dtype.

    Raises:
        ValueError: the layer cannot run on `torch._scaled_mm` (`why_not_dense_fp8` says why); nothing is kept.
    """

    def __init__(self, linear: nn.Module, emulate: bool = False, fused_quantizer: bool = True) -> None:
        super().__init__()
        why = why_not_dense_fp8(linear, emulate)
        if why is not None:
            raise ValueError(f"DenseFp8Linear: {why}")
        weight = linear.weight.detach()
        if not isinstance(linear, nn.Linear):  # Conv1D stores [in, out]
            weight = weight.t()
        weight_fp8, scale = cutlass_fp8.quantize_weight(weight.contiguous())
        self.out_features, self.in_features = weight_fp8.shape
        self.compute_dtype = weight.dtype
        self.emulate = emulate
        self.fused_quantizer = fused_quantizer and not emulate
        self.register_buffer("weight_fp8", weight_fp8.contiguous())  # [out, in]: .t() is column-major
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # [1, out] float32
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights=fp8_e4m3 dense, dtype={self.compute_dtype}{', emulated' if self.emulate else ''}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not self.compute_dtype:
            raise TypeError(
                f"DenseFp8Linear runs {self.compute_dtype} activations, got {x.dtype}; cast the input"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        quantize = fused_quantize_rows if self.fused_quantizer else cutlass_fp8.quantize_rows
        q, scale_x = quantize(x.reshape(-1, self.in_features))
        mm = emulated_scaled_mm if self.emulate else scaled_mm
        y = mm(q, self.weight_fp8.t(), scale_x[:, None], self.weight_scale, self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


@dataclass
class DenseFp8Report:
    """What `to_dense_fp8` did."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # linear layers left as they were, and why
    fast_accum: bool | None = None  # whether torch._scaled_mm took use_fast_accum=True (None: emulated)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} linear layers on dense FP8 (torch._scaled_mm, rowwise scales)"]
        if self.fast_accum is False:
            lines.append("  without fast accumulation (this torch refused it with rowwise scales)")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _head_names(model: nn.Module) -> set[str]:
    """The output embeddings' (LM head's) module names."""
    try:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except (AttributeError, NotImplementedError):
        output = None
    return {name for name, module in model.named_modules() if output is not None and module is output}


def to_dense_fp8(
    model: nn.Module,
    targets: list[str] | None = None,
    include_lm_head: bool = False,
    emulate: bool = False,
    fused_quantizer: bool = True,
) -> DenseFp8Report:
    """Replace linear layers of `model` by `DenseFp8Linear`, in place.

    Args:
        model: a float16/bfloat16 model on a CUDA GPU (compute capability 8.9+), or anywhere with `emulate`.
        targets: names of the layers to convert (each must be eligible, else `ValueError`). Default: every linear
            layer that `prune_24` would prune by default, as `accelerate_24` converts them after it (task heads
            and poolers such as `qa_outputs`, `classifier`, `pooler` excluded, `hf_semisparse.config`'s
            `DEFAULT_EXCLUDE_MODULES`) and not the LM head; the ineligible ones are skipped with the reason.
            To mirror an FP8 2:4 model exactly, pass the names of its `Fp8SemiSparseLinear` layers.
        include_lm_head: convert the LM head (the output embeddings, `lm_head`) too (default layers only).
        emulate: float32 torch ops instead of `torch._scaled_mm` (CPU tests only).
        fused_quantizer: see `DenseFp8Linear`.

    Returns:
        A `DenseFp8Report`: the converted names, the skipped ones with reasons, whether fast accumulation is on.

    Raises:
        ValueError: a name of `targets` is not in the model or cannot run dense FP8; nothing is changed then.

    Example:
        >>> report = to_dense_fp8(model)  # a bf16 Llama on an H200
        >>> print(report)  # "224 linear layers on dense FP8 (torch._scaled_mm, rowwise scales)"
    """
    modules = dict(model.named_modules())
    report = DenseFp8Report()
    chosen: list[str] = []
    if targets is not None:
        for name in targets:
            if name not in modules:
                raise ValueError(f"to_dense_fp8: no module named {name!r} in the model")
            why = why_not_dense_fp8(modules[name], emulate)
            if why is not None:
                raise ValueError(f"to_dense_fp8: {name}: {why}")
            chosen.append(name)
    else:
        heads = _head_names(model)
        excluded = set(DEFAULT_EXCLUDE_MODULES) - ({"lm_head"} if include_lm_head else set())
        for name, module in modules.items():
            if not is_linear_module(module):
                continue
            parts = set(name.split("."))
            if name in heads:
                if not include_lm_head:
                    report.skipped[name] = "the LM head (include_lm_head=True converts it)"
                    continue
            elif parts & excluded:
                report.skipped[name] = "a task head or pooler (not pruned, so not converted by accelerate_24)"
                continue
            why = why_not_dense_fp8(module, emulate)
            if why is not None:
                report.skipped[name] = why
                continue
            chosen.append(name)
    if chosen and not emulate:
        weight = modules[chosen[0]].weight
        report.fast_accum = settle_fast_accum(weight.device, weight.dtype)
    # every layer built before any is swapped: an error leaves the model as it was
    layers = {name: DenseFp8Linear(modules[name], emulate, fused_quantizer) for name in chosen}
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
        report.converted.append(name)
    return report


def fp8_linear_bytes(model: nn.Module) -> int:
    """Bytes of the `DenseFp8Linear` layers' e4m3 weights and scales in `model`."""
    return sum(
        m.weight_fp8.numel() + m.weight_scale.numel() * 4
        for m in model.modules()
        if isinstance(m, DenseFp8Linear)
    )
