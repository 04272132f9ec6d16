"""`AutoSparseModel`: a thin entry point over plain `from_pretrained` with our quantizer (`quantizer.py`)."""

from __future__ import annotations

import logging
import os

import torch
import transformers
from transformers import AutoConfig

from .checkpoint_format import read_headers
from .masks import find_nm_violation
from .registration import load_options
from .serialization import SparseCheckpointError, digests_recorded, verify_weight_files, weight_files

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


class AutoSparseModel:
    """Loads checkpoints written by `save_sparse_pretrained` (or compressed-tensors' sparse-24-bitmask, or dense
    checkpoints whose recorded targets are 2:4 zeros) and, on a GPU that can, runs the 2:4 layers on sparse kernels.

    Example:
        >>> model = AutoSparseModel.from_pretrained("out/sparse", dtype=torch.float16, device_map="cuda")
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
        keep_dense: bool | None = None,
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
            keep_dense: passed to `accelerate_24` (None: its default, compressed weights only for decoders).
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
        read_headers(files)  # clear errors for truncated or non-safetensors shards first
        # every tensor against the CRC32 recorded when it was written, before transformers reads the files
        verify_weight_files(files, require_digests=digests_recorded(quant))
        klass = _model_class(config, model_class)
        dtype = torch_dtype if torch_dtype is not None else dtype
        if (
            device_map == "auto"
        ):  # the first GPU if any, as before (transformers' "auto" spreads over devices)
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        with load_options(accelerate=accelerate, keep_dense=keep_dense, verified_files=tuple(files)):
            model = klass.from_pretrained(
                directory,
                dtype="auto" if dtype is None else dtype,
                device_map=device_map,
                use_safetensors=True,
                trust_remote_code=False,
            )
        if (
            getattr(model, "hf_quantizer", None) is None
        ):  # a dense checkpoint: its recorded targets must be 2:4
            recorded = getattr(model.config, "sparsity_config", None)
            if isinstance(recorded, dict) and (recorded.get("targets") or recorded.get("expert_targets")):
                _check_dense_targets(
                    model, recorded.get("targets") or [], recorded.get("expert_targets") or []
                )
            if accelerate:
                from .kernels import accelerate_24

                model.sparsity_acceleration = accelerate_24(model, keep_dense=keep_dense)
        return model


def _check_dense_targets(model: torch.nn.Module, targets: list[str], experts: list[str] = ()) -> None:
    modules = dict(model.named_modules())
    for name in experts:  # fused expert weights: 2:4 along each expert's input dimension
        module_name, _, param = name.rpartition(".")
        weight = getattr(modules.get(module_name), param, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            raise SparseCheckpointError(
                f"config.sparsity_config names the expert weight {name}, which the model lacks"
            )
        view = weight.transpose(-2, -1) if getattr(modules[module_name], "is_transposed", False) else weight
        bad = find_nm_violation(view)
        if bad is not None:
            raise SparseCheckpointError(
                f"{name} is recorded as 2:4 but the group at {bad.index} ([experts, out, in] layout) has "
                f"{bad.nonzeros} non-zeros"
            )
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
