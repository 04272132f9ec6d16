"""`SparsityConfig`: what to prune, how, and when."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_NAME = "sparsity_config.json"

METHODS = ("magnitude", "wanda", "sparsegpt")
SCHEDULES = ("oneshot", "gradual")

# Modules that are task heads or poolers in transformers models; never pruned by default.
DEFAULT_EXCLUDE_MODULES = [
    "lm_head",
    "qa_outputs",
    "classifier",
    "pre_classifier",
    "score",
    "pooler",
    "cls",
    "embed_out",
    "output_projection",
]


@dataclass
class SparsityConfig:
    """Configuration of N:M (by default 2:4) semi-structured sparsity.

    Example:
        >>> cfg = SparsityConfig(target_modules=r".*encoder.*", schedule="gradual", end_step=1000)
        >>> SparsityConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to sparsify. A list of names (a module matches if its full name equals an entry or "
            "ends with '.' + entry) or one regex matched against the full name. None: every eligible "
            "nn.Linear / Conv1D of the base model."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_EXCLUDE_MODULES),
        metadata={
            "help": "Modules never sparsified, same matching rules as target_modules (a name also "
            "excludes everything below it)."
        },
    )
    method: str = field(
        default="magnitude",
        metadata={
            "help": f"Mask selection, one of {METHODS}. 'wanda' and 'sparsegpt' calibrate on data: "
            "prune_24(calibration_data=...) or, in training, the first calibration_batches batches."
        },
    )
    calibration_batches: int = field(
        default=16,
        metadata={
            "help": "Batches of the training data that SparsityTrainer/SparsityCallback calibrate wanda/sparsegpt "
            "on; prune_24 uses every batch of its calibration_data and records how many."
        },
    )
    n: int = field(default=2, metadata={"help": "Weights kept in each group of m."})
    m: int = field(default=4, metadata={"help": "Group size along the input dimension."})
    schedule: str = field(
        default="oneshot",
        metadata={
            "help": "'oneshot': prune fully at start_step. 'gradual': the share of N:M-pruned groups of "
            "each layer rises along a cubic curve from start_step to end_step."
        },
    )
    start_step: int = field(default=0, metadata={"help": "Optimizer step at which pruning starts."})
    end_step: int | None = field(
        default=None, metadata={"help": "Step at which a gradual schedule reaches 100%."}
    )
    prune_every: int = field(default=1, metadata={"help": "Gradual schedule: steps between pruning updates."})
    mask_update_every: int | None = field(
        default=None,
        metadata={
            "help": "Re-select masks from a dense shadow of the weights every this many steps "
            "(straight-through estimator) until freeze_step. None: masks fixed once fully pruned."
        },
    )
    freeze_step: int | None = field(
        default=None,
        metadata={"help": "Step after which masks never change (needed with mask_update_every)."},
    )
    min_features: int = field(
        default=32, metadata={"help": "Linear layers with fewer input or output features are skipped."}
    )
    kernel_multiple: int = field(
        default=16,
        metadata={
            "help": "In/out features must be multiples of this for a 2:4 GPU kernel (cuSPARSELt needs 16 "
            "for fp16/bf16). Set to the group size m to prune layers no kernel can run."
        },
    )

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):  # a tuple is kept as the list it stands for
            if isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, list(getattr(self, name)))
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a field validates the whole config; an invalid value is refused and the old one kept.

        To change fields that depend on each other (e.g. `schedule` and `end_step`) use
        `dataclasses.replace(config, schedule="gradual", end_step=1000)`.
        """
        if not self.__dict__.get("_validated") or name not in _FIELD_NAMES:
            object.__setattr__(self, name, value)
            return
        if name in ("target_modules", "exclude_modules") and isinstance(value, tuple):
            value = list(value)
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except (TypeError, ValueError) as exc:
            object.__setattr__(self, name, old)
            raise type(exc)(
                f"{exc} (SparsityConfig.{name} was left at {old!r}; to change fields that depend on each other "
                "together, use dataclasses.replace(config, ...))"
            ) from None

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INT_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                allowed = "an int or None" if name in _OPTIONAL_INT_FIELDS else "an int"
                raise TypeError(
                    f"SparsityConfig.{name} must be {allowed}, got {type(value).__name__} {value!r}"
                    + (
                        f"; write {name}={int(value)}"
                        if isinstance(value, str) and value.strip().isdigit()
                        else ""
                    )
                )
        for name in ("method", "schedule"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(
                    f"SparsityConfig.{name} must be a str, got {type(getattr(self, name)).__name__}"
                )

    def validate(self) -> None:
        """Raise `ValueError` (or `TypeError` for a wrong type) naming the first invalid field."""
        self._check_types()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"SparsityConfig.{name}={value!r} is not a valid regex: {exc}") from exc
            elif isinstance(value, list):
                if not all(isinstance(v, str) and v for v in value):
                    raise ValueError(f"SparsityConfig.{name} must hold non-empty strings, got {value!r}")
            else:
                raise TypeError(
                    f"SparsityConfig.{name} must be a list of names, a regex string or None, "
                    f"got {type(value).__name__}"
                )
        if self.method not in METHODS:
            raise ValueError(
                f"SparsityConfig.method={self.method!r} is not supported; choose one of {METHODS}"
            )
        if self.method != "magnitude" and (self.schedule != "oneshot" or self.mask_update_every is not None):
            raise ValueError(
                f"SparsityConfig.method={self.method!r} prunes once from calibration data: it needs "
                "schedule='oneshot' and no mask_update_every"
            )
        if self.calibration_batches < 1:
            raise ValueError(
                f"SparsityConfig.calibration_batches must be >= 1, got {self.calibration_batches}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SparsityConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"SparsityConfig needs 0 < n < m, got n={self.n}, m={self.m}")
        if self.start_step < 0:
            raise ValueError(f"SparsityConfig.start_step must be >= 0, got {self.start_step}")
        if self.schedule == "gradual" and (self.end_step is None or self.end_step <= self.start_step):
            raise ValueError(
                "SparsityConfig(schedule='gradual') needs end_step > start_step, "
                f"got start_step={self.start_step}, end_step={self.end_step}"
            )
        if self.prune_every < 1:
            raise ValueError(f"SparsityConfig.prune_every must be >= 1, got {self.prune_every}")
        if self.mask_update_every is not None:
            if self.mask_update_every < 1:
                raise ValueError(
                    f"SparsityConfig.mask_update_every must be >= 1, got {self.mask_update_every}"
                )
            if self.freeze_step is None:
                raise ValueError(
                    "SparsityConfig.mask_update_every needs freeze_step (the step masks stop changing)"
                )
            if self.schedule != "oneshot":
                raise ValueError("SparsityConfig.mask_update_every works with schedule='oneshot' only")
        if self.freeze_step is not None and self.freeze_step < self.start_step:
            raise ValueError(
                f"SparsityConfig.freeze_step ({self.freeze_step}) is before start_step ({self.start_step})"
            )
        if self.min_features < 1:
            raise ValueError(f"SparsityConfig.min_features must be >= 1, got {self.min_features}")
        if self.kernel_multiple < 1 or self.kernel_multiple % self.m:
            raise ValueError(
                f"SparsityConfig.kernel_multiple must be a positive multiple of m={self.m}, got {self.kernel_multiple}"
            )

    # ------------------------------------------------------------------ schedule
    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def final_step(self) -> int:
        """The step from which every target is fully N:M pruned."""
        return self.end_step if self.schedule == "gradual" else self.start_step

    def level_at(self, step: int) -> float:
        """Share of N:M-pruned groups at optimizer step `step` (0.0 before start, 1.0 when done)."""
        if step < self.start_step:
            return 0.0
        if self.schedule == "oneshot" or step >= self.end_step:
            return 1.0
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return 1.0 - (1.0 - progress) ** 3

    def is_prune_step(self, step: int) -> bool:
        """Whether masks are (re)computed at the start of optimizer step `step`."""
        if step < self.start_step:
            return False
        if step == self.start_step:
            return True
        if self.schedule == "gradual":
            return step <= self.end_step and (
                (step - self.start_step) % self.prune_every == 0 or step == self.end_step
            )
        if self.mask_update_every is not None:
            on_period = (step - self.start_step) % self.mask_update_every == 0
            return step == self.freeze_step or (step < self.freeze_step and on_period)
        return False

    def uses_dense_shadow(self, step: int) -> bool:
        """Whether straight-through mask re-selection is active at `step`."""
        return self.mask_update_every is not None and self.start_step <= step < self.freeze_step

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SparsityConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `sparsity_config.json` into `save_directory` (atomically) and return its path."""
        from .utils import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SparsityConfig:
        """Read a config from a directory holding `sparsity_config.json`, or from the JSON file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"No sparsity config at {path}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


_FIELD_NAMES = frozenset(f.name for f in fields(SparsityConfig))
_INT_FIELDS = (
    "calibration_batches",
    "n",
    "m",
    "start_step",
    "prune_every",
    "min_features",
    "kernel_multiple",
)
_OPTIONAL_INT_FIELDS = ("end_step", "mask_update_every", "freeze_step")
