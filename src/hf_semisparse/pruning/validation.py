"""Checks that run before a pruning method writes anything, with errors that name the layer."""

from __future__ import annotations

import warnings

import torch

FP16_HINT = (
    "If the model runs in float16, its activations may have overflowed: calibrate in bfloat16 or float32 "
    "(load with torch_dtype=torch.bfloat16 or torch.float32) and cast back afterwards."
)


def check_finite_weight(name: str, weight: torch.Tensor) -> None:
    """Raise `ValueError` naming the parameter `name` (e.g. `...up_proj.weight`) if `weight` holds NaN or inf.

    Pruning a layer whose weight is not finite would spread the NaN (SparseGPT's update mixes columns) or pick
    an arbitrary mask (magnitude, Wanda), so it is refused before any weight of the model is written.
    """
    if weight.device.type == "meta":
        return
    finite = torch.isfinite(weight.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        first = tuple(int(i) for i in torch.nonzero(~finite)[0])
        raise ValueError(
            f"{name} holds {bad} NaN or infinite value(s) (first at index {first}, shape "
            f"{tuple(weight.shape)}); 2:4 pruning needs finite weights. The model is unchanged: repair or "
            "reload the checkpoint, or exclude the layer with exclude_modules."
        )


def check_statistics(name: str, method: str, count: int, stat: torch.Tensor, expected_cols: int) -> None:
    """Raise `RuntimeError`/`ValueError` naming `name` when its calibration statistics are unusable; warn (once
    per input width, `UserWarning`) when SparseGPT's Hessian saw fewer tokens than the layer has input features.

    Args:
        count: calibration rows (tokens) the layer saw.
        stat: Wanda's per-channel squared norms `[in]` or SparseGPT's `X^T X` `[in, in]`, float32.
        expected_cols: the layer's input features.
    """
    if count == 0:
        raise RuntimeError(
            f"{name} saw no input during calibration: is it used by the model's forward for these inputs? "
            "Exclude it with exclude_modules, or pass calibration batches that reach it."
        )
    if stat.shape[-1] != expected_cols:
        raise ValueError(
            f"{name}: {method} statistics have {stat.shape[-1]} input features, the weight has {expected_cols}"
        )
    if not bool(torch.isfinite(stat).all()):
        raise ValueError(
            f"{name}: the {method} calibration statistics of its inputs hold NaN or infinite values after "
            f"{count} tokens. {FP16_HINT}"
        )
    if method == "sparsegpt" and count < expected_cols:
        # not a per-layer message: Python shows it once per input width instead of once per layer
        warnings.warn(
            f"SparseGPT: layers with {expected_cols} input features saw fewer calibration tokens than that, so "
            "their Hessian X^T X is rank-deficient and the solve leans on its damping. Calibrate with at least "
            f"{expected_cols} real (non-padding) tokens per layer (more or longer samples; for mixture-of-experts, "
            "per expert) for a better result.",
            UserWarning,
            stacklevel=2,
        )
