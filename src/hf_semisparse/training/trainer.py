"""`SparsityTrainer`: a drop-in `transformers.Trainer` that prunes to N:M and recovers accuracy."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import AutocastKwargs
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint_format import BITMASK_SUFFIX
from ..config import SparsityConfig
from ..lora import check_lora_maskable
from ..peft_structure import is_peft_model
from ..quantizer_ops import begin_checkpoint_load, end_checkpoint_load
from ..targets import select_targets
from ..utils import unwrap_model
from .callback import SparsityCallback, check_not_on_kernels, resolve_config

logger = logging.getLogger(__name__)


@dataclass
class SparsityTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the sparsity configuration (a dict, or a path to `sparsity_config.json`)."""

    sparsity_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "SparsityConfig as a dict, or a path to sparsity_config.json. Default: 2:4 magnitude, "
            "one-shot at step 0."
        },
    )


def logits_distillation_loss(
    student_out, teacher_out, temperature: float, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the softmaxes at temperature T, per predicted distribution, averaged over
    the `*logits` outputs the two share (e.g. `start_logits` and `end_logits` for question answering).

    Each output's leading dimensions index distributions: `[batch, classes]` averages over the batch, a causal
    LM's `[batch, tokens, vocab]` over every token (not summed over the sequence, so the loss has the scale of the
    per-token task loss it is mixed with). `attention_mask` (`[batch, tokens]`, 1 = real token): where it matches
    an output's leading shape, padded positions are left out of the mean.
    """
    t = temperature
    losses = []
    for key, student_logits in student_out.items():
        if not key.endswith("logits") or key not in teacher_out:
            continue
        if teacher_out[key].shape != student_logits.shape:
            raise ValueError(
                f"distillation: the teacher's {key} has shape {tuple(teacher_out[key].shape)}, the student's "
                f"{tuple(student_logits.shape)}; the teacher must share the student's vocabulary (or classes)"
            )
        s_log = torch.log_softmax(student_logits.float() / t, dim=-1)
        t_log = torch.log_softmax(teacher_out[key].float() / t, dim=-1)
        per_row = torch.nn.functional.kl_div(s_log, t_log, log_target=True, reduction="none").sum(-1)
        if attention_mask is not None and attention_mask.shape == per_row.shape:
            keep = attention_mask.to(per_row.dtype)
            losses.append((per_row * keep).sum() / keep.sum().clamp_min(1) * t * t)
        else:
            losses.append(per_row.mean() * t * t)
    if not losses:
        raise ValueError("distillation found no '*logits' output shared by the student and the teacher")
    return sum(losses) / len(losses)


def hidden_states_loss(student_out, teacher_out) -> torch.Tensor:
    """Mean over layers of the mean squared error between the student's and the teacher's hidden states."""
    student, teacher = student_out.get("hidden_states"), teacher_out.get("hidden_states")
    if student is None or teacher is None:
        raise ValueError(
            "distillation_hidden_weight > 0 needs hidden states from both models, but one returned none "
            "for output_hidden_states=True"
        )
    if len(student) != len(teacher) or any(
        s.shape != t.shape for s, t in zip(student, teacher, strict=False)
    ):
        raise ValueError(
            "distillation_hidden_weight > 0 needs a teacher with the student's layers and hidden size, got "
            f"{[tuple(s.shape) for s in student]} and {[tuple(t.shape) for t in teacher]}"
        )
    losses = [
        torch.nn.functional.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)
    ]
    return sum(losses) / len(losses)


def _mostly_fp32(model: torch.nn.Module) -> bool:
    """Whether float32 holds most of `model`'s floating-point parameter elements."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return bool(counts) and max(counts, key=counts.get) == torch.float32


