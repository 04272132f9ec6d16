"""The `hf-semisparse` command: convert, inspect and push sparse checkpoints.

Exit codes: 0 success; 1 a finding (`inspect`/`push`: a layer is not 2:4, a layout problem, or no 2:4 layer is
recorded); 2 a usage or input error (bad argument, missing or unreadable file, damaged checkpoint, refused
destination, Hub unreachable), reported in one line on stderr; 3 an unexpected error (a bug: set HF_SEMISPARSE_DEBUG=1 for the
traceback); 130 interrupted. Heavy libraries (transformers, the kernels) are imported only by the commands that
need them, so `--help` and `inspect` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

DEBUG_ENV = "HF_SEMISPARSE_DEBUG"
DTYPES = {
    "auto": "auto",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


class CliInputError(Exception):
    """A usage or input problem found by the command itself (exit code 2)."""


def _dtype(value: str) -> str:
    if value.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"{value!r} is not a dtype; choose one of {', '.join(DTYPES)}")
    return DTYPES[value.lower()]


def _shard_size(value: str) -> str:
    from .serialization import parse_shard_size

    try:
        parse_shard_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def _checkpoint_folder(path: str) -> str:
    """`path` if it is a folder with a config.json, else a one-line input error."""
    if not os.path.exists(path):
        raise CliInputError(f"{path}: no such folder")
    if not os.path.isdir(path):
        raise CliInputError(f"{path} is a file; give the checkpoint folder that holds it")
    if not os.path.isfile(os.path.join(path, "config.json")):
        inside = sorted(
            (n for n in os.listdir(path) if re.fullmatch(r"checkpoint-\d+", n)), key=lambda n: int(n[11:])
        )
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        hint = f" (a Trainer output folder? it holds {', '.join(inside[-3:])}{more}: give one of them)"
        hint = hint if inside else ""
        raise CliInputError(f"{path} holds no config.json: not a transformers checkpoint folder{hint}")
    return path


def _convert_source(source: str) -> str:
    """A local checkpoint folder, or a Hub repo id; anything else is an input error."""
    if os.path.isdir(source):
        return _checkpoint_folder(source)
    if os.path.exists(source):
        raise CliInputError(f"{source} is a file; give the checkpoint folder that holds it")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise CliInputError(f"{source}: no such folder, and not a Hub repo id (owner/name)") from None
    return source


# the files of a tokenizer or processor that transformers writes beside a model (copied by `convert`)
TOKENIZER_FILES = re.compile(
    r"tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|.*\.model|chat_template\.(jinja|json)|preprocessor_config\.json|processor_config\.json"
)
TOKENIZER_DIRS = ("additional_chat_templates",)


class _TokenizerFiles:
    """The tokenizer and processor files of a local checkpoint folder, copied byte for byte by `save_pretrained`
    (no tokenizer is built, so no code of the checkpoint's runs)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.names = sorted(
            n
            for n in os.listdir(folder)
            if (TOKENIZER_FILES.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))
            or (n in TOKENIZER_DIRS and os.path.isdir(os.path.join(folder, n)))
        )

    def save_pretrained(self, destination: str) -> None:
        for name in self.names:
            source = os.path.join(self.folder, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(destination, name))
            else:
                shutil.copy2(source, os.path.join(destination, name))


def _source_tokenizer(source: str):
    """What `convert` writes beside the weights: a local folder's tokenizer files as they are, or a Hub repo's
    tokenizer (never its remote code); None where there is none (said)."""
    if os.path.isdir(source):
        files = _TokenizerFiles(source)
        return files if files.names else None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a repo without a (loadable) tokenizer still converts
        print(
            f"note: no tokenizer copied from {source} ({type(exc).__name__}: {str(exc)[:120]})",
            file=sys.stderr,
        )
        return None


