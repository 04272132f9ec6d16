"""FP8 (e4m3) 2:4 weights on disk (format version 4): our layout with e4m3 kept values and per-channel scales.

Every FP8 2:4 weight `W [rows, cols]` of a target module `m` is stored as three tensors:

    m.weight          float8_e4m3fn [rows, cols / 2]   W's kept values quantised, row-major (as version 2)
    m.weight_bitmask  uint8 [rows, ceil(cols / 8)]     the kept positions (as version 2)
    m.weight_scale    float32 [rows, 1]                W ~= e4m3 value * weight_scale, one scale per output row

The codes and scales are `kernels.cutlass_fp8.quantize_weight` of the 2:4 weight: exactly what
`accelerate_24(model, weights="fp8")` computes for the same weight. A bias stays `m.bias` in the model's dtype;
activations are quantised per token at run time (no stored activation scale). `config.json`'s quantization_config
says `"version": 4` and `"weights": {"format": "fp8-e4m3", "scales": "channel", "activations": "dynamic-token",
"targets": [...]}`.

Loading dequantises (`dequantize_fp8`: e4m3 value * scale in float32, then the model's dtype) and keeps the stored
codes beside the layer (`attach_stored_codes`), so that `accelerate_24(model, weights="fp8")` runs the kernels on
exactly the stored codes: quantising the dequantised weight again would not always give them back (loaded in
another dtype than it was saved in, the row maximum `448 * scale` rounds to another value, hence another scale,
and values on e4m3 ties could then change code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint_format import SCALE_SUFFIX, check_bitmask_groups, check_bitmask_layout, compress_values
from .errors import SparseCheckpointError
from .masks import unpack_mask

FP8_DTYPE = torch.float8_e4m3fn
SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STORED_ATTR = "hf_semisparse_fp8"  # the attribute of a loaded layer that holds its stored codes


def compress_fp8_24(
    weight: torch.Tensor, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise a 2:4 weight `[rows, cols]` to e4m3 per output row (`cutlass_fp8.quantize_weight`) and compress it.

    Args:
        weight: fp16, bf16 or fp32, finite, exactly 2:4 along `cols`, `cols % 4 == 0`.
        name: the tensor's name, for errors.

    Returns:
        `(values, bitmask, scale)`: float8_e4m3fn `[rows, cols / 2]`, uint8 `[rows, ceil(cols / 8)]`, float32
        `[rows, 1]`, on CPU. The 2:4 positions come from the unquantised weight.

    Raises:
        SparseCheckpointError: another dtype or not 2-D, a NaN or infinite value, or not 2:4 (names the tensor).

    Example:
        >>> values, bitmask, scale = compress_fp8_24(model.model.layers[0].mlp.up_proj.weight, "up_proj.weight")
        >>> weight_fp8, row_scale = decompress_fp8_24(values, bitmask, scale, "up_proj.weight")
    """
    from .kernels.cutlass_fp8 import quantize_weight

    if weight.dtype not in SOURCE_DTYPES or weight.dim() != 2:
        raise SparseCheckpointError(
            f"{name}: FP8 checkpoints quantise 2-D fp16, bf16 or fp32 weights, got {weight.dtype} "
            f"{list(weight.shape)}"
        )
    weight = weight.detach().cpu()
    bad = torch.nonzero(~torch.isfinite(weight))
    if bad.numel():
        row, col = (int(i) for i in bad[0])
        raise SparseCheckpointError(
            f"{name}[{row}, {col}] is {weight[row, col].item()}: an FP8 checkpoint needs finite weights"
        )
    _, bitmask = compress_values(weight, name)  # validates shape and 2:4
    mask = unpack_mask(bitmask, tuple(weight.shape))
    codes, scale = quantize_weight(weight)
    values = codes.view(torch.uint8)[mask].reshape(weight.shape[0], weight.shape[1] // 2).view(FP8_DTYPE)
    return values.contiguous(), bitmask, scale.reshape(-1, 1).contiguous()


def check_fp8_values(name: str, values: torch.Tensor) -> None:
    """Stored FP8 values must be float8_e4m3fn and hold no NaN code."""
    if values.dtype != FP8_DTYPE:
        raise SparseCheckpointError(f"{name}: FP8 values are {values.dtype}, expected float8_e4m3fn")
    bad = torch.nonzero(torch.isnan(values.float()))
    if bad.numel():
        raise SparseCheckpointError(
            f"{name}: the stored e4m3 value at {bad[0].tolist()} is NaN (corrupted file)"
        )


def e4m3_from_cast(name: str, values: torch.Tensor) -> torch.Tensor:
    """Stored e4m3 values that the loader cast to a wider float dtype, as e4m3 again (exact both ways).

    transformers 5.17 casts every stored float tensor whose key it does not rename to the load dtype before our
    load op sees it (later releases ask the quantizer, `SemiSparseHfQuantizer.get_new_dtype`). Every e4m3 value is
    exactly an fp16, bf16 and float32 value, so the cast loses nothing; `check_layout` has checked the file's
    dtype (F8_E4M3) before loading.

    Raises:
        SparseCheckpointError: a value is not an e4m3 value, so the tensor cannot be the file's codes.
    """
    if values.dtype == FP8_DTYPE or not values.is_floating_point():
        return values
    codes = values.to(FP8_DTYPE)
    # NaN codes are left for `check_fp8_values`, which says so
    inexact = (codes.to(values.dtype) != values) & ~torch.isnan(values)
    if inexact.any():
        bad = torch.nonzero(inexact)[0].tolist()
        raise SparseCheckpointError(
            f"{name}: the FP8 values reached the loader as {values.dtype}, and the one at {bad} "
            f"({values[tuple(bad)].item()}) is not an e4m3 value"
        )
    return codes


def check_fp8_scale(name: str, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A stored scale must be float32 `[rows, 1]` of finite positive numbers; returns it as `[rows]`.

    Raises:
        SparseCheckpointError: naming the tensor and the first bad row.
    """
    if scale.dtype != torch.float32 or tuple(scale.shape) != (rows, 1):
        raise SparseCheckpointError(
            f"{name} is {scale.dtype} {list(scale.shape)}, expected float32 [{rows}, 1] (one scale per output row)"
        )
    scale = scale.reshape(rows)
    bad = torch.nonzero(~(torch.isfinite(scale) & (scale > 0)))
    if bad.numel():
        row = int(bad[0, 0])
        raise SparseCheckpointError(f"{name}[{row}] is {scale[row].item()}, expected a finite positive scale")
    return scale.contiguous()


def decompress_fp8_24(
    values: torch.Tensor, bitmask: torch.Tensor, scale: torch.Tensor, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `compress_fp8_24`, checking every tensor: `(weight_fp8 [rows, cols], scale [rows] float32)`.

    Raises:
        SparseCheckpointError: a tensor has the wrong dtype or shape, a value is a NaN code, the bitmask is not
            2:4, or a scale is not a finite positive number (the message names the tensor).
    """
    check_fp8_values(name, values)
    if values.dim() != 2:
        raise SparseCheckpointError(
            f"{name}: FP8 values must be 2-D [rows, cols / 2], got {list(values.shape)}"
        )
    check_bitmask_layout(name, tuple(values.shape), str(bitmask.dtype), tuple(bitmask.shape))
    rows, cols = values.shape[0], values.shape[1] * 2
    scale = check_fp8_scale(name + SCALE_SUFFIX, scale, rows)
    mask = unpack_mask(bitmask, (rows, cols))
    check_bitmask_groups(name, mask)
    dense = torch.zeros(rows, cols, dtype=torch.uint8, device=values.device)  # zeros: code 0x00, +0.0
    dense[mask] = values.view(torch.uint8).flatten()
    return dense.view(FP8_DTYPE), scale


def dequantize_fp8(weight_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight_fp8 [rows, cols] * scale [rows]` in float32, rounded once to `dtype`: the loaded weight."""
    return (weight_fp8.float() * scale.float().reshape(-1, 1)).to(dtype)


# ----------------------------------------------------------------------------- stored codes of a loaded layer
@dataclass
class StoredFp8Weight:
    """The FP8 codes a layer was loaded from (compressed, on CPU): values, bitmask, scale as in the checkpoint."""

    values: torch.Tensor
    bitmask: torch.Tensor
    scale: torch.Tensor  # float32 [rows]

    def expand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(weight_fp8 [rows, cols], scale [rows])`."""
        return decompress_fp8_24(self.values, self.bitmask, self.scale.reshape(-1, 1))


def attach_stored_codes(module: nn.Module, stored: StoredFp8Weight) -> None:
    """Keep the codes a layer was loaded from beside it (a plain attribute: not in its state dict, not moved)."""
    object.__setattr__(module, STORED_ATTR, stored)


def stored_codes(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored codes of a loaded FP8 layer, on `weight`'s device, if they still give `weight` exactly.

    Args:
        module: a layer loaded from an FP8 checkpoint (else None is returned).
        weight: its current weight `[out, in]` (Conv1D: transposed), any dtype.

    Returns:
        `(weight_fp8 [out, in], scale [out])`, or None where the layer has no stored codes or its weight changed
        since it was loaded (trained, edited): then the weight must be quantised again.
    """
    stored = getattr(module, STORED_ATTR, None)
    if not isinstance(stored, StoredFp8Weight) or weight.is_meta:
        return None
    weight_fp8, scale = stored.expand()
    if tuple(weight_fp8.shape) != tuple(weight.shape):
        return None
    weight_fp8, scale = weight_fp8.to(weight.device), scale.to(weight.device)
    if not torch.equal(dequantize_fp8(weight_fp8, scale, weight.dtype), weight.detach()):
        return None
    return weight_fp8, scale
