"""`AutoSparseModel`: load a sparse (or 2:4-zeroed dense) checkpoint as a normal transformers model."""

from __future__ import annotations

import logging
import os
import re
from types import SimpleNamespace

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig

from .masks import find_nm_violation
from .serialization import (
    SparseCheckpointError,
    decompress_state_dict,
    read_tensors,
    weight_files,
)

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.md"]


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> str:
    """A local folder as it is; a Hub repo id downloaded (safetensors and text files only) through huggingface_hub."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id=path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_patterns=HUB_PATTERNS,
    )


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"cannot infer the model class: config.architectures={architectures!r} names no transformers "
        "class. Pass model_class= (e.g. transformers.AutoModelForQuestionAnswering's concrete class)."
    )


def _resolve_dtype(dtype, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        for t in tensors.values():
            if t.is_floating_point():
                return t.dtype
        return torch.float32
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"torch_dtype must be a torch.dtype, its name, 'auto' or None; got {dtype!r}")


class AutoSparseModel:
    """Loads checkpoints written by `save_sparse_pretrained` (or compressed-tensors' sparse-24-bitmask, or dense
    checkpoints whose recorded targets are 2:4 zeros) and, on a GPU that can, runs the 2:4 layers on sparse kernels.

    Example:
        >>> model = AutoSparseModel.from_pretrained("out/sparse", torch_dtype=torch.float16, device_map="cuda")
        >>> model.sparsity_acceleration  # which layers run on 2:4 kernels, or why none do
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        model_class: type | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | dict | None = None,
        accelerate: bool = True,
        keep_dense: bool = True,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
    ) -> torch.nn.Module:
        """Load a model; see the class docstring.

        Args:
            model_class: the transformers class to build; default from `config.architectures`.
            torch_dtype / dtype: the dtype to load in; None or "auto" keeps the stored dtype.
            device_map: None (CPU), a device ("cuda", "cuda:1"), "auto" (the first GPU if any), or an accelerate
                device map dict.
            accelerate: run 2:4 layers on cuSPARSELt when the device and dtype allow (`kernels.accelerate_24`).
            keep_dense: passed to `accelerate_24`.
            revision, token, cache_dir, local_files_only: as in transformers, for Hub repo ids.
            trust_remote_code: must stay False: loading never runs code from a checkpoint.
        """
        if trust_remote_code:
            raise ValueError(
                "AutoSparseModel never runs code from a checkpoint (trust_remote_code must be False)"
            )
        directory = resolve_checkpoint(
            pretrained_model_name_or_path, revision, token, cache_dir, local_files_only
        )
        config = AutoConfig.from_pretrained(directory)
        quant = getattr(config, "quantization_config", None)
        quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
        files = weight_files(directory)  # safetensors only; raises on pickle-only folders or missing shards
        digests_recorded = isinstance(quant, dict) and bool(
            (quant.get("hf_semisparse") or {}).get("tensor_digests")
        )
        tensors = read_tensors(files, require_digests=digests_recorded)

        compressed_modules: list[str] = []
        if isinstance(quant, dict) and quant.get("sparsity_config"):
            ours = quant.get("hf_semisparse") or {}
            if ours and ours.get("version", 1) > 1:
                raise SparseCheckpointError(
                    f"checkpoint format version {ours['version']} is newer than this "
                    "library reads (1): upgrade hf_semisparse"
                )
            tensors, compressed_modules = decompress_state_dict(
                tensors, quant["sparsity_config"], ours.get("transposed", ()), targets_are_modules=bool(ours)
            )
            if quant.get("config_groups"):
                raise SparseCheckpointError(
                    "quantized compressed-tensors checkpoints are not supported, only sparse"
                )
            del config.quantization_config
        elif quant is not None:
            raise SparseCheckpointError(f"unsupported quantization_config {quant.get('quant_method')!r}")

        dtype = _resolve_dtype(torch_dtype if torch_dtype is not None else dtype, tensors)
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        klass = _model_class(config, model_class)
        with init_empty_weights(include_buffers=False):
            model = klass(config)
        _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        unexpected = tolerated_unexpected_keys(model, unexpected)
        if unexpected:
            raise SparseCheckpointError(
                f"checkpoint tensors the {klass.__name__} does not have: {unexpected[:5]} "
                "(config and weights disagree)"
            )
        model.tie_weights()
        still_meta = [n for n, p in model.named_parameters() if p.is_meta]
        if still_meta:
            raise SparseCheckpointError(
                f"checkpoint lacks tensors {still_meta[:5]} (missing shard or wrong config)"
            )

        recorded = getattr(model.config, "sparsity_config", None)
        if compressed_modules:
            record = dict(recorded) if isinstance(recorded, dict) else {"pattern": "2:4"}
            record["targets"] = compressed_modules
            model.config.sparsity_config = record
        elif isinstance(recorded, dict) and recorded.get("targets"):
            _check_dense_targets(model, recorded["targets"])

        model.eval()
        model = _place(model, device_map)
        if accelerate:
            from .kernels import accelerate_24

            model.sparsity_acceleration = accelerate_24(model, keep_dense=keep_dense)
        return model


def tolerated_unexpected_keys(model: torch.nn.Module, unexpected: list[str]) -> list[str]:
    """The checkpoint keys `model` lacks that transformers' own loading would also refuse.

    transformers ignores keys matching the model's `_keys_to_ignore_on_load_unexpected` and stale copies of buffers
    that are no longer saved (`position_ids`, rotary `inv_freq`), e.g. `embeddings.position_ids` in BERT checkpoints
    written by transformers 4.x; its `PreTrainedModel._adjust_missing_and_unexpected_keys` applies those rules and
    is used here. Keys naming a non-persistent buffer of the model are tolerated too: the model builds it itself.
    """
    non_persistent = set()
    for module_name, module in model.named_modules():
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{module_name}.{buffer}" if module_name else buffer)
    keys = {k for k in unexpected if k not in non_persistent}
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if keys and adjust is not None:
        info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(keys))
        adjust(info)
        keys = set(info.unexpected_keys)
    elif keys:  # transformers without that method: its documented class attribute
        patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
        keys = {k for k in keys if not any(re.search(p, k) for p in patterns)}
    return [k for k in unexpected if k in keys]


def _check_dense_targets(model: torch.nn.Module, targets: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in targets:
        module = modules.get(name)
        if module is None:
            raise SparseCheckpointError(f"config.sparsity_config names {name}, which the model lacks")
        weight = module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()
        bad = find_nm_violation(weight)
        if bad is not None:
            raise SparseCheckpointError(
                f"{name}.weight is recorded as 2:4 but the group at {bad.index} has {bad.nonzeros} non-zeros"
            )


def _place(model: torch.nn.Module, device_map) -> torch.nn.Module:
    if device_map is None:
        return model
    if isinstance(device_map, dict):
        from accelerate import dispatch_model

        return dispatch_model(model, device_map=device_map)
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device_map)
