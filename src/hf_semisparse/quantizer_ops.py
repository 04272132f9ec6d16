"""The load and save ops of our quantizer (transformers' `ConversionOps`, 5.x weight-conversion API).

`Sparse24Expand` turns compressed values + bitmask (ours, or the legacy compressed-tensors triplet) into the dense
weight while transformers loads it; its `reverse_op`, `Sparse24Compress`, compresses the targets again when
`model.save_pretrained` writes the model. Every other weight passes through unchanged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers.core_model_loading import ConversionOps

from .checkpoint_format import (
    BITMASK_SUFFIX,
    SCALE_SUFFIX,
    SparseCheckpointError,
    check_legacy_shape,
    compress_values,
    expand_values,
)

if TYPE_CHECKING:
    from .quantizer import SemiSparseHfQuantizer

logger = logging.getLogger(__name__)


class Sparse24Expand(ConversionOps):
    """Load op: compressed values + bitmask (ours, or the legacy triplet) -> the dense weight, checked; every other
    weight passes through, cast to the model's dtype. Its `reverse_op` compresses again when saving."""

    def __init__(self, hf_quantizer: SemiSparseHfQuantizer):
        self.hf_quantizer = hf_quantizer
        self.planned_dtype = None  # format version 4: the dtype transformers planned (`get_new_dtype`)

    def __deepcopy__(self, memo):
        # transformers deep-copies a converter for every layer it loads: the copies share our one quantizer,
        # which records what was decompressed (`SemiSparseHfQuantizer.expanded`); a deep copy of a whole model
        # (whose memo holds its quantizer) gets its own
        return type(self)(memo.get(id(self.hf_quantizer), self.hf_quantizer))

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        try:
            if self.hf_quantizer.fp8:
                return self._convert_fp8(input_dict, full_layer_name, model)
            return self._convert(input_dict, full_layer_name)
        except SparseCheckpointError as exc:
            # transformers collects conversion errors into its load report and raises a generic RuntimeError
            # afterwards: say what is wrong where the user sees it
            logger.error("hf_semisparse: cannot load %s: %s", full_layer_name, exc)
            raise

    def _convert(self, input_dict, full_layer_name):
        if "compressed" in input_dict:  # legacy: a whole module's triplet
            values, bitmask, shape = (_one(input_dict.get(k)) for k in ("compressed", "bitmask", "shape"))
            module = full_layer_name.rsplit(".", 1)[0]
            if bitmask is None or shape is None:
                raise SparseCheckpointError(f"{module}: compressed weight lacks its bitmask or shape tensor")
            check_legacy_shape(module, shape, values)
            dense = expand_values(values, bitmask, f"{module}.weight")
            self._record(full_layer_name)
            return {full_layer_name: self._finish(dense, full_layer_name, compressed=True)}
        result = {}
        for key, value in input_dict.items():
            if key.endswith(BITMASK_SUFFIX):
                continue
            masks = input_dict.get(key + BITMASK_SUFFIX)
            if masks is None:
                result[key] = value
                continue
            values_list = value if isinstance(value, list) else [value]
            masks = masks if isinstance(masks, list) else [masks]
            name = full_layer_name or key
            result[key] = [expand_values(v, m, name) for v, m in zip(values_list, masks, strict=True)]
            if full_layer_name is not None:
                self._record(full_layer_name)
            if not isinstance(value, list):
                result[key] = result[key][0]
        if (
            len(result) == 1 and full_layer_name is not None
        ):  # one module's weight, or one fused expert weight
            (key,) = result
            weight = _one(result[key])
            compressed = key + BITMASK_SUFFIX in input_dict
            return {full_layer_name: self._finish(weight, full_layer_name, compressed=compressed)}
        return result

    def _convert_fp8(self, input_dict, full_layer_name, model):
        """Format version 4: e4m3 values + bitmask + per-row scale -> the dequantised weight in the planned dtype
        (the codes are kept for the FP8 kernels); any other weight passes, float32 ones cast to the planned dtype
        (`SemiSparseHfQuantizer.get_new_dtype` leaves every float32 tensor to this op)."""
        from .fp8_serialization import StoredFp8Weight, decompress_fp8_24, dequantize_fp8, e4m3_from_cast

        dtype = self._planned_dtype(model, full_layer_name)
        value = _one(input_dict.get("weight"))
        if value is None:
            raise SparseCheckpointError(f"{full_layer_name}: a bitmask or scale without its weight")
        bitmask = _one(input_dict.get("weight" + BITMASK_SUFFIX))
        scale = _one(input_dict.get("weight" + SCALE_SUFFIX))
        if bitmask is None and scale is None:
            if (
                value.dtype == torch.float8_e4m3fn
            ):  # `check_layout` refuses this before loading; never a raw cast
                raise SparseCheckpointError(
                    f"{full_layer_name} is stored as FP8 but is not an FP8 2:4 target"
                )
            if value.is_floating_point() and value.dtype == torch.float32 and dtype is not None:
                value = value.to(dtype)
            return {full_layer_name: value}
        if bitmask is None or scale is None:
            raise SparseCheckpointError(
                f"{full_layer_name}: an FP8 weight needs both its bitmask and its scale"
            )
        if value.dtype != torch.float8_e4m3fn and value.is_floating_point():
            # transformers 5.17 cast the values to the dtype it planned for this parameter (T5's `wo` float32)
            dtype = value.dtype
            value = e4m3_from_cast(full_layer_name, value)
        weight_fp8, row_scale = decompress_fp8_24(value, bitmask, scale, full_layer_name)
        module = full_layer_name.rsplit(".", 1)[0]
        # kept on the CPU (0.625 bytes per weight): the FP8 kernels take them, or saving as FP8 again
        self.hf_quantizer.fp8_codes[module] = StoredFp8Weight(value.cpu(), bitmask.cpu(), row_scale.cpu())
        self._record(full_layer_name)
        weight = dequantize_fp8(weight_fp8, row_scale, dtype or torch.get_default_dtype())
        return {full_layer_name: self._finish(weight, full_layer_name, compressed=True)}

    def _planned_dtype(self, model, full_layer_name):
        """The dtype transformers planned for the parameter (as `get_new_dtype` saw it: T5's `wo` stays float32 in
        an fp16 model), else its meta tensor's, else the requested one."""
        if isinstance(self.planned_dtype, torch.dtype):
            return self.planned_dtype
        try:
            return model.get_parameter(full_layer_name).dtype
        except (AttributeError, TypeError):
            requested = self.hf_quantizer.requested_dtype
            return requested if isinstance(requested, torch.dtype) else None

    def _record(self, full_layer_name: str) -> None:
        """Tell the quantizer that this module's weight (or this fused expert parameter) was decompressed
        (`_check_all_expanded` after loading)."""
        self.hf_quantizer.expanded.update((full_layer_name.rsplit(".", 1)[0], full_layer_name))

    def _finish(self, weight, full_layer_name, compressed):
        quantizer = self.hf_quantizer
        if compressed and (
            full_layer_name.rsplit(".", 1)[0] in quantizer.transposed_modules
            or full_layer_name in quantizer.transposed_experts
        ):
            weight = weight.transpose(-2, -1).contiguous()
        return weight  # already in the planned dtype (`SemiSparseHfQuantizer.get_new_dtype`)

    @property
    def reverse_op(self) -> ConversionOps:
        return Sparse24Compress(self.hf_quantizer)


