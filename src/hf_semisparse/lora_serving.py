"""Unmerged LoRA serving: the 2:4 base layers of a PEFT model on our 2:4 kernels, the adapters beside them.

`accelerate_24(peft_model)` replaces the `base_layer` (a 2:4 `nn.Linear` or `Conv1D`) of every LoRA layer on a
2:4 target by a `SemiSparseLinear` (or `Fp8SemiSparseLinear`); the LoRA A/B weights stay as they are and PEFT's
forward keeps adding their path (`peft.tuners.lora.layer.Linear.forward`). This module holds what that needs
beyond plain `accelerate_24`:

- names: PEFT nests the transformers model (`base_model.model`) and keeps each adapted layer as `base_layer` of
  its LoRA layer; the 2:4 targets are named as in the plain model (`model.layers.0.self_attn.q_proj`).
- the 2:4 mask of masked adapters (`lora.MaskedLoraVariant`), which reads `base.weight != 0` on dense bases: a
  base on our kernels keeps only its compressed weight (`keep_dense=False`, the default for decoders), whose
  cuSPARSELt layout is opaque. So the mask is taken once, before the base is replaced, and kept as a bitmask on
  the LoRA layer: 1 bit per weight, `out * in / 8` bytes (1/16 of the fp16 weight; the compressed weight is
  9/16), unpacked on each call into a transient `[out, in]` bool beside the `[out, in]` update the masked path
  materializes anyway.
- merges: an accelerated base's weight cannot take a merge (its dense weight is gone, or the compressed copy
  would go stale), so once a PEFT model is accelerated every LoRA layer in it refuses `merge`/`merge_and_unload`
  before any weight changes, naming the layer: merge first (`merge_sparse_lora`), then `accelerate_24`.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from .peft_structure import BASE_LAYER, adapter_of, adapter_prefixes, base_name, is_tuner_layer

logger = logging.getLogger(__name__)

# buffer of a LoRA layer whose base went onto 2:4 kernels: the base's non-zeros, 1 bit each, uint8 [out, in / 8]
MASK_BITS = "hf_semisparse_mask_bits"
# attribute of every LoRA layer of an accelerated model: the names of its base layers on 2:4 kernels
ON_KERNELS = "hf_semisparse_on_kernels"


class MergeOnKernelsError(RuntimeError):
    """A LoRA adapter was to be merged into (or unmerged from) a model whose base layers run on 2:4 kernels."""


def _shifts(device: torch.device) -> torch.Tensor:
    # made on the device (no host-to-device copy): unpacking may run inside a CUDA graph capture
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """`mask` (bool `[out, in]`, `in % 8 == 0`) as uint8 `[out, in / 8]`, bit j of byte i = column 8 i + j."""
    out_f, in_f = mask.shape
    if in_f % 8:
        raise ValueError(f"pack_mask: the input dimension {in_f} is not a multiple of 8")
    bits = mask.view(out_f, in_f // 8, 8).to(torch.uint8) << _shifts(mask.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor) -> torch.Tensor:
    """The bool `[out, in]` mask of `pack_mask`'s `[out, in / 8]` bytes."""
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.view(packed.shape[0], -1).bool()


def stored_mask(lora_layer: nn.Module) -> torch.Tensor | None:
    """The `[out, in]` bool mask kept for `lora_layer` when its base went onto the 2:4 kernels, or None."""
    packed = lora_layer._buffers.get(MASK_BITS)
    return None if packed is None else unpack_mask(packed)


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - only PEFT models get here
        return None
    return Linear


def kernel_slots(base: nn.Module) -> tuple[dict[str, nn.Module], dict[str, tuple[nn.Module, str]]]:
    """The layers of a PEFT base model that `accelerate_24` may replace, by their plain-model name, and where
    each sits: `(parent, attribute)`. A LoRA layer's name stands for its base layer (`(lora_layer,
    "base_layer")`); adapter modules (`lora_A`, `lora_B`, ...) are left out."""
    prefixes = adapter_prefixes(base)
    full = dict(base.named_modules())
    modules: dict[str, nn.Module] = {}
    slots: dict[str, tuple[nn.Module, str]] = {}
    for name, module in full.items():
        if is_tuner_layer(module) or adapter_of(name, prefixes) is not None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = full[parent_name] if parent_name else base
        plain = base_name(name)
        modules[plain] = module
        slots[plain] = (parent, child)
    return modules, slots


def _tuner_of(slot: tuple[nn.Module, str]) -> nn.Module | None:
    parent, child = slot
    return parent if child == BASE_LAYER and is_tuner_layer(parent) else None


