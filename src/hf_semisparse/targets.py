"""Which modules of a model get N:M sparsity, and why the others do not."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import SparsityConfig
from .peft_structure import adapter_of, adapter_prefixes, base_name, peft_base_model
from .utils import unwrap_model

try:  # transformers' GPT-2 style linear layer: weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:  # FSDP1 flattens parameters into shards that no longer have the weight's [out, in] shape
    from torch.distributed.fsdp import FullyShardedDataParallel

    FSDP1_TYPES: tuple[type, ...] = (FullyShardedDataParallel,)
except ImportError:  # torch built without distributed support
    FSDP1_TYPES = ()


@dataclass
class SparseTarget:
    """A module whose weight is N:M sparsified."""

    name: str
    module: nn.Module
    transposed: bool  # True for Conv1D, whose weight is [in, out]

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def linear_view(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """`tensor` (default: the weight) seen as `[out, in]`, the layout masks are computed in."""
        tensor = self.weight if tensor is None else tensor
        return tensor.t() if self.transposed else tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.linear_view().shape)


@dataclass
class ModuleDecision:
    name: str
    module_type: str
    shape: tuple[int, ...] | None  # [out, in]
    selected: bool
    reason: str


@dataclass
class SparsityReport:
    """Per module: sparsified or skipped, and why."""

    decisions: list[ModuleDecision]
    pattern: str = "2:4"

    @property
    def targets(self) -> list[str]:
        return [d.name for d in self.decisions if d.selected]

    @property
    def skipped(self) -> list[ModuleDecision]:
        return [d for d in self.decisions if not d.selected]

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "modules": [
                {
                    "name": d.name,
                    "type": d.module_type,
                    "shape": list(d.shape) if d.shape else None,
                    "sparsified": d.selected,
                    "reason": d.reason,
                }
                for d in self.decisions
            ],
        }

    def __str__(self) -> str:
        width = max((len(d.name) for d in self.decisions), default=4)
        lines = [f"{'module':<{width}}  {'shape':>12}  status"]
        for d in self.decisions:
            shape = "x".join(map(str, d.shape)) if d.shape else "-"
            status = f"{self.pattern} sparse" if d.selected else f"skipped: {d.reason}"
            lines.append(f"{d.name:<{width}}  {shape:>12}  {status}")
        lines.append(f"{len(self.targets)} of {len(self.decisions)} linear modules sparsified")
        return "\n".join(lines)


class NoTargetsError(ValueError):
    """The configuration selects no module; the message lists what was skipped and why."""


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _excluded(name: str, patterns: list[str] | str | None) -> bool:
    """A name excludes itself and everything below it; a regex must match the full name."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    parts = name.split(".")
    return any(_matches(".".join(parts[: i + 1]), patterns) for i in range(len(parts)))