def _convert(args) -> int:
    source = _convert_source(args.source)
    from .serialization import check_save_destination

    if args.weights == "fp8" and args.format != "hf_semisparse":
        raise CliInputError(
            "--weights fp8 is written in the hf_semisparse format only (not --format compressed-tensors)"
        )
    if os.path.isdir(source) and os.path.realpath(source) == os.path.realpath(args.destination):
        raise CliInputError(
            "the destination is the source folder: convert never replaces its source; choose another"
        )
    check_save_destination(args.destination, source=source, overwrite=args.overwrite)
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from .modeling import AutoSparseModel
    from .serialization import save_sparse_pretrained

    try:
        model = AutoSparseModel.from_pretrained(source, accelerate=False, dtype=args.dtype)
    except (HfHubHTTPError, LocalEntryNotFoundError, ConnectionError) as exc:
        raise CliInputError(
            f"{source} is not a local folder and cannot be downloaded from the Hub: {exc}"
        ) from exc
    summary = save_sparse_pretrained(
        model,
        args.destination,
        max_shard_size=args.max_shard_size,
        format=args.format,
        overwrite=args.overwrite,
        tokenizer=_source_tokenizer(source),
        weights=args.weights,
    )
    print(
        f"wrote {args.destination}: {len(summary['targets'])} 2:4 layers"
        + (" (FP8 e4m3, per-channel scales)" if args.weights == "fp8" else "")
        + ", "
        f"{summary['dense_target_bytes'] / 2**20:.1f} MiB -> {summary['compressed_target_bytes'] / 2**20:.1f} MiB "
        f"({summary['target_ratio']:.3f}x), files {summary['file_bytes'] / 2**20:.1f} MiB"
    )
    return 0


