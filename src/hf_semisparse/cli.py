"""The `hf-semisparse` command: convert, inspect and push sparse checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys

from safetensors import safe_open

from .checkpoint_format import (
    QUANT_METHOD,
    SparseCheckpointError,
    check_bitmask_groups,
    check_layout,
    is_legacy_sparse_24,
    read_headers,
)
from .masks import find_nm_violation, unpack_mask
from .serialization import weight_files


def _convert(args) -> int:
    from .modeling import AutoSparseModel
    from .serialization import save_sparse_pretrained

    model = AutoSparseModel.from_pretrained(args.source, accelerate=False, torch_dtype=args.dtype)
    summary = save_sparse_pretrained(
        model, args.destination, max_shard_size=args.max_shard_size, format=args.format
    )
    print(
        f"wrote {args.destination}: {len(summary['targets'])} 2:4 layers, "
        f"{summary['dense_target_bytes'] / 2**20:.1f} MiB -> {summary['compressed_target_bytes'] / 2**20:.1f} MiB "
        f"({summary['target_ratio']:.3f}x), files {summary['file_bytes'] / 2**20:.1f} MiB"
    )
    return 0


def inspect_checkpoint(path: str) -> dict:
    """The sparsity report of a local checkpoint, read on the CPU without building the model.

    A compressed checkpoint gets exactly the checks the loader runs (`checkpoint_format.check_layout` on the
    headers, then every bitmask: exactly 2 kept values in every group of 4); a problem is reported in `problems`
    (and per layer), not raised. For a dense checkpoint, the recorded targets' weights are read and checked to be 2:4.
    """
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    quant = config.get("quantization_config") or {}
    recorded = (config.get("sparsity_config") or {}).get("targets") or []
    files = weight_files(path)
    layers, problems, fmt, ignored = [], [], "dense", []
    if quant.get("quant_method") == QUANT_METHOD or is_legacy_sparse_24(quant):
        try:
            layout = check_layout(quant, read_headers(files))
        except SparseCheckpointError as exc:
            layout = None
            problems.append(str(exc))
        fmt = QUANT_METHOD if quant.get("quant_method") == QUANT_METHOD else "compressed-tensors"
        fmt += f" {quant.get('format') if fmt == QUANT_METHOD else quant['sparsity_config']['format']}"
        for layer in layout.layers if layout else []:
            entry = {
                "module": layer.module,
                "shape": list(layer.dense_shape),
                "dtype": layer.dtype,
                "stored": "compressed",
                "orientation": "Conv1D [in, out], stored [out, in]" if layer.transposed else "as stored",
                "is_24": True,
                "problem": None,
            }
            try:
                with safe_open(_file_of(files, layer.bitmask_key), framework="pt") as f:
                    bitmask = f.get_tensor(layer.bitmask_key)
                check_bitmask_groups(layer.bitmask_key, unpack_mask(bitmask, layer.dense_shape))
            except SparseCheckpointError as exc:
                entry.update(is_24=False, problem=str(exc))
                problems.append(str(exc))
            layers.append(entry)
        ignored = layout.ignored if layout else []
    elif quant:
        problems.append(f"quantization_config {quant.get('quant_method')!r} is not a 2:4 sparse format")
    else:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in sorted(f.keys()):  # noqa: SIM118 - safe_open is not a dict
                    if not (key.endswith(".weight") and key[: -len(".weight")] in recorded):
                        continue
                    tensor = f.get_tensor(key)
                    bad = find_nm_violation(tensor)
                    if bad is not None and find_nm_violation(tensor.t()) is None:
                        bad = None  # a GPT-2 style Conv1D weight, stored [in, out]
                    problem = None if bad is None else f"group at {bad.index}: {bad.nonzeros} non-zeros"
                    if problem:
                        problems.append(f"{key}: {problem}")
                    layers.append(
                        {
                            "module": key[: -len(".weight")],
                            "shape": list(tensor.shape),
                            "dtype": str(tensor.dtype).split(".")[-1],
                            "stored": "dense",
                            "is_24": bad is None,
                            "problem": problem,
                        }
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
    }


def _file_of(files: list[str], key: str) -> str:
    for file in files:
        with safe_open(file, framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                return file
    raise SparseCheckpointError(f"no weight file holds {key}")


def _inspect(args) -> int:
    report = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['path']}: {report['format']}, {report['architectures']}")
        for layer in report["layers"]:
            status = "2:4" if layer["is_24"] else f"NOT 2:4 ({layer['problem']})"
            print(
                f"  {layer['module']:<60} {'x'.join(map(str, layer['shape'])):>12} {layer['dtype']:>9} "
                f"{layer['stored']:>10}  {status}"
            )
        for problem in report["problems"]:
            if not any(problem == layer.get("problem") for layer in report["layers"]):
                print(f"  PROBLEM: {problem}")
        print(
            f"{len(report['layers'])} 2:4 layers recorded; {len(report['ignored'])} linear layers left dense"
        )
    return 0 if not report["problems"] else 1


def _push(args) -> int:
    from huggingface_hub import HfApi

    from .hub import render_model_card

    inspect_checkpoint(args.path)  # refuses folders that are not sparse checkpoints
    readme = os.path.join(args.path, "README.md")
    if not os.path.isfile(readme):
        with open(readme, "w", encoding="utf-8") as f:
            f.write(
                render_model_card(checkpoint_dir=args.path, repo_id=args.repo_id, base_model=args.base_model)
            )
    api = HfApi(token=args.token)
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(repo_id=args.repo_id, folder_path=args.path, commit_message=args.message)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-semisparse", description="2:4 sparse checkpoints for transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "convert",
        help="dense checkpoint with 2:4 zeros, or a legacy compressed-tensors 2:4 one -> our compressed format",
    )
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--dtype", default=None, help="e.g. float16; default: as stored")
    p.add_argument(
        "--format",
        choices=["hf_semisparse", "compressed-tensors"],
        default="hf_semisparse",
        help="hf_semisparse (default; plain from_pretrained after import hf_semisparse) or the legacy "
        "compressed-tensors sparse-24-bitmask layout for older serving stacks",
    )
    p.set_defaults(func=_convert)
    p = sub.add_parser("inspect", help="print the sparsity report of a checkpoint (CPU only, no model built)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("push", help="upload a sparse checkpoint folder (adds a model card if it has none)")
    p.add_argument("path")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--base-model", default=None)
    p.add_argument("--message", default="Upload 2:4 sparse model (hf_semisparse)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SparseCheckpointError, FileNotFoundError) as exc:
        print(f"hf-semisparse {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
