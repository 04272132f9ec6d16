"""LoRA on a 2:4 model that stays 2:4: the adapter's update is masked by the frozen base weight's zeros.

A plain LoRA update `B @ A` (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") is dense,
so merging it destroys the 2:4 pattern. Here every LoRA layer whose base layer is a 2:4 target computes

    y = base(x) + x @ (mask * (B @ A) * scale)^T        mask = (base.weight != 0)

so the trained function is exactly the one `merge_and_unload()` produces, `W + mask * (B @ A) * scale`, and
that is exactly 2:4 wherever `W` is (the same idea as SPP, Lu et al., 2024, "SPP: Sparsity-Preserved
Parameter-Efficient Fine-Tuning for Large Language Models"). The mask is read from the base weight on every
call, so it needs no storage and always matches the base being merged into.

It plugs into PEFT (https://github.com/huggingface/peft, tested with 0.21) through its own extension point, the
per-adapter `lora_variant` of `peft.tuners.lora.layer.Linear` (the mechanism DoRA uses): PEFT's forward,
`merge`, `unmerge`, `merge_and_unload` and mixed-adapter batches all call the variant. Adapters are saved and
loaded by PEFT as usual (the variant adds no weights); after `PeftModel.from_pretrained` call `mask_lora` (or use
`load_sparse_lora`), since PEFT does not know the variant.

Cost: the masked update is no longer low-rank, so the adapter path materializes `mask * (B @ A)` (`[out, in]`)
per call. In training an autograd function (`_MaskedLoraLinear`) keeps only `x`, `A`, `B` and the layer's bool
mask, and builds the update once more in the backward for the input gradient, so activation memory is as for
plain LoRA plus one byte per base weight. Beyond the frozen base's two dense GEMMs (forward, input gradient), each
adapted layer costs three and some rank-r products: `x @ delta^T` in the forward, `dy @ delta` and the masked
weight gradient `dy^T @ x` in the backward. For serving, merge (`merge_sparse_lora`): the result is exactly 2:4
and runs on the 2:4 kernels with no adapter path at all. To serve unmerged (adapters kept apart, e.g. to switch
them), `accelerate_24(peft_model)` puts the base layers on the 2:4 kernels and keeps the adapter path
(`lora_serving.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .lora_serving import MASK_BITS, refuse_merge_on_kernels, stored_mask
from .masks import find_nm_violation
from .peft_structure import base_name, is_tuner_layer, peft_base_model

logger = logging.getLogger(__name__)

try:
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraVariant
except ImportError:  # peft is an optional dependency: pip install "hf_semisparse[peft]"
    LoraLinear = None
    LoraVariant = object

_MERGE_MASK = "hf_semisparse.merge_mask.{}"  # key in the layer's `_caches` while an adapter is merged


class UnmaskableAdapterError(ValueError):
    """A PEFT adapter on a 2:4 target changes the weight in a way that cannot be kept 2:4."""


def _require_peft() -> None:
    if LoraLinear is None:
        raise ImportError(
            'LoRA on 2:4 models needs peft: pip install "hf_semisparse[peft]" (or pip install peft)'
        )


def _weight_mask(module: nn.Module) -> torch.Tensor:
    """Where the base weight of LoRA layer `module` is non-zero, bool `[out, in]` (`F.linear`'s layout, also for
    `Conv1D`): read from the dense base weight, or, once the base runs on 2:4 kernels, from the mask kept then."""
    kept = stored_mask(module)
    if kept is not None:
        return kept
    mask = module.get_base_layer().weight != 0
    return mask.t() if module.fan_in_fan_out else mask  # Conv1D stores [in, out]


def _masked_delta(module: nn.Module, adapter: str, mask: torch.Tensor) -> torch.Tensor:
    """`mask * (B @ A) * scale` in the base weight's layout (PEFT's `get_delta_weight`, masked)."""
    delta = module.get_delta_weight(adapter)
    return torch.where(mask, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def _masked_lora_linear(x, weight_a, weight_b, mask, scale: float) -> torch.Tensor:
    delta = (weight_b @ weight_a) * scale
    return F.linear(x, torch.where(mask, delta, torch.zeros((), dtype=delta.dtype, device=delta.device)))


def _autocast_to(dtype: torch.dtype | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` as autocast hands them to a GEMM that runs in `dtype` (None: autocast off): float64 stays."""
    if dtype is None:
        return tensors
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)


