"""`SparsityCallback`: N:M prune-and-recover inside any `transformers.Trainer`."""

from __future__ import annotations

import json
import logging
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import SparsityConfig
from ..lora import mask_lora
from ..peft_structure import is_peft_model
from ..pruning.optimizers import zero_preserving_optimizer
from ..pruning.sparsifier import (
    Sparsifier,
    calibrate,
    record_calibration_batches,
    record_sparsity_in_config,
)
from ..quantizer_ops import begin_checkpoint_load, held_halves
from ..utils import unwrap_model

logger = logging.getLogger(__name__)


def resolve_config(config: SparsityConfig | dict | str | os.PathLike | None) -> SparsityConfig:
    """Accept a `SparsityConfig`, its dict form, a path to `sparsity_config.json` (or its folder), or None."""
    if config is None:
        return SparsityConfig()
    if isinstance(config, SparsityConfig):
        return config
    if isinstance(config, dict):
        return SparsityConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return SparsityConfig.from_pretrained(config)
    raise TypeError(f"sparsity_config must be a SparsityConfig, dict or path, got {type(config).__name__}")


def _recorded_calibration_batches(directory: str) -> int | None:
    """The calibration batches a checkpoint's `config.json` says its masks were chosen with (None if it says
    nothing readable): a resumed run does not calibrate again, so its record must come from the checkpoint."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            record = json.load(f).get("sparsity_config")
    except (OSError, ValueError, AttributeError):
        return None
    value = record.get("calibration_batches") if isinstance(record, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _warn_about_held_halves(model) -> None:
    """Warn if the last checkpoint load left 2:4 weight halves unpaired (those weights were not loaded), and drop
    them. A plain Trainer's loads cannot be checked as they happen; SparsityTrainer raises instead."""
    held = held_halves(model)
    if held:
        logger.warning(
            "%d 2:4 weight half(s) arrived without their values or bitmask in the last checkpoint load, so "
            "those weights were not loaded (first: %s); is a shard missing? SparsityTrainer raises here",
            len(held),
            held[0],
        )
        begin_checkpoint_load(model)


def _first_batches(dataloader, count: int, model=None) -> list | None:
    if dataloader is None:
        return None
    batches = []
    for batch in dataloader:
        batches.append(calibration_inputs(batch, model))
        if len(batches) >= count:
            break
    return batches


