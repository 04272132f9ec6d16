"""The on-disk format of sparse checkpoints, and the checks that both the loader and `hf-semisparse inspect` run.

Our format (quant_method "hf_semisparse", format version 2). Every 2:4 weight `W [..., rows, cols]` of a target
module `m` (2-D for a linear layer; leading dimensions, e.g. stacked MoE experts, are allowed) is stored as

    m.weight          W's kept values, [..., rows, cols / 2], in W's dtype, row-major order
    m.weight_bitmask  uint8 [..., rows, ceil(cols / 8)], the kept positions, bits little-endian along each row

with exactly 2 kept positions in every group of 4 along `cols`. `m.weight` deliberately has a shape no model has:
a transformers that does not know our quantization method (no `import hf_semisparse`) stops with a size-mismatch
error instead of loading a random weight. GPT-2 style `Conv1D` weights (stored `[in, out]` in the model) are
stored as `[out, in]` (their 2:4 groups run along `in`) and listed under `transposed`, so the orientation is
recorded at save time and checked at load time. Every other tensor is stored as it is.

Fused mixture-of-experts weights (transformers 5 experts modules, e.g. Mixtral's `m.gate_up_proj`
`[experts, out, in]`) are stored the same way under their own names, each expert's matrix compressed along its
input dimension:

    m.gate_up_proj          kept values [experts, out, in / 2]
    m.gate_up_proj_bitmask  uint8 [experts, out, ceil(in / 8)]

listed under `expert_targets` (and under `expert_transposed` when the module stores them `[experts, in, out]`:
stored `[experts, out, in]`). A checkpoint with expert targets is format version 3, so that an hf_semisparse that
predates them refuses it with "upgrade" instead of a size mismatch; one without is version 2.

Format version 4 stores FP8 (e4m3) 2:4 weights (`fp8_serialization`): `m.weight` holds the kept values as
float8_e4m3fn `[rows, cols / 2]`, `m.weight_bitmask` as above, and `m.weight_scale` float32 `[rows, 1]` one scale
per output row; every target is FP8, listed again under `weights.targets`; no fused expert weights (yet).

`config.json` carries

    "quantization_config": {"quant_method": "hf_semisparse", "format": "sparse-24-bitmask", "version": 2,
                            "targets": [...], "transposed": [...], "ignore": [...], ...}

The legacy layout (compressed-tensors <= 0.14 "sparse-24-bitmask", also written by hf_semisparse 0.1 as format
version 1) stores `m.shape` (int64 [[rows], [cols]]), `m.compressed` and `m.bitmask` instead; it is read and, on
request, written (`save_sparse_pretrained(..., format="compressed-tensors")`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open

from .errors import SparseCheckpointError  # the one class; re-exported here for the format checks
from .masks import compute_nm_mask, find_nm_violation, pack_mask, unpack_mask

QUANT_METHOD = "hf_semisparse"
SPARSITY_FORMAT = "sparse-24-bitmask"
FORMAT_VERSION = 2
EXPERTS_FORMAT_VERSION = 3  # version 2 plus fused expert weights (`expert_targets`)
FP8_FORMAT_VERSION = 4  # version 2 with e4m3 values and per-row scales (`weights`, `fp8_serialization`)
READABLE_VERSIONS = (FORMAT_VERSION, EXPERTS_FORMAT_VERSION, FP8_FORMAT_VERSION)
BITMASK_SUFFIX = "_bitmask"  # m.weight_bitmask
SCALE_SUFFIX = "_scale"  # m.weight_scale (version 4)
FP8_WEIGHTS_FORMAT = {"format": "fp8-e4m3", "scales": "channel", "activations": "dynamic-token"}
LEGACY_SUFFIXES = ("shape", "compressed", "bitmask")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


# ----------------------------------------------------------------------------- one tensor
def compress_values(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2:4 weight `[..., rows, cols]` into its kept values `[..., rows, cols / 2]` and packed bitmask.

    Groups with fewer than 2 non-zeros keep their lowest-index zeros, so every group stores exactly 2 values.

    Raises:
        SparseCheckpointError: `weight` has fewer than 2 dimensions, `cols` is not a multiple of 4, or a group of 4
            holds more than 2 non-zeros (the message names the first one).
    """
    if weight.dim() < 2 or weight.shape[-1] % 4:
        raise SparseCheckpointError(
            f"{name}: 2:4 compression needs a tensor of 2 or more dimensions whose last one is a multiple "
            f"of 4, got shape {tuple(weight.shape)}"
        )
    bad = find_nm_violation(weight)
    if bad is not None:
        raise SparseCheckpointError(
            f"{name} claims 2:4 sparsity but the group at {bad.index} has {bad.nonzeros} non-zeros"
        )
    weight = weight.detach().cpu()
    if weight.dim() > 2:  # stacked experts: one matrix at a time bounds the mask's sort memory
        parts = [compress_values(w, name) for w in weight.unbind(0)]
        return torch.stack([v for v, _ in parts]), torch.stack([b for _, b in parts])
    mask = compute_nm_mask(weight)
    values = weight[mask].reshape(*weight.shape[:-1], weight.shape[-1] // 2).contiguous()
    return values, pack_mask(mask)


def expand_values(values: torch.Tensor, bitmask: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Inverse of `compress_values`: the dense weight `[..., rows, 2 * values.shape[-1]]`.

    Raises:
        SparseCheckpointError: the bitmask's dtype or shape does not fit `values`, or a group of 4 does not mark
            exactly 2 kept values (the message names the first one).
    """
    cols = values.shape[-1] * 2
    shape = (*values.shape[:-1], cols)
    check_bitmask_layout(name, tuple(values.shape), str(bitmask.dtype), tuple(bitmask.shape))
    mask = unpack_mask(bitmask, shape)
    check_bitmask_groups(name, mask)
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    out[mask] = values.flatten()
    return out


def check_bitmask_layout(name: str, values_shape: tuple, bitmask_dtype: str, bitmask_shape: tuple) -> None:
    """The bitmask of a `values_shape` compressed weight must be uint8 `[..., rows, ceil(cols / 8)]`."""
    if len(values_shape) < 2:
        raise SparseCheckpointError(
            f"{name}: compressed values must have 2 or more dims, got {list(values_shape)}"
        )
    cols = values_shape[-1] * 2
    expected = (*values_shape[:-1], math.ceil(cols / 8))
    if bitmask_dtype not in ("torch.uint8", "uint8", "U8") or tuple(bitmask_shape) != expected:
        raise SparseCheckpointError(
            f"{name}: the bitmask is {bitmask_dtype} {list(bitmask_shape)}, expected uint8 {list(expected)} for "
            f"compressed values {list(values_shape)} (a [..., {values_shape[-2]}, {cols}] 2:4 weight)"
        )


def check_bitmask_groups(name: str, mask: torch.Tensor) -> None:
    """Every group of 4 along the last dim of the unpacked `mask` must mark exactly 2 kept values."""
    counts = mask.reshape(-1, 4).sum(dim=1)
    bad = torch.nonzero(counts != 2)
    if bad.numel():
        g, cols = int(bad[0, 0]), mask.shape[-1]
        row, col = divmod(g * 4, cols)
        raise SparseCheckpointError(
            f"{name}: the bitmask is not 2:4: the group at (row {row}, column {col}) marks {int(counts[g])} of 4 "
            "weights, expected exactly 2 (the file is corrupted or was not written as a 2:4 checkpoint)"
        )


# ----------------------------------------------------------------------------- whole checkpoint, from headers
@dataclass
class TensorInfo:
    """What a safetensors header says about one tensor."""

    dtype: str  # safetensors dtype name: "F16", "U8", "I64", ...
    shape: tuple[int, ...]


@dataclass
class CompressedLayer:
    """One compressed weight as the checkpoint describes it."""

    module: str
    dense_shape: tuple[int, ...]  # as stored: [..., rows, cols] ([out, in] also for Conv1D)
    dtype: str
    transposed: bool
    keys: tuple[str, ...]  # its tensors in the checkpoint
    bitmask_key: str
    kind: str = "linear"  # "linear": `module` is a module name; "experts": a fused expert parameter's name
    scale_key: str | None = None  # FP8 (version 4): `m.weight_scale`


@dataclass
class CheckpointLayout:
    """The result of `check_layout`: the compressed layers, what stays dense, and the config's claims."""

    format: str  # "hf_semisparse", "compressed-tensors"
    sparsity_format: str  # "sparse-24-bitmask" or "dense"
    layers: list[CompressedLayer] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def check_layout(quant: dict, tensors: dict[str, TensorInfo]) -> CheckpointLayout:
    """Check a checkpoint's `quantization_config` against its tensors' headers (no weight read).

    The loader runs this before it reads any weight, and `hf-semisparse inspect` runs it too.

    Args:
        quant: the `quantization_config` of config.json (ours, or compressed-tensors' sparse-only one).
        tensors: every tensor name of the checkpoint -> its header dtype and shape.

    Raises:
        SparseCheckpointError: the config and the tensors disagree (the message names the module and tensor).
    """
    method = quant.get("quant_method")
    if method == QUANT_METHOD:
        return _check_ours(quant, tensors)
    if method == "compressed-tensors":
        return _check_legacy(quant, tensors)
    raise SparseCheckpointError(f"quantization_config.quant_method {method!r} is not a 2:4 sparse format")


def _check_ours(quant: dict, tensors: dict[str, TensorInfo]) -> CheckpointLayout:
    version = quant.get("version")
    if version not in READABLE_VERSIONS:
        newest = max(READABLE_VERSIONS)
        raise SparseCheckpointError(
            f"checkpoint format version {version!r} is not one this hf_semisparse reads {list(READABLE_VERSIONS)}"
            + (": upgrade hf_semisparse" if isinstance(version, int) and version > newest else "")
        )
    if quant.get("format") != SPARSITY_FORMAT:
        raise SparseCheckpointError(
            f"quantization_config.format {quant.get('format')!r} is not supported (expected {SPARSITY_FORMAT!r})"
        )
    targets = quant.get("targets")
    if (
        not isinstance(targets, list)
        or not (targets or quant.get("expert_targets"))
        or not all(isinstance(t, str) for t in targets)
    ):
        raise SparseCheckpointError(
            "quantization_config.targets must be a list of module names, and it or expert_targets non-empty"
        )
    transposed = quant.get("transposed", [])
    if not isinstance(transposed, list) or not set(transposed) <= set(targets):
        raise SparseCheckpointError(
            "quantization_config.transposed (the Conv1D targets) must be a list of names from targets, got "
            f"{transposed!r}"
        )
    experts = quant.get("expert_targets", [])
    expert_transposed = quant.get("expert_transposed", [])
    if not isinstance(experts, list) or not all(isinstance(e, str) for e in experts):
        raise SparseCheckpointError("quantization_config.expert_targets must be a list of parameter names")
    if experts and version < EXPERTS_FORMAT_VERSION:
        raise SparseCheckpointError(
            f"quantization_config lists expert_targets but says format version {version}; expert weights need "
            f"version {EXPERTS_FORMAT_VERSION} (the config was edited or written by another tool)"
        )
    if not isinstance(expert_transposed, list) or not set(expert_transposed) <= set(experts):
        raise SparseCheckpointError(
            "quantization_config.expert_transposed must be a list of names from expert_targets, got "
            f"{expert_transposed!r}"
        )
    listed = {f"{t}.weight{BITMASK_SUFFIX}" for t in targets} | {f"{e}{BITMASK_SUFFIX}" for e in experts}
    stray = sorted(k for k in tensors if k.endswith(BITMASK_SUFFIX) and k not in listed)
    if stray:
        raise SparseCheckpointError(
            f"tensors {stray[:5]} hold 2:4 bitmasks of weights that quantization_config.targets / expert_targets "
            "do not list"
        )
    fp8 = version == FP8_FORMAT_VERSION
    if fp8:
        _check_fp8_record(quant, targets, experts)
    scales = {f"{t}.weight{SCALE_SUFFIX}" for t in targets} if fp8 else set()
    stray = sorted(k for k in tensors if k.endswith(f".weight{SCALE_SUFFIX}") and k not in scales)
    if stray:
        raise SparseCheckpointError(
            f"tensors {stray[:5]} are FP8 weight scales of modules that this version {version} checkpoint does not "
            "store as FP8 (only version 4 lists FP8 targets)"
        )
    fp8_values = {f"{t}.weight" for t in targets} if fp8 else set()
    stray = sorted(k for k, t in tensors.items() if t.dtype.startswith("F8") and k not in fp8_values)
    if stray:
        raise SparseCheckpointError(
            f"tensors {stray[:5]} are stored as FP8 but are not the values of FP8 2:4 targets (a format version 4 "
            "checkpoint's `weights.targets`): they have no scale to be dequantised with"
        )
    layers = []
    for module in targets:
        wkey, mkey = f"{module}.weight", f"{module}.weight{BITMASK_SUFFIX}"
        missing = [k for k in (wkey, mkey) if k not in tensors]
        if missing:
            raise SparseCheckpointError(
                f"{module} is listed in quantization_config.targets but the checkpoint lacks {missing}"
            )
        values, bitmask, skey = tensors[wkey], tensors[mkey], None
        if fp8:
            skey = f"{wkey}{SCALE_SUFFIX}"
            _check_fp8_headers(module, wkey, skey, tensors)
        elif values.dtype not in FLOAT_DTYPES:
            raise SparseCheckpointError(
                f"{wkey}: compressed values are {values.dtype}, expected a float dtype"
            )
        check_bitmask_layout(wkey, values.shape, bitmask.dtype, bitmask.shape)
        dense = (*values.shape[:-1], values.shape[-1] * 2)
        keys = (wkey, mkey, skey) if skey else (wkey, mkey)
        layers.append(
            CompressedLayer(module, dense, values.dtype, module in transposed, keys, mkey, scale_key=skey)
        )
    for param in experts:
        mkey = f"{param}{BITMASK_SUFFIX}"
        missing = [k for k in (param, mkey) if k not in tensors]
        if missing:
            raise SparseCheckpointError(
                f"{param} is listed in quantization_config.expert_targets but the checkpoint lacks {missing}"
            )
        values, bitmask = tensors[param], tensors[mkey]
        if values.dtype not in FLOAT_DTYPES or len(values.shape) != 3:
            raise SparseCheckpointError(
                f"{param}: compressed expert values are {values.dtype} {list(values.shape)}, expected a 3-D "
                "float tensor [experts, out, in / 2]"
            )
        check_bitmask_layout(param, values.shape, bitmask.dtype, bitmask.shape)
        dense = (*values.shape[:-1], values.shape[-1] * 2)
        layers.append(
            CompressedLayer(
                param, dense, values.dtype, param in expert_transposed, (param, mkey), mkey, kind="experts"
            )
        )
    return CheckpointLayout(QUANT_METHOD, SPARSITY_FORMAT, layers, list(quant.get("ignore") or []))


def _check_fp8_record(quant: dict, targets: list[str], experts: list[str]) -> None:
    """Version 4: `weights` says FP8 e4m3 with per-row scales and lists exactly the targets; no fused experts."""
    record = quant.get("weights")
    expected = {**FP8_WEIGHTS_FORMAT, "targets": sorted(targets)}
    if not isinstance(record, dict) or {k: record.get(k) for k in FP8_WEIGHTS_FORMAT} != FP8_WEIGHTS_FORMAT:
        raise SparseCheckpointError(
            f"quantization_config.weights is {record!r}; a format version 4 checkpoint needs {FP8_WEIGHTS_FORMAT} "
            "(FP8 e4m3 weights, one scale per output row, activations quantised per token)"
        )
    if not isinstance(record.get("targets"), list) or sorted(record["targets"]) != expected["targets"]:
        raise SparseCheckpointError(
            "quantization_config.weights.targets must list exactly the targets (every 2:4 weight of a version 4 "
            f"checkpoint is FP8), got {record.get('targets')!r}"
        )
    if experts:
        raise SparseCheckpointError(
            "quantization_config lists expert_targets in a format version 4 (FP8) checkpoint: FP8 fused expert "
            "weights are not supported"
        )


def _check_fp8_headers(module: str, wkey: str, skey: str, tensors: dict[str, TensorInfo]) -> None:
    """An FP8 target's values must be F8_E4M3 and its scale F32 `[rows, 1]`."""
    values = tensors[wkey]
    if skey not in tensors:
        raise SparseCheckpointError(f"{module} is an FP8 target but the checkpoint lacks its scale {skey}")
    if values.dtype != "F8_E4M3" or len(values.shape) != 2:
        raise SparseCheckpointError(
            f"{wkey}: FP8 values are {values.dtype} {list(values.shape)}, expected F8_E4M3 (float8_e4m3fn) "
            "[rows, cols / 2]"
        )
    scale = tensors[skey]
    if scale.dtype != "F32" or tuple(scale.shape) != (values.shape[0], 1):
        raise SparseCheckpointError(
            f"{skey} is {scale.dtype} {list(scale.shape)}, expected F32 [{values.shape[0]}, 1] (one scale per "
            "output row)"
        )


def legacy_sparsity_config(quant: dict) -> dict:
    """The `sparsity_config` of a compressed-tensors config that holds 2:4 sparsity and nothing else.

    Raises:
        SparseCheckpointError: the config quantizes (config_groups) or its sparsity is not 2:4 in a format we read.
    """
    sparsity = quant.get("sparsity_config")
    if not isinstance(sparsity, dict):
        raise SparseCheckpointError(
            "this compressed-tensors checkpoint has no sparsity_config: it is not 2:4 sparse"
        )
    if quant.get("config_groups"):
        raise SparseCheckpointError(
            "this compressed-tensors checkpoint is quantized (config_groups); hf_semisparse reads sparse-only "
            "2:4 checkpoints. Load it with compressed-tensors instead."
        )
    fmt = sparsity.get("format")
    if fmt not in (SPARSITY_FORMAT, "dense"):
        raise SparseCheckpointError(
            f"sparsity format {fmt!r} is not supported (hf_semisparse reads {SPARSITY_FORMAT!r} and 'dense')"
        )
    if sparsity.get("sparsity_structure", "2:4") != "2:4":
        raise SparseCheckpointError(f"sparsity_structure {sparsity.get('sparsity_structure')!r} is not 2:4")
    return sparsity


def _check_legacy(quant: dict, tensors: dict[str, TensorInfo]) -> CheckpointLayout:
    sparsity = legacy_sparsity_config(quant)
    ours = quant.get("hf_semisparse") or {}
    if ours.get("version", 1) != 1:
        raise SparseCheckpointError(
            f"checkpoint format version {ours['version']!r} in the compressed-tensors layout is not one this "
            "hf_semisparse reads (1)"
        )
    transposed = set(ours.get("transposed") or [])
    modules = sorted({k[: -len(".bitmask")] for k in tensors if k.endswith(".bitmask")})
    layers = []
    if sparsity["format"] == "dense":
        if modules:
            raise SparseCheckpointError(
                f"sparsity format 'dense' but the checkpoint holds compressed tensors {modules[:5]}"
            )
        return CheckpointLayout("compressed-tensors", "dense", [], list(sparsity.get("ignore") or []))
    for module in modules:
        keys = tuple(f"{module}.{s}" for s in LEGACY_SUFFIXES)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise SparseCheckpointError(f"{module}: compressed weight lacks {missing}")
        shape, values, bitmask = (tensors[k] for k in keys)
        if shape.dtype not in ("I64", "I32") or math.prod(shape.shape) != 2:
            raise SparseCheckpointError(
                f"{keys[0]} must be an int64 tensor holding [rows, cols], got {shape}"
            )
        if values.dtype not in FLOAT_DTYPES or len(values.shape) != 2:
            raise SparseCheckpointError(
                f"{keys[1]} is {values.dtype} {list(values.shape)}, expected 2-D float"
            )
        check_bitmask_layout(keys[1], values.shape, bitmask.dtype, bitmask.shape)
        dense = (values.shape[0], values.shape[1] * 2)
        layers.append(CompressedLayer(module, dense, values.dtype, module in transposed, keys, keys[2]))
    listed = sparsity.get("targets")
    if ours and isinstance(
        listed, list
    ):  # hf_semisparse 0.1 wrote module names there: each must be compressed
        missing = sorted(set(listed) - set(modules))
        if missing:
            raise SparseCheckpointError(f"config lists 2:4 targets with no compressed tensors: {missing[:5]}")
    if not set(transposed) <= set(modules):
        raise SparseCheckpointError(
            f"hf_semisparse.transposed names modules without compressed tensors: {sorted(transposed - set(modules))}"
        )
    return CheckpointLayout("compressed-tensors", SPARSITY_FORMAT, layers, list(sparsity.get("ignore") or []))


def check_legacy_shape(name: str, shape: torch.Tensor, values: torch.Tensor) -> None:
    """A legacy `m.shape` tensor must say `[rows, 2 * values.shape[1]]`."""
    rows_cols = [int(v) for v in shape.flatten().tolist()]
    expected = [values.shape[0], values.shape[1] * 2]
    if rows_cols != expected:
        raise SparseCheckpointError(
            f"{name}.shape says {rows_cols} but {name}.compressed {list(values.shape)} holds a {expected} weight"
        )


def read_headers(files) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape from the safetensors headers of `files` (no tensor data is read)."""
    out = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    sl = f.get_slice(key)
                    out[key] = TensorInfo(sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise SparseCheckpointError(f"{path} is truncated or not a safetensors file: {exc}") from exc
    return out


def is_legacy_sparse_24(quant: dict) -> bool:
    """A compressed-tensors `quantization_config` holding 2:4 sparsity and no quantization."""
    sparsity = quant.get("sparsity_config")
    return (
        isinstance(sparsity, dict)
        and not quant.get("config_groups")
        and sparsity.get("sparsity_structure", "2:4") == "2:4"
        and sparsity.get("format") in (SPARSITY_FORMAT, "dense")
    )
