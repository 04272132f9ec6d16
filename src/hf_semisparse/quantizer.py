"""Our quantization method for transformers: plain `from_pretrained` loads 2:4 sparse checkpoints exactly.

`import hf_semisparse` registers the quant_method "hf_semisparse" (`SemiSparseConfig` and `SemiSparseHfQuantizer`)
with `transformers.quantizers.auto`, and routes sparse-only compressed-tensors 2:4 configs (the legacy layout,
formats "sparse-24-bitmask" and "dense") to the same quantizer, so that

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cuda")

expands every compressed weight while transformers loads it (sharded, offloaded to cpu/disk with a device map, from
the Hub), checks the checkpoint as `hf-semisparse inspect` does (`checkpoint_format.check_layout`), and on a CUDA
GPU runs the 2:4 layers on sparse kernels (`kernels.accelerate_24`). `model.save_pretrained` compresses the 2:4
weights again (our format). The quantizer follows transformers' `HfQuantizer` API (5.x: weight conversions with a
load op and its `reverse_op` for saving, as the FP8 quantizer does).
"""

from __future__ import annotations

import logging
import os
import re

import torch
from transformers import __version__ as transformers_version
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint_format import (
    BITMASK_SUFFIX,
    EXPERTS_FORMAT_VERSION,
    FORMAT_VERSION,
    FP8_FORMAT_VERSION,
    QUANT_METHOD,
    SCALE_SUFFIX,
    SPARSITY_FORMAT,
    SparseCheckpointError,
    check_layout,
    is_legacy_sparse_24,
    legacy_sparsity_config,
    read_headers,
)
from .masks import find_nm_violation
from .registration import current_load_options
from .serialization import digests_recorded, verify_weight_files
from .targets import is_linear_module

logger = logging.getLogger(__name__)


