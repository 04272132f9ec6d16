"""Text sampled from the dense model, to distill its pruned copy on the dense model's own distribution.

Recovery data that is narrow (a few plays, one domain) teaches the pruned model that domain; sequences sampled
from the dense teacher cover what the teacher knows. This is the data-free distillation of LLM-QAT (Liu et al.,
2023, "LLM-QAT: Data-Free Quantization Aware Training for Large Language Models", arXiv:2305.17888), which found
it recovers general perplexity better than a small real corpus.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def _start_token(model, start_token_id: int | None) -> int:
    if start_token_id is not None:
        return start_token_id
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        token = getattr(source, "bos_token_id", None)
        if isinstance(token, list):
            token = token[0] if token else None
        if token is not None:
            return int(token)
    raise ValueError(
        f"{type(model).__name__} has no bos_token_id in its generation_config or config: pass start_token_id="
    )


@torch.no_grad()
def sample_teacher_sequences(
    model,
    num_sequences: int,
    length: int,
    *,
    batch_size: int = 64,
    start_token_id: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
) -> torch.Tensor:
    """Sample token sequences from a causal LM (the dense teacher), as distillation data for its pruned copy.

    Each sequence is `start_token_id` followed by `length - 1` tokens drawn from the model's full next-token
    distribution at `temperature` (no top-k or top-p), with transformers' `generate` and a static KV cache. The
    end-of-sequence token is never sampled (`min_new_tokens`), so every sequence has `length` tokens; the
    distillation loss still sees the teacher's full distribution, end-of-sequence included, at every position.
    Sampling uses its own seeded random state: the global one is left as it was.

    On a GPU, transformers compiles the decode step of a static-cache `generate` (`torch.compile`; transformers
    5.17 on an NVIDIA H200: the first batch of 256 x 512 tokens of a 135M-parameter model took 41.6 s, compilation
    included). Every batch therefore has the same size, `min(batch_size, num_sequences)`; the last one is
    sampled whole and cut, so that it does not compile again. Prefer few large batches.

    Args:
        model: a transformers causal LM (`generate` and a `bos_token_id`, or pass `start_token_id`), on the
            device it should run on; it is used in eval mode and not changed.
        num_sequences: how many sequences (> 0).
        length: tokens per sequence, the start token included (>= 2).
        batch_size: sequences sampled together (> 0); memory grows with `batch_size * length`.
        start_token_id: the first token of every sequence (default: the model's `bos_token_id`).
        temperature: softmax temperature of the sampling (> 0).
        seed: seed of the sampling; the same seed on the same device and versions gives the same sequences.
        show_progress: a progress bar over the batches.

    Returns:
        `torch.int64` tensor `[num_sequences, length]` on the CPU.

    Raises:
        ValueError: a count, length or temperature out of range, or no start token.
        TypeError: a model without `generate`.

    Example:
        >>> ids = sample_teacher_sequences(teacher, 1024, 512, batch_size=256)  # doctest: +SKIP
        >>> data = [{"input_ids": row, "labels": row} for row in ids]
    """
    for name, value, low in (
        ("num_sequences", num_sequences, 1),
        ("length", length, 2),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"sample_teacher_sequences: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"sample_teacher_sequences: temperature must be a number > 0, got {temperature!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"sample_teacher_sequences: temperature must be finite, got {temperature!r}")
    if not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"sample_teacher_sequences needs a causal LM with generate(), got {type(model).__name__}"
        )
    start = _start_token(model, start_token_id)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and not 0 <= start < vocab:
        raise ValueError(
            f"sample_teacher_sequences: start_token_id {start} is outside the vocabulary (0..{vocab - 1})"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    batch_size = min(batch_size, num_sequences)
    batches = range(0, num_sequences, batch_size)
    out = []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for first in tqdm(
                batches, desc="sampling from the teacher", unit="batch", disable=not show_progress
            ):
                n = min(batch_size, num_sequences - first)
                # always a full batch: a new batch size would compile the decode step again
                prompt = torch.full((batch_size, 1), start, dtype=torch.long, device=device)
                ids = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=float(temperature),
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=length - 1,
                    min_new_tokens=length - 1,
                    cache_implementation="static",
                    pad_token_id=start,
                )
                if ids.shape != (batch_size, length):
                    raise RuntimeError(
                        f"generate returned shape {tuple(ids.shape)}, expected {(batch_size, length)}"
                    )
                out.append(ids[:n].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
