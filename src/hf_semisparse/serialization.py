"""Sparse checkpoints on disk: compressed-tensors' "sparse-24-bitmask" layout in safetensors.

Every 2:4 weight `W [rows, cols]` of a target module `m` is stored as three tensors, exactly as compressed-tensors
(<= 0.14, the releases that still read this format; vLLM reads it too) writes them:

    m.shape       int64 [[rows], [cols]]
    m.compressed  W's kept values, [rows, cols / 2], in W's dtype, row-major order
    m.bitmask     uint8 [rows, ceil(cols / 8)], the kept positions, bits little-endian along each row

Every other tensor is stored as it is. `config.json` gets a compressed-tensors `quantization_config` whose
`sparsity_config` says format, structure, targets and ignored modules, plus `sparsity_config` (ours). GPT-2 style
`Conv1D` weights are stored as `[out, in]` (their 2:4 groups run along `in`) and listed under
`hf_semisparse.transposed` in the config: only this library reads those back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from . import save_destination
from .digests import DIGEST_KEY, digest_metadata, open_verified
from .errors import CorruptCheckpointError, SaveDestinationError, SparseCheckpointError
from .masks import compute_nm_mask, find_nm_violation, pack_mask, unpack_mask
from .save_destination import check_save_destination
from .utils import unwrap_model

logger = logging.getLogger(__name__)

SPARSITY_FORMAT = "sparse-24-bitmask"
COMPRESSION_SUFFIXES = ("shape", "compressed", "bitmask")
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


__all__ = [
    "CorruptCheckpointError",
    "SaveDestinationError",
    "SparseCheckpointError",
    "check_save_destination",
    "parse_shard_size",
    "save_sparse_pretrained",
]


# ----------------------------------------------------------------------------- one tensor
def compress_24(weight: torch.Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """Compress a 2:4 weight `[rows, cols]` into `shape`, `compressed` and `bitmask` tensors.

    Raises:
        SparseCheckpointError: `weight` is not 2-D, or not 2:4 (the message names the first offending group).
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise SparseCheckpointError(
            f"{name}: 2:4 compression needs a 2-D tensor whose columns are a multiple "
            f"of 4, got shape {tuple(weight.shape)}"
        )
    bad = find_nm_violation(weight)
    if bad is not None:
        raise SparseCheckpointError(
            f"{name} claims 2:4 sparsity but the group at {bad.index} has {bad.nonzeros} non-zeros"
        )
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    mask = compute_nm_mask(weight)  # exactly 2 per group: every non-zero, then the lowest-index zeros
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        "compressed": weight[mask].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_mask(mask),
    }


def decompress_24(
    shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor, name: str = "weight"
) -> torch.Tensor:
    """Inverse of `compress_24`, checking every field against the others."""
    if shape.numel() != 2:
        raise SparseCheckpointError(f"{name}.shape must hold [rows, cols], got {shape.flatten().tolist()}")
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if rows <= 0 or cols <= 0 or cols % 4:
        raise SparseCheckpointError(f"{name}.shape {[rows, cols]} is not a 2:4 weight shape")
    if tuple(compressed.shape) != (rows, cols // 2):
        raise SparseCheckpointError(
            f"{name}.compressed has shape {tuple(compressed.shape)}, expected "
            f"{(rows, cols // 2)} for a {rows}x{cols} 2:4 weight"
        )
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, math.ceil(cols / 8)):
        raise SparseCheckpointError(
            f"{name}.bitmask is {bitmask.dtype} {tuple(bitmask.shape)}, expected uint8 "
            f"{(rows, math.ceil(cols / 8))}"
        )
    mask = unpack_mask(bitmask, (rows, cols))
    counts = mask.reshape(-1, 4).sum(dim=1)
    bad = torch.nonzero(counts != 2)
    if bad.numel():
        g = int(bad[0, 0])
        raise SparseCheckpointError(
            f"{name}.bitmask is not 2:4: the group at ({g * 4 // cols}, {g * 4 % cols}) "
            f"marks {int(counts[g])} of 4 weights"
        )
    out = torch.zeros(rows, cols, dtype=compressed.dtype)
    out[mask] = compressed.flatten()
    return out