class SparsityTrainer(Trainer):
    """`Trainer` that prunes the model to N:M (default 2:4) and keeps it so while fine-tuning.

    Everything else is the parent's: swap `Trainer` for `SparsityTrainer` in an existing script.

    Args:
        sparsity_config: a `SparsityConfig`, its dict, or a path. Defaults to `args.sparsity_config` when `args`
            is a `SparsityTrainingArguments`, else `SparsityConfig()`.
        teacher_model: a dense model to distill from during recovery: never trained (it runs under
            `torch.no_grad`, its `requires_grad` flags are left as they are), put in eval mode and moved to the
            training device; may be fp16/bf16. It must be another object than `model` (pass a copy).
        distillation_weight: w in (1 - w) * task loss + w * distillation loss.
        distillation_temperature: softmax temperature T of the distillation loss (scaled by T^2).
        distillation_hidden_weight: h, the weight of a loss on the hidden states, added on top: the mean over
            layers of the mean squared error between student and teacher hidden states (both models are run
            with `output_hidden_states=True`; they must have the same number of layers and hidden size).
            0 (the default) distills the logits only.
        teacher_autocast: whether the teacher's forward runs under the training's mixed precision (`bf16=True` or
            `fp16=True` autocast; accelerate applies it to the student only). None (the default): yes for a
            teacher whose weights are mostly fp32 (else it would run full-precision GEMMs beside a bf16 student),
            no for one in fp16/bf16 (autocast would recast an fp16 teacher to bf16), decided from the teacher's
            dtype when the trainer is built (cast the teacher before). False keeps an fp32 teacher's logits in full
            precision, e.g. for a model whose activations overflow fp16.
        *args, **kwargs: as for `transformers.Trainer`.

    Example:
        >>> trainer = SparsityTrainer(model=model, args=TrainingArguments("out"), train_dataset=ds,
        ...                           sparsity_config=SparsityConfig(schedule="gradual", end_step=500))
        >>> trainer.train()
        >>> trainer.save_model("out/final")  # dense weights with 2:4 zeros, config.json records the sparsity
    """

    def __init__(
        self,
        *args,
        sparsity_config: SparsityConfig | dict | str | None = None,
        teacher_model: torch.nn.Module | None = None,
        distillation_weight: float = 0.5,
        distillation_temperature: float = 2.0,
        distillation_hidden_weight: float = 0.0,
        teacher_autocast: bool | None = None,
        **kwargs,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:  # before Trainer's own checks, whose message for this case names no way out
            check_not_on_kernels(model)
        super().__init__(*args, **kwargs)
        if (
            not 0.0 <= distillation_weight <= 1.0
            or distillation_temperature <= 0
            or distillation_hidden_weight < 0
        ):
            raise ValueError(
                "distillation_weight must be in [0, 1], distillation_temperature > 0 and "
                f"distillation_hidden_weight >= 0, got {distillation_weight}, {distillation_temperature}, "
                f"{distillation_hidden_weight}"
            )
        self.teacher_model = teacher_model
        self.distillation_weight = distillation_weight
        self.distillation_temperature = distillation_temperature
        self.distillation_hidden_weight = distillation_hidden_weight
        if teacher_autocast is not None and not isinstance(teacher_autocast, bool):
            raise TypeError(f"teacher_autocast must be None, True or False, got {teacher_autocast!r}")
        if teacher_autocast is None and isinstance(teacher_model, torch.nn.Module):
            teacher_autocast = _mostly_fp32(teacher_model)  # decided once, not on every step
        self.teacher_autocast = bool(teacher_autocast)
        if teacher_model is not None:
            if not isinstance(teacher_model, torch.nn.Module):
                raise TypeError(
                    f"teacher_model must be a loaded model (torch.nn.Module), got {type(teacher_model).__name__}: "
                    "load it first, e.g. AutoModelForCausalLM.from_pretrained(path)"
                )
            if teacher_model is self.model:
                raise ValueError("teacher_model is the model being trained; pass a copy of the dense model")
            teacher_model.eval().to(self.args.device)
        elif (distillation_weight, distillation_temperature, distillation_hidden_weight) != (0.5, 2.0, 0.0):
            logger.warning(
                "SparsityTrainer got distillation settings but no teacher_model: they have no effect (pass "
                "teacher_model= a copy of the dense model to distill from)"
            )
        from_args = getattr(self.args, "sparsity_config", None)
        if sparsity_config is None:
            sparsity_config = from_args
        elif from_args is not None and resolve_config(from_args) != resolve_config(sparsity_config):
            logger.warning(
                "SparsityTrainer got sparsity_config= and SparsityTrainingArguments.sparsity_config, and they "
                "differ: the trainer's argument is used"
            )
        config = resolve_config(sparsity_config)
        # fail now, not after the first epoch, on a config that selects nothing or an adapter that cannot be masked
        _, report = select_targets(self.model, config)
        if is_peft_model(unwrap_model(self.model)):
            check_lora_maskable(self.model, report.targets)
        self.sparsity_callback = SparsityCallback(config)
        # one fused gradient mask between backward and clipping instead of a Python hook per weight; kept as
        # hooks if this transformers version has no `_clip_grad_norm` to hook into
        self.sparsity_callback.hook_free_gradients = callable(getattr(Trainer, "_clip_grad_norm", None))
        self.add_callback(self.sparsity_callback)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """transformers' load, with the 2:4 halves of a sharded checkpoint of a loaded model checked to pair."""
        target = model if model is not None else self.model
        begin_checkpoint_load(target)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        end_checkpoint_load(target, str(resume_from_checkpoint))

    def _load_best_model(self):
        begin_checkpoint_load(self.model)
        super()._load_best_model()
        end_checkpoint_load(self.model, str(self.state.best_model_checkpoint))

    def _issue_warnings_after_load(self, load_result) -> None:
        """transformers' resume from a sharded checkpoint lists its keys against the model's, so the bitmask of
        every 2:4 weight of a loaded model shows as "unexpected" though it was read (expanded on load): leave
        those out of the warning."""
        unexpected = [k for k in load_result.unexpected_keys if not k.endswith(BITMASK_SUFFIX)]
        if len(unexpected) != len(load_result.unexpected_keys):
            load_result = type(load_result)(load_result.missing_keys, unexpected)
        return super()._issue_warnings_after_load(load_result)

    def _clip_grad_norm(self, model):
        self.sparsity_callback.mask_gradients()  # clipping must see the gradients of the sparse model
        return super()._clip_grad_norm(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss, mixed with a KL loss towards the dense teacher's logits when a teacher is given:
        (1 - w) * task + w * T^2 * KL(teacher || student) at temperature T, over every `*logits` output, plus
        h * the mean over layers of MSE(student hidden states, teacher hidden states) when h > 0."""
        if self.teacher_model is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden = self.distillation_hidden_weight > 0
        if hidden:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        label_keys = set(self.label_names or []) | {"labels", "start_positions", "end_positions"}
        teacher_inputs = {k: v for k, v in inputs.items() if k not in label_keys}
        # the mask of the positions the logits belong to: the decoder's for an encoder-decoder, never the encoder's
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        prepare = getattr(self.teacher_model, "prepare_decoder_input_ids_from_labels", None)
        if encoder_decoder and "decoder_input_ids" not in inputs and "labels" in inputs and callable(prepare):
            # the student made its decoder inputs from the labels: the teacher gets the same ones
            teacher_inputs["decoder_input_ids"] = prepare(labels=inputs["labels"])
        with torch.no_grad(), self._teacher_autocast():
            teacher_out = self.teacher_model(**teacher_inputs)
        mask = inputs.get("decoder_attention_mask" if encoder_decoder else "attention_mask")
        kd = logits_distillation_loss(outputs, teacher_out, self.distillation_temperature, mask)
        if hidden:
            kd_hidden = hidden_states_loss(outputs, teacher_out)
        if self._task_loss_spans_accumulation(num_items_in_batch):
            # the task loss is already a mean over all micro-batches of the step (divided by num_items_in_batch)
            # and the Trainer will not divide it by the accumulation steps: so that the sum over micro-batches
            # weighs the distillation terms as it weighs the task loss, divide them here
            steps = getattr(self, "current_gradient_accumulation_steps", 1) or 1
            kd = kd / steps
            if hidden:
                kd_hidden = kd_hidden / steps
        w = self.distillation_weight
        loss = (1 - w) * loss + w * kd
        if hidden:
            loss = loss + self.distillation_hidden_weight * kd_hidden
        return (loss, outputs) if return_outputs else loss

    def _teacher_autocast(self):
        """accelerate's mixed-precision autocast for the teacher's forward, or no context (`teacher_autocast`)."""
        if not self.teacher_autocast:
            return contextlib.nullcontext()
        # no cast cache: the teacher's weights keep requires_grad, and autocast would hold a low-precision copy of
        # each one until the forward ends (2 bytes per parameter more at peak; each weight is used once anyway)
        enabled = getattr(self.accelerator.autocast_handler, "enabled", True)
        return self.accelerator.autocast(AutocastKwargs(enabled=enabled, cache_enabled=False))

    def _task_loss_spans_accumulation(self, num_items_in_batch) -> bool:
        """Whether transformers' Trainer normalised the task loss by the accumulated `num_items_in_batch` (and so
        does not divide it by the gradient accumulation steps), as its `training_step` decides."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    @property
    def sparsity_config(self) -> SparsityConfig:
        return self.sparsity_callback.config

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self.sparsity_callback.resume_from_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        logs = {**logs, **self.sparsity_callback.sparsity_logs()}
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        sparsifier = self.sparsity_callback.sparsifier
        if sparsifier is not None and sparsifier.level >= 1.0:
            sparsifier.check()  # never ship a checkpoint that claims 2:4 but is not
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.sparsity_config.save_pretrained(output_dir or self.args.output_dir)