class Sparse24Compress(ConversionOps):
    """Save op: a target's dense weight -> its kept values and bitmask (our format); other weights pass."""

    def __init__(self, hf_quantizer: SemiSparseHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # as `Sparse24Expand`: the per-layer copies transformers makes share the quantizer (its saved targets)
        return type(self)(memo.get(id(self.hf_quantizer), self.hf_quantizer))

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        try:
            return self._convert(input_dict, full_layer_name)
        except SparseCheckpointError as exc:
            raise SparseCheckpointError(
                f"{exc}. This model was loaded from a 2:4 checkpoint, and save_pretrained writes that format, which "
                "needs every target 2:4: train it with SparsityTrainer or SparsityCallback (they keep the zeros), "
                "or prune_24 it again before saving"
            ) from exc

    def _convert(self, input_dict, full_layer_name):
        out = {}
        for key, value in input_dict.items():
            tensor = _one(value)
            name = full_layer_name or key
            module_name = name[: -len(".weight")] if name.endswith(".weight") else None
            if name in self.hf_quantizer.saved_experts:
                weight = tensor.transpose(-2, -1) if self.hf_quantizer.saved_experts[name] else tensor
                values, bitmask = compress_values(weight, name)
                out[name] = values
                out[name + BITMASK_SUFFIX] = bitmask
            elif module_name is not None and module_name in self.hf_quantizer.saved_targets:
                weight = tensor.t() if module_name in self.hf_quantizer.saved_transposed else tensor
                values, bitmask = compress_values(weight, name)
                out[name] = values
                out[name + BITMASK_SUFFIX] = bitmask
            else:
                out[name if full_layer_name else key] = tensor
        return out

    @property
    def reverse_op(self) -> ConversionOps:
        return Sparse24Expand(self.hf_quantizer)


def _one(value):
    if isinstance(value, list):
        if len(value) != 1:
            raise SparseCheckpointError(f"expected one tensor, got {len(value)}")
        return value[0]
    return value


class ExpandOnLoadStateDict:
    """A `load_state_dict` pre-hook for a model loaded from our format: a state dict in that format (what the
    model's own `save_pretrained` writes, e.g. a Trainer's `checkpoint-N/model.safetensors`) is expanded to dense
    weights before torch copies it in, so that `Trainer(resume_from_checkpoint=...)` and `load_best_model_at_end`
    work (tested, also for checkpoints that transformers shards).

    Every `<name>` with a `<name>_bitmask` beside it is replaced by `expand_values(...)` (checked), transposed back
    for the modules and expert parameters stored transposed (GPT-2's `Conv1D`); the bitmask keys are removed.
    transformers loads a sharded checkpoint one shard per `load_state_dict` call, in no fixed order, and may have
    put a 2:4 weight's values and its bitmask in different shards: the half that comes first is held back (torch
    reports the weight missing from that call, not a size mismatch) until the other half arrives. Only the
    compressed weights the model was loaded with (`compressed`) are held back, and a held half is dropped when a
    dense tensor or a complete pair for the same weight is loaded. A half left by an incomplete load would pair
    with the next load's other half: `SparsityTrainer` clears the held halves before each checkpoint it loads and
    raises if any are left after it (`begin_checkpoint_load` / `end_checkpoint_load`); `SparsityCallback` warns
    about leftovers; after loading shards yourself, call `end_checkpoint_load(model)`. A state dict without
    bitmasks passes unchanged; an FP8 one (version 4: e4m3 values and scales) raises SparseCheckpointError.

    Args:
        transposed: module names and expert parameter names stored transposed.
        compressed: parameter names (`<module>.weight`, expert parameters) stored as values and bitmask.
    """

    def __init__(self, transposed: set[str], compressed: set[str]):
        self.transposed = set(transposed)
        self.compressed = set(compressed)
        self.pending: dict[str, torch.Tensor] = {}  # half of a pair whose other half is in a later shard

    def _stored_shape(self, module, name: str) -> tuple | None:
        """The dense shape of the compressed weight `name` as the checkpoint stores it (transposed or not)."""
        if name not in self.compressed:
            return None
        try:
            shape = tuple(module.get_parameter(name).shape)
        except AttributeError:
            return None
        if len(shape) >= 2 and (name in self.transposed or name.rsplit(".", 1)[0] in self.transposed):
            shape = (*shape[:-2], shape[-1], shape[-2])
        return shape

    def _is_compressed(self, module, name: str, values: torch.Tensor) -> bool:
        stored = self._stored_shape(module, name)
        return (
            stored is not None
            and values.dim() >= 2
            and tuple(values.shape) != stored
            and (*values.shape[:-1], 2 * values.shape[-1]) == stored
        )

    def __call__(
        self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        for mask_key in [k for k in state_dict if k.startswith(prefix) and k.endswith(BITMASK_SUFFIX)]:
            key = mask_key[: -len(BITMASK_SUFFIX)]
            self.pending.pop(mask_key, None)  # this load brings its own bitmask
            if key in state_dict:
                self.pending.pop(key, None)  # a complete pair
            elif key in self.pending:  # its values came in an earlier shard
                state_dict[key] = self.pending.pop(key)
            else:  # its values come in a later shard
                self.pending[mask_key] = state_dict.pop(mask_key)
                continue
            self._expand(state_dict, key, state_dict.pop(mask_key), prefix)
        for key in [k for k in state_dict if k.startswith(prefix) and not k.endswith(BITMASK_SUFFIX)]:
            name = key[len(prefix) :]
            if not self._is_compressed(module, name, state_dict[key]):
                if name in self.compressed:  # a dense tensor for this weight: any held half is stale
                    self.pending.pop(key, None)
                    self.pending.pop(key + BITMASK_SUFFIX, None)
                continue
            if key + BITMASK_SUFFIX in self.pending:  # its bitmask came in an earlier shard
                self._expand(state_dict, key, self.pending.pop(key + BITMASK_SUFFIX), prefix)
            else:  # its bitmask comes in a later shard
                self.pending[key] = state_dict.pop(key)

    def _expand(self, state_dict, key: str, bitmask: torch.Tensor, prefix: str) -> None:
        if key + SCALE_SUFFIX in state_dict or state_dict[key].dtype == torch.float8_e4m3fn:
            raise SparseCheckpointError(
                f"{key}: an FP8 2:4 state dict (format version 4) cannot be loaded with load_state_dict; load "
                "its checkpoint folder with from_pretrained"
            )
        dense = expand_values(state_dict[key], bitmask, key)
        name = key[len(prefix) :]
        if name in self.transposed or name.rsplit(".", 1)[0] in self.transposed:
            dense = dense.transpose(-2, -1).contiguous()
        state_dict[key] = dense


def _expand_hooks(model) -> list[ExpandOnLoadStateDict]:
    hooks = []
    for module in model.modules():
        for hook in getattr(module, "_load_state_dict_pre_hooks", {}).values():
            hook = getattr(hook, "hook", hook)  # torch wraps registered hooks
            if isinstance(hook, ExpandOnLoadStateDict):
                hooks.append(hook)
    return hooks


def held_halves(model) -> list[str]:
    """Keys of 2:4 weight halves (values or bitmask) held back by `model`'s expand hooks, whose other half never
    arrived: those weights were not loaded."""
    return sorted(key for hook in _expand_hooks(model) for key in hook.pending)


def begin_checkpoint_load(model) -> None:
    """Forget halves held from earlier, incomplete loads, so that they cannot pair with this load's."""
    for hook in _expand_hooks(model):
        hook.pending.clear()


def end_checkpoint_load(model, source: str = "the checkpoint") -> None:
    """Check, after loading a compressed 2:4 checkpoint into an already loaded model by hand, that every 2:4
    weight arrived whole.

    A model loaded with `from_pretrained` from a compressed checkpoint expands each weight's values and bitmask
    (`<name>` and `<name>_bitmask`) back to a dense tensor as `load_state_dict` receives them; when the two halves
    come in different calls (the shards of a sharded checkpoint), the first is held until its partner arrives.
    `SparsityTrainer` runs this check after each checkpoint it loads; call it after loading shards yourself, e.g.
    after `transformers.trainer_utils.load_sharded_checkpoint(model, folder, strict=False)`.

    Args:
        model: the model the checkpoint was loaded into (`torch.nn.Module`).
        source: how the error message names the checkpoint.

    Raises:
        SparseCheckpointError: a weight's values or bitmask arrived without the other half, so that weight was
            not loaded (it keeps its earlier values); the message names the first such key. The held halves are
            dropped either way, so that they cannot pair with a later load's.
    """
    left = held_halves(model)
    begin_checkpoint_load(model)
    if left:
        raise SparseCheckpointError(
            f"{source}: {len(left)} 2:4 weight half(s) arrived without their values or bitmask, so those weights "
            f"were not loaded (first: {left[0]}); is a shard missing from the checkpoint?"
        )
