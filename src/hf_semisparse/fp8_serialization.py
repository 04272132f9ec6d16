"""FP8 (e4m3) 2:4 weights on disk: our "sparse-24-bitmask" layout with e4m3 values and per-channel scales.

Every FP8 2:4 weight `W [rows, cols]` of a target module `m` is stored as four tensors:

    m.shape         int64 [[rows], [cols]]                    (as serialization.compress_24)
    m.compressed    float8_e4m3fn [rows, cols / 2]            W's kept values, quantised, row-major order
    m.bitmask       uint8 [rows, ceil(cols / 8)]              the kept positions (as serialization.compress_24)
    m.weight_scale  float32 [rows, 1]                          W ~= compressed values * weight_scale (per row)

`weight_scale` has compressed-tensors' name and shape for channel-wise FP8 weight scales; the three others are the
bf16/fp16 layout's, with e4m3 values. A bias stays `m.bias` in the model's dtype. Activations are quantised per
token at run time (no stored activation scale). The checkpoint's `config.json` marks these modules with

    "sparsity_config": {..., "weights": {"format": "fp8-e4m3", "scales": "channel", "activations": "dynamic-token",
                                         "targets": [module names]}}

Loading a whole model from this layout through `from_pretrained` belongs to the transformers `HfQuantizer`
integration of the loading path; `compress_fp8_24` / `decompress_fp8_24` are the per-tensor halves, and
`Fp8SemiSparseLinear(weight_fp8=..., weight_scale=...)` builds the layer from them.
"""

from __future__ import annotations

import torch

from .kernels.cutlass_fp8 import FP8_DTYPE, quantize_weight
from .masks import unpack_mask
from .serialization import SparseCheckpointError, compress_24, decompress_24

FP8_SUFFIXES = ("shape", "compressed", "bitmask", "weight_scale")
WEIGHTS_FORMAT = {"format": "fp8-e4m3", "scales": "channel", "activations": "dynamic-token"}


def compress_fp8_24(weight: torch.Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """Quantise a 2:4 weight `[rows, cols]` (any float dtype) to e4m3 per output channel and compress it.

    Returns:
        `shape`, `compressed` (float8_e4m3fn), `bitmask` and `weight_scale` (float32 `[rows, 1]`), on CPU.

    Raises:
        SparseCheckpointError: `weight` is not 2-D with columns a multiple of 4, or not 2:4.
    """
    parts = compress_24(weight, name)  # validates, and the mask comes from the unquantised weight
    rows, cols = weight.shape
    mask = unpack_mask(parts["bitmask"], (rows, cols))
    weight_fp8, scale = quantize_weight(weight.detach().cpu())
    parts["compressed"] = weight_fp8[mask].reshape(rows, cols // 2).contiguous()
    parts["weight_scale"] = scale.reshape(rows, 1).contiguous()
    return parts


def decompress_fp8_24(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    weight_scale: torch.Tensor,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `compress_fp8_24`, checking every field: `(weight_fp8 [rows, cols], scale [rows] float32)`.

    Raises:
        SparseCheckpointError: a field has the wrong dtype or shape, the bitmask is not 2:4, or a scale is not a
            finite positive number (the message names the tensor).
    """
    if compressed.dtype != FP8_DTYPE:
        raise SparseCheckpointError(f"{name}.compressed is {compressed.dtype}, expected float8_e4m3fn")
    dense = decompress_24(shape, compressed.view(torch.uint8), bitmask, name)  # zeros: code 0x00, +0.0
    rows = dense.shape[0]
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) not in ((rows, 1), (rows,)):
        raise SparseCheckpointError(
            f"{name}.weight_scale is {weight_scale.dtype} {tuple(weight_scale.shape)}, expected float32 {(rows, 1)}"
        )
    scale = weight_scale.reshape(rows)
    bad = torch.nonzero(~(torch.isfinite(scale) & (scale > 0)))
    if bad.numel():
        row = int(bad[0, 0])
        raise SparseCheckpointError(
            f"{name}.weight_scale[{row}] is {scale[row].item()}, expected a finite positive scale"
        )
    return dense.view(FP8_DTYPE), scale.contiguous()
