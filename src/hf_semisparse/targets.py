"""Which modules of a model get N:M sparsity, and why the others do not."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import DEFAULT_EXCLUDE_MODULES, SparsityConfig
from .peft_structure import adapter_of, adapter_prefixes, base_name, peft_base_model
from .utils import output_head, unwrap_model

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


EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")  # transformers 5 fused expert weights


@dataclass
class SparseTarget:
    """A weight that is N:M sparsified: a linear layer's `weight`, or a fused mixture-of-experts parameter.

    A linear target is named after its module (`model.layers.0.mlp.up_proj`); an expert target after its parameter
    (`model.layers.0.mlp.experts.gate_up_proj`, shape `[experts, out, in]`, or `[experts, in, out]` when the
    experts module is `is_transposed`). Masks are computed in the "linear view" `[..., out, in]`, whose last
    dimension is the one the matmul contracts, so each expert's matrix is pruned along its own input dimension.
    """

    name: str
    module: nn.Module
    transposed: bool  # True for Conv1D ([in, out]) and transposed experts ([experts, in, out])
    param_name: str = "weight"

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def is_expert(self) -> bool:
        """A fused `[experts, ...]` parameter of a transformers mixture-of-experts module."""
        return self.param_name != "weight"

    @property
    def weight_name(self) -> str:
        """The parameter's qualified name (`...up_proj.weight`, or the expert parameter's own name)."""
        return self.name if self.is_expert else f"{self.name}.weight"

    @property
    def module_name(self) -> str:
        return self.name.rsplit(".", 1)[0] if self.is_expert else self.name

    def linear_view(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """`tensor` (default: the weight) seen as `[..., out, in]`, the layout masks are computed in."""
        tensor = self.weight if tensor is None else tensor
        return tensor.transpose(-2, -1) if self.transposed else tensor

    def param_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of `linear_view`: an `[..., out, in]` tensor in the parameter's own layout."""
        return tensor.transpose(-2, -1) if self.transposed else tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.linear_view().shape)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers 5 experts module (`@use_experts_implementation`): fused 3-D expert weights whose layout
    the decorator records (`is_transposed`, `has_gate`), dispatched to eager / batched_mm / grouped_mm."""
    return (
        hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
        and any(
            isinstance(getattr(module, p, None), torch.Tensor) and getattr(module, p).dim() == 3
            for p in EXPERT_PARAMS
        )
    )


@dataclass
class ModuleDecision:
    """One weight of the model: sparsified or kept dense, and why.

    `kind` is "linear" (a linear layer, named after its module), "experts" (a fused mixture-of-experts parameter,
    named after the parameter) or "other" (another weight of 2 or more dimensions, named after the parameter:
    embeddings, routers, ..., always dense).
    """

    name: str
    module_type: str
    shape: tuple[int, ...] | None  # [out, in]; [experts, out, in] for expert weights
    selected: bool
    reason: str
    kind: str = "linear"
    # the weight is another listed weight's (a head tied to the input embedding): counted once in the shares
    tied_to_listed: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 0


@dataclass
class SparsityReport:
    """Per weight: sparsified or kept dense, and why (every weight of 2 or more dimensions is listed)."""

    decisions: list[ModuleDecision]
    pattern: str = "2:4"
    # what `prune_24`'s calibration did (Wanda/SparseGPT): `calibrated_prune_`'s stats, e.g. "pipeline",
    # "block_s" and, with `reconstruct_epochs`, "reconstruction" (one record per block) and "blocks_tuned"
    calibration: dict | None = field(default=None, compare=False, repr=False)

    @property
    def targets(self) -> list[str]:
        """The sparsified linear layers (module names)."""
        return [d.name for d in self.decisions if d.selected and d.kind == "linear"]

    @property
    def expert_targets(self) -> list[str]:
        """The sparsified fused expert parameters (parameter names, e.g. `...mlp.experts.gate_up_proj`)."""
        return [d.name for d in self.decisions if d.selected and d.kind == "experts"]

    @property
    def skipped(self) -> list[ModuleDecision]:
        return [d for d in self.decisions if not d.selected]

    @property
    def sparsified_share(self) -> float:
        """Share of the listed weights' parameters that are sparsified (0 to 1); a weight tied to another listed
        one (an output head sharing the input embedding) is counted once."""
        total = sum(d.numel for d in self.decisions if not d.tied_to_listed)
        return sum(d.numel for d in self.decisions if d.selected) / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "sparsified_share": round(self.sparsified_share, 4),
            "modules": [
                {
                    "name": d.name,
                    "type": d.module_type,
                    "kind": d.kind,
                    "shape": list(d.shape) if d.shape else None,
                    "sparsified": d.selected,
                    "reason": d.reason,
                    "tied_to_listed": d.tied_to_listed,
                }
                for d in self.decisions
            ],
        }

    def __str__(self) -> str:
        width = max((len(d.name) for d in self.decisions), default=4)
        lines = [f"{'weight':<{width}}  {'shape':>14}  status"]
        for d in self.decisions:
            shape = "x".join(map(str, d.shape)) if d.shape else "-"
            status = f"{self.pattern} sparse" if d.selected else f"dense: {d.reason}"
            lines.append(f"{d.name:<{width}}  {shape:>14}  {status}")
        linear = [d for d in self.decisions if d.kind == "linear"]
        experts = [d for d in self.decisions if d.kind == "experts"]
        summary = f"{len(self.targets)} of {len(linear)} linear modules sparsified"
        if experts:
            summary += f", {len(self.expert_targets)} of {len(experts)} fused expert weights"
        tied = sum(d.tied_to_listed for d in self.decisions)
        summary += (
            f"; {self.sparsified_share:.0%} of the parameters of the {len(self.decisions)} weights listed"
            f"{' (tied ones counted once)' if tied else ''} are {self.pattern} sparse"
        )
        lines.append(summary)
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


def _exclusion_reason(name: str, config: SparsityConfig, shared: dict, model: nn.Module) -> str:
    """Why an excluded layer stays dense, in the words a user needs: a head the default list names is a task or
    output head (tied to the input embedding, for most decoder LLMs), not something the user chose."""
    if not _excluded(name, DEFAULT_EXCLUDE_MODULES) or isinstance(config.exclude_modules, str):
        return "in exclude_modules"
    if not set(DEFAULT_EXCLUDE_MODULES) <= set(config.exclude_modules):
        return "in exclude_modules"
    why = "a head (output, task or pooler), left dense by default (exclude_modules)"
    if _tied_to_non_linear(name, shared, model):
        why += f"; its weight is tied to {', '.join(shared[f'{name}.weight'])}"
    return why


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
    output = output_head(model)
    if output is not None:
        heads += [name for name, module in model.named_modules() if module is output and name not in heads]
    return heads


def _tied_to_non_linear(name: str, shared: dict[str, list[str]], model: nn.Module) -> bool:
    """The weight of `name` is also the weight of a module that is not a linear layer (e.g. an input embedding)."""
    others = shared.get(f"{name}.weight", [])
    return any(
        not is_linear_module(model.get_submodule(o.rsplit(".", 1)[0])) if "." in o else True for o in others
    )


def _expert_decisions(
    name: str, module: nn.Module, config: SparsityConfig, explicit: bool
) -> tuple[list[ModuleDecision], list[SparseTarget]]:
    """The fused expert parameters of the experts module `name`: each expert's `[out, in]` matrix is pruned along
    its input dimension (groups of `m` along `in`)."""
    decisions, targets = [], []
    transposed = bool(getattr(module, "is_transposed", False))
    for param_name in EXPERT_PARAMS:
        param = getattr(module, param_name, None)
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            continue
        full = f"{name}.{param_name}"
        view = param.transpose(-2, -1) if transposed else param
        shape = tuple(view.shape)
        in_f = shape[-1]
        named = _matches(full, config.target_modules) or _matches(name, config.target_modules)
        reason = ""
        if explicit and not named:
            reason = "not in target_modules"
        elif _excluded(full, config.exclude_modules):
            reason = "in exclude_modules"
        elif in_f % config.m:
            msg = f"expert input features {in_f} are not a multiple of {config.m}"
            if explicit:
                raise ValueError(f"{full}: {msg}, so it has no {config.pattern} groups. Exclude it.")
            reason = msg
        elif param.dtype not in KERNEL_DTYPES:
            reason = f"dtype {param.dtype} is not a floating dtype hf_semisparse prunes"
        elif min(shape[-2:]) < config.min_features:
            reason = f"too small (min_features={config.min_features})"
        decisions.append(
            ModuleDecision(
                full, type(module).__name__, shape, not reason, reason or "selected", kind="experts"
            )
        )
        if not reason:
            targets.append(SparseTarget(full, module, transposed, param_name))
    return decisions, targets


def _is_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """A mixture-of-experts router: a `...Router` module, or the `gate` beside an experts module."""
    if "router" in type(module).__name__.lower():
        return True
    last = name.rsplit(".", 1)[-1]
    return (
        parent is not None
        and last in ("gate", "router")
        and any(is_experts_module(m) for m in parent.children())
    )


def _other_weight_decisions(
    name: str, module: nn.Module, parent: nn.Module | None, embeddings: set[int], unsupported_3d: bool
) -> list[ModuleDecision]:
    """Weights of 2 or more dimensions of a module that is neither a linear layer nor an experts module."""
    out = []
    for param_name, param in module.named_parameters(recurse=False):
        if param.dim() < 2:
            continue
        if id(module) in embeddings or isinstance(module, nn.Embedding):
            reason = "embedding: a table lookup, not a matmul (2:4 does not apply)"
        elif _is_router(name, module, parent):
            reason = "mixture-of-experts router: kept dense (small, and every token's routing depends on it)"
        elif param.dim() == 3 and unsupported_3d:
            reason = (
                f"fused 3-D weight of {type(module).__name__}, not a transformers experts module "
                "(@use_experts_implementation): its layout is unknown, so it stays dense"
            )
        else:
            reason = f"weight of a {type(module).__name__}, not a linear layer: no {param.dim()}-D 2:4 rule"
        full = f"{name}.{param_name}" if name else param_name
        out.append(
            ModuleDecision(full, type(module).__name__, tuple(param.shape), False, reason, kind="other")
        )
    return out


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
    modules = dict(model.named_modules())
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            found = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            found = None
        if isinstance(found, nn.Module) and not is_linear_module(found):
            embeddings.add(id(found))

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
        if is_experts_module(module):
            found, selected = _expert_decisions(name, module, config, explicit)
            decisions += found
            targets += selected
            continue
        if not is_linear_module(module):
            parent = modules.get(wrapped_name.rsplit(".", 1)[0]) if "." in wrapped_name else model
            decisions += _other_weight_decisions(name, module, parent, embeddings, True)
            has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
            if named and has_weight and not list(module.children()):
                raise TypeError(
                    f"target_modules selects {name} ({type(module).__name__}), but only nn.Linear, "
                    "transformers' Conv1D and the fused weights of transformers experts modules can be N:M "
                    "sparsified. Narrow target_modules."
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
            reason = _exclusion_reason(name, config, shared, model)
        elif not explicit and any(name == h or name.startswith(h + ".") for h in heads):
            reason = "task head (outside the base model)"
            if _tied_to_non_linear(name, shared, model):
                reason += f"; its weight is tied to {', '.join(shared[f'{name}.weight'])}"
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

    listed = {d.name for d in decisions}
    for d in decisions:
        if d.kind == "linear" and not d.selected and set(shared.get(f"{d.name}.weight", ())) & listed:
            d.tied_to_listed = True
    report = SparsityReport(decisions, pattern=config.pattern)
    if not targets:
        raise NoTargetsError(
            f"SparsityConfig selects no module (target_modules={config.target_modules!r}).{_no_target_hint(decisions)}"
            f" What was found:\n{report}"
        )
    return targets, report


def _no_target_hint(decisions: list[ModuleDecision]) -> str:
    """The likely cause of an empty selection, said before the full report."""
    weights = [d for d in decisions if d.kind in ("linear", "experts")]
    excluded = {
        d.name for d in weights if d.reason == "in exclude_modules" or "left dense by default" in d.reason
    }
    named = [d.name for d in weights if d.reason != "not in target_modules"]
    if named and set(named) <= excluded:
        by_default = any("left dense by default" in d.reason for d in weights if d.name in excluded)
        shown = f"{', '.join(named[:3])}{', ...' if len(named) > 3 else ''}"
        if by_default:
            return (
                f" Every module it names is excluded ({shown}): exclude_modules excludes output and task heads by "
                "default; pass exclude_modules=[] to prune one."
            )
        return f" Every module it names is in exclude_modules ({shown}): narrow exclude_modules."
    if not named:
        return (
            " No linear module's name matches: an entry matches a full name or its last parts (for example "
            "'q_proj' or 'self_attn.q_proj', not a parent such as 'mlp'), or give one regex for the full name."
        )
    return ""
