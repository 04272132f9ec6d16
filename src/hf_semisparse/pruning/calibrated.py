"""One-shot 2:4 pruning that looks at activations: Wanda and SparseGPT.

- Wanda (Sun et al., 2023): score = |W| * ||X_col||_2, the 2 of each group of 4 with the largest score survive.
- SparseGPT (Frantar & Alistarh, 2023): walk the input columns left to right; in each group of 4 drop the 2
  weights whose removal costs least under the layer's Hessian H = X^T X, and update the remaining weights
  (the OBS update) so the layer's output changes as little as possible.

Calibration runs transformer block by transformer block: statistics are collected only for the block being
pruned (memory stays bounded: one block's Hessians at a time), and later blocks see the already-pruned earlier
ones, as in both papers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..masks import compute_nm_mask
from ..targets import SparseTarget

logger = logging.getLogger(__name__)

CALIBRATED_METHODS = ("wanda", "sparsegpt")


def sparsegpt_nm(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT for an N:M pattern: returns the pruned and updated weight `[out, in]` (float32), exactly N:M.

    `hessian` is X^T X / samples for the layer's inputs X `[samples, in]`.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    cols = w.shape[1]
    if blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h_inv = _inverse_cholesky(h, damp)
    prune_count = m - n
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, q1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[i1:i2, i1:i2]
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                cost = w1[:, i : i + m] ** 2 / torch.diag(hinv1)[i : i + m].reshape(1, -1) ** 2
                drop = torch.topk(cost, prune_count, dim=1, largest=False).indices
                pruned[:, i : i + m].scatter_(1, drop, True)
            col = w1[:, i]
            q = col.masked_fill(pruned[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return w


def _inverse_cholesky(h: torch.Tensor, damp: float, tries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + d I)^-1 (float64 math, float32 result), d = damp * mean(diag H).

    Activations with near-constant channels (padding tokens, dead GELU units) can leave H numerically
    singular even after the usual 1% damping; then the damping grows tenfold, up to `tries` times.
    """
    h64 = h.double()
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    mean_diag = torch.mean(torch.diag(h64))
    for attempt in range(tries):
        factor, info = torch.linalg.cholesky_ex(h64 + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    logger.warning("SparseGPT: Hessian needed damping %.3g to be positive definite", damp)
                return upper.float()
        damp *= 10.0
    raise torch.linalg.LinAlgError(
        f"SparseGPT: the calibration Hessian is not positive definite even with damping {damp / 10:.3g}; "
        "calibrate on more (or more varied) data"
    )


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| times each input channel's L2 norm over the calibration tokens."""
    return weight.detach().float().abs() * sq_norms.sqrt().reshape(1, -1)


def _block_key(name: str) -> str:
    """Targets in the same numbered block (`...layer.3.`, `...h.3.`) share a key; others stand alone."""
    found = list(re.finditer(r"\.(\d+)\.", name))
    return name[: found[-1].end()] if found else name


class _InputStats:
    def __init__(self, target: SparseTarget, method: str) -> None:
        self.method = method
        cols = target.shape[1]
        device = target.weight.device
        self.count = 0
        self.sq = torch.zeros(cols, device=device) if method == "wanda" else None
        self.xtx = torch.zeros(cols, cols, device=device) if method == "sparsegpt" else None

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.count += x.shape[0]
        if self.sq is not None:
            self.sq += (x * x).sum(dim=0)
        else:
            self.xtx += x.t() @ x


def calibrated_prune_(
    model: nn.Module,
    targets: list[SparseTarget],
    method: str,
    batches: Iterable[dict],
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
    show_progress: bool = True,
) -> None:
    """Prune `targets` in place with `method` ("wanda" or "sparsegpt"), calibrating on `batches`.

    `batches` are model inputs (dicts of tensors); they are moved to the model's device. Non-target weights
    are never written.
    """
    if method not in CALIBRATED_METHODS:
        raise ValueError(f"method must be one of {CALIBRATED_METHODS}, got {method!r}")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{method} needs calibration data: pass at least one batch")
    device = next(model.parameters()).device
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    groups: dict[str, list[SparseTarget]] = {}
    for t in targets:
        groups.setdefault(_block_key(t.name), []).append(t)
    was_training = model.training
    model.eval()
    try:
        for key, group in tqdm(groups.items(), desc=f"{method} 2:{m} pruning", disable=not show_progress):
            stats = {t.name: _InputStats(t, method) for t in group}
            hooks = [t.module.register_forward_hook(stats[t.name]) for t in group]
            try:
                with torch.no_grad():
                    for batch in batches:
                        model(**batch)
            finally:
                for h in hooks:
                    h.remove()
            for t in group:
                s = stats[t.name]
                if s.count == 0:
                    raise RuntimeError(
                        f"{t.name} saw no input during calibration ({key}): is it used by forward?"
                    )
                weight = t.linear_view().detach()
                if method == "wanda":
                    mask = compute_nm_mask(weight, n, m, scores=wanda_scores(weight, s.sq / s.count))
                    new = weight.float() * mask
                else:
                    new = sparsegpt_nm(weight, s.xtx / s.count, n, m, blocksize, damp)
                with torch.no_grad():
                    t.linear_view().copy_(new.to(weight.dtype))
    finally:
        model.train(was_training)