class _MaskedLoraLinear(torch.autograd.Function):
    """`_masked_lora_linear` that keeps only its inputs for the backward, not the `[out, in]` update.

    The backward builds the update once more for `dx = dy @ delta`, and reduces the masked weight gradient
    `g = where(mask, dy^T @ x, 0) * scale` to `dB = g @ A^T` and `dA = B^T @ g`: the GEMMs of autograd through
    `_masked_lora_linear`, without recomputing its output as `torch.utils.checkpoint` did. `dtype` is autocast's
    dtype at the call (None: off); the inputs are cast to it inside, as autocast would, so the tensors kept are the
    caller's (one `x` shared by the layers that read it) and the gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, mask, scale: float, dtype: torch.dtype | None):
        ctx.save_for_backward(x, weight_a, weight_b, mask)
        ctx.scale, ctx.dtype = scale, dtype
        return _masked_lora_linear(*_autocast_to(dtype, x, weight_a, weight_b), mask, scale)

    @staticmethod
    def backward(ctx, grad_out):
        device = grad_out.device.type
        if torch.is_autocast_enabled(device):  # a backward run inside autocast computes as without
            with torch.autocast(device, enabled=False):
                return _MaskedLoraLinear.backward(ctx, grad_out)
        x_in, a_in, b_in, mask = ctx.saved_tensors
        x, weight_a, weight_b = _autocast_to(ctx.dtype, x_in, a_in, b_in)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        if need_x:
            delta = torch.where(mask, (weight_b @ weight_a) * ctx.scale, 0.0)
            grad_x = (grad_out @ delta).to(x_in.dtype)
            del delta
        if need_a or need_b:
            grad = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            grad = torch.where(mask, grad, 0.0).mul_(ctx.scale)
            if need_b:
                grad_b = (grad @ weight_a.t()).to(b_in.dtype)
            if need_a:
                grad_a = (weight_b.t() @ grad).to(a_in.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def _masked_lora_update(x, weight_a, weight_b, mask, scale: float) -> torch.Tensor:
    """`_masked_lora_linear(x, weight_a, weight_b, mask, scale)` for training, through `_MaskedLoraLinear`."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return _MaskedLoraLinear.apply(x, weight_a, weight_b, mask, scale, None)
    with torch.autocast(device, enabled=False):
        return _MaskedLoraLinear.apply(x, weight_a, weight_b, mask, scale, torch.get_autocast_dtype(device))


class MaskedLoraVariant(LoraVariant):
    """PEFT LoRA variant whose weight update is `mask * (B @ A) * scale`, `mask` the base weight's non-zeros.

    Attached per adapter by `mask_lora`; not meant to be used directly. Supports `nn.Linear` and transformers'
    `Conv1D` (`fan_in_fan_out=True`) base layers and `lora_bias`; dropout applies to the adapter's input as in
    plain LoRA.
    """

    def supports_lora_conversion(self) -> bool:
        return False  # a masked update is not low-rank

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        refuse_merge_on_kernels(module)
        mask = orig_weight != 0
        module._caches[_MERGE_MASK.format(active_adapter)] = mask
        return orig_weight + _masked_delta(module, active_adapter, mask).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        refuse_merge_on_kernels(module)
        mask = orig_weight.data != 0
        module._caches[_MERGE_MASK.format(active_adapter)] = mask
        orig_weight.data += _masked_delta(module, active_adapter, mask).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        refuse_merge_on_kernels(module, "unmerge")
        # the mask of the merge: the merged weight may have new exact zeros
        mask = module._caches.pop(_MERGE_MASK.format(active_adapter), None)
        if mask is None:
            mask = orig_weight.data != 0
        return orig_weight.data - _masked_delta(module, active_adapter, mask).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        mask = _weight_mask(module)
        x = module.lora_dropout[active_adapter](x)
        scale = module.scaling[active_adapter]
        if torch.is_grad_enabled() and (
            x.requires_grad or lora_a.weight.requires_grad or lora_b.weight.requires_grad
        ):
            # rebuilds the [out, in] update in the backward rather than keep it for every layer
            update = _masked_lora_update(x, lora_a.weight, lora_b.weight, mask, scale)
        else:
            update = _masked_lora_linear(x, lora_a.weight, lora_b.weight, mask, scale)
        if lora_b.bias is not None:  # lora_bias=True
            update = update + lora_b.bias * scale
        return result + update


