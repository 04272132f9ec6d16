"""One-shot 2:4 pruning that looks at activations: Wanda and SparseGPT.

- Wanda (Sun et al., 2023): score = |W| * ||X_col||_2, the 2 of each group of 4 with the largest score survive.
- SparseGPT (Frantar & Alistarh, 2023): walk the input columns left to right; in each group of 4 drop the 2
  weights whose removal costs least under the layer's Hessian H = X^T X, and update the remaining weights
  (the OBS update) so the layer's output changes as little as possible.

Calibration runs transformer block by transformer block (`sequential.py`): statistics are collected only for
the block being pruned (memory stays bounded: one block's Hessians at a time), and later blocks see the
already-pruned earlier ones, as in both papers.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..kernels.cutlass_fp8 import FP8_MAX, quantize_rows
from ..masks import compute_nm_mask
from ..targets import SparseTarget
from .offload import is_offloaded, read_weight, write_weight
from .reconstruction import DEFAULT_LR, check_reconstruction_options
from .validation import FP16_HINT, check_finite_weight, check_statistics

logger = logging.getLogger(__name__)

CALIBRATED_METHODS = ("wanda", "sparsegpt")


def sparsegpt_nm(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
    fp8_rounding: bool = False,
) -> torch.Tensor:
    """SparseGPT for an N:M pattern: returns the pruned and updated weight `[out, in]` (float32), exactly N:M.

    `hessian` is X^T X / samples for the layer's inputs X `[samples, in]`. The arithmetic is that of the
    reference implementation (github.com/IST-DASLab/sparsegpt, `SparseGPT.fasterprune`) run on one CPU thread,
    element for element.

    `fp8_rounding`: also round each kept weight to the e4m3 grid of its row, in the same column walk, so that the
    update of the columns not yet visited absorbs the rounding error as it absorbs the pruning error (the joint
    sparsification and quantisation of the SparseGPT paper, Frantar & Alistarh 2023, done as GPTQ rounds,
    Frantar et al. 2023). The grid is the one the FP8 kernels' quantiser (`cutlass_fp8.quantize_weight`) gives
    the result of the plain solve (one scale per row, absmax / 448), so the solve runs twice; every kept weight of
    the result is a multiple of it by an e4m3 value. Where the largest weight of a row ends elsewhere on that grid,
    the quantiser's own scale of the result differs and it re-rounds that row.
    """
    if blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m}")
    with _one_cpu_thread(weight.device):
        w = weight.detach().float().clone()
        h = hessian.detach().float().clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h_inv = _inverse_cholesky(h, damp)
        plain = _sparsegpt_walk(w.clone() if fp8_rounding else w, h_inv, m, m - n, blocksize)
        if not fp8_rounding:
            return plain
        # the grid the FP8 quantiser will give the result: its scales of the unrounded result (the updates move
        # weights past the row's maximum before pruning, and a grid from that would clip them)
        scale = quantize_rows(plain)[1]
        return _sparsegpt_walk(w, h_inv, m, m - n, blocksize, (scale, torch.ones_like(scale) / scale))


def _sparsegpt_walk(
    w: torch.Tensor,
    h_inv: torch.Tensor,
    m: int,
    prune_count: int,
    blocksize: int,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SparseGPT's walk over the column blocks of `w` (`[out, in]` float32, updated in place and returned) with the
    upper Cholesky factor `h_inv` of the damped inverse Hessian; `grid` as `_sparsegpt_block`."""
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        q1, err1 = _sparsegpt_block(w[:, i1:i2], h_inv[i1:i2, i1:i2], m, prune_count, grid)
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return w


