"""Ahead-of-serving preparation: every kernel decision and plan a deployment needs, made once.

The first call of a 2:4 layer at a new token count searches kernels (seconds per shape), and inside a CUDA graph
capture nothing can be searched at all. `prepare_token_counts(model, max_tokens)` decides and plans every ladder
size up to `max_tokens` (`buckets.py`) for every 2:4 layer, with a progress bar; decisions go to the tuning cache
on disk (`tuning.py`), so a restarted process only plans (about 1 ms a layer and size, plus a cuSPARSELt
algorithm selection, 0.18 s, per distinct weight shape and size: 25.1 s for Llama-3-8B's 32 blocks, 4 shapes and
17 sizes on an H200). After it, any token count up to
`max_tokens` runs with no search and no new plan, eager, under `torch.compile` and in CUDA graphs.
`prepare_generation` does this for `generate`: prefill sizes up to a full batch of prompts, and decode sizes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils import output_head, unwrap_model
from .buckets import DECODE_MAX, ladder
from .gated_mlp import compile_silu_mul
from .plan_threads import plan_threads
from .projections import semi_sparse_layers

logger = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    """What `prepare_token_counts` did."""

    token_counts: list[int]  # the ladder sizes prepared
    layers: int  # 2:4 layers (joined projections count once)
    shapes: int  # distinct (weight shape, dtype, bias, kernel library) groups, each searched once per anchor
    seconds: float
    pad_buffer_bytes: int = 0  # persistent decode pad buffers added (`prepare_generation(pad_buffers=True)`)
    head_token_counts: list[int] | None = None  # the sizes of a 2:4 output head, where they differ

    def __str__(self) -> str:
        text = (
            f"prepared {len(self.token_counts)} token-count sizes ({self.token_counts[0]}..{self.token_counts[-1]}) "
            f"for {self.layers} 2:4 layers of {self.shapes} shapes in {self.seconds:.1f} s"
        )
        if self.head_token_counts is not None:
            text += f" (the 2:4 output head up to {self.head_token_counts[-1]} tokens)"
        return text


def prepare_token_counts(
    model: nn.Module,
    max_tokens: int,
    min_tokens: int = 1,
    quick: bool = True,
    progress: bool = True,
    head_max_tokens: int | None = None,
) -> PrepareReport:
    """Decide and plan the 2:4 kernels of every ladder size from `min_tokens` to `max_tokens` tokens per GEMM.

    Args:
        model: a model whose 2:4 layers run on 2:4 kernels (after `accelerate_24`), on a CUDA GPU.
        max_tokens: the most tokens one forward passes through a linear layer (batch size x sequence length).
        min_tokens: the fewest (decode steps: the batch size).
        quick: search fewer kernel candidates per size (`tuning.search_alg`); False searches every algorithm.
        progress: show a progress bar.
        head_max_tokens: where the output head (`get_output_embeddings()`) is a 2:4 layer, the most tokens it
            passes, if fewer than `max_tokens` (`prepare_generation`: generate computes the logits of the last
            position only). Default `max_tokens`.

    Returns:
        A `PrepareReport`.

    Raises:
        ValueError: `max_tokens` below `min_tokens` or below 1, `head_max_tokens` below 1, `model` has no 2:4
            layers (call `accelerate_24` first; where it could not accelerate, it said why), or
            `HF_SEMISPARSE_PLAN_THREADS` is not a positive integer.

    Example:
        >>> accelerate_24(model)
        >>> prepare_token_counts(model, max_tokens=8 * 2048)
    """
    from .linear import get_backend

    if min_tokens < 1 or max_tokens < min_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    if head_max_tokens is not None and head_max_tokens < 1:
        raise ValueError(f"head_max_tokens must be at least 1, got {head_max_tokens}")
    layers = semi_sparse_layers(unwrap_model(model))
    if not layers:
        raise ValueError(
            "the model has no 2:4 layers on 2:4 kernels: call accelerate_24(model) first; if you did, it did not "
            "accelerate this model and its report says why (for example a model on the CPU, fp32, or a GPU older "
            "than compute capability 8.0)"
        )
    sizes = ladder(max_tokens, min_tokens)
    head = output_head(unwrap_model(model))
    head_sizes = None
    if head in layers and head_max_tokens is not None and head_max_tokens < max_tokens:
        head_sizes = ladder(max(head_max_tokens, min_tokens), min_tokens)
    groups: dict[tuple, list] = {}
    for layer in layers:
        key = (
            tuple(head_sizes if layer is head and head_sizes is not None else sizes),
            layer.compressed.device,
            layer.out_features,
            layer.in_features,
            layer.compute_dtype,
            layer.bias is not None,
            layer.kernel,
            layer.weight is not None,
        )
        groups.setdefault(key, []).append(layer)
    plan_threads()  # a bad HF_SEMISPARSE_PLAN_THREADS stops here, before any search
    start = time.perf_counter()
    backend = get_backend()
    with tqdm(
        total=sum(len(key[0]) + 1 for key in groups),
        desc="hf_semisparse: preparing 2:4 kernels",
        disable=not progress,
    ) as bar:
        for (group_sizes, _, n, k, *_), group in groups.items():
            with torch.no_grad():
                for m in group_sizes:  # the searches: once per group (its layers share the tuning cache)
                    bar.set_postfix_str(f"{n}x{k}, {m} tokens")
                    group[0].decide([m], quick=quick)
                    bar.update(1)
                bar.set_postfix_str(f"{n}x{k}, planning {len(group)} layers")
                for layer in group:  # then the plans, from the decisions made
                    layer.prepare(list(group_sizes), quick=quick)
                bar.update(1)
    if max_tokens > DECODE_MAX:  # gated MLPs' SiLU product at prefill sizes (gated_mlp.py): compiled now
        compile_silu_mul(model)
    backend.prepared = True
    shapes = len({key[1:] for key in groups})
    report = PrepareReport(
        sizes, len(layers), shapes, time.perf_counter() - start, head_token_counts=head_sizes
    )
    logger.info("hf_semisparse: %s", report)
    return report


def prepare_generation(
    model: nn.Module,
    max_batch_size: int = 1,
    max_prompt_length: int = 2048,
    pad_buffers: bool = False,
    **kwargs,
) -> PrepareReport:
    """`prepare_token_counts` for `model.generate`: prefill of up to `max_batch_size` prompts of up to
    `max_prompt_length` tokens, and decode steps of 1 to `max_batch_size` sequences. Keyword arguments go to
    `prepare_token_counts`. `max_batch_size` counts the sequences generate runs at once: with beam search or
    `num_return_sequences`, prompts x beams x returned sequences.

    A 2:4 output head (`lm_head` named in `target_modules` and pruned with `exclude_modules=[]`) is prepared up to
    `max_batch_size` tokens only where the model takes transformers' `logits_to_keep` (generate then computes the
    logits of each sequence's last position, in prefill too); other calls of the head (a forward over whole
    sequences, assisted generation) search at their first size, eagerly. `head_max_tokens=None` prepares it at
    every size.

    `pad_buffers=True` (experimental, December 2026) also gives every 2:4 layer a persistent input buffer per
    decode size up to `max_batch_size` (16 rows at batch 1: about 26 MB for Llama-3-8B's 32 blocks), into which
    compiled decode steps pad their GEMM inputs in the graph (`SemiSparseLinear.add_pad_buffers`) instead of a
    copy kernel per GEMM in the op's body. Compiled graphs then mutate those buffers: run one compiled model per
    thread. Measured slower, so off by default: on an H200 (2026-12-02, Llama-3-8B shapes, fp16, compiled
    static-cache decode at batch 1) 1.10x dense with the buffers against 1.24x without (docs/guides/generation.md).

    Example:
        >>> accelerate_24(model)
        >>> prepare_generation(model, max_batch_size=32, max_prompt_length=2048)
        >>> model.generate(**inputs, cache_implementation="static", max_new_tokens=256)
    """
    if max_batch_size < 1 or max_prompt_length < 1:
        raise ValueError(
            f"max_batch_size and max_prompt_length must be at least 1, got {max_batch_size} and {max_prompt_length}"
        )
    supports_logits_to_keep = getattr(unwrap_model(model), "_supports_logits_to_keep", None)
    if callable(supports_logits_to_keep) and supports_logits_to_keep():
        kwargs.setdefault("head_max_tokens", max_batch_size)
    report = prepare_token_counts(
        model, max_tokens=max_batch_size * max_prompt_length, min_tokens=1, **kwargs
    )
    if pad_buffers:
        sizes = ladder(min(max_batch_size, DECODE_MAX))
        for layer in semi_sparse_layers(unwrap_model(model)):
            report.pad_buffer_bytes += layer.add_pad_buffers(sizes)
        logger.info(
            "hf_semisparse: decode pad buffers of %s tokens: %.1f MB", sizes, report.pad_buffer_bytes / 2**20
        )
    return report
