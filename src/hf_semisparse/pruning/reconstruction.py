"""Block-wise reconstruction after one-shot pruning: tune each pruned block's kept weights so its outputs match the
dense model's.

SparseGPT and Wanda fix each layer on its own; their errors add up through the depth of the model, and a
small model loses much of its accuracy that way. Block-wise reconstruction, as EBFT (Guo et al., 2024, "EBFT:
Effective and Block-Wise Fine-Tuning for Sparse LLMs") does it for sparse LLMs and BRECQ (Li et al., 2021) for
quantised ones, minimises for each transformer block in turn

    mean over the calibration tokens of || block_pruned(X_pruned) - block_dense(X_dense) ||^2

over the block's kept weights with Adam (masks fixed), where X_pruned are the block's inputs in the pruned model
and X_dense its inputs in the dense model: the block also learns to undo the error of the blocks before it. It
uses only the calibration data the one-shot method already has, one block on the compute device at a time, and
runs inside the block-by-block pipeline (`sequential.py`).

The weights are tuned in float32 (a float32 master copy of each target weight; the block's forward runs in the
model's dtype) and written back in the model's dtype. The error is measured on the calibration data before and
after; a block whose error does not go down keeps its one-shot weights, and so does a block whose tuning diverges
(NaN/inf error): the pipeline goes on with the next block either way, and says which blocks were not tuned.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.func import functional_call

from ..targets import SparseTarget

logger = logging.getLogger(__name__)

MAX_LR = 1.0  # the largest `reconstruct_lr` accepted
DEFAULT_LR = 3e-4  # `reconstruct_lr` when none is given (measured on SmolLM2-135M: docs/guides/pruning.md)


def check_reconstruction_options(epochs, lr) -> tuple[int, float]:
    """Validate `reconstruct_epochs` / `reconstruct_lr` before anything changes; return them as plain numbers.

    Args:
        epochs: any integer (`int`, `numpy.int64`, ...; not a bool), >= 0.
        lr: any real number (`float`, `numpy.float32`, ...; not a bool), > 0 and at most `MAX_LR` (1.0).

    Returns:
        `(int(epochs), float(lr))`, the values the pipeline uses and records.

    Raises:
        TypeError: `epochs` is not an integer or `lr` not a real number (a bool is neither).
        ValueError: `epochs` < 0, or `lr` <= 0, above `MAX_LR`, NaN or infinite.
        RuntimeError: `epochs` > 0 under `torch.inference_mode()` (the tuning needs autograd).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral):
        raise TypeError(
            f"reconstruct_epochs must be an integer >= 0 (int or numpy integer), got {epochs!r} "
            f"({type(epochs).__name__})"
        )
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(
            f"reconstruct_lr must be a real number > 0 (float, int or numpy scalar), got {lr!r} "
            f"({type(lr).__name__})"
        )
    try:
        epochs, lr = int(epochs), float(lr)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"reconstruct_lr must be a finite number > 0, got {lr!r}") from None
    if epochs < 0:
        raise ValueError(f"reconstruct_epochs must be >= 0, got {epochs}")
    if not 0 < lr < math.inf:
        raise ValueError(f"reconstruct_lr must be a finite number > 0, got {lr!r}")
    if lr > MAX_LR:  # steps larger than any weight of a trained model; far above, Adam overflows float32
        raise ValueError(f"reconstruct_lr must be at most {MAX_LR:g} (typical: 1e-4 to 1e-3), got {lr!r}")
    if epochs and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "block reconstruction trains the kept weights and cannot run under torch.inference_mode(); "
            "call prune_24 outside it (it runs its own forwards without gradients where it can)"
        )
    return epochs, lr


def _param_paths(block: nn.Module, targets: list[SparseTarget]) -> dict[str, SparseTarget]:
    """`{path of the target's parameter inside block: target}`."""
    names = {id(mod): name for name, mod in block.named_modules()}
    paths = {}
    for t in targets:
        prefix = names[id(t.module)]
        paths[f"{prefix}.{t.param_name}" if prefix else t.param_name] = t
    return paths