def inspect_checkpoint(path: str, verify_data: bool = False) -> dict:
    """The sparsity report of a local checkpoint, read on the CPU without building the model.

    A compressed checkpoint gets exactly the checks the loader runs (`checkpoint_format.check_layout` on the
    headers, then every bitmask: exactly 2 kept values in every group of 4); such a problem is reported in
    `problems` (and per layer), not raised. For a dense checkpoint, the recorded targets' weights are read and
    checked to be 2:4. Every file is opened through `digests.open_verified`: in files written with digests, names,
    dtypes and shapes are checked against them, and so is every tensor read; `verify_data=True` reads and checks
    all tensors.

    Raises:
        CliInputError: `path` is not a checkpoint folder.
        SparseCheckpointError: config.json or a weight file is unreadable or damaged (names the file);
            `CorruptCheckpointError` when a tensor differs from its recorded digest.
    """
    from .checkpoint_format import (
        QUANT_METHOD,
        check_bitmask_groups,
        check_layout,
        is_legacy_sparse_24,
        read_headers,
    )
    from .digests import open_verified
    from .errors import CorruptCheckpointError, SparseCheckpointError
    from .masks import find_nm_violation, unpack_mask
    from .serialization import digests_recorded, weight_files

    _checkpoint_folder(path)
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SparseCheckpointError(f"{os.path.join(path, 'config.json')} is not valid JSON: {exc}") from exc
    quant = config.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise SparseCheckpointError(
            f"{os.path.join(path, 'config.json')}: quantization_config is not an object"
        )
    recorded = (config.get("sparsity_config") or {}).get("targets") or []
    recorded_experts = set((config.get("sparsity_config") or {}).get("expert_targets") or [])
    require = digests_recorded(quant)
    files = weight_files(path)
    unrecorded = []  # files without a digest record: nothing to check their bytes against
    for file in files:  # every file's header against its digest record; with verify_data, every tensor too
        with open_verified(file, require=require, check_data=True) as f:
            if f.record is None:
                unrecorded.append(os.path.basename(file))
            if verify_data:
                for key in f.keys():  # noqa: SIM118 - not a dict
                    f.get_tensor(key)
    layers, problems, fmt, ignored = [], [], "dense", []
    if quant.get("quant_method") == QUANT_METHOD or is_legacy_sparse_24(quant):
        try:
            layout = check_layout(quant, read_headers(files))
        except SparseCheckpointError as exc:
            layout = None
            problems.append(str(exc))
        fmt = QUANT_METHOD if quant.get("quant_method") == QUANT_METHOD else "compressed-tensors"
        fmt += f" {quant.get('format') if fmt == QUANT_METHOD else quant['sparsity_config']['format']}"
        if layout is not None and any(layer.scale_key for layer in layout.layers):
            fmt += (
                " (version 4: FP8 e4m3 weights, per-channel float32 scales, activations quantised per token)"
            )
        for layer in layout.layers if layout else []:
            entry = {
                "module": layer.module,
                "shape": list(layer.dense_shape),
                "dtype": layer.dtype,
                "stored": "compressed",
                "orientation": (
                    (
                        "experts [experts, in, out], stored [experts, out, in]"
                        if layer.kind == "experts"
                        else "Conv1D [in, out], stored [out, in]"
                    )
                    if layer.transposed
                    else "as stored"
                ),
                "is_24": True,
                "problem": None,
            }
            if layer.scale_key:
                entry["scales"] = "float32 per output row"
            try:
                with open_verified(_file_of(files, layer.bitmask_key), require=require, check_data=True) as f:
                    bitmask = f.get_tensor(layer.bitmask_key)
                check_bitmask_groups(layer.bitmask_key, unpack_mask(bitmask, layer.dense_shape))
                if layer.scale_key:
                    _check_fp8_tensors(files, layer, require)
            except SparseCheckpointError as exc:
                if isinstance(exc, CorruptCheckpointError):
                    raise  # damaged bytes: an input error, not a finding
                entry.update(is_24=False, problem=str(exc))
                problems.append(str(exc))
            layers.append(entry)
        ignored = layout.ignored if layout else []
    elif quant:
        problems.append(f"quantization_config {quant.get('quant_method')!r} is not a 2:4 sparse format")
    else:
        found = set()
        for file in files:
            with open_verified(file, require=require, check_data=True) as f:
                for key in sorted(f.keys()):  # noqa: SIM118 - not a dict
                    expert = key in recorded_experts
                    found.add(key)
                    if not (expert or key.endswith(".weight") and key[: -len(".weight")] in recorded):
                        continue
                    tensor = f.get_tensor(key)
                    bad = find_nm_violation(tensor)
                    if bad is not None and find_nm_violation(tensor.transpose(-2, -1)) is None:
                        bad = None  # a GPT-2 style Conv1D weight [in, out], or experts stored [experts, in, out]
                    problem = None if bad is None else f"group at {bad.index}: {bad.nonzeros} non-zeros"
                    if problem:
                        problems.append(f"{key}: {problem}")
                    layers.append(
                        {
                            "module": key if expert else key[: -len(".weight")],
                            "shape": list(tensor.shape),
                            "dtype": str(tensor.dtype).split(".")[-1],
                            "stored": "dense",
                            "is_24": bad is None,
                            "problem": problem,
                        }
                    )
        for key in sorted(set(recorded_experts) - found):
            # transformers' own save_pretrained writes Mixtral/Qwen-MoE experts under per-expert names
            # (experts.N.w1 ...): not checked here, and said so; AutoSparseModel checks them after loading
            problems.append(
                f"{key}: recorded as a 2:4 expert weight but stored per expert, not as one fused tensor: not "
                "checked by inspect (AutoSparseModel.from_pretrained checks it after loading)"
            )
    return {
        "path": path,
        "format": fmt,
        "architectures": config.get("architectures"),
        "layers": layers,
        "ignored": ignored,
        "global_sparsity": quant.get(
            "global_sparsity", (quant.get("sparsity_config") or {}).get("global_sparsity")
        ),
        "problems": problems,
        "pruning": _pruning_record(config.get("sparsity_config")),
        "files_without_digests": unrecorded,
        # whether config.json records any 2:4 weight (a sparse format, or a dense save's sparsity record)
        "records_sparsity": bool(recorded or recorded_experts or fmt != "dense"),
    }


def _pruning_record(record) -> dict | None:
    """How the weights were pruned, from config.json's `sparsity_config` (None when there is none): the method,
    the N:M pattern, the method the masks came from, SparseGPT's FP8 rounding and block-wise reconstruction."""
    if not isinstance(record, dict):
        return None
    keys = ("method", "pattern", "mask_source", "fp8_rounding", "block_reconstruction", "library_version")
    return {key: record[key] for key in keys if key in record}


def _pruning_line(pruning: dict) -> str:
    """`_pruning_record` in words, e.g. "pruned: sparsegpt 2:4, block reconstruction 8 epochs at lr 0.001 (30 of
    30 blocks tuned)"."""
    words = f"pruned: {pruning.get('method', '?')} {pruning.get('pattern', '')}".rstrip()
    if pruning.get("mask_source"):
        words += f" (masks from {pruning['mask_source']})"
    if pruning.get("fp8_rounding"):
        words += ", rounded to the FP8 grid"
    recon = pruning.get("block_reconstruction")
    if isinstance(recon, dict):
        epochs = recon.get("epochs")
        words += f", block reconstruction {epochs} epoch{'' if epochs == 1 else 's'} at lr {recon.get('lr')}"
        if "blocks_tuned" in recon:
            words += f" ({recon['blocks_tuned']} of {recon.get('blocks')} blocks tuned)"
    return words


