"""Model cards and `push_to_hub` for sparse checkpoints."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn

from .serialization import save_sparse_pretrained
from .utils import unwrap_model

TEMPLATE = Path(__file__).parent / "model_cards" / "sparse_24.md"


def point_card_at(card: str, repo_id: str, folder: str | os.PathLike) -> str:
    """`card` (a model card's text) with each `AutoSparseModel.from_pretrained("...")` that loads the local
    `folder` loading `repo_id` instead: a card rendered for a local folder (the examples write one) names the
    folder there, which means nothing on the Hub. Other names (a base model the card cites) are left alone.

    A value names `folder` when it is its path as given or absolute (with forward slashes); a relative path that
    could not be a Hub id and that its absolute path ends with (the card was written from another working
    directory: `outputs/run/sparse` for `/home/me/proj/outputs/run/sparse`); an absolute path whose last part is
    the folder's name (the folder has moved since: another machine or container); or an existing folder that is
    the same one. A relative path of two parts (`outputs/run`) could be a Hub id, so it is left alone.
    """
    absolute = Path(os.path.abspath(folder)).as_posix()
    paths = {Path(os.path.normpath(folder)).as_posix(), absolute}

    def names_folder(value: str) -> bool:
        if value in paths:
            return True
        if value and os.path.isabs(value):
            if Path(value).name == Path(absolute).name:
                return True
        elif value and not _could_be_repo_id(value):
            tail = Path(os.path.normpath(value)).as_posix()
            if tail not in (".", "..") and not tail.startswith("../") and absolute.endswith("/" + tail):
                return True
        try:
            return os.path.isdir(value) and os.path.samefile(value, folder)
        except OSError:
            return False

    def point(match: re.Match) -> str:
        return match.group(1) + repo_id + match.group(3) if names_folder(match.group(2)) else match.group(0)

    return re.sub(r'(AutoSparseModel\.from_pretrained\(")([^"]*)(")', point, card)


def _could_be_repo_id(value: str) -> bool:
    try:
        check_repo_id(value)
    except ValueError:
        return False
    return True


def check_repo_id(value: str, name: str | None = None) -> None:
    """Raise ValueError, naming `value` (as `name`, e.g. "--base-model 'x'", where given), unless it is a valid
    Hub repo id (owner/name; `huggingface_hub.utils.validate_repo_id`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise ValueError(f"{name or repr(value)} is not a Hub repo id (owner/name): {exc}") from None


_SIMPLE_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_CONTINUED = (" ", "\t", "-")  # the lines of a key's value after its own: indented, or list items


def set_card_metadata(card: str, **fields: str | None) -> str:
    """`card` (a model card's text) with each field given (not None) set in its YAML metadata, e.g.
    `base_model="org/name"` or `license="llama3.1"`; a card without metadata gets a header holding only those.

    Only the lines of those keys change (a key's old value, with its indented or list lines, is replaced; a new
    key goes at the end of the header): the rest of the header (comments, ordering, quoting) and the Markdown body
    are kept byte for byte, apart from a leading byte-order mark, which is dropped (the Hub reads metadata only at
    the very start). Values are single strings.

    Raises:
        ValueError: a value is not a plain id (letters, digits, `.`, `_`, `-`, `/`), or is one that YAML reads as
            something other than that string (`null`, `true`, `1.0`).
    """
    import yaml

    fields = {key: value for key, value in fields.items() if value is not None}
    for key, value in fields.items():
        if not isinstance(value, str) or not _SIMPLE_VALUE.fullmatch(value):
            raise ValueError(f"{key} {value!r}: only a string of letters, digits and . _ - / is written")
        if yaml.safe_load(f"v: {value}") != {"v": value}:
            raise ValueError(f"{key} {value!r}: YAML would read it as {yaml.safe_load(f'v: {value}')['v']!r}")
    card = card.removeprefix("\ufeff")
    if not fields:
        return card
    lines = re.findall(r"[^\n]*\n|[^\n]+$", card)  # on "\n" only: other line breaks stay inside a line
    end = None
    if lines and lines[0].rstrip("\r\n") == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].rstrip("\r\n") == "---"), None)
    if end is None:  # no metadata: a header of its own
        return "---\n" + "".join(f"{key}: {value}\n" for key, value in fields.items()) + "---\n" + card
    newline = "\r\n" if lines[0].endswith("\r\n") else "\n"
    header = lines[1:end]
    for key, value in fields.items():
        start = next((i for i, line in enumerate(header) if re.match(rf"{re.escape(key)}\s*:", line)), None)
        if start is None:
            header.append(f"{key}: {value}{newline}")
            continue
        stop = scan = start + 1
        while scan < len(header):  # the old value's lines, across blank and comment lines between them
            line = header[scan]
            if line[:1] in _CONTINUED and line.strip() and not line.lstrip().startswith("#"):
                stop = scan = scan + 1
            elif not line.strip() or line.lstrip().startswith("#"):
                scan += 1
            else:
                break
        header[start:stop] = [f"{key}: {value}{newline}"]
    return "".join([lines[0], *header, *lines[end:]])


