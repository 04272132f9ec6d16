"""Sparse or dense per layer shape, chosen from timings of the whole forward rather than of each GEMM alone.

The per-GEMM decision (`tuning.py`) times one kernel back to back with warm caches. Inside a model that can mislead:
in an eager forward at small batches the host is the bottleneck and a cuSPARSELt call costs more host time than a
cuBLAS one; replayed from a CUDA graph, a small GEMM that won alone can lose in place (bert-large, batch 4, 0.93x
on an H100, CHANGELOG.md). `tune_dispatch` times the forward itself: the per-GEMM choice, everything dense,
then each layer shape flipped in turn; the fastest wins, and it must beat everything-dense by `margin` or the model
runs dense. `CUDAGraphedModel` does the same with replayed graphs for each input signature it captures.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

Choice = dict[str, bool]  # layer shape group -> runs sparse


@dataclass
class DispatchReport:
    """What `tune_dispatch` measured and chose, for the token counts of one example input."""

    token_counts: list[int]
    choice: Choice  # per layer shape: True = 2:4 kernel, False = dense
    per_gemm_ms: float  # the forward with each GEMM's own decision
    dense_ms: float  # every layer dense
    final_ms: float
    timings: dict[str, float] = field(default_factory=dict)  # every configuration tried, in order

    @property
    def speedup(self) -> float:
        """Everything-dense time over the chosen configuration's time (both through our layers)."""
        return self.dense_ms / self.final_ms

    def __str__(self) -> str:
        sparse = [g for g, s in self.choice.items() if s] or ["none"]
        return (
            f"token counts {self.token_counts}: sparse for {', '.join(sparse)}; {self.final_ms:.2f} ms "
            f"(all dense {self.dense_ms:.2f} ms, per-GEMM choice {self.per_gemm_ms:.2f} ms)"
        )


def group_of(layer) -> str:
    """The shape group of a `SemiSparseLinear`: layers of one group share their kernels and their choice."""
    return f"{layer.out_features}x{layer.in_features}" + ("+bias" if layer.bias is not None else "")


def choice_name(choice: Choice) -> str:
    return ",".join(f"{g}:{'sparse' if s else 'dense'}" for g, s in sorted(choice.items()))


def choose_dispatch(
    start: Choice, measure: Callable[[Choice], float], margin: float = 0.02, final_rounds: int = 3
) -> tuple[Choice, dict[str, float]]:
    """The fastest configuration found from `start` (usually the per-GEMM choice) by measuring whole forwards.

    Tries `start` and everything dense, then from the faster of the two flips each group in turn, keeping a flip
    that is faster (by `margin` when it makes more of the model sparse). Last, the winner and everything dense
    are measured again, alternately, `final_rounds` times each; the winner is kept only if its median beats
    dense's by `margin`, so neither a lucky sample nor one slow spell can make the model slower than dense.
    `measure(choice)` applies the choice, runs, and returns a time.
    Returns the choice and every time measured, keyed by configuration (the last two: the final medians).
    """
    timings: dict[str, float] = {}

    def timed(choice: Choice, label: str | None = None) -> float:
        t = measure(choice)
        timings[label or choice_name(choice)] = t
        return t

    dense = dict.fromkeys(start, False)
    t_start, t_dense = timed(dict(start)), timed(dense)
    best, t_best = (dict(start), t_start) if t_start < t_dense * (1 - margin) else (dense, t_dense)
    for group in sorted(start):
        trial = {**best, group: not best[group]}
        t = timed(trial)
        needed = t_best * (1 - margin) if trial[group] else t_best
        if t < needed:
            best, t_best = trial, t
    if any(best.values()):
        again: dict[str, list[float]] = {"dense": [], "chosen": []}
        for r in range(final_rounds):  # alternate, and alternate who goes first: drift hits both alike
            order = [("dense", dense), ("chosen", best)]
            for label, choice in order if r % 2 == 0 else order[::-1]:
                again[label].append(measure(choice))
        timings["final: all dense"] = statistics.median(again["dense"])
        timings["final: chosen"] = statistics.median(again["chosen"])
        if not timings["final: chosen"] < timings["final: all dense"] * (1 - margin):
            best = dense
    return best, timings


