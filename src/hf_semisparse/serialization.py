"""Writing sparse checkpoints: `save_sparse_pretrained` (the format is described in `checkpoint_format`).

By default the checkpoint is in our format (quant_method "hf_semisparse"), which plain `from_pretrained` loads
after `import hf_semisparse` (`quantizer`). `format="compressed-tensors"` writes the legacy compressed-tensors
"sparse-24-bitmask" layout instead, for serving stacks that still read it (compressed-tensors <= 0.14).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from . import save_destination
from .checkpoint_format import (
    BITMASK_SUFFIX,
    EXPERTS_FORMAT_VERSION,
    FORMAT_VERSION,
    FP8_FORMAT_VERSION,
    FP8_WEIGHTS_FORMAT,
    QUANT_METHOD,
    SCALE_SUFFIX,
    SPARSITY_FORMAT,
    check_legacy_shape,
    compress_values,
    expand_values,
)
from .digests import DIGEST_KEY, digest_metadata, open_verified
from .errors import CorruptCheckpointError, SaveDestinationError, SparseCheckpointError
from .masks import find_nm_violation
from .save_destination import check_save_destination
from .utils import unwrap_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


__all__ = [
    "CorruptCheckpointError",
    "SaveDestinationError",
    "SparseCheckpointError",
    "check_save_destination",
    "compress_24",
    "decompress_24",
    "digests_recorded",
    "parse_shard_size",
    "save_sparse_pretrained",
    "verify_weight_files",
    "weight_files",
]


# ----------------------------------------------------------------------------- one tensor, legacy layout
def compress_24(weight: torch.Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """Compress a 2:4 weight `[rows, cols]` into the legacy `shape`, `compressed` and `bitmask` tensors.

    Raises:
        SparseCheckpointError: `weight` is not 2-D, or not 2:4 (the message names the first offending group).
    """
    if weight.dim() != 2:
        raise SparseCheckpointError(f"{name}: the legacy layout holds 2-D weights, got {tuple(weight.shape)}")
    values, bitmask = compress_values(weight, name)
    shape = torch.tensor(list(weight.shape), dtype=torch.int64).reshape(-1, 1)
    return {"shape": shape, "compressed": values, "bitmask": bitmask}


def decompress_24(
    shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor, name: str = "weight"
) -> torch.Tensor:
    """Inverse of `compress_24`, checking every field against the others."""
    check_legacy_shape(name, shape, compressed)
    return expand_values(compressed, bitmask, name)


def check_not_tied(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Refuse a target whose weight tensor is shared with a module that is not a target (tied embeddings).

    Raises:
        SparseCheckpointError: naming the target, the other owners, and how to untie them.
    """
    # targets imports transformers: not at module level, so that `hf-semisparse inspect` stays light
    from .targets import shared_weight_owners

    owners = shared_weight_owners(model)
    for name in targets:
        others = [o for o in owners.get(f"{name}.weight", []) if o[: -len(".weight")] not in targets]
        if others:
            raise SparseCheckpointError(
                f"{name}.weight is tied to {others} (not a 2:4 target): compressing it would prune those too. "
                "Untie it first (config.tie_word_embeddings=False, then give it its own copy) or leave it dense."
            )


