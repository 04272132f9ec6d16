"""`Sparsifier`: owns the masks of a model's target weights and keeps the weights N:M.

It is the one piece shared by one-shot pruning (`prune_24`) and training (`SparsityCallback`): it selects
masks, applies them, masks gradients through parameter hooks, keeps an optional dense shadow for
straight-through mask re-selection, and saves/loads its masks as safetensors.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import SparsityConfig
from ..distributed import full_tensor, is_dtensor, like
from ..masks import compute_partial_nm_mask, find_nm_violation, pack_mask, unpack_mask
from ..peft_structure import modules_by_base_name
from ..targets import SparsityReport, select_targets
from ..utils import atomic_write
from .offload import is_offloaded, read_weight, write_weight
from .scores import compute_scores
from .validation import check_finite_weight

logger = logging.getLogger(__name__)

MASKS_NAME = "sparsity_masks.safetensors"
MASKS_FORMAT = "hf_semisparse.masks"
MASKS_VERSION = "1"


def _stored_weight(target) -> torch.Tensor:
    """The target's weight, loaded from accelerate's offload when the module holds only a meta placeholder."""
    return (
        read_weight(target.module, name=target.param_name) if is_offloaded(target.module) else target.weight
    )


def _partial_mask(cfg: SparsityConfig, weight: torch.Tensor, level: float) -> torch.Tensor:
    scores = compute_scores(cfg.method, weight)
    return compute_partial_nm_mask(weight, level, cfg.n, cfg.m, scores=scores)


def _multi_process() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Sparsifier:
    """Masks for the targets of `config` in `model`.

    Example:
        >>> sp = Sparsifier(model, SparsityConfig())
        >>> sp.update_masks(level=1.0)   # choose 2:4 masks and zero the pruned weights
        >>> sp.register_grad_hooks()     # from now on gradients of pruned weights are zero
    """

    def __init__(self, model: torch.nn.Module, config: SparsityConfig) -> None:
        self.config = config
        self.targets, self.report = select_targets(model, config)
        self.masks: dict[str, torch.Tensor] = {}  # parameter layout, bool
        self.dense_shadow: dict[str, torch.Tensor] = {}
        self.level = 0.0
        self._hooks: list = []
        self._mask_queued = False

    # ------------------------------------------------------------------ masks
    def update_masks(self, level: float = 1.0) -> None:
        """Choose masks for the share `level` of each target's groups and zero the pruned weights."""
        cfg = self.config
        sources = {t.name: self.dense_shadow.get(t.name, _stored_weight(t)).detach() for t in self.targets}
        # every weight is checked (one host sync) before any mask is chosen or applied
        finite = [torch.isfinite(full_tensor(s)).all() for s in sources.values() if s.device.type != "meta"]
        if finite and not bool(torch.stack([f.to(finite[0].device) for f in finite]).all()):
            for target in self.targets:
                check_finite_weight(target.weight_name, full_tensor(sources[target.name]))
        for target in self.targets:
            source = sources[target.name]
            # a sharded (FSDP2) weight is gathered: the groups may straddle shards, and every rank gets the same
            # mask; the mask is then sharded as the weight is
            weight = target.linear_view(full_tensor(source))
            if weight.dim() == 3:  # fused experts: one expert at a time bounds the sort's memory
                mask = torch.stack([_partial_mask(cfg, w, level) for w in weight.unbind(0)])
            else:
                mask = _partial_mask(cfg, weight, level)
            self.masks[target.name] = like(target.param_view(mask).contiguous(), source)
        self.level = level
        self.apply_masks()

    def _mask_on(self, name: str, device: torch.device) -> torch.Tensor:
        """The mask of `name` on `device` (moved there once, e.g. after loading masks or moving the model)."""
        mask = self.masks[name]
        if mask.device != device:
            mask = self.masks[name] = mask.to(device)
        return mask

    def apply_masks(self) -> None:
        """Zero every target weight where its mask is False (also weights offloaded by accelerate)."""
        self._multiply_by_masks(lambda target: [target.weight.data])
        for target in self.targets:
            if target.name in self.masks and is_offloaded(target.module):
                weight = read_weight(target.module, name=target.param_name)
                write_weight(
                    target.module, weight * self._mask_on(target.name, weight.device), name=target.param_name
                )

    def _multiply_by_masks(self, tensors_of) -> None:
        """Multiply the tensors `tensors_of(target)` (None entries skipped) of every masked target by its mask, in
        one `_foreach_mul_` call (no Python loop over kernels; with bool masks torch still runs one multiply each).
        """
        tensors, masks = [], []
        for target in self.targets:
            if target.name not in self.masks:
                continue
            for tensor in tensors_of(target):
                if tensor is not None and tensor.device.type != "meta":  # meta: offloaded by accelerate
                    tensors.append(tensor)
                    masks.append(self._mask_on(target.name, tensor.device))
        if tensors:
            with torch.no_grad():
                torch._foreach_mul_(tensors, masks)

    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer state of pruned weights (every state tensor shaped like the weight: momentum,
        moments), so that a zero-preserving optimizer keeps them at zero from now on (see `optimizers.py`)."""
        self._multiply_by_masks(
            lambda target: [
                value
                for value in optimizer.state.get(target.weight, {}).values()
                if isinstance(value, torch.Tensor) and value.shape == target.weight.shape
            ]
        )

    def pruned_nonzeros(self) -> int:
        """How many target weights are non-zero where their mask prunes (0 when the model is as masked)."""
        counts = []
        with torch.no_grad():
            for target in self.targets:
                if target.name in self.masks:
                    weight = target.weight.detach()
                    counts.append(((weight != 0) & ~self._mask_on(target.name, weight.device)).sum())
        if not counts:
            return 0
        return int(torch.stack([c.to(counts[0].device) for c in counts]).sum())  # one host sync

    @property
    def has_masks(self) -> bool:
        return bool(self.masks)

    def zero_fraction(self) -> float:
        """Share of target weights that the masks prune."""
        if not self.masks:
            return 0.0
        pruned = sum(int((~full_tensor(m)).sum()) for m in self.masks.values())
        return pruned / sum(m.numel() for m in self.masks.values())

    def check(self) -> None:
        """Raise `ValueError` if a fully pruned target weight is not N:M (names the tensor and group)."""
        if self.level < 1.0:
            return
        for target in self.targets:
            bad = find_nm_violation(full_tensor(target.linear_view()), self.config.n, self.config.m)
            if bad is not None:
                raise ValueError(
                    f"{target.weight_name} is not {self.config.pattern} sparse: the group at {bad.index} "
                    f"(in [..., out, in] layout) has {bad.nonzeros} non-zeros"
                )

    # ------------------------------------------------------------------ gradients
    def register_grad_hooks(self, fused: bool | None = None) -> None:
        """Zero the gradients of pruned weights during every backward, before clipping and the optimizer.

        fused=True: the hook of each target weight only queues, once per backward, one `mask_gradients()` call
        that autograd runs when the backward has finished (one fused multiply over all `.grad`s, little Python
        per weight). fused=False: each hook multiplies its own gradient before it is accumulated, which is what
        DDP and FSDP need (they reduce gradients during the backward). Default: fused unless a multi-process
        group is running or the masks are sharded.
        """
        if self._hooks:
            return
        if fused is None:
            fused = not (_multi_process() or self.sharded)
        self._mask_queued = False
        for target in self.targets:
            if not target.weight.requires_grad:  # frozen (e.g. the base under a LoRA adapter): no gradient
                continue
            hook = self._queue_fused_mask if fused else self._make_hook(target.name)
            self._hooks.append(target.weight.register_hook(hook))

    def _queue_fused_mask(self, grad: torch.Tensor) -> None:
        if not self._mask_queued:
            self._mask_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._run_fused_mask)

    def _run_fused_mask(self) -> None:
        self._mask_queued = False
        self.mask_gradients()

    def _make_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if name not in self.masks:
                return grad
            return grad * self._mask_on(name, grad.device)

        return hook

    def mask_gradients(self) -> None:
        """Zero the `.grad` of every pruned weight in one fused multiply (the hook-free alternative to
        `register_grad_hooks`, for trainers that can call it between backward and gradient clipping)."""
        self._multiply_by_masks(lambda target: [target.weight.grad])

    def remove_grad_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ straight-through shadow
    def start_dense_shadow(self) -> None:
        """Keep a dense copy of each target weight; the optimizer updates it, the forward sees it masked."""
        for target in self.targets:
            if target.name not in self.dense_shadow:
                self.dense_shadow[target.name] = target.weight.detach().clone()

    def load_dense_into_weights(self) -> None:
        """Before the optimizer step: give the optimizer the dense weights (straight-through)."""
        with torch.no_grad():
            for target in self.targets:
                shadow = self.dense_shadow.get(target.name)
                if shadow is not None:
                    target.weight.copy_(shadow)

    def store_dense_and_mask(self) -> None:
        """After the optimizer step: remember the dense weights, then zero the pruned ones."""
        with torch.no_grad():
            for target in self.targets:
                shadow = self.dense_shadow.get(target.name)
                if shadow is not None:
                    shadow.copy_(target.weight)
        self.apply_masks()

    def drop_dense_shadow(self) -> None:
        self.dense_shadow.clear()

    # ------------------------------------------------------------------ persistence
    @property
    def sharded(self) -> bool:
        """Whether the masks are DTensors (FSDP2): saving and loading them are collectives."""
        return any(is_dtensor(m) for m in self.masks.values())

    def save_masks(self, directory: str | os.PathLike, step: int, write: bool = True) -> str:
        """Write the masks (packed bits, `[out, in]` layout) and any dense shadow to `directory`, atomically.

        With sharded masks every rank must call this (the shards are gathered); only ranks with `write` write.
        """
        tensors = {}
        shapes = {}
        for target in self.targets:
            mask = self.masks.get(target.name)
            if mask is None:
                continue
            mask = full_tensor(mask)
            linear = target.linear_view(mask)
            tensors[f"{target.name}.mask"] = pack_mask(linear.cpu().contiguous())
            shapes[target.name] = list(linear.shape)
            if target.name in self.dense_shadow:
                shadow = full_tensor(self.dense_shadow[target.name].detach())
                tensors[f"{target.name}.dense"] = shadow.cpu().contiguous()
        metadata = {
            "format": MASKS_FORMAT,
            "version": MASKS_VERSION,
            "pattern": self.config.pattern,
            "step": str(step),
            "level": repr(self.level),
            "shapes": json.dumps(shapes),
            "sparsity_config": json.dumps(self.config.to_dict()),
        }
        path = os.path.join(directory, MASKS_NAME)
        if write:
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path

    def load_masks(self, directory: str | os.PathLike) -> int:
        """Restore masks saved by `save_masks`, check them against the weights, and apply them.

        Everything is checked before anything changes: a missing, corrupted or mismatched file raises
        `ValueError`/`FileNotFoundError` and leaves the model and the sparsifier as they were.

        Returns:
            The step recorded in the file.
        """
        path = os.path.join(directory, MASKS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming sparse training needs {path}, which is missing: was this checkpoint written with "
                "SparsityCallback? Start from a checkpoint that has it, or train from scratch."
            )
        try:
            tensors = load_file(path)
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"Mask file {path} is corrupted or unreadable: {exc}") from exc
        if metadata.get("format") != MASKS_FORMAT:
            raise ValueError(f"{path} is not an hf_semisparse mask file (format={metadata.get('format')!r})")
        if metadata.get("version") != MASKS_VERSION:
            raise ValueError(
                f"{path} has mask format version {metadata.get('version')!r}; this library reads "
                f"version {MASKS_VERSION}. Upgrade hf_semisparse."
            )
        if metadata.get("pattern") != self.config.pattern:
            raise ValueError(
                f"{path} holds {metadata.get('pattern')} masks but the config asks for {self.config.pattern}"
            )
        try:
            shapes = json.loads(metadata["shapes"])
            level = float(metadata["level"])
            step = int(metadata["step"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} has broken metadata: {exc}") from exc

        masks: dict[str, torch.Tensor] = {}
        shadows: dict[str, torch.Tensor] = {}
        for target in self.targets:
            key = f"{target.name}.mask"
            if key not in tensors:
                raise ValueError(
                    f"{path} has no mask for {target.name}; the checkpoint was trained with other targets"
                )
            if list(target.shape) != shapes.get(target.name):
                raise ValueError(
                    f"{path}: mask of {target.name} has shape {shapes.get(target.name)}, the weight "
                    f"is {list(target.shape)}"
                )
            try:
                linear = unpack_mask(tensors[key], target.shape)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: mask of {target.name} is corrupted: {exc}") from exc
            if level >= 1.0:
                bad = find_nm_violation(linear, self.config.n, self.config.m)
                if bad is not None:
                    raise ValueError(
                        f"{path}: mask of {target.name} is not {self.config.pattern} "
                        f"(group at {bad.index} keeps {bad.nonzeros})"
                    )
            weight = full_tensor(target.linear_view().detach())
            # a frozen weight (the base under a LoRA adapter) is not in the checkpoint: it is re-pruned
            if target.weight.requires_grad and (weight[~linear.to(weight.device)] != 0).any():
                raise ValueError(
                    f"{path}: mask of {target.name} does not match the checkpoint's weights "
                    "(non-zero weights where the mask prunes); the files come from different steps"
                )
            masks[target.name] = like(target.param_view(linear).contiguous(), target.weight)
            dense_key = f"{target.name}.dense"
            if dense_key in tensors:
                shadows[target.name] = like(tensors[dense_key].to(target.weight.dtype), target.weight)

        self.masks = masks
        self.dense_shadow = shadows
        self.level = level
        self.apply_masks()
        return step


def prune_24(
    model: torch.nn.Module,
    config: SparsityConfig | None = None,
    calibration_data=None,
    show_progress: bool = True,
    *,
    device: torch.device | str | None = None,
    true_sequential: bool | None = None,
    offload_activations: bool | None = None,
    pipeline: str | None = None,
    blocksize: int | None = None,
    damp: float | None = None,
    fp8_rounding: bool | None = None,
    reconstruct_epochs: int | None = None,
    reconstruct_lr: float | None = None,
) -> SparsityReport:
    """One-shot N:M (default 2:4) pruning in place, for people who do not train.

    Zeros the pruned weights of every target (SparseGPT also updates the kept ones), records the config in
    `model.config.sparsity_config` (when the model has a config), and returns the per-module report; for Wanda
    and SparseGPT `report.calibration` holds what the calibration did (`calibrated_prune_`'s stats: the pipeline,
    seconds per block and, with `reconstruct_epochs`, each block's errors and `blocks_tuned`).

    Args:
        config: what to prune and how; default 2:4 magnitude.
        calibration_data: batches of model inputs (dicts of tensors), needed by method "wanda" and "sparsegpt".
        show_progress: progress bars (one per transformer block for the calibrated methods).
        device: (wanda, sparsegpt) compute device of the block-by-block pipeline; default CUDA when available.
            The model may stay on the CPU or be offloaded by accelerate: one block at a time is brought there.
        true_sequential: (wanda, sparsegpt) calibrate each sub-layer on the outputs of the pruned sub-layers
            before it (attention before MLP), the SparseGPT paper's "true sequential"; default False.
        offload_activations: (wanda, sparsegpt) keep the cached block inputs on the CPU; default: when they
            would take over 40% of the device's free memory.
        pipeline: (wanda, sparsegpt) "sequential" (default: each block runs each calibration sample twice) or
            "per_block" (the whole model once per block).
        blocksize: (sparsegpt; Wanda ignores it) the column block size, a multiple of M; default 128
            (Frantar & Alistarh 2023).
        damp: (sparsegpt; Wanda ignores it) the Hessian dampening, a fraction of its mean diagonal, >= 0;
            default 0.01.
        fp8_rounding: (sparsegpt only) also round the kept weights to the per-row e4m3 grid of the FP8 kernels
            inside SparseGPT's solve, which then compensates the rounding as it does the pruning: for models
            that will run in FP8 (`accelerate_24(model, weights="fp8")`, `save_sparse_pretrained(...,
            weights="fp8")`). On SmolLM2-135M (CPU emulation, 2026-12-02, one run) it took FP8 2:4's perplexity
            cost over bf16 2:4 from 3.7% to 0.9%. Recorded in `model.config.sparsity_config`. Default False.
        reconstruct_epochs: (wanda, sparsegpt) after pruning each transformer block, tune its kept weights
            (masks fixed) for this many passes over the calibration batches, one Adam step per batch, so that the
            block's outputs match the dense model's (block-wise reconstruction as in EBFT, Guo et al. 2024); a
            block whose error does not go down, or whose tuning diverges, keeps its one-shot weights (a warning
            names it). Any integer >= 0 (`int`, `numpy.int64`; not a bool). Default 0 (off). Recorded in
            `model.config.sparsity_config` (`block_reconstruction`: epochs, lr, and `blocks_tuned` of `blocks`).
            Needs the blocks in memory (not offloaded by accelerate).
            Works through a PEFT wrapper (`PeftModel`): the base layers are tuned, the adapters left as they are.
        reconstruct_lr: (wanda, sparsegpt) Adam's learning rate for `reconstruct_epochs`, any real number > 0 and
            at most 1 (not a bool); default 3e-4. Recorded as a float. Given without `reconstruct_epochs` it has no
            effect, and a warning says so.
        (None for any of these: the default of `hf_semisparse.pruning.calibrated.calibrated_prune_`.)

    Raises:
        ValueError: a target in PEFT's `modules_to_save` (named; nothing changed), a target weight holds NaN/inf
            (named; the model is unchanged), calibration statistics overflow (named, with the likely cause),
            calibration data is missing or has `input_ids` of fewer than 2 dimensions, or a calibration option is
            bad (a `pipeline` name, `blocksize`, `damp`, `fp8_rounding` with Wanda, a `device` that is not one,
            "meta", or CUDA without a GPU, `reconstruct_epochs` < 0, `reconstruct_lr` <= 0, > 1, NaN or inf, or
            `reconstruct_epochs` with `fp8_rounding`, `pipeline="per_block"`, a model that cannot run block by
            block or blocks offloaded by accelerate); nothing changed in all but the overflow. A diverging reconstruction raises nothing: that block keeps its one-shot weights.
        RuntimeError: `reconstruct_epochs` under `torch.inference_mode()` (nothing changed).
        TypeError: a calibration option given for method "magnitude", batches that are not dicts of tensors,
            `true_sequential` / `offload_activations` / `fp8_rounding` not booleans, `reconstruct_epochs` not an
            integer or `reconstruct_lr` not a real number (bools are neither; nothing changed).

    Example:
        >>> report = prune_24(model, SparsityConfig(method="sparsegpt"), calibration_data=batches, device="cuda")
        >>> print(report)
    """
    options = {
        name: value
        for name, value in dict(
            device=device,
            true_sequential=true_sequential,
            offload_activations=offload_activations,
            pipeline=pipeline,
            blocksize=blocksize,
            damp=damp,
            fp8_rounding=fp8_rounding,
            reconstruct_epochs=reconstruct_epochs,
            reconstruct_lr=reconstruct_lr,
        ).items()
        if value is not None
    }
    config = config or SparsityConfig()
    if config.method == "magnitude" and options:
        raise TypeError(f"calibration options {sorted(options)} only apply to wanda/sparsegpt")
    if reconstruct_lr is not None and not reconstruct_epochs:
        logger.warning("reconstruct_lr=%r has no effect without reconstruct_epochs > 0", reconstruct_lr)
    sparsifier = Sparsifier(model, config)
    for target in sparsifier.targets:  # PEFT's modules_to_save: the forward runs a trained dense copy
        if ".modules_to_save." in f".{target.name}." or ".original_module." in f".{target.name}.":
            raise ValueError(
                f"{target.name}: a 2:4 target is in PEFT's modules_to_save, whose forward runs a separate dense "
                "copy of the layer; prune the model before wrapping it, remove the layer from modules_to_save, or "
                "exclude it from the sparsity targets"
            )
    stats: dict = {}
    if config.method != "magnitude":
        if calibration_data is None:
            raise ValueError(
                f"method {config.method!r} needs calibration_data (a few batches of model inputs)"
            )
        stats = calibrate(model, sparsifier, calibration_data, show_progress, **options)
        sparsifier.report.calibration = stats
    sparsifier.update_masks(level=1.0)
    record_sparsity_in_config(model, config, sparsifier.report)
    record = getattr(getattr(model, "config", None), "sparsity_config", None)
    record_calibration_batches(model, stats)
    if fp8_rounding and isinstance(record, dict):
        record["fp8_rounding"] = True  # the kept weights lie on the FP8 kernels' per-row e4m3 grid
    if reconstruct_epochs and isinstance(record, dict):
        from .reconstruction import DEFAULT_LR

        # plain Python numbers (validated by now): config.json cannot hold numpy scalars
        records = stats.get("reconstruction", [])
        record["block_reconstruction"] = {
            "epochs": int(reconstruct_epochs),
            "lr": float(options.get("reconstruct_lr", DEFAULT_LR)),
            # what was done, not only asked for: blocks whose tuning diverged or did not help keep one-shot weights
            "blocks_tuned": int(stats.get("blocks_tuned", 0)),
            "blocks": len(records),
        }
    logger.info("Pruned %d modules to %s", len(sparsifier.targets), config.pattern)
    return sparsifier.report


def calibrate(
    model: torch.nn.Module, sparsifier: Sparsifier, batches, show_progress: bool = True, **options
) -> dict:
    """Run the config's calibrated method (wanda / sparsegpt) on the sparsifier's targets; returns timings."""
    from ..utils import unwrap_model
    from .calibrated import calibrated_prune_

    cfg = sparsifier.config
    return calibrated_prune_(
        unwrap_model(model),
        sparsifier.targets,
        cfg.method,
        batches,
        cfg.n,
        cfg.m,
        show_progress=show_progress,
        **options,
    )


def record_calibration_batches(model: torch.nn.Module, stats: dict) -> None:
    """Record in `model.config.sparsity_config` how many calibration batches a calibrated prune used (`stats` of
    `calibrate`): all of `prune_24`'s calibration_data, or the ones the Trainer path took, not the config's count."""
    from ..utils import unwrap_model

    record = getattr(getattr(unwrap_model(model), "config", None), "sparsity_config", None)
    if "calibration_batches" in stats and isinstance(record, dict):
        record["calibration_batches"] = stats["calibration_batches"]


def record_sparsity_in_config(model: torch.nn.Module, config: SparsityConfig, report: SparsityReport) -> None:
    """Store what was pruned in `model.config.sparsity_config`, which `save_pretrained` writes to config.json."""
    from ..utils import unwrap_model

    hf_config = getattr(unwrap_model(model), "config", None)
    if hf_config is None:
        return
    from .. import __version__

    record = {
        **config.to_dict(),
        "pattern": config.pattern,
        "targets": report.targets,
        **({"expert_targets": report.expert_targets} if report.expert_targets else {}),
        "library": "hf_semisparse",
        "library_version": __version__,
    }
    previous = getattr(hf_config, "sparsity_config", None)
    source = _inherited_mask_source(unwrap_model(model), hf_config, config, report)
    if source is not None:
        record["mask_source"] = source
        # how the one-shot step that chose these masks ran (not `fp8_rounding`: training moves the weights off
        # the FP8 grid)
        for key in ("block_reconstruction", "calibration_batches"):
            if isinstance(previous, dict) and key in previous:
                record[key] = previous[key]
    hf_config.sparsity_config = record


def _inherited_mask_source(model, hf_config, config: SparsityConfig, report: SparsityReport) -> str | None:
    """The method that chose the zeros, when magnitude selection only finds zeros an earlier method left.

    A recovery fine-tune after a Wanda/SparseGPT one-shot prune uses magnitude selection, which on weights that
    are already exactly N:M keeps exactly their zeros: the masks still come from the one-shot method.
    """
    previous = getattr(hf_config, "sparsity_config", None)
    if config.method != "magnitude" or not isinstance(previous, dict):
        return None
    source = previous.get("mask_source") or previous.get("method")
    if source in (None, "magnitude") or previous.get("pattern") != config.pattern:
        return None
    if sorted(previous.get("targets") or []) != sorted(report.targets):
        return None
    if sorted(previous.get("expert_targets") or []) != sorted(report.expert_targets):
        return None
    modules = modules_by_base_name(model)  # through a PEFT wrapper: the base layers
    weights = []
    for name in report.targets:
        module = modules.get(name)
        weights.append(module.weight if isinstance(module, torch.nn.Linear) else module.weight.t())
    for name in report.expert_targets:
        module_name, param_name = name.rsplit(".", 1)
        module = modules.get(module_name)
        param = getattr(module, param_name)
        weights.append(param.transpose(-2, -1) if getattr(module, "is_transposed", False) else param)
    for weight in weights:
        if find_nm_violation(full_tensor(weight.detach()), config.n, config.m) is not None:
            return None
    return source