def _check_fp8_tensors(files: list[str], layer, require: bool) -> None:
    """An FP8 layer's stored values (float8_e4m3fn, no NaN code) and scales (float32 [rows, 1], finite, > 0)."""
    from .digests import open_verified
    from .fp8_serialization import check_fp8_scale, check_fp8_values

    values_key, scale_key = layer.keys[0], layer.scale_key
    with open_verified(_file_of(files, values_key), require=require, check_data=True) as f:
        check_fp8_values(values_key, f.get_tensor(values_key))
    with open_verified(_file_of(files, scale_key), require=require, check_data=True) as f:
        check_fp8_scale(scale_key, f.get_tensor(scale_key), layer.dense_shape[0])


def _file_of(files: list[str], key: str) -> str:
    from safetensors import safe_open

    from .errors import SparseCheckpointError

    for file in files:
        with safe_open(file, framework="pt") as f:  # header only: the file was opened verified before
            if key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                return file
    raise SparseCheckpointError(f"no weight file holds {key}")


def _inspect(args) -> int:
    report = inspect_checkpoint(args.path, verify_data=args.verify)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['path']}: {report['format']}, {report['architectures']}")
        if report["pruning"]:
            print(f"  {_pruning_line(report['pruning'])}")
        for layer in report["layers"]:
            status = "2:4" if layer["is_24"] else f"NOT 2:4 ({layer['problem']})"
            print(
                f"  {layer['module']:<60} {'x'.join(map(str, layer['shape'])):>12} {layer['dtype']:>9} "
                f"{layer['stored']:>10}  {status}"
            )
        for problem in report["problems"]:
            if not any(problem == layer.get("problem") for layer in report["layers"]):
                print(f"  PROBLEM: {problem}")
        ignored = report["ignored"]
        named = ", ".join(map(str, ignored[:5])) + (
            f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        )
        if not report["records_sparsity"]:
            print(
                "no 2:4 layers recorded: config.json has no sparsity record (not saved after prune_24, "
                "SparsityTrainer or save_sparse_pretrained?)"
            )
            return 1
        print(
            f"{len(report['layers'])} 2:4 layers recorded; {len(ignored)} linear layer"
            f"{'' if len(ignored) == 1 else 's'} left dense{f' ({named})' if ignored else ''}"
            + (_verify_words(report["files_without_digests"]) if args.verify else "")
        )
    return 0 if _is_sparse(report) else 1


def _verify_words(unrecorded: list[str]) -> str:
    """What `--verify` could check: every tensor, or not the files written without digests."""
    if not unrecorded:
        return "; every tensor matches its recorded CRC32"
    return (
        f"; {len(unrecorded)} weight file(s) hold no CRC32 record ({', '.join(unrecorded[:3])}; e.g. written by "
        "transformers' save_pretrained, a Trainer checkpoint, or another tool): their tensors were read but could "
        "not be checked"
    )


def _is_sparse(report: dict) -> bool:
    """No problem found, and at least one 2:4 layer recorded, all of them 2:4."""
    return (
        not report["problems"]
        and bool(report["layers"])
        and all(layer["is_24"] for layer in report["layers"])
    )


