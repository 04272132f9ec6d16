"""How PEFT (https://github.com/huggingface/peft) wraps a model, seen without importing peft.

A `PeftModel` nests the transformers model two levels down (`base_model.model`), and every adapted layer
becomes a tuner layer that keeps the original module as `base_layer` beside its adapters (`lora_A`, `lora_B`,
...). Target selection looks through both: the base layers are the N:M targets, named as in the base model
(`model.layers.0.self_attn.q_proj`, without `.base_layer`), and the adapters never are.
"""

from __future__ import annotations

from torch import nn

BASE_LAYER = "base_layer"


def _from_peft(module: nn.Module) -> bool:
    return any(cls.__module__.split(".")[0] == "peft" for cls in type(module).__mro__)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft `PeftModel` or a tuner model (`LoraModel`, ...) around a transformers model.

    (Checked by class origin: transformers models that had adapters loaded also carry a `peft_config`.)
    """
    return _from_peft(model) and (
        callable(getattr(model, "get_base_model", None))
        or isinstance(getattr(model, "model", None), nn.Module)
    )


def is_prompt_learning(model: nn.Module) -> bool:
    """Whether `model` is a `PeftModel` whose active adapter is prompt learning (prefix tuning, prompt tuning,
    P-tuning): it feeds learned virtual tokens or key/value prefixes to the base model, so the base model's blocks
    alone do not compute what the wrapped model computes."""
    if not _from_peft(model):
        return False
    try:
        config = model.active_peft_config
    except (AttributeError, KeyError, TypeError):
        return False
    return bool(getattr(config, "is_prompt_learning", False))


def peft_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` / tuner model (`model` itself when it is not wrapped).

    The base model's modules are the very modules the wrapper runs (PEFT wraps in place), so masking them
    masks the wrapped model.
    """
    while is_peft_model(model):
        inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model.model
        if inner is model:
            break
        model = inner
    return model


def is_tuner_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer: it holds the original module as `base_layer` plus adapter modules."""
    return isinstance(getattr(module, BASE_LAYER, None), nn.Module) and hasattr(module, "adapter_layer_names")


def adapter_prefixes(model: nn.Module) -> dict[str, str]:
    """Names of the adapter sub-modules of every tuner layer in `model` (all children but `base_layer`), each
    mapped to the adapter's kind and type, e.g. `{"...q_proj.lora_A": "lora_A of lora.Linear"}`."""
    prefixes = {}
    for name, module in model.named_modules():
        if is_tuner_layer(module):
            for child, _ in module.named_children():
                if child != BASE_LAYER:
                    prefixes[f"{name}.{child}" if name else child] = f"{child} of {type(module).__name__}"
    return prefixes


def adapter_of(name: str, prefixes: dict[str, str]) -> str | None:
    """The description of the adapter that module `name` belongs to, or None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        found = prefixes.get(".".join(parts[:i]))
        if found is not None:
            return found
    return None


def base_name(name: str) -> str:
    """`name` without PEFT's `.base_layer` levels: the module's name in the unwrapped (or merged) model."""
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)


def modules_by_base_name(model: nn.Module) -> dict[str, nn.Module]:
    """`model`'s modules by their name in the unwrapped model; a tuner layer's name maps to its base layer."""
    model = peft_base_model(model)
    return {base_name(n): m for n, m in model.named_modules() if not is_tuner_layer(m)}