def _sparse_layers(model: nn.Module) -> list:
    from .projections import semi_sparse_layers

    return semi_sparse_layers(model)


@contextmanager
def recording_token_counts(layers: list) -> Iterator[dict]:
    """Within the block, records for each layer the (device index, token count) pairs its forward saw."""
    seen: dict = {layer: set() for layer in layers}

    def hook(layer, args):
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_cuda and x.shape[-1] == layer.in_features:
            seen[layer].add((x.get_device(), x.numel() // layer.in_features))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def apply_choice(seen: dict, choice: Choice) -> None:
    """Set every recorded (layer, token count) to its group's choice."""
    for layer, pairs in seen.items():
        for device_index, m in pairs:
            layer.set_dispatch(m, choice[group_of(layer)], device_index)


def eager_forward_ms(
    run: Callable[[], object], budget_s: float = 0.25, min_runs: int = 5, max_runs: int = 50
) -> float:
    """Median CUDA-event time of `run()`, repeated for about `budget_s` seconds (at least `min_runs` times)."""
    run()  # plans for a new choice are built here, not timed
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() < deadline):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tune_model_dispatch(
    model: nn.Module,
    run: Callable[[], object],
    measure: Callable[[Choice], float] | None = None,
    margin: float = 0.02,
) -> DispatchReport | None:
    """`tune_dispatch` with the forward given as `run()`, and `measure(choice)` timing the model once `choice` is
    applied (default: `eager_forward_ms(run)`). None when the model has no layer that could switch."""
    layers = [layer for layer in _sparse_layers(model) if layer.weight is not None]
    if not layers:
        return None
    with recording_token_counts(layers) as seen:
        run()  # per-GEMM decisions for these token counts are made (and searched if new) here
    seen = {layer: pairs for layer, pairs in seen.items() if pairs}
    if not seen:
        return None
    start: Choice = {}
    for layer, pairs in seen.items():
        group = group_of(layer)
        # a group starts sparse where most of its (layer, token count) pairs were decided sparse
        votes = [layer.runs_sparse(m, index) for index, m in pairs]
        start.setdefault(group, 0)
        start[group] += sum(1 if v else -1 for v in votes)
    start = {g: votes > 0 for g, votes in start.items()}
    timer = measure or (lambda choice: eager_forward_ms(run))

    def measured(choice: Choice) -> float:
        apply_choice(seen, choice)
        return timer(choice)

    choice, timings = choose_dispatch(start, measured, margin)
    apply_choice(seen, choice)
    dense_ms = timings[choice_name(dict.fromkeys(start, False))]
    report = DispatchReport(
        token_counts=sorted({m for pairs in seen.values() for _, m in pairs}),
        choice=choice,
        per_gemm_ms=timings[choice_name(start)],
        dense_ms=dense_ms,
        final_ms=timings["final: chosen"] if any(choice.values()) else dense_ms,
        timings=timings,
    )
    logger.info("hf_semisparse dispatch: %s", report)
    return report


def tune_dispatch(model: nn.Module, *args, margin: float = 0.02, **kwargs) -> DispatchReport | None:
    """Choose sparse or dense per layer shape for the token counts of `model(*args, **kwargs)`, from eager
    timings of that whole forward, and keep the choice for those token counts.

    Call it after `accelerate_24` (with `keep_dense=True`) with a batch shaped like the ones you will serve: each
    distinct token count (batch x sequence) has its own choice. It runs the forward about 30 to 60 times, under
    `torch.inference_mode()`. For forwards replayed from CUDA graphs, `CUDAGraphedModel` tunes by itself.

    Returns a `DispatchReport`, or None when the model has no `SemiSparseLinear` with a dense weight.

    Example:
        >>> accelerate_24(model)
        >>> print(tune_dispatch(model, input_ids=ids))
    """
    with torch.inference_mode():
        return tune_model_dispatch(model, lambda: model(*args, **kwargs), margin=margin)