@register_quantization_config(QUANT_METHOD)
class SemiSparseConfig(QuantizationConfigMixin):
    """The `quantization_config` of a 2:4 sparse checkpoint (see `checkpoint_format` for every field).

    Args:
        targets: the compressed modules' names.
        transposed: the targets that are transformers `Conv1D` layers (weight `[in, out]`, stored `[out, in]`).
        expert_targets: the compressed fused expert parameters' names (format version 3).
        expert_transposed: the expert targets whose module stores them `[experts, in, out]`.
        weights: format version 4: the FP8 record `{"format": "fp8-e4m3", "scales": "channel", "activations":
            "dynamic-token", "targets": [...]}` (`fp8_serialization`).
        ignore: linear layers left dense (informational).
        legacy: for a compressed-tensors checkpoint read through this config, its original `quantization_config`.
    """

    def __init__(
        self,
        targets: list[str] | None = None,
        transposed: list[str] | None = None,
        ignore: list[str] | None = None,
        format: str = SPARSITY_FORMAT,  # noqa: A002 - the config field's name
        version: int = FORMAT_VERSION,
        legacy: dict | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.version = version
        self.targets = list(targets or [])
        self.transposed = list(transposed or [])
        self.ignore = list(ignore or [])
        self.legacy = legacy
        self.expert_targets = list(kwargs.pop("expert_targets", None) or [])
        self.expert_transposed = list(kwargs.pop("expert_transposed", None) or [])
        for key, value in kwargs.items():  # global_sparsity, target_bytes_ratio, library_version, ...
            setattr(self, key, value)

    def layout_dict(self) -> dict:
        """The config as `check_layout` reads it (the legacy one for a compressed-tensors checkpoint)."""
        return self.legacy if self.legacy is not None else dict(self.__dict__)

    def to_dict(self) -> dict:
        """The config as transformers writes it. The digest marker ("tensor_digests") is left out: it promises
        that every weight file records its tensors' CRC32, which `save_sparse_pretrained` writes and transformers'
        own `save_pretrained` does not."""
        out = dict(self.__dict__)
        out.pop("tensor_digests", None)
        if not out.get("expert_targets"):
            out.pop("expert_targets", None)
            out.pop("expert_transposed", None)
        if out.get("weights") is None:
            out.pop("weights", None)
        if out.get("legacy") is None:
            out.pop("legacy", None)
        elif isinstance(out["legacy"].get("hf_semisparse"), dict):
            section = {k: v for k, v in out["legacy"]["hf_semisparse"].items() if k != "tensor_digests"}
            out["legacy"] = {**out["legacy"], "hf_semisparse": section}
        return out


_original_ct_config = AUTO_QUANTIZATION_CONFIG_MAPPING.get("compressed-tensors")


class _CompressedTensorsDispatch:
    """Stands in the config mapping for "compressed-tensors": sparse-only 2:4 configs become a `SemiSparseConfig`
    (read by our quantizer, compressed-tensors not needed); every other config goes to transformers' own class."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        quant = config_dict.get("quantization_config", config_dict)
        if isinstance(quant, dict) and is_legacy_sparse_24(quant):
            config = SemiSparseConfig(legacy=dict(quant))
            return (config, kwargs) if return_unused_kwargs else config
        if _original_ct_config is None:
            raise ValueError("this transformers has no compressed-tensors support")
        return _original_ct_config.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


if _original_ct_config is not None and _original_ct_config is not _CompressedTensorsDispatch:
    AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] = _CompressedTensorsDispatch


def _is_conv1d(module) -> bool:
    return is_linear_module(module) and not isinstance(module, torch.nn.Linear)


def resolve_ct_targets(model: torch.nn.Module, targets: list[str], ignore: list[str]) -> list[str]:
    """Module names selected by compressed-tensors target lists: a module matches an entry that is its name, its
    class name ("Linear"), or a "re:" regex matching the start of its name (as compressed-tensors' `is_match`)."""

    def matches(name, module, entries):
        for entry in entries or []:
            if entry.startswith("re:"):
                if re.match(entry[3:], name):
                    return True
            elif entry in (name, type(module).__name__):
                return True
        return False

    return [
        name
        for name, module in model.named_modules()
        if name
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and matches(name, module, targets)
        and not matches(name, module, ignore)
    ]


@register_quantizer(QUANT_METHOD)
class SemiSparseHfQuantizer(HfQuantizer):
    """Loads 2:4 sparse checkpoints (ours and legacy compressed-tensors) as dense transformers models with 2:4
    zeros, and saves them compressed; see the module docstring."""

    requires_calibration = True  # only pre-compressed checkpoints: prune with hf_semisparse, then save

    def __init__(self, quantization_config: SemiSparseConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        legacy = quantization_config.legacy
        self.legacy_format = legacy_sparsity_config(legacy)["format"] if legacy is not None else None
        # format version 4: e4m3 values + per-row scales, dequantised at load (their codes kept for the kernels)
        self.fp8 = legacy is None and getattr(quantization_config, "version", None) == FP8_FORMAT_VERSION
        self.serialized_names = (
            {}
            if legacy is not None
            else {
                "weight": [
                    "weight",
                    "weight" + BITMASK_SUFFIX,
                    *(["weight" + SCALE_SUFFIX] if self.fp8 else []),
                ]
            }
        )
        self.fp8_codes: dict = {}  # model module name -> StoredFp8Weight (version 4)
        self.requested_dtype = None
        self.layout = None
        self.saved_targets: set[str] = set()
        self.saved_transposed: set[str] = set()
        self._module_of: dict[str, str] = {}  # model module name -> checkpoint module name
        self.transposed_modules: set[str] = set()  # model module names whose stored weight is transposed
        self.expanded: set[str] = set()  # model module names whose weight `Sparse24Expand` decompressed
        self._expert_of: dict[str, str] = {}  # model expert parameter name -> checkpoint name
        self.transposed_experts: set[str] = set()  # model expert parameter names stored [experts, out, in]
        self.saved_experts: dict[str, bool] = {}  # expert parameter -> transposed, compressed when saving

    # -- checks before anything is loaded
    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError(
                "quant_method 'hf_semisparse' loads 2:4 checkpoints saved by hf_semisparse; to make one, prune a "
                "model (hf_semisparse.prune_24 or SparsityTrainer) and save it"
            )

    def update_dtype(self, dtype):
        self.requested_dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        quant = self.quantization_config.layout_dict()
        if not checkpoint_files:
            raise SparseCheckpointError("a 2:4 sparse checkpoint needs safetensors weight files")
        headers = read_headers(checkpoint_files)
        verified = {os.path.realpath(f) for f in current_load_options()["verified_files"]}
        if not {os.path.realpath(f) for f in checkpoint_files} <= verified:
            # plain from_pretrained: every tensor against its recorded CRC32 before transformers reads the files
            # (AutoSparseModel.from_pretrained has done this already and says so through load_options)
            verify_weight_files(checkpoint_files, require_digests=digests_recorded(quant))
        self.layout = check_layout(quant, headers)
        modules = dict(model.named_modules())
        prefix = getattr(model, "base_model_prefix", "")
        tied = _tied_names(model)
        if self.legacy_format == "dense":
            sparsity = legacy_sparsity_config(quant)
            self.dense_targets = resolve_ct_targets(model, sparsity.get("targets"), sparsity.get("ignore"))
            return model
        for layer in self.layout.layers:
            if layer.kind == "experts":
                self._check_expert_layer(layer, modules, prefix)
                continue
            name = _model_name(layer.module, modules, prefix)
            if name is None:
                raise SparseCheckpointError(
                    f"the checkpoint compresses {layer.module}, which this {type(model).__name__} does not have "
                    "(config and weights disagree, or the wrong model class)"
                )
            module = modules[name]
            if f"{name}.weight" in tied:
                raise SparseCheckpointError(
                    f"{name}.weight is compressed in the checkpoint but tied to {tied[f'{name}.weight']} in this "
                    "model; load with tie_word_embeddings=False or re-save the checkpoint untied"
                )
            weight = getattr(module, "weight", None)
            if weight is None:
                raise SparseCheckpointError(
                    f"{name} ({type(module).__name__}) has no weight to decompress into"
                )
            conv1d = _is_conv1d(module)
            if self.legacy_format is None and conv1d != layer.transposed:
                raise SparseCheckpointError(
                    f"{name} is a {type(module).__name__} but the checkpoint records it as "
                    f"{'Conv1D [in, out]' if layer.transposed else 'Linear [out, in]'}: orientation mismatch"
                )
            expected = tuple(weight.shape)
            stored = layer.dense_shape
            if layer.transposed:
                stored = (*stored[:-2], stored[-1], stored[-2])
            if stored != expected:
                raise SparseCheckpointError(
                    f"{name}.weight: the checkpoint holds a {list(stored)} weight, the model expects {list(expected)}"
                )
            self._module_of[name] = layer.module
            if layer.transposed:  # stored [out, in] for a Conv1D: transposed back at load
                self.transposed_modules.add(name)
        return model

    def _check_expert_layer(self, layer, modules: dict, prefix: str) -> None:
        """A compressed fused expert weight must be a 3-D expert parameter of the model, same orientation and
        shape (checked before any weight is read)."""
        from .targets import is_experts_module

        module_name, param = layer.module.rsplit(".", 1)
        name = _model_name(module_name, modules, prefix)
        module = modules.get(name) if name is not None else None
        weight = getattr(module, param, None) if module is not None else None
        if module is None or not is_experts_module(module) or not isinstance(weight, torch.Tensor):
            raise SparseCheckpointError(
                f"the checkpoint compresses the fused expert weight {layer.module}, which this model does not have "
                "as a transformers experts parameter (config and weights disagree, or the wrong model class)"
            )
        transposed = bool(getattr(module, "is_transposed", False))
        if transposed != layer.transposed:
            raise SparseCheckpointError(
                f"{name}.{param}: the checkpoint records it as "
                f"{'[experts, in, out]' if layer.transposed else '[experts, out, in]'} but this model's "
                f"{type(module).__name__} stores it the other way: orientation mismatch"
            )
        expected = tuple(weight.transpose(-2, -1).shape if transposed else weight.shape)
        if tuple(layer.dense_shape) != expected:
            raise SparseCheckpointError(
                f"{name}.{param}: the checkpoint holds a {list(layer.dense_shape)} [experts, out, in] weight, the "
                f"model expects {list(expected)}"
            )
        self._expert_of[f"{name}.{param}"] = layer.module
        if transposed:
            self.transposed_experts.add(f"{name}.{param}")

    def get_new_dtype(self, converter, param, dtype):
        """Stored float tensors (kept values included) are cast to the dtype transformers plans for the parameter
        (e.g. T5's `wo` kept in float32) before expanding, which is exact; bitmasks and shapes are not cast."""
        if hasattr(param, "get_dtype"):
            stored = param.get_dtype()
        else:
            stored = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}.get(param.dtype, "F16")
            stored = stored if param.is_floating_point() else "U8"
        ours = [op for op in getattr(converter, "operations", ()) if type(op).__name__ == "Sparse24Expand"]
        if self.fp8 and ours and stored in ("F8_E4M3", "F32"):
            for op in ours:  # each parameter's converter has its own op (`Sparse24Expand.__deepcopy__`)
                op.planned_dtype = dtype
            # e4m3 codes and their float32 scales are dequantised by `Sparse24Expand`, which casts the result (and
            # any other float32 tensor it passes) to the planned dtype: a scale cast to fp16 first would be rounded
            return None
        is_float = stored.startswith(("F", "BF")) if stored is not None else param.is_floating_point()
        return dtype if is_float else None

    def param_needs_quantization(self, model, param_name, **kwargs) -> bool:
        return False

    def get_load_operations(self):
        from .quantizer_ops import Sparse24Expand

        return {"deserialize": Sparse24Expand, "dequantize": Sparse24Expand}

    def get_weight_conversions(self):
        from transformers.core_model_loading import WeightConverter

        from .quantizer_ops import Sparse24Expand

        if self.legacy_format == "dense":
            return []
        if self.legacy_format is not None:
            return [WeightConverter(["compressed", "bitmask", "shape"], "weight", [Sparse24Expand(self)])]
        if self.fp8:  # the bitmask's and scale's patterns before "weight" (see below)
            names = ["weight" + BITMASK_SUFFIX, "weight" + SCALE_SUFFIX, "weight"]
            return [WeightConverter(names, "weight", [Sparse24Expand(self)])]
        # the bitmask's pattern first: transformers 5.17 matches source patterns by an unanchored regex search in
        # this order, where "weight" would also claim "x.weight_bitmask" and the bitmask would be dropped
        return [
            WeightConverter(["weight" + BITMASK_SUFFIX, "weight"], "weight", [Sparse24Expand(self)]),
            *_expert_converters(self.quantization_config.expert_targets, Sparse24Expand(self)),
        ]

    # -- after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.legacy_format == "dense":
            targets = []
            modules = dict(model.named_modules())
            for name in self.dense_targets:
                weight = modules[name].weight
                view = weight.t() if _is_conv1d(modules[name]) else weight
                if weight.dim() >= 2 and weight.shape[-1] % 4 == 0 and find_nm_violation(view) is None:
                    targets.append(name)
                else:
                    logger.warning(
                        "%s is a compressed-tensors sparsity target but is not 2:4: it stays dense", name
                    )
            compressed = targets
        else:
            compressed = sorted(self._module_of)
            self._check_all_expanded(compressed)
        experts = {name: name in self.transposed_experts for name in self._expert_of}
        if experts:
            self._check_all_expanded(sorted(experts), suffix="")
        if not compressed and not experts:  # only a legacy "dense" checkpoint gets here
            logger.warning(
                "hf_semisparse: none of the compressed-tensors sparsity targets of this checkpoint is 2:4: it "
                "loaded as a dense model, and nothing runs on 2:4 kernels"
            )
            self.remove_quantization_config(model)
            return model
        self.saved_targets = set(compressed)
        self.saved_transposed = {n for n in compressed if _is_conv1d(model.get_submodule(n))}
        # from here on the model carries our own config (also for a legacy checkpoint): save_pretrained writes ours
        old = self.quantization_config
        kept = {k: v for k, v in old.__dict__.items() if k in ("global_sparsity", "library_version")}
        linear = [n for n, m in model.named_modules() if is_linear_module(m)]
        self.saved_experts = experts
        if experts:
            kept.update(
                version=EXPERTS_FORMAT_VERSION,
                expert_targets=sorted(experts),
                expert_transposed=sorted(n for n, t in experts.items() if t),
            )
        self.quantization_config = SemiSparseConfig(
            targets=sorted(compressed),
            transposed=sorted(self.saved_transposed),
            ignore=[n for n in linear if n not in self.saved_targets],
            **kept,
        )
        model.config.quantization_config = self.quantization_config
        self._save_in_our_format(model)
        record = getattr(model.config, "sparsity_config", None)
        record = dict(record) if isinstance(record, dict) else {"pattern": "2:4"}
        record["targets"] = sorted(compressed)
        if experts:
            record["expert_targets"] = sorted(experts)
        model.config.sparsity_config = record
        # a Trainer's checkpoint of this model is in our format (version 2 or 3, also after an FP8 load): its
        # resume (`load_state_dict`) expands it
        from .quantizer_ops import ExpandOnLoadStateDict

        transposed = self.saved_transposed | {name for name, flag in experts.items() if flag}
        compressed_weights = {f"{name}.weight" for name in compressed} | set(experts)
        model.register_load_state_dict_pre_hook(ExpandOnLoadStateDict(transposed, compressed_weights))
        options = current_load_options()
        on_cuda = any(p.is_cuda for p in model.parameters())
        run_kernels = options["accelerate"] is True or (options["accelerate"] == "auto" and on_cuda)
        if self.fp8:
            self._attach_fp8_codes(model)
        self.accelerated = run_kernels  # then not trainable (`is_qat_trainable`)
        if run_kernels:
            from .kernels import accelerate_24

            model.sparsity_acceleration = accelerate_24(
                model, keep_dense=options["keep_dense"], weights="fp8" if self.fp8 else "native"
            )
        if self.fp8:
            self._say_fp8_dequantised(model, run_kernels, on_cuda)
            # the layers hold their codes now; `model.hf_quantizer` stays on the model, and a second reference here
            # would keep every layer's codes in CPU memory after the FP8 kernels replaced the layer
            self.fp8_codes = {}
        return model

    def _attach_fp8_codes(self, model) -> None:
        """Keep each FP8 layer's stored codes beside it (`fp8_serialization.attach_stored_codes`), so that the
        FP8 kernels run exactly those codes (`accelerate_24(model, weights="fp8")`, or saving as FP8 again)."""
        from .fp8_serialization import attach_stored_codes

        for name, stored in self.fp8_codes.items():
            attach_stored_codes(model.get_submodule(name), stored)

    def _say_fp8_dequantised(self, model, run_kernels: bool, on_cuda: bool) -> None:
        """One warning for the whole model where FP8 layers run dequantised instead of on the FP8 kernels."""
        from .kernels import FP8_KERNEL

        report = getattr(model, "sparsity_acceleration", None) if run_kernels else None
        on_fp8 = report.kernels.get(FP8_KERNEL, 0) if report is not None else 0
        total = len(self.fp8_codes)
        if on_fp8 >= total:
            return
        dtype = next(iter(model.parameters())).dtype
        if not on_cuda:
            why = "the model is on the CPU (the FP8 2:4 kernels run on Hopper GPUs)"
        elif not run_kernels:
            why = "loaded with accelerate=False"
        else:
            why = (report.reason if report is not None and report.reason else None) or _fp8_unavailable(
                model, self.fp8_codes
            )
        logger.warning(
            "hf_semisparse: this checkpoint stores FP8 (e4m3) 2:4 weights with one scale per output row; %d of its "
            "%d layers were dequantised to %s (e4m3 value * scale: FP8-rounded weights, not the original ones) and "
            "do not run on the FP8 kernels: %s. On a Hopper GPU with `hf-semisparse build-kernels --fp8`, load "
            "with dtype=torch.bfloat16 (or float16) and device_map='cuda' (or call accelerate_24(model, "
            "weights='fp8') on the model in that dtype there) to run the stored codes on them.",
            total - on_fp8,
            total,
            str(dtype).removeprefix("torch."),
            why,
        )

    def _check_all_expanded(self, compressed: list[str], suffix: str = ".weight") -> None:
        """Every compressed module's weight (`suffix` "": every compressed fused expert parameter) went through
        `Sparse24Expand`: a transformers version whose weight loading bypassed it would otherwise leave those weights
        randomly initialised, with a warning at most."""
        missing = [name for name in compressed if name not in self.expanded]
        if missing:
            raise SparseCheckpointError(
                f"{len(missing)} compressed 2:4 weights were not decompressed while transformers "
                f"{transformers_version} loaded the checkpoint (first: {missing[0]}{suffix}); the model would hold "
                "random weights there. Please report this with your transformers version; hf_semisparse is tested "
                "with transformers 5.17 and the newest release."
            )

    def _save_in_our_format(self, model) -> None:
        """Make `save_pretrained` write our format whatever was read: transformers saves by reversing the weight
        conversions of the load, so the legacy layout's converter (or none, for the legacy "dense" format) is
        replaced by ours, whose reverse op compresses every target."""
        from transformers.core_model_loading import WeightConverter

        from .quantizer_ops import Sparse24Expand

        kept = [
            c
            for c in getattr(model, "_weight_conversions", None) or []
            if not any(isinstance(op, Sparse24Expand) for op in getattr(c, "operations", []))
        ]
        # values first: transformers <= 5.17 names a reversed converter's outputs after these patterns in order
        ours = WeightConverter(["weight", "weight" + BITMASK_SUFFIX], "weight", [Sparse24Expand(self)])
        experts = _expert_converters(sorted(self.saved_experts), Sparse24Expand(self), for_saving=True)
        model._weight_conversions = [*kept, ours, *experts]

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # the loaded weights are plain dense tensors (the 2:4 format is lossless storage): full fine-tuning works,
        # and Trainer refuses a "purely quantized" model without adapters unless this is True. Not when the 2:4
        # layers were put on inference kernels (frozen, compressed weights): SparsityTrainer/SparsityCallback say
        # how to load for training (`check_not_on_kernels`)
        return not getattr(self, "accelerated", False)


def _expert_converters(names: list[str], operation, for_saving: bool = False) -> list:
    """One weight converter per kind of fused expert parameter (`experts.gate_up_proj`, `experts.down_proj`):
    the values and `_bitmask` of each are expanded into the parameter. The patterns hold the experts module's own
    name, so a dense `shared_expert.down_proj.weight` is not collected."""
    from transformers.core_model_loading import WeightConverter

    patterns = sorted({".".join(name.rsplit(".", 2)[-2:]) for name in names})
    return [
        WeightConverter([p, p + BITMASK_SUFFIX] if for_saving else [p + BITMASK_SUFFIX, p], p, [operation])
        for p in patterns
    ]


def _fp8_unavailable(model, codes: dict) -> str:
    """Why the FP8 kernels do not take a loaded FP8 layer that stayed dequantised (the first such layer's reason)."""
    from .kernels import cutlass_fp8

    for name, stored in codes.items():
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor):
            rows, cols = stored.values.shape[0], stored.values.shape[1] * 2
            why = cutlass_fp8.why_unavailable(weight.device, weight.dtype, rows, cols)
            if why is not None:
                return f"{name}: {why}"
    return "see the acceleration report (model.sparsity_acceleration)"


def _model_name(checkpoint_name: str, modules: dict, prefix: str) -> str | None:
    if checkpoint_name in modules:
        return checkpoint_name
    if prefix and checkpoint_name.startswith(prefix + ".") and checkpoint_name[len(prefix) + 1 :] in modules:
        return checkpoint_name[len(prefix) + 1 :]
    if prefix and f"{prefix}.{checkpoint_name}" in modules:
        return f"{prefix}.{checkpoint_name}"
    return None


def _tied_names(model) -> dict[str, str]:
    """Tied parameter name -> the name it shares its tensor with."""
    out = {}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for a, b in tied.items():
        out[a], out[b] = b, a
    return out