def _error(
    outputs: torch.Tensor, wanted: torch.Tensor, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Sum of squared differences over the real tokens (float32) and the number of values it sums."""
    diff = (outputs.float() - wanted.to(outputs.device).float()).reshape(-1, outputs.shape[-1])
    if token_mask is not None and token_mask.numel() == diff.shape[0]:
        diff = diff[token_mask.reshape(-1).to(diff.device)]
    return (diff * diff).sum(), diff.numel()


def reconstruct_block_(
    block: nn.Module,
    targets: list[SparseTarget],
    run: Callable[[int, Callable], torch.Tensor],
    wanted: list[torch.Tensor],
    token_masks: list[torch.Tensor | None],
    epochs: int,
    lr: float,
    label: str,
) -> dict:
    """Tune the kept weights of `targets` (all inside `block`, already pruned) in place; returns the errors.

    The weights are tuned on float32 master copies and written back in their own dtype only when that lowers the
    block's error; otherwise (no improvement, or a NaN/inf error: divergence) the block keeps its one-shot weights
    bit for bit. A divergence is logged as a warning naming the block; nothing is raised for it.

    Args:
        block: the transformer block (its parameters on the device `run` computes on).
        targets: its pruned targets; their zeros stay zeros.
        run: `run(i, forward)` calls `forward` (the block, or the block with its target weights swapped) on
            calibration batch i's cached (pruned-model) inputs and returns its output hidden states
            `[batch, seq, hidden]`.
        wanted: the dense block's outputs for each batch, from the dense model's inputs (same shapes).
        token_masks: each batch's real tokens (`[batch, seq]` bool) or None; padding is not counted.
        epochs: passes over the batches, one Adam step per batch.
        lr: Adam's learning rate.
        label: the block's name, for messages and the record.

    Returns:
        {"block": label, "error_before", "error_after", "applied", "diverged", "skipped"}: the relative squared
        error sum ||out - wanted||^2 / sum ||wanted||^2 over the calibration tokens (floats) before and after;
        "applied" is whether the tuned weights were kept. When not, "error_after" is "error_before" (the block is as
        it was), "diverged" says whether the error became NaN/inf, and "skipped" whether the one-shot error was
        already not finite (the block was not tuned).
    """
    paths = _param_paths(block, targets)
    params = {path: getattr(t.module, t.param_name) for path, t in paths.items()}
    before = _relative_error(block, run, wanted, token_masks)
    if not math.isfinite(before):  # nothing to lower, and not the learning rate's fault
        logger.warning(
            "%s: the one-shot block's error against the dense block is not finite (%s): its outputs overflow "
            "(fp16: calibrate in bf16 or float32) or the dense block's outputs are all zero; not tuned",
            label,
            before,
        )
        return {
            "block": label,
            "error_before": before,
            "error_after": before,
            "applied": False,
            "diverged": False,
            "skipped": True,
        }
    masters = _tuned_masters(block, params, run, wanted, token_masks, epochs, lr)
    after = math.nan
    if masters is not None:
        originals = {path: p.detach().clone() for path, p in params.items()}
        with torch.no_grad():
            for path, p in params.items():
                p.copy_(masters[path].to(p.dtype))
        after = _relative_error(block, run, wanted, token_masks)
        if not after < before:  # also NaN: the one-shot weights back, bit for bit
            with torch.no_grad():
                for path, p in params.items():
                    p.copy_(originals[path])
    diverged = not math.isfinite(after)
    applied = not diverged and after < before
    if diverged:
        logger.warning(
            "%s: block reconstruction diverged (the error became NaN/inf at reconstruct_lr=%g); the block keeps "
            "its one-shot weights. Lower reconstruct_lr (default %g).",
            label,
            lr,
            DEFAULT_LR,
        )
    return {
        "block": label,
        "error_before": before,
        "error_after": after if applied else before,
        "applied": applied,
        "diverged": diverged,
        "skipped": False,
    }


def _tuned_masters(block, params, run, wanted, token_masks, epochs, lr) -> dict[str, torch.Tensor] | None:
    """Adam on float32 copies of `params` (`{path in block: parameter}`), gradients and weights masked to the
    current non-zeros; the block's own parameters are not touched. None when a loss became NaN/inf."""
    masks = {path: p.detach() != 0 for path, p in params.items()}
    masters = {path: p.detach().float().clone().requires_grad_(True) for path, p in params.items()}
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(list(masters.values()), lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for i in range(len(wanted)):
                    swapped = {path: masters[path].to(params[path].dtype) for path in masters}
                    out = run(i, partial(_swapped_call, block, swapped))
                    total, count = _error(out, wanted[i], token_masks[i])
                    loss = total / max(count, 1)
                    if not bool(torch.isfinite(loss)):
                        return None
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    with torch.no_grad():
                        for path, master in masters.items():
                            if master.grad is not None:  # a target this batch did not reach
                                master.grad.mul_(masks[path])
                    optimizer.step()
                    with torch.no_grad():
                        for path, master in masters.items():
                            master.mul_(masks[path])
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {path: master.detach() for path, master in masters.items()}


def summarize_reconstruction(records: list[dict], epochs: int, lr: float) -> dict:
    """The call's reconstruction stats from the per-block `records` (`reconstruct_block_`'s), and one warning that
    lists the blocks whose error it did not lower (diverged blocks were warned about one by one).

    Args:
        records: one `reconstruct_block_` record per block with targets, in block order.
        epochs, lr: the validated `reconstruct_epochs` and `reconstruct_lr`.

    Returns:
        {"reconstruction": records, "blocks_tuned": how many blocks kept tuned weights (int),
        "reconstruct_epochs": epochs (int), "reconstruct_lr": lr (float)}.
    """
    # diverged and skipped blocks (a one-shot error that is not finite) were warned about one by one
    unimproved = [r["block"] for r in records if not (r["applied"] or r["diverged"] or r.get("skipped"))]
    if unimproved:
        logger.warning(
            "block reconstruction did not lower the error of %d of %d blocks (%s); they keep their one-shot "
            "weights. A smaller reconstruct_lr (it was %g) or more epochs may help.",
            len(unimproved),
            len(records),
            ", ".join(unimproved),
            lr,
        )
    return {
        "reconstruction": records,
        "blocks_tuned": sum(1 for r in records if r["applied"]),
        "reconstruct_epochs": int(epochs),
        "reconstruct_lr": float(lr),
    }


def _swapped_call(block: nn.Module, swapped: dict, *args, **kwargs):
    """`block(*args, **kwargs)` with its target parameters replaced by `swapped` (differentiable tensors)."""
    return functional_call(block, swapped, args, kwargs)


@torch.no_grad()
def _relative_error(block, run, wanted, token_masks) -> float:
    """sum ||block(inputs) - wanted||^2 / sum ||wanted||^2 over the real tokens of every batch (inf for all-zero
    `wanted`; NaN/inf when the block's outputs are)."""
    num, den = 0.0, 0.0
    for i, w in enumerate(wanted):
        total, _ = _error(run(i, block), w, token_masks[i])
        ref, _ = _error(torch.zeros_like(w), w, token_masks[i])
        num, den = num + float(total), den + float(ref)
    return num / den if den > 0 else float("inf")