class PlainLoraGuard(LoraVariant):
    """Plain LoRA (`y = base(x) + B(A(dropout(x))) * scale`, merged as `W + B @ A * scale`, as PEFT does) whose
    merges are refused once its model's base layers run on 2:4 kernels.

    `accelerate_24` gives it to the plain LoRA adapters of a PEFT model whose base layers it puts on 2:4 kernels:
    their compressed weights cannot take a merge, and PEFT merges plain LoRA without asking anyone
    (`lora_serving.refuse_merge_on_kernels`). Not meant to be used directly.
    """

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        refuse_merge_on_kernels(module)
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        refuse_merge_on_kernels(module)
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        refuse_merge_on_kernels(module, "unmerge")
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        return result + lora_b(lora_a(dropout(x))) * module.scaling[active_adapter]


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Tuner layers of `model` by base-model name."""
    base = peft_base_model(model)
    return {base_name(name): m for name, m in base.named_modules() if is_tuner_layer(m)}


def _is_2_4(module: nn.Module) -> bool:
    if MASK_BITS in module._buffers:  # its base went onto 2:4 kernels (only 2:4 layers do), mask kept
        return True
    weight = getattr(module.get_base_layer(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    view = weight.t() if getattr(module, "fan_in_fan_out", False) else weight
    return view.shape[-1] % 4 == 0 and find_nm_violation(view.detach()) is None


def _why_unmaskable(name: str, layer: nn.Module) -> str | None:
    kind = f"{type(layer).__module__}.{type(layer).__name__}"
    if LoraLinear is None or not isinstance(layer, LoraLinear):
        return (
            f"{name}: its adapter is {kind}, which changes the weight in a way hf_semisparse cannot mask to 2:4 "
            "(only plain LoRA on nn.Linear/Conv1D layers can be kept 2:4). Use peft.LoraConfig, or leave this "
            "layer out of the adapter's target_modules."
        )
    for adapter, variant in layer.lora_variant.items():
        if isinstance(variant, PlainLoraGuard):
            return (
                f"{name}: adapter {adapter!r} was plain LoRA when its base layer went onto 2:4 kernels "
                "(accelerate_24), whose compressed weight gives no mask to read. Call mask_lora(model) before "
                "accelerate_24."
            )
        if not isinstance(variant, MaskedLoraVariant):
            return (
                f"{name}: adapter {adapter!r} uses the LoRA variant {type(variant).__name__} (e.g. DoRA, which "
                "rescales whole weight columns), which hf_semisparse cannot mask to 2:4. Use plain LoRA "
                "(use_dora=False and no other variant option) on 2:4 layers."
            )
    if MASK_BITS not in layer._buffers and not isinstance(
        getattr(layer.get_base_layer(), "weight", None), torch.Tensor
    ):
        return (
            f"{name}: the base layer {type(layer.get_base_layer()).__name__} keeps no dense weight to read the "
            "2:4 mask from; load the base with keep_dense=True (or accelerate=False) before adding adapters."
        )
    return None


def check_lora_maskable(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Check that every PEFT adapter on the 2:4 targets `targets` (base-model names) can be masked.

    Returns:
        The names among `targets` that carry a LoRA adapter.

    Raises:
        UnmaskableAdapterError: an adapter type or LoRA variant that cannot be kept 2:4 sits on a target (the
            message names the layer, the adapter and what to use instead), or a target is in PEFT's
            `modules_to_save` (a full dense copy that is trained).
    """
    layers = _lora_layers(model)
    wrapped = []
    for name in targets:
        if ".modules_to_save." in f".{name}." or ".original_module." in f".{name}.":
            raise UnmaskableAdapterError(
                f"{name}: a 2:4 target is in PEFT's modules_to_save, which trains a full dense copy of the "
                "layer; remove it from modules_to_save (or exclude it from the sparsity targets)"
            )
        layer = layers.get(name)
        if layer is None:
            continue
        why = _why_unmaskable(name, layer)
        if why:
            raise UnmaskableAdapterError(why)
        wrapped.append(name)
    return wrapped