# ----------------------------------------------------------------------------- targets
def sparse_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose weights are stored compressed: the recorded targets, else every 2:4 linear layer."""
    from .targets import is_linear_module

    root = unwrap_model(model)
    modules = dict(root.named_modules())
    recorded = getattr(getattr(root, "config", None), "sparsity_config", None)
    if isinstance(recorded, dict) and recorded.get("targets"):
        missing = [n for n in recorded["targets"] if n not in modules]
        if missing:
            raise SparseCheckpointError(
                f"config.sparsity_config names modules the model lacks: {missing[:5]}"
            )
        return {n: modules[n] for n in recorded["targets"]}
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


def save_sparse_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    extra_files: dict[str, str] | None = None,
    *,
    overwrite: bool = False,
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

    Returns:
        A summary: targets, bytes of the pruned layers dense vs compressed, file bytes.

    Raises:
        SaveDestinationError: `save_directory` is refused (see `overwrite`), or is a file.
        SparseCheckpointError: the model has no 2:4 layer, or a recorded target is not 2:4 (names the tensor).
        ValueError: `max_shard_size` or an `extra_files` name is invalid.

    Example:
        >>> save_sparse_pretrained(model, "out/bert-24")
        >>> tokenizer.save_pretrained("out/bert-24")  # either order: neither removes the other's files
    """
    from . import __version__

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
    source = getattr(getattr(root, "config", None), "_name_or_path", None)
    destination = check_save_destination(save_directory, source=source or None, overwrite=overwrite)
    targets = sparse_targets(root)
    if not targets:
        raise SparseCheckpointError(
            "no 2:4 linear layer to compress: prune the model first (prune_24 or SparsityTrainer)"
        )
    from .targets import is_linear_module

    state = _dedupe_shared({k: v.detach() for k, v in root.state_dict().items()})
    tensors: dict[str, torch.Tensor] = {}
    groups: list[list[str]] = []
    transposed, dense_bytes, compressed_bytes = [], 0, 0
    for name, tensor in state.items():
        module_name = name[: -len(".weight")] if name.endswith(".weight") else None
        if module_name in targets:
            module = targets[module_name]
            weight = tensor if isinstance(module, nn.Linear) else tensor.t()
            if not isinstance(module, nn.Linear):
                transposed.append(module_name)
            parts = compress_24(weight, name)
            keys = [f"{module_name}.{suffix}" for suffix in COMPRESSION_SUFFIXES]
            for key, suffix in zip(keys, COMPRESSION_SUFFIXES, strict=True):
                tensors[key] = parts[suffix]
            groups.append(keys)
            dense_bytes += weight.numel() * weight.element_size()
            compressed_bytes += sum(
                parts[s].numel() * parts[s].element_size() for s in ("compressed", "bitmask")
            )
        else:
            tensors[name] = tensor.cpu().contiguous()
            groups.append([name])

    target_names = sorted(targets)
    total_linear = [n for n, m in root.named_modules() if is_linear_module(m)]
    config = root.config
    sparsity_cfg = {
        "format": SPARSITY_FORMAT,
        "sparsity_structure": "2:4",
        "global_sparsity": _global_sparsity(root),
        "targets": target_names,
        "ignore": [n for n in total_linear if n not in targets],
        "registry_requires_subclass": False,
    }
    quant_config = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "sparsity_config": sparsity_cfg,
        "hf_semisparse": {
            "version": CHECKPOINT_VERSION,
            "library_version": __version__,
            "transposed": transposed,
            "target_bytes_ratio": round(compressed_bytes / dense_bytes, 4),
            "tensor_digests": DIGEST_KEY,  # every weight file records its tensors' CRC32 (digests.py)
        },
    }
    summary_meta = json.dumps(
        {
            "format": SPARSITY_FORMAT,
            "targets": len(target_names),
            "library": f"hf_semisparse {__version__}",
            "version": CHECKPOINT_VERSION,
        }
    )

    shards = _shards(tensors, groups, shard_limit)
    staging = save_destination.stage(destination)
    try:
        config.architectures = [type(root).__name__]  # as transformers' save_pretrained records it
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
        "dense_target_bytes": dense_bytes,
        "compressed_target_bytes": compressed_bytes,
        "target_ratio": compressed_bytes / dense_bytes,
        "file_bytes": file_bytes,
    }


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


def read_tensors(files: Iterable[str], require_digests: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, each checked against the digests recorded in its file (`digests.open_verified`).

    Args:
        require_digests: every file must carry a digest record (config.json says they were written with one).

    Raises:
        CorruptCheckpointError: a file is unreadable, or a tensor differs from what was written.
    """
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with open_verified(path, require=require_digests) as f:
            for key in f.keys():  # noqa: SIM118 - not a dict
                try:
                    out[key] = f.get_tensor(key)
                except (OSError, RuntimeError, ValueError) as exc:
                    if isinstance(exc, SparseCheckpointError):
                        raise
                    raise CorruptCheckpointError(f"{path}: tensor {key} cannot be read: {exc}") from exc
    return out


def decompress_state_dict(
    tensors: dict[str, torch.Tensor],
    sparsity_config: dict,
    transposed: Iterable[str] = (),
    targets_are_modules: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Turn every `m.shape/compressed/bitmask` triplet back into `m.weight`; check config against tensors.

    `targets_are_modules`: the config's `targets` are module names (checkpoints we wrote), so each must have a
    compressed weight. compressed-tensors writes class names there ("Linear"), which say nothing per tensor.

    Returns:
        The dense state dict and the names of the modules that were compressed.
    """
    if sparsity_config.get("format") != SPARSITY_FORMAT:
        raise SparseCheckpointError(
            f"sparsity format {sparsity_config.get('format')!r} is not supported "
            f"(this library reads {SPARSITY_FORMAT!r})"
        )
    if sparsity_config.get("sparsity_structure", "2:4") != "2:4":
        raise SparseCheckpointError(
            f"sparsity_structure {sparsity_config.get('sparsity_structure')!r} is not 2:4"
        )
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".bitmask")})
    transposed = set(transposed)
    out = dict(tensors)
    for m in modules:
        parts = {}
        for s in COMPRESSION_SUFFIXES:
            key = f"{m}.{s}"
            if key not in tensors:
                raise SparseCheckpointError(f"{m}: compressed weight lacks {key}")
            parts[s] = out.pop(key)
        weight = decompress_24(parts["shape"], parts["compressed"], parts["bitmask"], name=f"{m}.weight")
        out[f"{m}.weight"] = weight.t().contiguous() if m in transposed else weight
    listed = sparsity_config.get("targets")
    if targets_are_modules and isinstance(listed, list):
        missing = sorted(set(listed) - set(modules))
        if missing:
            raise SparseCheckpointError(f"config lists 2:4 targets with no compressed tensors: {missing[:5]}")
    return out, modules
