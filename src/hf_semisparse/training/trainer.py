"""`SparsityTrainer`: a drop-in `transformers.Trainer` that prunes to N:M and recovers accuracy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..config import SparsityConfig
from ..targets import select_targets
from .callback import SparsityCallback, resolve_config

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


class SparsityTrainer(Trainer):
    """`Trainer` that prunes the model to N:M (default 2:4) and keeps it so while fine-tuning.

    Everything else is the parent's: swap `Trainer` for `SparsityTrainer` in an existing script.

    Args:
        sparsity_config: a `SparsityConfig`, its dict, or a path. Defaults to `args.sparsity_config` when `args`
            is a `SparsityTrainingArguments`, else `SparsityConfig()`.
        *args, **kwargs: as for `transformers.Trainer`.

    Example:
        >>> trainer = SparsityTrainer(model=model, args=TrainingArguments("out"), train_dataset=ds,
        ...                           sparsity_config=SparsityConfig(schedule="gradual", end_step=500))
        >>> trainer.train()
        >>> trainer.save_model("out/final")  # dense weights with 2:4 zeros, config.json records the sparsity
    """

    def __init__(self, *args, sparsity_config: SparsityConfig | dict | str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if sparsity_config is None:
            sparsity_config = getattr(self.args, "sparsity_config", None)
        config = resolve_config(sparsity_config)
        select_targets(
            self.model, config
        )  # fail now, not after the first epoch, on a config that selects nothing
        self.sparsity_callback = SparsityCallback(config)
        self.add_callback(self.sparsity_callback)

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