def mask_lora(model: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """Make the LoRA adapters on 2:4 layers sparsity-preserving: their update becomes `mask * (B @ A) * scale`.

    Call it on a `PeftModel` (or tuner model) before training, and again after `PeftModel.from_pretrained`
    (PEFT saves the adapter weights, not the variant). `SparsityTrainer` and `SparsityCallback` call it for
    you. Calling it twice is harmless. Nothing is changed when an error is raised.

    Args:
        model: a PEFT-wrapped model.
        targets: base-model names of the 2:4 layers (as in `SparsityReport.targets`). Default: every LoRA layer
            whose base weight is exactly 2:4 now.

    Returns:
        The names of the masked layers.

    Raises:
        ImportError: peft is not installed.
        UnmaskableAdapterError: see `check_lora_maskable`.
    """
    _require_peft()
    if targets is None:
        targets = [name for name, layer in _lora_layers(model).items() if _is_2_4(layer)]
    names = check_lora_maskable(model, list(targets))
    layers = _lora_layers(model)
    for name in names:
        layer = layers[name]
        for adapter in layer.lora_A:
            if adapter not in layer.lora_variant:
                layer.lora_variant[adapter] = MaskedLoraVariant()
    logger.info("hf_semisparse: %d LoRA layers keep their 2:4 base masks", len(names))
    return names


def unmasked_lora_layers(model: nn.Module) -> list[str]:
    """Names of the LoRA layers whose base weight is 2:4 but whose adapter update is not masked."""
    found = []
    for name, layer in _lora_layers(model).items():
        if not _is_2_4(layer):
            continue
        adapters = getattr(layer, "lora_A", {})
        variants = getattr(layer, "lora_variant", {})
        if not adapters or any(not isinstance(variants.get(a), MaskedLoraVariant) for a in adapters):
            found.append(name)
    return found


def merge_sparse_lora(model: nn.Module, safe_merge: bool = True, progressbar: bool = False) -> nn.Module:
    """`merge_and_unload()` that refuses to break 2:4: the merged model is exactly 2:4 where the base was.

    Args:
        model: a PEFT model whose adapters on 2:4 layers were masked (`mask_lora`, `SparsityTrainer`,
            `SparsityCallback`).
        safe_merge: check the merged weights for NaN/inf (PEFT's `safe_merge`).
        progressbar: show PEFT's progress bar.

    Returns:
        The merged transformers model (no PEFT wrappers); save it with `save_sparse_pretrained`.

    Raises:
        ValueError: an adapter on a 2:4 layer is not masked (merging it would make the layer dense; the message
            names the layers), or, after merging, a former 2:4 layer is not 2:4 (nothing is returned then).
        hf_semisparse.lora_serving.MergeOnKernelsError: the base layers run on 2:4 kernels (`accelerate_24` on
            the PEFT model); merge before accelerating. Nothing is changed.
    """
    _require_peft()
    for layer in _lora_layers(model).values():
        refuse_merge_on_kernels(layer)  # before anything is merged
    unmasked = unmasked_lora_layers(model)
    if unmasked:
        raise ValueError(
            f"merging would make {len(unmasked)} 2:4 layers dense: their LoRA update is not masked "
            f"({', '.join(unmasked[:5])}{', ...' if len(unmasked) > 5 else ''}). Call "
            "hf_semisparse.lora.mask_lora(model) before training (SparsityTrainer and SparsityCallback do), or use "
            "model.merge_and_unload() if you want a dense model."
        )
    sparse = [name for name, layer in _lora_layers(model).items() if _is_2_4(layer)]
    merged = model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge)
    modules = dict(merged.named_modules())
    for name in sparse:
        module = modules[name]
        weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
        bad = find_nm_violation(weight.detach())
        if bad is not None:
            raise ValueError(
                f"{name}.weight is not 2:4 after merging: the group at {bad.index} has {bad.nonzeros} non-zeros"
            )
    return merged


def load_sparse_lora(model: nn.Module, adapter: str, **kwargs) -> nn.Module:
    """`PeftModel.from_pretrained(model, adapter, **kwargs)` with the adapters on 2:4 layers masked.

    Args:
        model: the 2:4 base, e.g. from `AutoSparseModel.from_pretrained(..., accelerate=False)` (PEFT wraps
            `nn.Linear` layers, not our kernel layers).
        adapter: a folder or Hub id written by PEFT's `save_pretrained`.
        **kwargs: passed to `PeftModel.from_pretrained` (`adapter_name`, `is_trainable`, ...).

    Returns:
        The `PeftModel`, whose function equals the trained one and whose `merge_sparse_lora` is exactly 2:4. To
        serve it unmerged on a GPU, call `kernels.accelerate_24` on it afterwards (the base layers go onto the
        2:4 kernels, the adapters stay; docs/guides/lora.md).
    """
    _require_peft()
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter, **kwargs)
    recorded = getattr(getattr(model, "config", None), "sparsity_config", None)
    targets = recorded.get("targets") if isinstance(recorded, dict) else None
    mask_lora(peft_model, targets)
    return peft_model