# ----------------------------------------------------------------------------- targets
def sparse_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose weights are stored compressed: the recorded targets, else every 2:4 linear layer."""
    from .targets import is_linear_module

    root = unwrap_model(model)
    modules = dict(root.named_modules())
    recorded = getattr(getattr(root, "config", None), "sparsity_config", None)
    if isinstance(recorded, dict) and (recorded.get("targets") or recorded.get("expert_targets")):
        missing = [n for n in recorded.get("targets") or [] if n not in modules]
        if missing:
            raise SparseCheckpointError(
                f"config.sparsity_config names modules the model lacks: {missing[:5]}"
            )
        return {n: modules[n] for n in recorded.get("targets") or []}
    out = {}
    for name, module in modules.items():
        if not is_linear_module(module):
            continue
        weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
        if (
            weight.dim() == 2
            and weight.shape[1] % 4 == 0
            and weight.shape[1] >= 16
            and not (weight == 0).all()
        ) and find_nm_violation(weight) is None:
            out[name] = module
    return out


def sparse_expert_params(model: nn.Module) -> dict[str, bool]:
    """Fused expert parameters stored compressed -> whether their module stores them `[experts, in, out]`.

    The recorded `config.sparsity_config["expert_targets"]`, else every fused expert weight of a transformers
    experts module that is 2:4 along its input dimension (and not all zero).

    Raises:
        SparseCheckpointError: a recorded name is not a fused expert weight of the model.
    """
    from .targets import EXPERT_PARAMS, is_experts_module

    root = unwrap_model(model)
    modules = dict(root.named_modules())
    recorded = getattr(getattr(root, "config", None), "sparsity_config", None)
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, module in modules.items():
        if is_experts_module(module):
            for param in EXPERT_PARAMS:
                tensor = getattr(module, param, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 3:
                    found[f"{name}.{param}"] = (module, param)
    if isinstance(recorded, dict) and (recorded.get("targets") or recorded.get("expert_targets")):
        names = list(recorded.get("expert_targets") or [])
        missing = [n for n in names if n not in found]
        if missing:
            raise SparseCheckpointError(
                f"config.sparsity_config names fused expert weights the model lacks: {missing[:5]}"
            )
    else:
        names = []
        for name, (module, param) in found.items():
            weight = getattr(module, param)
            view = weight.transpose(-2, -1) if getattr(module, "is_transposed", False) else weight
            if view.shape[-1] % 4 == 0 and not (view == 0).all() and find_nm_violation(view) is None:
                names.append(name)
    return {n: bool(getattr(found[n][0], "is_transposed", False)) for n in names}


# ----------------------------------------------------------------------------- save
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_shard_size(size: int | str) -> int:
    """Bytes in a shard size given as in transformers ("5GB", "500MB", "2GiB") or as a number of bytes.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise ValueError(
                f"max_shard_size={size!r} is not a size: use a number of bytes or a number with a unit "
                "(KB, MB, GB, KiB, MiB, GiB), e.g. '5GB'"
            )
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be a positive size, e.g. '5GB'")
    return value


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors sharing storage (tied weights): safetensors cannot hold aliases."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
        )
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _shards(
    tensors: dict[str, torch.Tensor], groups: list[list[str]], limit: int
) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for group in groups:
        group_size = sum(tensors[k].numel() * tensors[k].element_size() for k in group)
        if current and size + group_size > limit:
            shards.append(current)
            current, size = {}, 0
        for k in group:
            current[k] = tensors[k]
        size += group_size
    if current:
        shards.append(current)
    return shards


PROGRESS_MIN_TARGETS = 32  # fewer 2:4 weights compress in a moment: no progress bar