def is_linear_module(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (whose weight is stored [in, out])."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def shared_weight_owners(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names the same tensor is registered under (tied weights), for shared ones only."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {n: [o for o in group if o != n] for group in names.values() if len(group) > 1 for n in group}


def _head_prefixes(model: nn.Module) -> list[str]:
    """Names of the task heads: the direct children outside the base model, and the output embeddings.

    Models such as T5ForConditionalGeneration hold their base model's parts directly (no `base_model_prefix`
    child), so their `lm_head` is found as the output embeddings (`get_output_embeddings()`), tied or not.
    """
    prefix = getattr(model, "base_model_prefix", "")
    heads = []
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        heads = [name for name, _ in model.named_children() if name != prefix]
    try:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except (AttributeError, NotImplementedError):
        output = None
    if isinstance(output, nn.Module):
        heads += [name for name, module in model.named_modules() if module is output and name not in heads]
    return heads


def _tied_to_non_linear(name: str, shared: dict[str, list[str]], model: nn.Module) -> bool:
    """The weight of `name` is also the weight of a module that is not a linear layer (e.g. an input embedding)."""
    others = shared.get(f"{name}.weight", [])
    return any(
        not is_linear_module(model.get_submodule(o.rsplit(".", 1)[0])) if "." in o else True for o in others
    )


def _dense_expert_weights(model: nn.Module) -> list[ModuleDecision]:
    """Fused 3-D weights (transformers 5 mixture-of-experts layers: `[experts, out, in]` parameters such as
    Mixtral's `experts.gate_up_proj` / `experts.down_proj`), listed so the report shows they stay dense."""
    found = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                found.append(
                    ModuleDecision(
                        f"{module_name}.{param_name}" if module_name else param_name,
                        type(module).__name__,
                        tuple(param.shape),
                        False,
                        "fused 3-D expert weight [experts, out, in]: stays dense (2:4 pruning of fused "
                        "experts is not supported yet)",
                    )
                )
    return found


def select_targets(model: nn.Module, config: SparsityConfig) -> tuple[list[SparseTarget], SparsityReport]:
    """Find the modules `config` sparsifies.

    A PEFT model (`PeftModel`, or a tuner model such as `LoraModel`) is looked through: the targets are the
    base layers of its tuner layers, named as in the base model (`model.layers.0.mlp.up_proj`, no
    `.base_layer`), task heads are detected on the base model, and adapter modules (`lora_A`, `lora_B`, ...)
    are reported as skipped, never selected.

    Raises:
        NoTargetsError: nothing is selected (the message lists every skipped module and why).
        ValueError/TypeError: a module named explicitly by `target_modules` cannot be N:M sparsified.
    """
    model = peft_base_model(unwrap_model(model))  # a PeftModel: its base layers are the targets
    if any(isinstance(m, FSDP1_TYPES) for m in model.modules()):
        raise NotImplementedError(
            "the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameter shards no longer have "
            "the weights' [out, in] shape; N:M masks need FSDP2: set fsdp_config={'fsdp_version': 2, ...} in "
            "TrainingArguments (or use torch.distributed.fsdp.fully_shard)"
        )
    heads = _head_prefixes(model)
    shared = shared_weight_owners(model)
    targets: list[SparseTarget] = []
    decisions: list[ModuleDecision] = []
    explicit = config.target_modules is not None
    adapters = adapter_prefixes(model)

    for wrapped_name, module in model.named_modules():
        if not wrapped_name:
            continue
        adapter = adapter_of(wrapped_name, adapters)
        name = base_name(wrapped_name)  # as named in the unwrapped model, where the mask is recorded
        if adapter is not None:
            if is_linear_module(module):
                shape = tuple(module.weight.shape)
                decisions.append(
                    ModuleDecision(
                        wrapped_name,
                        type(module).__name__,
                        shape,
                        False,
                        f"PEFT adapter ({adapter}), never a target",
                    )
                )
            continue
        named = _matches(name, config.target_modules)
        if not is_linear_module(module):
            has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
            if named and has_weight and not list(module.children()):
                raise TypeError(
                    f"target_modules selects {name} ({type(module).__name__}), but only nn.Linear and "
                    "transformers' Conv1D can be N:M sparsified. Narrow target_modules."
                )
            continue

        transposed = not isinstance(module, nn.Linear)
        weight = module.weight
        shape = tuple(weight.t().shape) if transposed else tuple(weight.shape)
        out_f, in_f = shape
        reason = ""
        if explicit and not named:
            reason = "not in target_modules"
        elif _excluded(name, config.exclude_modules):
            reason = "in exclude_modules"
        elif not explicit and any(name == h or name.startswith(h + ".") for h in heads):
            reason = "task head (outside the base model)"
        elif in_f % config.m:
            msg = f"in_features {in_f} is not a multiple of {config.m}"
            if explicit:
                raise ValueError(f"{name}: {msg}, so it has no {config.pattern} groups. Exclude it.")
            reason = msg
        elif _tied_to_non_linear(name, shared, model):
            tied = shared[f"{name}.weight"]
            msg = f"weight tied to {tied} (pruning it would prune those too)"
            if explicit:
                raise ValueError(
                    f"{name}: {msg}. Untie it first (config.tie_word_embeddings=False and give it its own copy of "
                    "the weight) or leave it out of target_modules."
                )
            reason = msg
        elif weight.dtype not in KERNEL_DTYPES:
            reason = f"dtype {weight.dtype} has no 2:4 kernel"
        elif min(out_f, in_f) < config.min_features:
            reason = f"too small (min_features={config.min_features})"
        elif out_f % config.kernel_multiple or in_f % config.kernel_multiple:
            reason = f"shape not a multiple of {config.kernel_multiple} (no 2:4 kernel)"

        decisions.append(ModuleDecision(name, type(module).__name__, shape, not reason, reason or "selected"))
        if not reason:
            targets.append(SparseTarget(name, module, transposed))

    decisions += _dense_expert_weights(model)
    report = SparsityReport(decisions, pattern=config.pattern)
    if not targets:
        raise NoTargetsError(
            f"SparsityConfig selects no module (target_modules={config.target_modules!r}). "
            f"What was found:\n{report}"
        )
    return targets, report
