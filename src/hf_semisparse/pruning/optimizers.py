"""Optimizers whose step keeps a pruned weight at exactly zero on its own, so no weight pass is needed after it.

A weight stays exactly 0 through a step of torch's `SGD`, `Adam` or `AdamW` when its gradient and its optimizer
state (momentum, first and second moments) are 0 there:

- SGD: the momentum buffer stays `momentum * 0 + (1 - dampening) * 0 = 0`, the update `lr * (0 + wd * 0) = 0`;
- Adam/AdamW: both moments stay 0, the update is `lr * 0 / (sqrt(0) + eps) = 0` for `eps > 0`, and weight decay
  (L2 or decoupled) scales or adds a multiple of the weight, which is 0.

With the gradients masked before every step, the zeros then hold by induction once the optimizer state has been
masked after the last change of the masks. Other optimizers (Adafactor, 8-bit, LOMO, subclasses that may
override `step`) are not assumed to do this.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (and similar wrappers with `.optimizer`)."""
    for _ in range(8):  # wrappers nest a few levels at most
        inner = getattr(optimizer, "optimizer", None)
        if type(optimizer) in ZERO_PRESERVING or inner is None or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def zero_preserving_optimizer(optimizer, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer | None:
    """The (unwrapped) optimizer when one of its steps provably leaves each of `params` at zero wherever the
    parameter, its gradient and its optimizer state are zero; else None.

    True for torch's `SGD`, `Adam` and `AdamW` (exact types: a subclass may override `step`) with `eps > 0`,
    and only when every one of `params` is one of the optimizer's own parameters (not, say, a flat FSDP1 shard).
    """
    inner = unwrap_optimizer(optimizer)
    if type(inner) not in ZERO_PRESERVING:
        return None
    owned = set()
    for group in inner.param_groups:
        if type(inner) is not torch.optim.SGD and not group.get("eps", 0) > 0:
            return None
        owned.update(id(p) for p in group["params"])
    if not all(id(p) in owned for p in params):
        return None
    return inner