def _check_other_pattern(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """A model pruned to another N:M pattern (1:4 or 1:2 are also 2:4; 4:8 is not): raise SparseCheckpointError
    saying so when a target is not 2:4, instead of the bare "claims 2:4" error of compression."""
    recorded = getattr(getattr(model, "config", None), "sparsity_config", None)
    pattern = recorded.get("pattern", "2:4") if isinstance(recorded, dict) else "2:4"
    if pattern == "2:4":
        return
    for name, module in targets.items():
        weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
        if find_nm_violation(weight) is not None:
            raise SparseCheckpointError(
                f"the model was pruned to {pattern} (config.sparsity_config) and {name} is not 2:4, which is all "
                "the compressed formats hold: save it with save_pretrained (dense weights with their zeros), or "
                "prune it to 2:4"
            )


def check_no_adapters(model: nn.Module) -> None:
    """Raise SparseCheckpointError when `model` is a `PeftModel` (or tuner model) or holds PEFT adapter layers:
    the base weights would be stored under `base_layer` names beside the adapters', which `from_pretrained`
    cannot load as a 2:4 checkpoint. The message names the way out for the kind of wrapper."""
    from .peft_structure import is_peft_model, is_prompt_learning, is_tuner_layer

    if is_prompt_learning(model):
        raise SparseCheckpointError(
            "the model is a PEFT prompt-learning model: save its base model, save_sparse_pretrained("
            "peft_model.get_base_model(), ...), and its adapter with peft_model.save_pretrained"
        )
    wrapped = next((name for name, mod in model.named_modules() if is_tuner_layer(mod)), None)
    if is_peft_model(model) or wrapped is not None:
        where = f" (e.g. {wrapped})" if wrapped else ""
        raise SparseCheckpointError(
            f"the model holds PEFT adapters{where}: a checkpoint of it would not load as a 2:4 model. Save the "
            "adapter with peft_model.save_pretrained and the 2:4 base without its adapters, "
            "save_sparse_pretrained(copy.deepcopy(peft_model).unload(), ...); or merge the adapters, "
            "hf_semisparse.lora.merge_sparse_lora(peft_model) (docs/guides/lora.md)"
        )


def save_sparse_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    extra_files: dict[str, str] | None = None,
    format: str = "hf_semisparse",  # noqa: A002 - as in transformers' save options
    *,
    overwrite: bool = False,
    tokenizer: PreTrainedTokenizerBase | ProcessorMixin | None = None,
    show_progress: bool = True,
    weights: str = "native",
) -> dict:
    """Save `model` with every 2:4 target weight compressed, never losing files already there.

    A new folder is written whole beside its final place and renamed into it: an interrupted save leaves nothing.
    Into an existing checkpoint folder, all files are written to a hidden staging folder inside it first, then each
    replaces its namesake atomically (`config.json`, `generation_config.json`, the weights and their index, and
    `extra_files`); weight shards or an index of an older save that this one does not use are removed, and
    nothing else is touched (tokenizer files, notes, `runs/` stay). An interrupted save leaves the old checkpoint.
    Every safetensors file records each tensor's dtype, shape and CRC32 (`digests.py`), checked when it is read.

    Args:
        model: a transformers model whose targets are exactly 2:4 (recorded in `config.sparsity_config`, or found).
        save_directory: where to write `config.json`, `model.safetensors` (or shards plus an index).
        max_shard_size: as in transformers, e.g. "5GB"; a compressed weight's three tensors stay in one shard.
        extra_files: more text files to write, name -> content (e.g. a model card as README.md).
        overwrite: also write into a folder that is refused by default: the current directory or a folder above
            it, a folder above the checkpoint the model was loaded from, a non-empty folder holding no checkpoint.
            Even then only the files listed above are replaced.
        tokenizer: a tokenizer or processor (anything with transformers' `save_pretrained`), saved into the same
            folder in the same atomic step, so the folder loads with `AutoTokenizer.from_pretrained` too.
        show_progress: a progress bar while the weights are compressed, for models with `PROGRESS_MIN_TARGETS` or
            more 2:4 weights (compression runs on the CPU, tensor by tensor).
        weights: "native" stores the kept values in the model's dtype (format version 2, or 3 with fused experts).
            "fp8" stores every 2:4 linear weight as e4m3 codes with one float32 scale per output row (format
            version 4, `fp8_serialization`), the codes `accelerate_24(model, weights="fp8")` computes; the model
            must be fp16, bf16 or fp32 with finite 2:4 weights, and without 2:4 fused expert weights. A layer
            loaded from an FP8 checkpoint whose weight is unchanged keeps its stored codes.

    Returns:
        A summary: targets, bytes of the pruned layers dense vs compressed, file bytes.

    Raises:
        SaveDestinationError: `save_directory` is refused (see `overwrite`), or is a file.
        SparseCheckpointError: the model has no 2:4 layer, holds PEFT adapter layers (merge them first), or a
            recorded target is not 2:4 (names the tensor; for a model pruned to another N:M pattern, says so);
            with `weights="fp8"`: a target weight is not finite or of another dtype, or the model has 2:4 fused
            expert weights. Nothing is written then.
        ValueError: `max_shard_size`, `weights` or an `extra_files` name is invalid.
        TypeError: `tokenizer` is not a tokenizer or processor (no `save_pretrained`, or a model or config).

    Example:
        >>> save_sparse_pretrained(model, "out/bert-24", tokenizer=tokenizer)
        >>> # or tokenizer.save_pretrained("out/bert-24") before or after: neither removes the other's files
    """
    from . import __version__

    if format not in ("hf_semisparse", "compressed-tensors"):
        raise ValueError(f"format must be 'hf_semisparse' or 'compressed-tensors', got {format!r}")
    if weights not in ("native", "fp8"):
        raise ValueError(f"weights must be 'native' or 'fp8', got {weights!r}")
    fp8 = weights == "fp8"
    if fp8 and format != "hf_semisparse":
        raise ValueError(
            "weights='fp8' is written in the hf_semisparse format only (the compressed-tensors layout has no FP8 "
            "2:4 weights)"
        )
    if tokenizer is not None:
        from transformers import GenerationConfig, PretrainedConfig

        if not callable(getattr(tokenizer, "save_pretrained", None)) or isinstance(
            tokenizer, (nn.Module, PretrainedConfig, GenerationConfig)
        ):
            raise TypeError(
                "tokenizer must be a tokenizer or processor (AutoTokenizer / AutoProcessor.from_pretrained) with a "
                f"save_pretrained method, got {type(tokenizer).__name__}"
            )
    legacy = format == "compressed-tensors"
    shard_limit = parse_shard_size(max_shard_size)
    for fname in extra_files or {}:
        if not fname or os.path.basename(fname) != fname or fname in (".", ".."):
            raise ValueError(f"extra_files name {fname!r} must be a plain file name (no folders)")
        if save_destination.OWNED_WEIGHTS.fullmatch(fname) or fname in (
            "config.json",
            "generation_config.json",
        ):
            raise ValueError(f"extra_files name {fname!r} would replace a file the checkpoint itself writes")
    root = unwrap_model(model)
    check_no_adapters(root)
    source = getattr(getattr(root, "config", None), "_name_or_path", None)
    destination = check_save_destination(save_directory, source=source or None, overwrite=overwrite)
    targets = sparse_targets(root)
    _check_other_pattern(root, targets)
    experts = sparse_expert_params(root)
    if not targets and not experts:
        raise SparseCheckpointError(
            "no 2:4 linear layer to compress: prune the model first (prune_24 or SparsityTrainer)"
        )
    if legacy and experts:
        raise SparseCheckpointError(
            f"the compressed-tensors layout holds 2-D weights only, and this model has 2:4 fused expert weights "
            f"({sorted(experts)[:2]}...): save it in the hf_semisparse format (the default)"
        )
    if fp8 and experts:
        raise SparseCheckpointError(
            f"weights='fp8': this model has 2:4 fused expert weights ({sorted(experts)[:2]}...), which FP8 "
            "checkpoints do not hold yet; save it with weights='native'"
        )
    check_not_tied(root, targets)
    from .targets import is_linear_module

    state = _dedupe_shared({k: v.detach() for k, v in root.state_dict().items()})
    tensors: dict[str, torch.Tensor] = {}
    groups: list[list[str]] = []
    transposed, dense_bytes, compressed_bytes = [], 0, 0
    from tqdm.auto import tqdm

    progress = tqdm(
        total=len(state),
        desc="hf_semisparse: compressing 2:4 weights",
        unit="tensor",
        disable=not show_progress or len(targets) + len(experts) < PROGRESS_MIN_TARGETS,
    )
    for name, tensor in state.items():
        progress.update()
        module_name = name[: -len(".weight")] if name.endswith(".weight") else None
        if name in experts:
            weight = tensor.transpose(-2, -1) if experts[name] else tensor
            values, bitmask = compress_values(weight, name)
            parts = {name: values, name + BITMASK_SUFFIX: bitmask}
            tensors.update(parts)
            groups.append(list(parts))
            dense_bytes += weight.numel() * weight.element_size()
            compressed_bytes += values.numel() * values.element_size() + bitmask.numel()
        elif module_name in targets:
            module = targets[module_name]
            weight = tensor if isinstance(module, nn.Linear) else tensor.t()
            if not isinstance(module, nn.Linear):
                transposed.append(module_name)
            if fp8:
                values, bitmask, scale = _fp8_parts(module, weight, name)
                compressed_bytes += scale.numel() * scale.element_size()
            else:
                values, bitmask = compress_values(weight, name)
            if legacy:
                parts = {
                    f"{module_name}.shape": torch.tensor(list(weight.shape), dtype=torch.int64).reshape(
                        -1, 1
                    ),
                    f"{module_name}.compressed": values,
                    f"{module_name}.bitmask": bitmask,
                }
            else:
                parts = {name: values, name + BITMASK_SUFFIX: bitmask}
            if fp8:
                parts[name + SCALE_SUFFIX] = scale
            tensors.update(parts)
            groups.append(list(parts))
            dense_bytes += weight.numel() * weight.element_size()
            compressed_bytes += values.numel() * values.element_size() + bitmask.numel()
        else:
            tensors[name] = tensor.cpu().contiguous()
            groups.append([name])

    progress.close()
    target_names = sorted(targets)
    total_linear = [n for n, m in root.named_modules() if is_linear_module(m)]
    config = root.config
    ignore = [n for n in total_linear if n not in targets]
    ours = {
        "library_version": __version__,
        "global_sparsity": _global_sparsity(root),
        "target_bytes_ratio": round(compressed_bytes / dense_bytes, 4),
        "tensor_digests": DIGEST_KEY,  # every weight file records its tensors' CRC32 (digests.py)
    }
    if legacy:
        quant_config = {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "sparsity_config": {
                "format": SPARSITY_FORMAT,
                "sparsity_structure": "2:4",
                "global_sparsity": ours["global_sparsity"],
                "targets": target_names,
                "ignore": ignore,
                "registry_requires_subclass": False,
            },
            "hf_semisparse": {"version": 1, "transposed": transposed, **ours},
        }
    else:
        quant_config = {
            "quant_method": QUANT_METHOD,
            "format": SPARSITY_FORMAT,
            "version": FP8_FORMAT_VERSION if fp8 else EXPERTS_FORMAT_VERSION if experts else FORMAT_VERSION,
            "targets": target_names,
            **({"weights": {**FP8_WEIGHTS_FORMAT, "targets": target_names}} if fp8 else {}),
            "transposed": sorted(transposed),
            **(
                {
                    "expert_targets": sorted(experts),
                    "expert_transposed": sorted(n for n, t in experts.items() if t),
                }
                if experts
                else {}
            ),
            "ignore": ignore,
            **ours,
        }
    summary_meta = json.dumps(
        {
            "format": SPARSITY_FORMAT,
            "targets": len(target_names),
            "library": f"hf_semisparse {__version__}",
            "version": 1 if legacy else quant_config["version"],
        }
    )

    shards = _shards(tensors, groups, shard_limit)
    staging = save_destination.stage(destination)
    try:
        if tokenizer is not None:  # first: the model's own files below replace any namesake it writes
            tokenizer.save_pretrained(staging)
        config.architectures = [type(root).__name__]  # as transformers' save_pretrained records it
        dtype = getattr(root, "dtype", None)
        if isinstance(dtype, torch.dtype):  # the dtype the weights are in, as transformers records it
            config.dtype = str(dtype).removeprefix("torch.")
        previous = getattr(config, "quantization_config", None)
        config.quantization_config = quant_config
        try:
            config.save_pretrained(staging)
        finally:
            if previous is None:
                del config.quantization_config
            else:
                config.quantization_config = previous
        generation_config = getattr(root, "generation_config", None)
        if generation_config is not None and getattr(root, "can_generate", lambda: False)():
            generation_config.save_pretrained(staging)
        file_bytes = 0
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            metadata = {"format": "pt", "hf_semisparse": summary_meta, DIGEST_KEY: digest_metadata(shard)}
            save_file(shard, os.path.join(staging, fname), metadata=metadata)
            file_bytes += os.path.getsize(os.path.join(staging, fname))
            weight_map.update(dict.fromkeys(shard, fname))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(staging, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        for fname, text in (extra_files or {}).items():
            with open(os.path.join(staging, fname), "w", encoding="utf-8") as f:
                f.write(text)
        save_destination.commit(staging, destination)
    except BaseException:
        save_destination.discard(staging)
        raise
    return {
        "targets": target_names,
        "expert_targets": sorted(experts),
        "dense_target_bytes": dense_bytes,
        "compressed_target_bytes": compressed_bytes,
        "target_ratio": compressed_bytes / dense_bytes,
        "file_bytes": file_bytes,
    }


def _fp8_parts(module: nn.Module, weight: torch.Tensor, name: str):
    """A target's FP8 values, bitmask and scale: the codes it was loaded with if its weight is unchanged, else
    `compress_fp8_24` of its weight (validated: dtype, finite, 2:4)."""
    from .fp8_serialization import STORED_ATTR, compress_fp8_24, stored_codes

    if (
        stored_codes(module, weight) is not None
    ):  # loaded from an FP8 checkpoint: its codes (re-quantising may change them)
        stored = getattr(module, STORED_ATTR)
        return stored.values, stored.bitmask, stored.scale.reshape(-1, 1).contiguous()
    return compress_fp8_24(weight, name)


def _global_sparsity(model: nn.Module) -> float:
    total = zeros = 0
    for p in model.parameters():
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / total if total else 0.0


# ----------------------------------------------------------------------------- load
def weight_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint folder, checking the index; refuses pickle-only checkpoints."""
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as exc:
                raise SparseCheckpointError(f"{index} is not a valid shard index: {exc}") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise SparseCheckpointError(
                f"{directory} is missing shard(s) {missing} listed in {WEIGHTS_INDEX_NAME}"
            )
        return [os.path.join(directory, f) for f in files]
    if os.path.isfile(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(directory)):
        raise SparseCheckpointError(
            f"{directory} holds only pickle weights (.bin/.pt). hf_semisparse loads safetensors only, because "
            "unpickling can run code. Convert it once with transformers (from_pretrained(..., "
            "use_safetensors=False) then save_pretrained(..., safe_serialization=True)) from a source you trust."
        )
    raise SparseCheckpointError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}")


def digests_recorded(quant: dict | None) -> bool:
    """Whether a checkpoint's `quantization_config` says every weight file records its tensors' digests.

    Our format keeps the marker at the top level (`"tensor_digests"`), the legacy compressed-tensors layout in its
    `hf_semisparse` section; both name the safetensors metadata key (`digests.DIGEST_KEY`).
    """
    if not isinstance(quant, dict):
        return False
    legacy_section = quant.get("hf_semisparse")
    legacy_section = legacy_section if isinstance(legacy_section, dict) else {}
    return bool(quant.get("tensor_digests") or legacy_section.get("tensor_digests"))


def verify_weight_files(files: Iterable[str], require_digests: bool = False) -> None:
    """Check every tensor of `files` against the digests recorded in its file (`digests.open_verified`).

    Tensors are read one at a time and dropped, so memory stays at the largest tensor. Files without a digest
    record (checkpoints of other writers) are only checked to be readable safetensors, unless `require_digests`.

    Args:
        require_digests: every file must carry a digest record (config.json says they were written with one).

    Raises:
        CorruptCheckpointError: a file is unreadable, its record is missing (when required) or damaged, or a
            tensor's name, dtype, shape or bytes differ from what was written.
    """
    for path in files:
        with open_verified(path, require=require_digests) as f:
            if f.record is None or not f.check_data:
                continue  # header checks only: nothing recorded to compare the bytes with
            for key in f.keys():  # noqa: SIM118 - not a dict
                try:
                    f.get_tensor(key)
                except (OSError, RuntimeError, ValueError) as exc:
                    if isinstance(exc, SparseCheckpointError):
                        raise
                    raise CorruptCheckpointError(f"{path}: tensor {key} cannot be read: {exc}") from exc