def calibration_inputs(batch: dict, model=None) -> dict:
    """The inputs of a training batch that a calibration forward needs: `labels` are dropped (no loss is
    needed), except that an encoder-decoder (T5, BART, Whisper) gets the decoder inputs it would build from them,
    the way the model does (`prepare_decoder_input_ids_from_labels`), or keeps `labels` when it has no such
    method."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    labels = batch.get("labels")
    if labels is None or not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in batch:
        return {k: v for k, v in batch.items() if k != "labels"}
    prepare = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        return dict(batch)
    out = {k: v for k, v in batch.items() if k != "labels"}
    out["decoder_input_ids"] = prepare(labels=labels)
    return out


def check_not_on_kernels(model) -> None:
    """Raise ValueError when `model`'s 2:4 layers run on inference kernels (`accelerate_24`, or a checkpoint
    loaded onto CUDA): their weights are compressed and frozen there, so training would leave them unchanged."""
    from ..kernels.linear import SemiSparseLinear

    on_kernels = [
        name for name, mod in unwrap_model(model).named_modules() if isinstance(mod, SemiSparseLinear)
    ]
    if on_kernels:
        raise ValueError(
            f"{on_kernels[0]} (and {len(on_kernels) - 1} more) run on 2:4 inference kernels, whose weights are "
            "compressed and frozen: training would not change them. Load the model for training with "
            "AutoSparseModel.from_pretrained(path, accelerate=False) (or inside hf_semisparse.load_options("
            "accelerate=False)), train, then accelerate_24 for serving"
        )


class SparsityCallback(TrainerCallback):
    """Prunes the model to N:M on schedule and keeps it N:M through training.

    - prunes at `config.start_step` (one-shot) or along a cubic schedule (gradual);
    - masks gradients of pruned weights as they are computed (so clipping, all-reduce and optimizer state
      never see them) and keeps pruned weights at zero after every optimizer step (see `weight_pass`);
    - logs `sparsity_level` and `sparsity_zero_fraction`;
    - saves `sparsity_masks.safetensors` into every checkpoint and restores it on resume;
    - at train end leaves plain zeros in the weights, no hooks or parametrizations.

    Gradient masking: with a plain `Trainer` the callback registers a gradient hook on every target weight (the
    only way to reach the gradients before clipping from a callback). In one process those hooks only queue
    one fused multiply over all targets, run by autograd when the backward ends; under DDP/FSDP each hook
    masks its own gradient before it is reduced. `SparsityTrainer` needs no hooks: it calls
    `mask_gradients()` once between backward and clipping (`hook_free_gradients = True`).

    Weight pass (`weight_pass`): "always" multiplies every target weight by its mask after every optimizer
    step. "auto" (the default) does so after the first step following each (re-)selection of the masks, zeros
    the optimizer state of the pruned weights once, and from then on skips the pass while the optimizer is
    torch's `SGD`, `Adam` or `AdamW`: with zero gradients and zero state their step provably leaves those
    weights at exactly zero (`hf_semisparse.pruning.optimizers`). Any other optimizer, sharded (FSDP2) masks or a
    dense shadow get the pass every step. Before every checkpoint the skipped pass is checked (one pass over the
    weights): a non-zero pruned weight is re-zeroed, logged as an error, and the pass runs every step from then.

    On resume the masks are read from, in order: `resume_from_checkpoint` given here (or set by
    `SparsityTrainer`), `args.resume_from_checkpoint` when it is a folder, `output_dir/checkpoint-<step>`.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   callbacks=[SparsityCallback(SparsityConfig())])
        >>> trainer.train()
    """

    def __init__(
        self,
        config: SparsityConfig | dict | str | None = None,
        resume_from_checkpoint: str | None = None,
        weight_pass: str = "auto",
    ) -> None:
        if weight_pass not in ("auto", "always"):
            raise ValueError(f"weight_pass must be 'auto' or 'always', got {weight_pass!r}")
        self.config = resolve_config(config)
        self.weight_pass = weight_pass
        self.resume_from_checkpoint = resume_from_checkpoint
        self.sparsifier: Sparsifier | None = None
        self._last_prune_step: int | None = None
        self._zero_fraction = 0.0
        self._model = None
        self._calibration_batches: list | None = None
        # set by SparsityTrainer, which calls mask_gradients() before clipping
        self.hook_free_gradients = False
        self._gradients_masked = False
        # True while the optimizer is known to keep pruned weights at zero (weight_pass="auto")
        self.optimizer_keeps_zeros = False
        self.skipped_weight_passes = 0

    # ------------------------------------------------------------------ helpers
    def sparsity_logs(self) -> dict[str, float]:
        """What the callback adds to the Trainer's logs."""
        if self.sparsifier is None:
            return {}
        return {"sparsity_level": self.sparsifier.level, "sparsity_zero_fraction": self._zero_fraction}

    def _resume_dir(self, args, state) -> str:
        candidates = [self.resume_from_checkpoint]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for directory in candidates:
            if directory and os.path.isdir(directory):
                return directory
        raise FileNotFoundError(
            f"Resuming at step {state.global_step} needs the checkpoint's sparsity masks, but no checkpoint folder "
            f"was found (looked at {[c for c in candidates if c]}). Pass resume_from_checkpoint to "
            "SparsityCallback, or use SparsityTrainer."
        )

    def _prune(self, step: int) -> None:
        cfg, sp = self.config, self.sparsifier
        if self._last_prune_step == step:
            return
        if cfg.method != "magnitude" and not sp.has_masks:
            if self._calibration_batches is None:
                raise ValueError(
                    f"method {cfg.method!r} needs calibration batches, but the Trainer passed no "
                    "train_dataloader to the callback"
                )
            record_calibration_batches(self._model, calibrate(self._model, sp, self._calibration_batches))
            self._calibration_batches = None
        if cfg.uses_dense_shadow(step):
            sp.start_dense_shadow()
        sp.update_masks(cfg.level_at(step))
        # new zeros: the next step masks the weights and the optimizer state again
        self.optimizer_keeps_zeros = False
        self._last_prune_step = step
        self._zero_fraction = sp.zero_fraction()
        logger.info(
            "step %d: %s sparsity level %.3f (%.1f%% of target weights zero)",
            step,
            cfg.pattern,
            sp.level,
            100 * self._zero_fraction,
        )

    def _set_gradient_mode(self, step: int) -> None:
        sp = self.sparsifier
        if self.config.uses_dense_shadow(step):
            sp.remove_grad_hooks()
            return
        if sp.dense_shadow:
            sp.drop_dense_shadow()
        if sp.has_masks and not self.hook_free_gradients:
            sp.register_grad_hooks()

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights now (between backward and clipping); no-op while the masks are
        being re-selected with a dense shadow (the optimizer then needs the dense gradients)."""
        sp = self.sparsifier
        if sp is None or not sp.has_masks or sp.dense_shadow or self._gradients_masked:
            return
        sp.mask_gradients()
        self._gradients_masked = True

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("SparsityCallback needs the Trainer to pass `model` to its callbacks")
        check_not_on_kernels(model)
        _warn_about_held_halves(model)  # a resume (or an earlier load) of a sharded checkpoint
        self._model = model
        self.optimizer_keeps_zeros = False  # the first step masks the weights and the (maybe resumed) state
        if self.config.method != "magnitude" and state.global_step <= self.config.start_step:
            self._calibration_batches = _first_batches(
                train_dataloader, self.config.calibration_batches, model
            )
        sp = Sparsifier(model, self.config)  # raises before anything changes if the config selects nothing
        if is_peft_model(unwrap_model(model)):  # LoRA updates on 2:4 layers masked by the base's zeros
            mask_lora(model, sp.report.targets)
        step = state.global_step
        resume_dir = None
        if step > self.config.start_step:
            resume_dir = self._resume_dir(args, state)
            sp.load_masks(resume_dir)
            if self.config.uses_dense_shadow(step) and not sp.dense_shadow:
                logger.warning(
                    "checkpoint has no dense shadow for mask re-selection; starting it from the "
                    "pruned weights"
                )
                sp.start_dense_shadow()
        self.sparsifier = sp
        record_sparsity_in_config(model, self.config, sp.report)
        if resume_dir is not None and self.config.method != "magnitude":
            recorded = _recorded_calibration_batches(resume_dir)
            if recorded is not None:  # the masks' calibration ran before the checkpoint: keep its count
                record_calibration_batches(model, {"calibration_batches": recorded})
        logger.info("SparsityCallback targets:\n%s", sp.report)
        if sp.has_masks:
            self._zero_fraction = sp.zero_fraction()
        if self.config.is_prune_step(step):
            self._prune(step)
        self._set_gradient_mode(step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._gradients_masked = False
        step = state.global_step
        if self.config.is_prune_step(step):
            self._prune(step)
        self._set_gradient_mode(step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.hook_free_gradients:
            self.mask_gradients()  # when no clipping ran, this is the first chance
        if self.sparsifier is not None and self.sparsifier.dense_shadow:
            self.sparsifier.load_dense_into_weights()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        sp = self.sparsifier
        if sp is None or not sp.has_masks:
            return
        if sp.dense_shadow:
            self.optimizer_keeps_zeros = False
            sp.store_dense_and_mask()
            return
        if self.optimizer_keeps_zeros:
            self.skipped_weight_passes += 1
            return
        sp.apply_masks()
        if self.weight_pass == "auto" and not sp.sharded and optimizer is not None:
            trained = [t.weight for t in sp.targets if t.weight.requires_grad]  # frozen bases are not stepped
            inner = zero_preserving_optimizer(optimizer, trained)
            if inner is not None:
                sp.mask_optimizer_state(inner)
                self.optimizer_keeps_zeros = True
                logger.info(
                    "%s keeps pruned weights at zero: skipping the weight pass after each step",
                    type(inner).__name__,
                )

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and self.optimizer_keeps_zeros:
            self.verify_zeros(state.global_step)

    def verify_zeros(self, step: int) -> None:
        """Check that the skipped weight passes lost nothing; on a non-zero pruned weight, re-zero, log an error
        and go back to a weight pass after every step."""
        sp = self.sparsifier
        stray = sp.pruned_nonzeros()
        if stray:
            logger.error(
                "step %d: %d pruned weights were non-zero although the optimizer should keep them at zero "
                "(did something else write to the weights?); re-zeroed, and masking weights after every step "
                "from now on",
                step,
                stray,
            )
            sp.apply_masks()
            self.optimizer_keeps_zeros = False
            self.weight_pass = "always"

    def on_log(self, args, state, control, logs=None, **kwargs):
        stats = self.sparsity_logs()
        if logs is None or not stats:
            return
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_save(self, args, state, control, **kwargs):
        sp = self.sparsifier
        if sp is None or not sp.has_masks or not (args.should_save or sp.sharded):
            return
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # sharded (FSDP2) masks are gathered on every rank; the main process writes them
        sp.save_masks(directory, state.global_step, write=args.should_save and os.path.isdir(directory))

    def on_train_end(self, args, state, control, **kwargs):
        sp = self.sparsifier
        if sp is None:
            return
        _warn_about_held_halves(self._model)  # `load_best_model_at_end` has just loaded a checkpoint
        if self.optimizer_keeps_zeros:
            self.verify_zeros(state.global_step)
        self.optimizer_keeps_zeros = False
        sp.remove_grad_hooks()
        sp.drop_dense_shadow()
        sp.apply_masks()
        if sp.level < 1.0:
            logger.warning(
                "Training ended at step %d before the sparsity schedule finished (level %.3f; full %s at step %d): "
                "the model is NOT fully %s sparse.",
                state.global_step,
                sp.level,
                self.config.pattern,
                self.config.final_step,
                self.config.pattern,
            )
        else:
            sp.check()