def _round_to_e4m3_grid(values: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """`values` (any shape ending in `[out]`) rounded to the nearest multiple of `scale` `[out]` by an e4m3 value
    (ties to even, saturating at +-448 x scale); `inv_scale` is `1 / scale`."""
    scaled = (values * inv_scale).clamp(-FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn).float() * scale


def _sparsegpt_block(
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    m: int,
    prune_count: int,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of columns `[out, b]`: its pruned weights and its scaled errors (both `[out, b]`).

    Column by column: choose each group's pruned weights when the walk reaches the group, then push every
    column's error onto the columns right of it. The block is held transposed (column i is the contiguous
    row i) and only the columns not yet visited are updated; each element still sees the same float32 products
    and subtractions, in the same order, as in the reference loop. `grid` (`(scale, 1 / scale)`, each `[out]`):
    also round the kept weights to that e4m3 grid (`sparsegpt_nm`'s `fp8_rounding`).
    """
    rows_t = w1.t().contiguous()  # [b, out]
    err_t = torch.empty_like(rows_t)
    pruned_t = torch.zeros_like(rows_t, dtype=torch.bool)
    diag_sq = torch.diag(hinv1).reshape(1, -1) ** 2
    for i in range(rows_t.shape[0]):
        if i % m == 0:
            cost = rows_t[i : i + m].t().contiguous() ** 2 / diag_sq[:, i : i + m]
            drop = torch.topk(cost, prune_count, dim=1, largest=False).indices
            pruned_t[i : i + m].t().scatter_(1, drop, True)
        row = rows_t[i]
        if grid is None:
            # (w - q) / d with q = w where kept and 0 where pruned
            torch.div(torch.where(pruned_t[i], row, 0.0), hinv1[i, i], out=err_t[i])
        else:
            q = torch.where(pruned_t[i], 0.0, _round_to_e4m3_grid(row, *grid))
            torch.div(row - q, hinv1[i, i], out=err_t[i])
            row.copy_(q)
        rows_t[i + 1 :] -= hinv1[i, i + 1 :].unsqueeze(1) * err_t[i]
    return rows_t.masked_fill_(pruned_t, 0.0).t(), err_t.t().contiguous()


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run CPU torch ops on one thread inside the block (restored on exit; nothing changes for other devices).

    SparseGPT's column loop issues thousands of small ops, and its Hessian inverse and lazy updates are mid-sized
    LAPACK/BLAS calls; split over threads they gain little, and on a busy machine every parallel op waits for a
    descheduled worker (2 cores under load: the 7 solves of one SmolLM2-135M block took 3-18 s on 2 threads,
    under 1 s on 1). On one thread the result is also the same whatever `torch.get_num_threads()` is (MKL's
    factorizations and products can change their last bits with the thread count).
    """
    if device.type != "cpu":
        yield
        return
    # torch's thread count is process-wide: nested or concurrent solves set and restore it once, at the outermost
    with _ONE_THREAD_LOCK:
        _ONE_THREAD_STATE["depth"] += 1
        if _ONE_THREAD_STATE["depth"] == 1:
            _ONE_THREAD_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
    try:
        yield
    finally:
        with _ONE_THREAD_LOCK:
            _ONE_THREAD_STATE["depth"] -= 1
            if _ONE_THREAD_STATE["depth"] == 0:
                torch.set_num_threads(_ONE_THREAD_STATE["saved"])


_ONE_THREAD_LOCK = threading.Lock()
_ONE_THREAD_STATE = {"depth": 0, "saved": 1}


def _inverse_cholesky(h: torch.Tensor, damp: float, tries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + d I)^-1 (float64 math, float32 result), d = damp * mean(diag H).

    Activations with near-constant channels (padding tokens, dead GELU units) can leave H numerically
    singular even after the usual 1% damping; then the damping grows tenfold, up to `tries` times.
    """
    h64 = h.double()  # damped in place on its diagonal: no identity matrix or second copy (70B MLPs: 28672^2)
    diag = h64.diagonal()
    base = diag.clone()
    mean_diag = torch.mean(base)
    for attempt in range(tries):
        diag.copy_(base + damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(h64)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
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
    """Wanda's per-channel sum of squares or SparseGPT's X^T X of one layer's inputs, summed over calls."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.count = 0
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add the rows of `x` `[..., in]`; `token_mask`: bool, the calibration batch's real tokens (`token_mask_of`),
        applied where `x` is laid out as the batch (`applies_to`): padding left out."""
        if token_mask is not None and applies_to(token_mask, x):
            x = x.detach().reshape(-1, x.shape[-1])[token_mask.reshape(-1).to(x.device)]
        else:
            x = x.detach().reshape(-1, x.shape[-1])
        x = x.float()
        if self.value is None:
            cols = x.shape[-1]
            shape = (cols,) if self.method == "wanda" else (cols, cols)
            self.value = torch.zeros(shape, device=x.device)
        self.count += x.shape[0]
        if self.method == "wanda":
            self.value += (x * x).sum(dim=0)
        else:
            self.value.addmm_(x.t(), x)


def token_mask_of(batch: dict, model: nn.Module | None = None) -> torch.Tensor | None:
    """The tokens of a calibration batch that count, bool in the shape of its `attention_mask` (`[batch, seq]`, or
    `[batch, choices, seq]` for multiple choice): mask != 0. None where there is none (or a 4-D one), or for an
    encoder-decoder (its decoder's tokens are not the ones the mask describes)."""
    if model is not None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not torch.is_tensor(mask) or mask.dim() not in (2, 3):
        return None
    return mask != 0


def applies_to(token_mask: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a layer input `x` holds the batch's tokens in the batch's order: `[*mask.shape, features]` (a
    transformers block's `[batch, seq, hidden]`), or the same rows flattened, `[batch * seq, features]` (an MoE
    block's shared expert). Anything else (another layout, another sequence) is counted whole."""
    lead = tuple(x.shape[:-1])
    if lead == tuple(token_mask.shape):
        return True
    if x.dim() == 2 and token_mask.dim() == 2:
        return lead[0] == token_mask.numel()
    # multiple choice: the model runs [batch * choices, seq]
    return token_mask.dim() == 3 and lead == (token_mask.shape[0] * token_mask.shape[1], token_mask.shape[2])


class _ExpertStats:
    """The input statistics of one fused expert weight, one `_InputStats` per expert (its routed tokens only)."""

    def __init__(self, method: str, num_experts: int) -> None:
        self.experts = [_InputStats(method) for _ in range(num_experts)]

    @property
    def count(self) -> int:
        return sum(e.count for e in self.experts)


def _expert_up_params(module: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused up (or gate-up) weight of an experts module and its bias (or None), on `device`. Read through
    accelerate's offload map when the module is offloaded: a forward pre-hook runs before accelerate's own hook
    has put the weights in place (they are still on the meta device there)."""
    up = "gate_up_proj" if bool(getattr(module, "has_gate", True)) else "up_proj"
    has_bias = getattr(module, "has_bias", False)
    if is_offloaded(module):
        bias = read_weight(module, device, f"{up}_bias") if has_bias else None
        return read_weight(module, device, up), bias
    return getattr(module, up).detach(), getattr(module, f"{up}_bias").detach() if has_bias else None


def _expert_hidden(
    module: nn.Module,
    x: torch.Tensor,
    expert: int,
    up: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The input of expert `expert`'s down projection for its routed tokens `x` `[tokens, hidden]`: the up (or
    gate-up) projection, its bias, then the module's own gating (`_apply_gate`) or activation, as transformers'
    experts forwards (eager, batched_mm, grouped_mm in `transformers.integrations.moe`) compute it. `up`: the
    module's `_expert_up_params` (read once per call of the module)."""
    weights, biases = up if up is not None else _expert_up_params(module, x.device)
    weight = weights[expert]
    out = x @ weight if getattr(module, "is_transposed", False) else nn.functional.linear(x, weight)
    if biases is not None:
        out = out + biases[expert]
    return module._apply_gate(out) if bool(getattr(module, "has_gate", True)) else module.act_fn(out)


def _routed_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`(hidden_states [tokens, hidden], top_k_index [tokens, k])` of a call to an experts module."""
    names = ("hidden_states", "top_k_index")
    values = [args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(names)]
    if not all(torch.is_tensor(v) for v in values):
        raise TypeError(
            "an experts module was called without (hidden_states, top_k_index, top_k_weights): hf_semisparse "
            "reads the routing of transformers 5 experts modules (@use_experts_implementation) from these arguments"
        )
    hidden, index = values
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, index.reshape(hidden.shape[0], -1)


class StatsCollector:
    """Forward hooks that gather the input statistics of several targets.

    Targets called one after the other on the very same input tensor (q/k/v, gate/up) share one accumulator,
    so each distinct input is reduced once. `order` lists the targets in the order the forward first calls them.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.stats: dict[str, _InputStats] = {}
        self.order: list[str] = []
        # the real tokens of the batch being run (`token_mask_of`): padding tokens are not counted, in inputs laid
        # out as the batch (`applies_to`)
        self.token_mask: torch.Tensor | None = None
        self._last_x: torch.Tensor | None = None
        self._last_name: str | None = None
        self._handles: list = []

    def attach(self, targets: list[SparseTarget]) -> StatsCollector:
        experts: dict[int, list[SparseTarget]] = {}
        for t in targets:
            if t.is_expert:
                experts.setdefault(id(t.module), []).append(t)
            else:
                self._handles.append(t.module.register_forward_hook(self._hook(t.name)))
        for group in experts.values():
            hook = self._expert_hook(group)
            self._handles.append(group[0].module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def _expert_hook(self, targets: list[SparseTarget]):
        """Statistics per expert from the tokens the router sends to it: the fused input projection sees the
        routed hidden states, the down projection their gated up projection (recomputed here, so that the
        statistics do not depend on which transformers experts implementation runs the forward)."""
        by_param = {t.param_name: t.name for t in targets}

        def hook(module, args, kwargs) -> None:
            hidden, index = _routed_inputs(args, kwargs)
            num_experts = getattr(targets[0].weight, "shape", (0,))[0]
            for name in by_param.values():
                if name not in self.order:
                    self.order.append(name)
                self.stats.setdefault(name, _ExpertStats(self.method, num_experts))
            up = _expert_up_params(module, hidden.device) if "down_proj" in by_param else None
            mask = self.token_mask  # fused experts see the batch's tokens flattened, in order
            keep = (
                mask.reshape(-1).to(hidden.device) if mask is not None and applies_to(mask, hidden) else None
            )
            for expert in range(num_experts):
                routed = (index == expert).any(dim=-1)
                rows = (routed if keep is None else routed & keep).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                x = hidden[rows]
                for param, name in by_param.items():
                    if param != "down_proj":
                        self.stats[name].experts[expert].add(x)
                if "down_proj" in by_param:
                    self.stats[by_param["down_proj"]].experts[expert].add(
                        _expert_hidden(module, x, expert, up)
                    )

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last_x = None

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0]
            if name not in self.order:
                self.order.append(name)
            last = self.stats.get(self._last_name) if self._last_name is not None else None
            same_input = x is self._last_x and last is not None
            if same_input and self.stats.get(name) is last:
                pass  # shares the accumulator that already counted this input
            elif same_input and name not in self.stats:
                self.stats[name] = last
            else:
                self.stats.setdefault(name, _InputStats(self.method)).add(x, self.token_mask)
            self._last_x, self._last_name = x, name

        return hook


def pruned_weight(
    target: SparseTarget,
    weight: torch.Tensor,
    stats: _InputStats | _ExpertStats | None,
    method: str,
    n: int,
    m: int,
    blocksize: int,
    damp: float,
    fp8_rounding: bool = False,
) -> torch.Tensor:
    """The N:M-pruned `[out, in]` float32 weight of `target` (`[experts, out, in]` for a fused expert weight,
    each expert pruned with the statistics of the tokens routed to it), validated; nothing is written.

    An expert that received no calibration token is pruned by magnitude, with a warning naming it.

    Raises:
        RuntimeError: the target saw no calibration input.
        ValueError: its statistics or result hold NaN/inf (the message names the layer and the likely cause).
        torch.linalg.LinAlgError: SparseGPT's Hessian stays indefinite (named).
    """
    check_finite_weight(target.weight_name, weight)
    if stats is None or stats.count == 0:
        check_statistics(target.name, method, 0, torch.zeros(0), weight.shape[-1])
    if not isinstance(stats, _ExpertStats):
        return _pruned_matrix(target.name, weight, stats, method, n, m, blocksize, damp, fp8_rounding)
    new = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    unrouted = []
    for expert, expert_stats in enumerate(stats.experts):
        if expert_stats.count == 0:
            unrouted.append(expert)
            new[expert] = weight[expert].float() * compute_nm_mask(weight[expert], n, m)
            continue
        label = f"{target.name}[expert {expert}]"
        new[expert] = _pruned_matrix(
            label, weight[expert], expert_stats, method, n, m, blocksize, damp, fp8_rounding
        )
    if unrouted:
        logger.warning(
            "%s: expert(s) %s received no calibration token; their %d:%d masks are chosen by magnitude. Calibrate "
            "on more (or more varied) data to give every expert tokens.",
            target.name,
            unrouted,
            n,
            m,
        )
    return new


def _pruned_matrix(
    name: str,
    weight: torch.Tensor,
    stats: _InputStats,
    method: str,
    n: int,
    m: int,
    blocksize: int,
    damp: float,
    fp8_rounding: bool = False,
) -> torch.Tensor:
    """Wanda or SparseGPT on one `[out, in]` matrix with its input statistics; validated, float32."""
    stat = stats.value / stats.count
    check_statistics(name, method, stats.count, stat, weight.shape[1])
    try:
        if method == "wanda":
            mask = compute_nm_mask(weight, n, m, scores=wanda_scores(weight, stat))
            new = weight.float() * mask
        else:
            new = sparsegpt_nm(weight, stat, n, m, blocksize, damp, fp8_rounding)
    except torch.linalg.LinAlgError as exc:
        raise torch.linalg.LinAlgError(f"{name}: {exc}. {FP16_HINT}") from exc
    if not bool(torch.isfinite(new).all()):
        raise ValueError(f"{name}: {method} produced NaN or infinite weights. {FP16_HINT}")
    return new


def write_linear(target: SparseTarget, new: torch.Tensor) -> None:
    """Write an `[..., out, in]` weight into `target` (its module or accelerate's offloaded copy)."""
    write_weight(target.module, target.param_view(new), target.param_name)


def read_linear(target: SparseTarget, device: torch.device | None = None) -> torch.Tensor:
    """`target`'s weight in `[out, in]` layout (loaded from accelerate's offload when offloaded)."""
    return target.linear_view(read_weight(target.module, device, target.param_name))


def check_targets_finite(targets: list[SparseTarget]) -> None:
    """Refuse, before any write, a target whose weight holds NaN/inf (named)."""
    for t in targets:
        check_finite_weight(t.weight_name, read_linear(t))


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
    pipeline: str = "sequential",
    device: torch.device | str | None = None,
    true_sequential: bool = False,
    offload_activations: bool | None = None,
    fp8_rounding: bool = False,
    reconstruct_epochs: int = 0,
    reconstruct_lr: float = DEFAULT_LR,
) -> dict:
    """Prune `targets` in place with `method` ("wanda" or "sparsegpt"), calibrating on `batches`.

    `batches` are model inputs (dicts of tensors). Non-target weights are never written. Every target weight is
    checked for NaN/inf before anything is written; statistics and results are checked per layer before that
    layer's block is written (a failing block is restored; the error names the layer and the likely cause).

    Args:
        pipeline: "sequential" (default): the inputs of the first transformer block are captured once, then each
            block in turn is pruned from its cached inputs and run once more, pruned, to make the next block's
            inputs (see `sequential.py`). Models it cannot run block by block (encoder-decoders, per-layer
            attention types) and targets outside the block list use "per_block". "per_block": the whole model
            runs over the calibration set once per block (the earlier implementation, kept for comparison).
        device: compute device for the sequential pipeline (default: CUDA when available, else the model's).
        true_sequential: SparseGPT/Wanda sub-layer by sub-layer inside each block (attention before MLP): later
            sub-layers are calibrated on the outputs of pruned earlier ones (Frantar & Alistarh 2023, sec. 4).
        offload_activations: keep the cached block inputs on CPU (None: decide from free device memory).
        blocksize: SparseGPT's column block size, a multiple of `m` (Frantar & Alistarh 2023, Algorithm 1).
        damp: SparseGPT's Hessian dampening, a fraction of the mean of its diagonal added to it (>= 0).
        fp8_rounding: (SparseGPT only) round the kept weights to the per-row e4m3 grid of the FP8 kernels inside
            the solve, so that it compensates the rounding as it compensates the pruning (`sparsegpt_nm`); for
            models that will run with `accelerate_24(model, weights="fp8")` or be saved with `weights="fp8"`.
            Experts that receive no calibration token are pruned by magnitude and not rounded.
        reconstruct_epochs: after pruning each block, tune its kept weights (masks fixed) for this many passes
            over the calibration batches (one Adam step per batch) so that its outputs match the dense model's
            block outputs (block-wise reconstruction, EBFT; `reconstruction.py`). Any integer (`int`,
            `numpy.int64`, ...; not a bool), >= 0; 0 (default): off. Sequential pipeline only, blocks not offloaded
            by accelerate, not with `fp8_rounding`; targets outside the block list are not tuned. A block whose
            tuning diverges (NaN/inf error) or does not lower its error keeps its one-shot weights bit for bit, with
            a warning naming it (one warning per call for the blocks not improved), and later blocks are tuned.
        reconstruct_lr: Adam's learning rate for `reconstruct_epochs`, any real number > 0 and at most 1 (not a
            bool); default 3e-4.

    Returns:
        Timings and counts: {"pipeline", "blocks" (int), "calibration_batches" (int: batches used), "capture_s"
        (seconds to capture the first block's inputs, with the pruning of targets the forward calls before it),
        "block_s": [...] (seconds per block),
        "fallback_targets" (names of the targets outside the block list, pruned with whole-model forwards)}, and
        with `reconstruct_epochs` also "reconstruction": one record per block with targets, {"block" (its name),
        "error_before", "error_after" (relative squared error of the block's outputs against the dense model's
        on the calibration tokens), "applied", "diverged", "skipped"}; "blocks_tuned" (int: how many kept tuned
        weights); "reconstruct_epochs" (int) and "reconstruct_lr" (float).

    Raises:
        ValueError: a bad `method`, `pipeline`, `blocksize`, `damp` or `device`, `fp8_rounding` with Wanda or with
            `reconstruct_epochs`, `reconstruct_epochs` < 0, `reconstruct_lr` <= 0 / > 1 / NaN / inf,
            `reconstruct_epochs` for a model that cannot run block by block or with blocks offloaded by
            accelerate, no batches, `input_ids` that are not `[batch, seq]`, a target weight with NaN/inf (nothing
            changed in all these),
            or calibration statistics that are not finite (the block restored; the layer and the likely cause
            named). A diverging reconstruction raises nothing (see `reconstruct_epochs`).
        TypeError: `true_sequential` / `offload_activations` / `fp8_rounding` not booleans, `reconstruct_epochs`
            not an integer (or a bool), `reconstruct_lr` not a real number (or a bool), or batches that are not
            dicts of model inputs (nothing changed).
        RuntimeError: `reconstruct_epochs` under `torch.inference_mode()` (nothing changed).
    """
    if method not in CALIBRATED_METHODS:
        raise ValueError(f"method must be one of {CALIBRATED_METHODS}, got {method!r}")
    if pipeline not in ("sequential", "per_block"):
        raise ValueError(f"pipeline must be 'sequential' or 'per_block', got {pipeline!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < m or blocksize % m:
        raise ValueError(f"blocksize must be a positive multiple of m={m}, got {blocksize!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < float("inf"):
        raise ValueError(
            f"damp must be a finite number >= 0 (a fraction of the Hessian's mean diagonal), got {damp!r}"
        )
    if not isinstance(true_sequential, bool):
        raise TypeError(f"true_sequential must be True or False, got {true_sequential!r}")
    if not isinstance(fp8_rounding, bool):
        raise TypeError(f"fp8_rounding must be True or False, got {fp8_rounding!r}")
    if fp8_rounding and method != "sparsegpt":
        raise ValueError(f"fp8_rounding is part of SparseGPT's solve; method {method!r} has none")
    reconstruct_epochs, reconstruct_lr = check_reconstruction_options(reconstruct_epochs, reconstruct_lr)
    if reconstruct_epochs and fp8_rounding:
        raise ValueError(
            "fp8_rounding and reconstruct_epochs cannot be combined: the reconstruction's Adam steps move the kept "
            "weights off the FP8 grid the rounding put them on; choose one"
        )
    if reconstruct_epochs and pipeline != "sequential":
        raise ValueError("reconstruct_epochs needs pipeline='sequential' (it reconstructs block by block)")
    if offload_activations is not None and not isinstance(offload_activations, bool):
        raise TypeError(f"offload_activations must be True, False or None, got {offload_activations!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
        if device.type == "meta":
            raise ValueError("device 'meta' holds no data: calibrate on 'cuda' or 'cpu'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but no CUDA GPU is available here")
    if isinstance(batches, Mapping) or torch.is_tensor(batches):
        raise TypeError(
            "calibration_data must be an iterable of batches, each a dict of model inputs such as "
            f"{{'input_ids': LongTensor [batch, seq]}}; got one {type(batches).__name__} (wrap it in a list)"
        )
    batches = list(batches)
    if not batches:
        raise ValueError(f"{method} needs calibration data: pass at least one batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"calibration batch {i} is a {type(batch).__name__}: each batch must be a dict of model inputs, "
                "such as {'input_ids': LongTensor [batch, seq], 'attention_mask': ...} (a tokenizer's output)"
            )
        if not any(torch.is_tensor(v) for v in batch.values()):
            raise TypeError(
                f"calibration batch {i} holds no tensor (keys {sorted(batch)}): tokenize with "
                "return_tensors='pt'"
            )
        ids = batch.get("input_ids")
        if torch.is_tensor(ids) and ids.dim() < 2:
            raise ValueError(
                f"calibration batch {i}: input_ids has shape {tuple(ids.shape)}, expected [batch, seq] "
                "(add a batch dimension: ids[None])"
            )
    check_targets_finite(targets)
    options = dict(
        n=n, m=m, blocksize=blocksize, damp=damp, fp8_rounding=fp8_rounding, show_progress=show_progress
    )
    if pipeline == "sequential":
        from .sequential import sequential_prune_

        stats = sequential_prune_(
            model,
            targets,
            method,
            batches,
            device=device,
            true_sequential=true_sequential,
            offload_activations=offload_activations,
            reconstruct_epochs=reconstruct_epochs,
            reconstruct_lr=reconstruct_lr,
            **options,
        )
    else:
        per_block_prune_(model, targets, method, batches, **options)
        stats = {"pipeline": "per_block", "blocks": len({_block_key(t.name) for t in targets})}
    stats["calibration_batches"] = len(batches)
    return stats


def model_input_device(model: nn.Module) -> torch.device | None:
    """Where the model's inputs go: its first non-meta parameter's device; None when accelerate dispatches."""
    if getattr(model, "hf_device_map", None):
        return None
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def move_batch(batch: dict, device: torch.device | None) -> dict:
    if device is None:
        return dict(batch)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def per_block_prune_(
    model: nn.Module,
    targets: list[SparseTarget],
    method: str,
    batches: list[dict],
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
    show_progress: bool = True,
    fp8_rounding: bool = False,
) -> None:
    """The whole model runs over `batches` once per block of targets (L forwards for L blocks)."""
    device = model_input_device(model)
    batches = [move_batch(b, device) for b in batches]
    groups: dict[str, list[SparseTarget]] = {}
    for t in targets:
        groups.setdefault(_block_key(t.name), []).append(t)
    was_training = model.training
    model.eval()
    try:
        for group in tqdm(groups.values(), desc=f"{method} 2:{m} pruning", disable=not show_progress):
            collector = StatsCollector(method).attach(group)
            try:
                with torch.no_grad():
                    for batch in batches:
                        collector.token_mask = token_mask_of(batch, model)
                        model(**batch)
            finally:
                collector.detach()
            prune_group_(group, collector.stats, method, n, m, blocksize, damp, fp8_rounding=fp8_rounding)
    finally:
        model.train(was_training)


def prune_group_(
    group: list[SparseTarget],
    stats: dict[str, _InputStats],
    method: str,
    n: int,
    m: int,
    blocksize: int,
    damp: float,
    device: torch.device | None = None,
    fp8_rounding: bool = False,
) -> None:
    """Compute and validate the new weights of every target in `group`, then write them all."""
    new = {}
    for t in group:
        weight = read_linear(t, device)
        new[t.name] = pruned_weight(t, weight, stats.get(t.name), method, n, m, blocksize, damp, fp8_rounding)
    for t in group:
        write_linear(t, new.pop(t.name))