def _folder_operations(folder: str, replace: dict[str, bytes]) -> list:
    """`huggingface_hub` commit operations adding the files `upload_folder` would upload from `folder` (its own
    listing and default ignore patterns: `.git` and `.cache/huggingface` anywhere), with the bytes in `replace`
    (path in the repo -> content) in place of those files."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    root = Path(folder).expanduser().resolve()
    files = {path.relative_to(root).as_posix(): path for path in sorted(root.glob("**/*")) if path.is_file()}
    kept = filter_repo_objects(files, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS) + list(replace))
    return [CommitOperationAdd(rel, str(files[rel])) for rel in kept] + [
        CommitOperationAdd(rel, content) for rel, content in replace.items()
    ]


def _push(args) -> int:
    from .hub import check_repo_id, set_card_metadata

    try:
        check_repo_id(args.repo_id)
        if args.base_model is not None:
            check_repo_id(args.base_model, f"--base-model {args.base_model!r}")
        if args.license is not None:
            set_card_metadata("", license=args.license)  # refuses a value that is not a plain id
    except ValueError as exc:
        raise CliInputError(str(exc)) from None
    readme = os.path.join(args.path, "README.md")
    text = None  # the folder's card, read (and refused where it cannot go up) before the long checks
    if os.path.lexists(readme) and os.path.isdir(args.path):
        if not os.path.isfile(readme):
            raise CliInputError(
                f"{readme} is not a file: a model card must be one (or absent: push writes one)"
            )
        with open(readme, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CliInputError(
                f"{readme} is not UTF-8, which the Hub needs of a model card: convert it, or remove it and push "
                "writes one"
            ) from None
    report = inspect_checkpoint(args.path, verify_data=True)  # every time, whether or not a card exists
    if not _is_sparse(report):
        bad = [layer["module"] for layer in report["layers"] if not layer["is_24"]]
        why = f"layers not 2:4: {bad[:5]}" if bad else "it records no 2:4 layer"
        print(
            f"hf-semisparse push: not uploaded: {args.path} is not a 2:4 checkpoint ({why})", file=sys.stderr
        )
        return 1
    from huggingface_hub import HfApi

    from .hub import point_card_at, render_model_card
    from .utils import atomic_write_text

    card = pointed = None
    # a card of the examples loads the local folder: the uploaded copy loads the repo, the folder's is untouched
    if text is not None:
        # a byte-order mark would hide the metadata from the Hub: dropped from the copy that goes up
        pointed_text = point_card_at(text.removeprefix("\ufeff"), args.repo_id, args.path)
        if args.base_model or args.license:
            pointed_text = set_card_metadata(pointed_text, base_model=args.base_model, license=args.license)
        if pointed_text != text:
            pointed = pointed_text.encode("utf-8")
    else:
        card = render_model_card(
            checkpoint_dir=args.path, repo_id=args.repo_id, base_model=args.base_model, license=args.license
        )
        atomic_write_text(readme, card)
    try:
        api = HfApi(token=args.token)
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        if pointed is None:
            info = api.upload_folder(repo_id=args.repo_id, folder_path=args.path, commit_message=args.message)
        else:  # one commit: the folder's files, with the pointed card in place of the local one
            info = api.create_commit(
                repo_id=args.repo_id,
                operations=_folder_operations(args.path, {"README.md": pointed}),
                commit_message=args.message,
            )
    except Exception as exc:
        if card is not None:
            os.remove(readme)  # the folder is left as it was
        raise CliInputError(f"upload to {args.repo_id} failed ({type(exc).__name__}): {exc}") from exc
    print(f"uploaded {args.path} to {args.repo_id}: {info}")
    return 0


def _build_kernels(args) -> int:
    import torch

    from .kernels.cutlass_sm90 import CutlassUnavailable, build_library, kernel_dir

    directory = args.directory or kernel_dir()
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    for name in args.dtypes:
        print(f"building the 2:4 CUTLASS kernels for {name} in {directory} (several minutes per dtype)...")
        try:
            path = build_library(dtypes[name], directory, nvcc=args.nvcc, progress=f"  nvcc, {name}")
        except CutlassUnavailable as exc:
            print(f"hf-semisparse build-kernels: error: {exc}", file=sys.stderr)
            return 2
        print(f"  wrote {path}")
        if args.fp8:
            from .kernels import cutlass_fp8

            print(f"building the FP8 2:4 CUTLASS kernels with {name} outputs in {directory}...")
            try:
                path = cutlass_fp8.build_library(dtypes[name], directory, nvcc=args.nvcc)
            except CutlassUnavailable as exc:
                print(f"hf-semisparse build-kernels: error: {exc}", file=sys.stderr)
                return 2
            print(f"  wrote {path}")
    if args.directory:
        print(f"set HF_SEMISPARSE_KERNEL_DIR={directory} so that hf_semisparse finds them")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `hf-semisparse convert: error: ...` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-semisparse", description="2:4 sparse checkpoints for transformers")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"hf-semisparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "convert",
        help="dense checkpoint with 2:4 zeros, or a legacy compressed-tensors 2:4 one -> our compressed format",
    )
    p.add_argument("source", help="a local checkpoint folder or a Hub repo id; never modified")
    p.add_argument(
        "destination", help="a new folder, or a checkpoint folder (only checkpoint files are replaced)"
    )
    p.add_argument("--max-shard-size", default="5GB", type=_shard_size, help="e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--dtype", default=None, type=_dtype, help="float16, bfloat16, float32; default: as stored"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="also write into the current directory, a folder above the source, or a non-empty folder holding no "
        "checkpoint (still only checkpoint files are replaced)",
    )
    p.add_argument(
        "--format",
        choices=["hf_semisparse", "compressed-tensors"],
        default="hf_semisparse",
        help="hf_semisparse (default; plain from_pretrained after import hf_semisparse) or the legacy "
        "compressed-tensors sparse-24-bitmask layout for older serving stacks",
    )
    p.add_argument(
        "--weights",
        choices=["native", "fp8"],
        default="native",
        help="native (default): kept values in the model's dtype; fp8: e4m3 values with one float32 scale per output "
        "row (format version 4, for the FP8 2:4 kernels on Hopper; docs/guides/fp8.md)",
    )
    p.set_defaults(func=_convert)
    p = sub.add_parser("inspect", help="print the sparsity report of a checkpoint (CPU only, no model built)")
    p.add_argument("path", help="a checkpoint folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--verify", action="store_true", help="read every tensor and check it against its recorded CRC32"
    )
    p.set_defaults(func=_inspect)
    p = sub.add_parser(
        "push",
        help="check a sparse checkpoint folder (every time) and upload it (adds a model card if it has none)",
        epilog="exit codes: 0 uploaded; 1 not uploaded, the folder is not a 2:4 checkpoint (a layer is not 2:4, "
        "or none is recorded); 2 bad input or a failed upload (the folder is left as it was); 3 an unexpected "
        "error (a bug: HF_SEMISPARSE_DEBUG=1 shows the traceback); 130 interrupted",
    )
    p.add_argument(
        "path",
        help="the checkpoint folder (save_sparse_pretrained's or an example's); only a missing README.md "
        "card is written",
    )
    p.add_argument(
        "repo_id", help="the Hub model repo to upload to (owner/name); created if it does not exist"
    )
    p.add_argument(
        "--private", action="store_true", help="create the repo private (an existing one is unchanged)"
    )
    p.add_argument(
        "--token", default=None, help="a Hub token (default: HF_TOKEN or the one `hf auth login` saved)"
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="the Hub id the model was pruned from: the card's base_model (also in the uploaded copy of "
        "an existing card)",
    )
    p.add_argument(
        "--license",
        default=None,
        help="the card's license (a Hub license id, e.g. apache-2.0, llama3.1); default: none written, or the "
        "existing card's",
    )
    p.add_argument(
        "--message", default="Upload 2:4 sparse model (hf_semisparse)", help="the commit message on the Hub"
    )
    p.set_defaults(func=_push)
    p = sub.add_parser(
        "build-kernels", help="compile our CUTLASS 2:4 kernels for Hopper (needs nvcc and nvidia-cutlass)"
    )
    p.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16"], default=["float16", "bfloat16"])
    p.add_argument("--directory", default=None, help="default: HF_SEMISPARSE_KERNEL_DIR or ~/.cache/...")
    p.add_argument("--nvcc", default=None, help="default: nvcc on PATH")
    p.add_argument(
        "--fp8", action="store_true", help="also the FP8 (e4m3) 2:4 kernels, one library per output dtype"
    )
    p.set_defaults(func=_build_kernels)
    return parser


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    more = f" (+{len(lines) - 1} more lines: set {DEBUG_ENV}=1)" if len(lines) > 1 else ""
    return lines[0] + more


def _stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # replaced by something without a file descriptor
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"hf-semisparse {args.command}: error:"
    try:
        code = args.func(args)
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`)
            sys.stdout.flush()  # a reader that went away shows here, inside the try, not when Python exits
        return code
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if not _stdout_is_a_pipe():
            print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
            return 2
        # `... | head`: stop quietly, as shell tools do, and keep Python from failing again when it flushes
        # stdout at exit (the recipe in Python's `signal` documentation)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except (
        CliInputError,
        ValueError,
        OSError,
    ) as exc:  # our checkpoint errors are ValueErrors; files, Hub: OSError
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"{prefix} unexpected {type(exc).__name__}: {_one_line(exc)} (a bug: please report it; "
            f"{DEBUG_ENV}=1 shows the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
