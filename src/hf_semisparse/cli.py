"""The `hf-semisparse` command: convert, inspect and push sparse checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys

from safetensors import safe_open

from .masks import find_nm_violation
from .serialization import SparseCheckpointError, weight_files


def _convert(args) -> int:
    from .modeling import AutoSparseModel
    from .serialization import save_sparse_pretrained

    model = AutoSparseModel.from_pretrained(args.source, accelerate=False, torch_dtype=args.dtype)
    summary = save_sparse_pretrained(model, args.destination, max_shard_size=args.max_shard_size)
    print(
        f"wrote {args.destination}: {len(summary['targets'])} 2:4 layers, "
        f"{summary['dense_target_bytes'] / 2**20:.1f} MiB -> {summary['compressed_target_bytes'] / 2**20:.1f} MiB "
        f"({summary['target_ratio']:.3f}x), files {summary['file_bytes'] / 2**20:.1f} MiB"
    )
    return 0


def inspect_checkpoint(path: str) -> dict:
    """The sparsity report of a local checkpoint, read on the CPU without building the model.

    For a compressed checkpoint only the safetensors headers are read; for a dense one, the recorded targets'
    weights are read and checked to be 2:4.
    """
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    sparsity = (config.get("quantization_config") or {}).get("sparsity_config")
    recorded = (config.get("sparsity_config") or {}).get("targets") or []
    layers = []
    for file in weight_files(path):
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if key.endswith(".bitmask"):
                    module = key[: -len(".bitmask")]
                    rows, cols = (int(v) for v in f.get_tensor(f"{module}.shape").flatten())
                    values = f.get_slice(f"{module}.compressed")
                    layers.append(
                        {
                            "module": module,
                            "shape": [rows, cols],
                            "dtype": values.get_dtype(),
                            "stored": "compressed",
                            "is_24": True,
                        }
                    )
                elif not sparsity and key.endswith(".weight") and key[: -len(".weight")] in recorded:
                    tensor = f.get_tensor(key)
                    bad = find_nm_violation(tensor)
                    if bad is not None and find_nm_violation(tensor.t()) is None:
                        bad = None  # a GPT-2 style Conv1D weight, stored [in, out]
                    layers.append(
                        {
                            "module": key[: -len(".weight")],
                            "shape": list(tensor.shape),
                            "dtype": str(tensor.dtype).split(".")[-1],
                            "stored": "dense",
                            "is_24": bad is None,
                            "problem": None
                            if bad is None
                            else f"group at {bad.index}: {bad.nonzeros} non-zeros",
                        }
                    )
    return {
        "path": path,
        "format": sparsity.get("format") if sparsity else "dense",
        "architectures": config.get("architectures"),
        "layers": layers,
        "ignored": (sparsity or {}).get("ignore", []),
        "global_sparsity": (sparsity or {}).get("global_sparsity"),
    }


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
        print(
            f"{len(report['layers'])} 2:4 layers recorded; {len(report['ignored'])} linear layers left dense"
        )
    return 0 if all(layer["is_24"] for layer in report["layers"]) else 1


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
    p = sub.add_parser("convert", help="dense checkpoint with 2:4 zeros -> compressed sparse checkpoint")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--dtype", default=None, help="e.g. float16; default: as stored")
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
