"""Block-by-block calibrated pruning: one pass through the model, one block on the compute device at a time.

The pipeline of SparseGPT (Frantar & Alistarh, 2023, sec. 4 "sequential") and of llm-compressor:

1. run the model up to its first transformer block once per calibration batch and keep that block's inputs
   (hidden states plus the other arguments: masks, rotary embeddings, ...);
2. for each block in turn: move it to the compute device; run it over the cached inputs with hooks that collect
   each target's input statistics; prune its targets (validated before anything is written); run the pruned
   block over the cached inputs again, whose outputs replace them as the next block's inputs; move it back.

Each block therefore runs twice per calibration batch (statistics, then pruned outputs), or once more per
sub-layer stage with `true_sequential`, whatever the depth of the model; the old per-block pipeline ran the
whole model once per block. Device memory holds one block, its statistics and the cached activations (which
may stay on CPU). Blocks offloaded by accelerate (`device_map` with "cpu"/"disk") are run through their hooks
and their pruned weights written back into accelerate's weights map. A PEFT model (`PeftModel`, LoRA...) runs as
it is, adapters included; its blocks and targets are found and named in its base model.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..peft_structure import is_prompt_learning, peft_base_model
from ..targets import SparseTarget
from .calibrated import (
    StatsCollector,
    model_input_device,
    move_batch,
    per_block_prune_,
    prune_group_,
    read_linear,
    token_mask_of,
    write_linear,
)
from .offload import is_offloaded, offload_hook
from .reconstruction import DEFAULT_LR, reconstruct_block_, summarize_reconstruction

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


def find_block_list(model: nn.Module, targets: list[SparseTarget]) -> tuple[str, nn.ModuleList] | None:
    """The `nn.ModuleList` of transformer blocks that holds the targets, with its qualified name.

    Names are those of `select_targets`: in a PEFT model (`PeftModel`, tuner model) the base model's, without the
    wrapper's `base_model.model.` prefix. None when the model cannot be run block by block (`locate_blocks` says
    why).
    """
    return locate_blocks(model, targets)[0]


def locate_blocks(
    model: nn.Module, targets: list[SparseTarget]
) -> tuple[tuple[str, nn.ModuleList] | None, str]:
    """`find_block_list`'s answer, and when it is None, why (a phrase for messages; "" otherwise).

    The first block's arguments are reused for every block, which rules out: encoder-decoders (the decoder needs
    the encoder's outputs; T5 passes a position bias made by block 0), models whose layers have different attention
    types (`config.layer_types`, e.g. sliding-window and full attention: per-layer masks and rotary embeddings),
    targets spread over several block lists (or none), and PEFT models with a prompt-learning adapter (prefix
    tuning passes its learned prefix as the blocks' KV cache, which block-by-block runs cannot carry).
    """
    if is_prompt_learning(model):
        return (
            None,
            "it is a PEFT model with a prompt-learning adapter (its prefix reaches the blocks as a KV cache)",
        )
    model = peft_base_model(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return None, "it is an encoder-decoder (the decoder's blocks need the encoder's outputs)"
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(set(layer_types)) > 1:
        kinds = ", ".join(sorted(set(map(str, layer_types))))
        return None, f"its layers have different attention types (config.layer_types: {kinds})"
    lists = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)
    ]
    holding = []
    for name, mod in lists:
        prefix = f"{name}."
        if any(t.name.startswith(prefix) for t in targets):
            holding.append((name, mod))
    # nested lists (experts inside a block): keep the outermost
    outer = [(n, m) for n, m in holding if not any(n != o and n.startswith(o + ".") for o, _ in holding)]
    if not outer:
        return None, "no list of blocks holds its targets"
    if len(outer) > 1:
        return None, f"its targets lie in several block lists ({', '.join(n for n, _ in outer)})"
    return outer[0], ""


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _is_cache(value) -> bool:
    return type(value).__name__.endswith("Cache")


def _drop_caches(kwargs: dict) -> dict:
    """KV caches must not grow while a block is run several times over the same inputs."""
    out = {}
    for key, value in kwargs.items():
        if key in ("past_key_value", "past_key_values", "layer_past", "cache") or _is_cache(value):
            out[key] = None
        elif key == "use_cache":
            out[key] = False
        else:
            out[key] = value
    return out


class _Sample:
    """One calibration batch's inputs to the current block: hidden states and the other arguments."""

    __slots__ = ("hidden", "args", "kwargs", "hidden_key", "token_mask")

    def __init__(self, args: tuple, kwargs: dict, store: torch.device) -> None:
        if args:
            self.hidden, self.hidden_key, rest = args[0], None, args[1:]
        elif "hidden_states" in kwargs:
            self.hidden, self.hidden_key, rest = kwargs["hidden_states"], "hidden_states", ()
        else:
            raise TypeError(
                "the first transformer block was called without positional hidden states or a `hidden_states` "
                f"keyword (got {sorted(kwargs)}); use pipeline='per_block' for this model"
            )
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.hidden = self.hidden.detach().to(store)
        self.args = _to(tuple(None if _is_cache(a) else a for a in rest), store)
        self.kwargs = _to(_drop_caches(kwargs), store)
        self.token_mask: torch.Tensor | None = (
            None  # the batch's real tokens (`token_mask_of`), set by _capture
        )

    def run(self, block, device: torch.device | None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`block` (a module or any callable taking its arguments) on these inputs, or on `hidden` in place of
        the cached hidden states."""
        hidden = self.hidden if hidden is None else hidden
        hidden = hidden if device is None else hidden.to(device, non_blocking=True)
        args = self.args if device is None else _to(self.args, device)
        kwargs = self.kwargs if device is None else _to(self.kwargs, device)
        if self.hidden_key is None:
            out = block(hidden, *args, **kwargs)
        else:
            out = block(**{self.hidden_key: hidden}, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _capture(
    model: nn.Module,
    first: nn.Module,
    batches: list[dict],
    store: torch.device,
    watch: Sequence[nn.Module] = (),
) -> tuple[list[_Sample], set[int]]:
    """Run `model` over `batches` up to `first` (its first block): that block's inputs per batch (on `store`),
    and the ids of the `watch` modules the forward called before it."""
    samples: list[_Sample] = []
    called: set[int] = set()

    def hook(module, args, kwargs):
        samples.append(_Sample(args, kwargs, store))
        raise _StopForward

    handles = [first.register_forward_pre_hook(hook, with_kwargs=True)]
    handles += [mod.register_forward_hook(lambda mod, args, out: called.add(id(mod))) for mod in watch]
    device = model_input_device(model)
    accepts_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = move_batch(batch, device)
                if accepts_use_cache:
                    inputs.setdefault("use_cache", False)
                try:
                    model(**inputs)
                except _StopForward:
                    samples[-1].token_mask = token_mask_of(batch, model)
                    continue
                raise RuntimeError("the model's forward finished without calling its first transformer block")
    finally:
        for handle in handles:
            handle.remove()
    return samples, called


def _default_device(model: nn.Module) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return model_input_device(model) or torch.device("cpu")


def _activation_store(samples_bytes: int, device: torch.device, offload: bool | None) -> torch.device:
    if offload:
        return torch.device("cpu")
    if offload is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if samples_bytes > 0.4 * free:
            logger.info("cached activations (%.1f GB) stay on the CPU", samples_bytes / 1e9)
            return torch.device("cpu")
    return device


def _stages(names_in_call_order: list[str], targets: list[SparseTarget]) -> list[list[SparseTarget]]:
    """Targets grouped by parent module (`self_attn`, `mlp`, ...) in the order the forward reaches them."""
    by_name = {t.name: t for t in targets}
    ordered = [by_name[n] for n in names_in_call_order if n in by_name]
    ordered += [t for t in targets if t.name not in names_in_call_order]  # never called: fails validation
    stages: list[list[SparseTarget]] = []
    parents: list[str] = []
    for t in ordered:
        parent = t.name.rsplit(".", 1)[0]
        if parent in parents:
            stages[parents.index(parent)].append(t)
        else:
            parents.append(parent)
            stages.append([t])
    return stages


def _block_device(block: nn.Module) -> torch.device:
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def sequential_prune_(
    model: nn.Module,
    targets: list[SparseTarget],
    method: str,
    batches: list[dict],
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
    show_progress: bool = True,
    device: torch.device | str | None = None,
    true_sequential: bool = False,
    offload_activations: bool | None = None,
    fp8_rounding: bool = False,
    reconstruct_epochs: int = 0,
    reconstruct_lr: float = DEFAULT_LR,
) -> dict:
    """Prune `targets` block by block (see the module docstring); arguments as `calibrated_prune_`, which
    validates them (`reconstruct_epochs` an int, `reconstruct_lr` a float).

    Targets outside the block list are pruned with `per_block_prune_`: those the forward calls before the first
    block (OPT's `project_in`) before the blocks' inputs are captured, the others after the blocks. Models the
    pipeline cannot run (see `find_block_list`) are pruned with `per_block_prune_` whole. With
    `reconstruct_epochs`, each pruned block's kept weights are then tuned to match the dense model's block outputs
    (`reconstruction.py`); the dense model's block inputs (captured before any target is pruned) are carried
    beside the pruned model's. A block whose tuning diverges or does not lower its error keeps its one-shot
    weights, with a warning, and the blocks after it are tuned as usual.

    Returns:
        {"pipeline", "blocks", "capture_s", "block_s", "fallback_targets"} (see `calibrated_prune_`), with
        `reconstruct_epochs` also `summarize_reconstruction`'s keys.

    Raises:
        ValueError: `reconstruct_epochs` for a model without one block list or with blocks offloaded by
            accelerate (nothing changed).
    """
    found, why_not = locate_blocks(model, targets)
    options = dict(n=n, m=m, blocksize=blocksize, damp=damp, fp8_rounding=fp8_rounding)
    if reconstruct_epochs and found is None:
        raise ValueError(
            f"block reconstruction runs block by block, and this model cannot be run so: {why_not}; prune "
            "without reconstruct_epochs"
        )
    if reconstruct_epochs and any(is_offloaded(mod) for mod in found[1].modules()):
        raise ValueError(
            "block reconstruction trains each block's weights and needs the blocks in memory, not offloaded by "
            "accelerate (device_map with 'cpu'/'disk'): load the model on the CPU instead (one block at a time "
            "still goes to the GPU), or prune without reconstruct_epochs"
        )
    if found is None:
        logger.info("%s: this model is pruned with whole-model forwards: %s", method, why_not)
        per_block_prune_(model, targets, method, batches, show_progress=show_progress, **options)
        return {"pipeline": "per_block", "blocks": 0, "fallback_targets": [t.name for t in targets]}
    list_name, blocks = found
    device = torch.device(device) if device is not None else _default_device(model)
    inside = [t for t in targets if t.name.startswith(f"{list_name}.")]
    outside = [t for t in targets if t not in inside]
    stats: dict = {"pipeline": "sequential", "blocks": 0, "block_s": [], "fallback_targets": []}
    records: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        samples, dense_hidden, after = _capture_inputs(
            model, blocks[0], batches, outside, method, options, bool(reconstruct_epochs)
        )
        size = sum(s.hidden.numel() * s.hidden.element_size() for s in samples)
        # with reconstruction, the dense model's inputs and outputs of the block beside them
        size *= 3 if reconstruct_epochs else 1
        store = _activation_store(size, device, offload_activations)
        if store != torch.device("cpu"):
            for s in samples:
                s.hidden, s.args, s.kwargs = s.hidden.to(store), _to(s.args, store), _to(s.kwargs, store)
                s.token_mask = None if s.token_mask is None else s.token_mask.to(store)
            dense_hidden = None if dense_hidden is None else [h.to(store) for h in dense_hidden]
        stats["capture_s"] = time.perf_counter() - start
        desc = f"{method} {n}:{m} pruning" + (" + reconstruction" if reconstruct_epochs else "")
        bar = tqdm(blocks, desc=desc, unit="block", disable=not show_progress)
        for index, block in enumerate(bar):
            start = time.perf_counter()
            prefix = f"{list_name}.{index}."
            block_targets = [t for t in inside if t.name.startswith(prefix)]
            result = _prune_block(
                block,
                block_targets,
                samples,
                method,
                device,
                true_sequential,
                options,
                dense_hidden,
                (reconstruct_epochs, reconstruct_lr, f"{list_name}.{index}"),
            )
            if result is not None:
                records.append(result)
                bar.set_postfix_str(f"recon {result['error_before']:.3g}->{result['error_after']:.3g}")
            stats["block_s"].append(time.perf_counter() - start)
            stats["blocks"] += 1
        del samples
        if after:
            per_block_prune_(model, after, method, batches, show_progress=False, **options)
        stats["fallback_targets"] = [t.name for t in outside]
    finally:
        model.train(was_training)
    if reconstruct_epochs:
        stats.update(summarize_reconstruction(records, reconstruct_epochs, reconstruct_lr))
    return stats


def _capture_inputs(
    model: nn.Module,
    first: nn.Module,
    batches: list[dict],
    outside: list[SparseTarget],
    method: str,
    options: dict,
    dense: bool,
) -> tuple[list[_Sample], list[torch.Tensor] | None, list[SparseTarget]]:
    """The first block's inputs in the pruned model, those of the dense model (`dense`: the reconstruction's
    teacher; else None), and the `outside` targets left for after the blocks.

    The `outside` targets the forward calls before `first` (OPT's `project_in`) are pruned here, after the dense
    inputs are captured and before the pruned ones are; all tensors on the CPU.
    """
    samples, called = _capture(model, first, batches, torch.device("cpu"), [t.module for t in outside])
    before = [t for t in outside if id(t.module) in called]
    dense_hidden = [s.hidden.clone() for s in samples] if dense else None
    if before:
        per_block_prune_(model, before, method, batches, show_progress=False, **options)
        samples, _ = _capture(model, first, batches, torch.device("cpu"))
    return samples, dense_hidden, [t for t in outside if t not in before]


def _prune_block(
    block: nn.Module,
    targets: list[SparseTarget],
    samples: list[_Sample],
    method: str,
    device: torch.device,
    true_sequential: bool,
    options: dict,
    dense_hidden: list[torch.Tensor] | None = None,
    reconstruction: tuple[int, float, str] = (0, 0.0, ""),
) -> dict | None:
    """Prune one block's targets from the cached inputs and replace them with the pruned block's outputs; with
    `dense_hidden` (the dense model's inputs of this block `[batch, seq, hidden]` each, replaced by its outputs)
    also reconstruct the block with `reconstruction` = (epochs, lr, the block's name).

    Returns:
        The block's reconstruction record (`reconstruct_block_`), or None (no reconstruction, or no target).

    Raises:
        ValueError: statistics that are not finite, or a solve that fails (`prune_group_`: the layer and the
            likely cause named). On any exception, pruning's or reconstruction's, every target of the block
            that was already pruned gets its dense weights back and the block returns to its device.
    """
    offloaded = any(is_offloaded(mod) for mod in block.modules())
    home = _block_device(block)
    run_device = device
    if offloaded:
        hooks = [offload_hook(mod) for mod in block.modules() if is_offloaded(mod)]
        run_device = getattr(hooks[0], "execution_device", None) or device
        run_device = torch.device(run_device) if not isinstance(run_device, torch.device) else run_device
    backup: dict[str, torch.Tensor] = {}
    try:
        if not offloaded and home != device:
            block.to(device)  # inside the try: a failed move is moved back by the `finally`
        with torch.no_grad():
            wanted = None
            if dense_hidden is not None:  # before any weight changes: the dense block's outputs
                wanted = [
                    s.run(block, run_device, hidden=h).to(h.device)
                    for s, h in zip(samples, dense_hidden, strict=True)
                ]
            remaining = list(targets)
            while remaining:
                collector = StatsCollector(method).attach(remaining)
                try:
                    for s in samples:
                        collector.token_mask = s.token_mask  # padding tokens are not counted
                        s.run(block, run_device)
                finally:
                    collector.detach()
                stages = _stages(collector.order, remaining) if true_sequential else [remaining]
                stage = stages[0]
                for t in stage:
                    backup[t.name] = read_linear(t).detach().to("cpu", copy=True)
                prune_group_(stage, collector.stats, method, device=run_device, **options)
                del collector
                remaining = [t for t in remaining if t not in stage]
        result = None
        if wanted is not None and not targets:  # a block with no target: nothing to tune
            dense_hidden[:] = wanted
        elif wanted is not None:
            epochs, lr, label = reconstruction
            result = reconstruct_block_(
                block,
                targets,
                lambda i, forward: samples[i].run(forward, run_device),
                wanted,
                [s.token_mask for s in samples],
                epochs,
                lr,
                label,
            )
            dense_hidden[:] = wanted
        with torch.no_grad():
            for s in samples:
                out = s.run(block, run_device)
                s.hidden = out.to(s.hidden.device)
        return result
    except BaseException as exc:
        for t in targets:
            if t.name in backup:
                write_linear(t, backup[t.name])
        names = ", ".join(t.name for t in targets[:1])
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(
                f"hf_semisparse: the block of {names} was restored; blocks before it (if any) are already pruned, "
                "and so are targets the model runs before its first block (OPT's project_in), if any."
            )
        else:
            logger.error(
                "the block of %s was restored; blocks before it and targets run before the first block (if any) "
                "are already pruned",
                names,
            )
        raise
    finally:
        if not offloaded and home != device:
            block.to(home)