def check_kernel_bases(names: list[str], slots: dict[str, tuple[nn.Module, str]]) -> None:
    """Raise before anything changes if a base layer among `names` cannot go onto the 2:4 kernels under its
    adapter: the adapter is not LoRA on a linear layer (its merge or forward would need the dense weight), or
    an adapter is merged into it now (its weight holds the update; unmerging later would be impossible).

    Raises:
        ValueError: naming the layer, the adapter and what to do.
    """
    lora_linear = _lora_linear_class()
    for name in names:
        tuner = _tuner_of(slots[name])
        if tuner is None:
            continue
        kind = f"{type(tuner).__module__}.{type(tuner).__name__}"
        if lora_linear is None or not isinstance(tuner, lora_linear):
            raise ValueError(
                f"accelerate_24: {name} carries a {kind} adapter; only LoRA adapters on linear layers can run "
                "beside a base on 2:4 kernels. Merge the adapter first (model.merge_and_unload()), or pass "
                "targets= without this layer."
            )
        from .lora import MaskedLoraVariant, PlainLoraGuard

        for adapter, variant in tuner.lora_variant.items():
            if not isinstance(variant, (MaskedLoraVariant, PlainLoraGuard)):
                raise ValueError(
                    f"accelerate_24: {name} carries the adapter {adapter!r} with the LoRA variant "
                    f"{type(variant).__name__} (e.g. DoRA), whose forward and merge need the dense base weight; "
                    "only plain and masked LoRA (hf_semisparse.lora.mask_lora) run beside a base on 2:4 kernels. "
                    "Merge it first (merge_and_unload()), or pass targets= without this layer."
                )
        if tuner.merged:
            raise ValueError(
                f"accelerate_24: {name} has the adapters {tuner.merged_adapters} merged into its weight; "
                "unmerge them first (model.unmerge_adapter()) to serve them unmerged, or merge for good "
                "(hf_semisparse.lora.merge_sparse_lora(model)) and accelerate the merged model."
            )


def attach_kernel_bases(base: nn.Module, names: list[str], slots: dict[str, tuple[nn.Module, str]]) -> None:
    """Before the base layers `names` are replaced (validated by `check_kernel_bases`): keep the 2:4 mask of
    every LoRA layer among them whose adapters are masked, and make every LoRA layer of the model refuse merges.
    """
    from .kernels import _linear_weight
    from .lora import MaskedLoraVariant, PlainLoraGuard

    on_kernels = list(names)
    for name in names:
        tuner = _tuner_of(slots[name])
        if tuner is None or MASK_BITS in tuner._buffers:
            continue
        if any(isinstance(v, MaskedLoraVariant) for v in tuner.lora_variant.values()):
            weight = _linear_weight(tuner.get_base_layer())  # [out, in] for Linear and Conv1D
            tuner.register_buffer(MASK_BITS, pack_mask(weight.detach() != 0), persistent=False)
    lora_linear = _lora_linear_class()
    guarded = 0
    for module in base.modules():
        if lora_linear is None or not isinstance(module, lora_linear):
            continue
        setattr(module, ON_KERNELS, on_kernels)
        _guard_merges(module)
        for adapter in module.lora_A:
            if adapter not in module.lora_variant:  # plain LoRA: same forward, merges refused
                module.lora_variant[adapter] = PlainLoraGuard()
                guarded += 1
    logger.info(
        "hf_semisparse: %d LoRA base layers go onto 2:4 kernels; merges refused from now on (%d plain adapters)",
        len(names),
        guarded,
    )


def _guarded_merge(self, *args, **kwargs):
    refuse_merge_on_kernels(self, "merge")
    return type(self).merge(self, *args, **kwargs)


def _guard_merges(lora_layer: nn.Module) -> None:
    """`merge` of this LoRA layer refuses before PEFT touches any weight, whatever adapter is (or is later) on it:
    PEFT's `merge_and_unload`, `merge_adapter` and safe merges all call the layer's `merge`. (Nothing can be merged
    then, so `unmerge` has nothing to undo and stays PEFT's.) A bound method in the instance's `__dict__`: a deep
    copy of the model keeps it, bound to the copy."""
    lora_layer.merge = types.MethodType(_guarded_merge, lora_layer)


def refuse_merge_on_kernels(lora_layer: nn.Module, what: str = "merge") -> None:
    """Raise `MergeOnKernelsError` if `lora_layer` belongs to a model whose base layers run on 2:4 kernels."""
    on_kernels = getattr(lora_layer, ON_KERNELS, None)
    if not on_kernels:
        return
    more = f" and {len(on_kernels) - 1} more" if len(on_kernels) > 1 else ""
    raise MergeOnKernelsError(
        f"cannot {what} LoRA adapters: the base layers of this model ({on_kernels[0]}{more}) run on 2:4 kernels "
        "(accelerate_24), which keep a compressed weight that a merge cannot change. Nothing was merged. Merge "
        "before accelerating: merged = hf_semisparse.lora.merge_sparse_lora(peft_model) on a model loaded "
        "without acceleration (accelerate=False), then accelerate_24(merged); or serve unmerged as is."
    )