def render_model_card(
    model: nn.Module | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    repo_id: str = "path/to/this/model",
    model_name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's field name
    datasets: list[str] | None = None,
    results: list[dict] | None = None,
    results_command: str | None = None,
    speedups: list[dict] | None = None,
    speed_command: str | None = None,
    recovered: bool = False,
    notice: str | None = None,
) -> str:
    """Render the model card (YAML metadata + Markdown) of a 2:4 model.

    The sparsity facts come from a saved checkpoint's `config.json` (`checkpoint_dir`) or from `model.config`,
    and so does the transformers class the card names (`architectures`). `results` and `speedups` are table
    rows: dicts with a "name" and one value per column, e.g. `{"name": "dense", "EM": 78.5, "F1": 86.9}`.
    `repo_id` is what the card's snippet loads (a Hub id or a folder); `model_name`, the card's title, is its
    last part unless given. `base_model`: the Hub id the model was pruned from (the card's metadata and first
    line). `license`: a Hub license id; none is written unless given (a pruned model keeps its base model's
    license, which only the caller knows). `notice`: a line shown in bold under the title (e.g. that a smoke
    run's numbers mean nothing).

    Raises:
        ValueError: neither `model` nor `checkpoint_dir`, or the model records no 2:4 targets.
    """
    if checkpoint_dir is not None:
        with open(os.path.join(checkpoint_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    elif model is not None:
        root = unwrap_model(model)
        config = root.config.to_dict()
        # the weights' own dtype: a config built before a cast still names the old one
        if isinstance(getattr(root, "dtype", None), torch.dtype):
            config["dtype"] = str(root.dtype).removeprefix("torch.")
    else:
        raise ValueError("render_model_card needs a model or a checkpoint_dir")
    quant = config.get("quantization_config") or {}
    sparsity = quant if quant.get("quant_method") == "hf_semisparse" else quant.get("sparsity_config") or {}
    ours = config.get("sparsity_config") or {}
    targets = list(sparsity.get("targets") or ours.get("targets") or [])
    if not targets:
        raise ValueError("the model records no 2:4 targets; prune it with hf_semisparse first")
    ignore = list(sparsity.get("ignore") or [])
    card_data = ModelCardData(
        license=license,
        base_model=base_model,
        datasets=datasets,
        library_name="transformers",
        tags=["sparse", "2:4", "semi-structured-sparsity", "hf_semisparse"],
        pipeline_tag=None,
    )

    def columns(rows):
        return [k for k in dict.fromkeys(k for r in rows for k in r) if k != "name"]

    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name or repo_id.rstrip("/").split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        method=ours.get("mask_source") or ours.get("method", "magnitude"),
        pattern=ours.get("pattern", sparsity.get("sparsity_structure", "2:4")),
        recovered=recovered,
        notice=notice,
        architecture=_transformers_class(config),
        targets=targets,
        num_targets=len(targets),
        num_linear=len(targets) + len(ignore),
        skipped=", ".join(f"`{n}`" for n in ignore[:8]) + (" …" if len(ignore) > 8 else "") or "none",
        global_sparsity=f"{sparsity['global_sparsity']:.1%}" if "global_sparsity" in sparsity else "n/a",
        target_ratio=_ratio_text(config),
        load_dtype=_load_dtype(config),
        results=results,
        result_columns=columns(results or []),
        results_command=results_command,
        speedups=speedups,
        speed_columns=columns(speedups or []),
        speed_command=speed_command,
    )
    return str(card)


def _transformers_class(config: dict) -> str | None:
    """The first of `config.architectures` that transformers has a class for; None for a custom class (or one
    whose lazy import fails here): the card then names none."""
    for name in config.get("architectures") or []:
        try:
            getattr(transformers, name)
        except Exception:  # AttributeError, or an optional dependency the lazy import needs
            continue
        return name
    return None


def _load_dtype(config: dict) -> str:
    """The dtype the card's load snippet names: the half-precision dtype the checkpoint records, else float16
    (the 2:4 kernels run fp16 and bf16)."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    dtype = dtype.removeprefix("torch.") if isinstance(dtype, str) else dtype
    return dtype if dtype in ("float16", "bfloat16") else "float16"


def _ratio_text(config: dict) -> str:
    quant = config.get("quantization_config") or {}
    ours = quant if quant.get("quant_method") == "hf_semisparse" else quant.get("hf_semisparse") or {}
    if "target_bytes_ratio" in ours:
        return f"{ours['target_bytes_ratio']:.3f}x"
    return (
        "1.0x (stored dense, with zeros)" if not config.get("quantization_config") else "about 0.56x (fp16)"
    )


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    tokenizer=None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload 2:4 sparse model (hf_semisparse)",
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    **card_kwargs,
):
    """Save `model` as a compressed sparse checkpoint with a model card and upload it to the Hub.

    Everything is written to a temporary folder first (the same files `save_sparse_pretrained` writes, plus
    README.md and the tokenizer's files); then one `upload_folder` call sends it.

    Returns:
        The `CommitInfo` of the upload.
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        save_sparse_pretrained(model, folder, max_shard_size=max_shard_size)
        card = render_model_card(checkpoint_dir=folder, repo_id=repo_id, **card_kwargs)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr
        )
