"""Text sampled from the dense model, to distill its pruned copy on the dense model's own distribution.

Recovery data that is narrow (a few plays, one domain) teaches the pruned model that domain; sequences sampled
from the dense teacher cover what the teacher knows. This is the data-free distillation of LLM-QAT (Liu et al.,
2023, "LLM-QAT: Data-Free Quantization Aware Training for Large Language Models", arXiv:2305.17888), which trains
the quantized model on text the full-precision model generated instead of on a real corpus.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel


def _integer(name: str, value, low: int) -> int:
    """`value` as a Python int >= `low` (numpy and torch integers accepted, bools refused)."""
    if not isinstance(value, bool):
        try:
            value = operator.index(value)
        except TypeError:
            pass
        else:
            if value >= low:
                return value
    raise ValueError(f"sample_teacher_sequences: {name} must be an integer >= {low}, got {value!r}")


def _start_token(model, start_token_id) -> int:
    if start_token_id is not None:
        return _integer("start_token_id", start_token_id, 0)
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        token = getattr(source, "bos_token_id", None)
        if isinstance(token, list):
            token = token[0] if token else None
        if token is not None:
            return int(token)
    raise ValueError(
        f"{type(model).__name__} has no bos_token_id in its generation_config or config: pass start_token_id="
    )


def _neutral_generation_config(model, start: int) -> GenerationConfig:
    """A generation config with only the model's special tokens: none of the sampling settings a checkpoint may
    ship (`repetition_penalty`, `no_repeat_ngram_size`, `suppress_tokens`, `min_p`...), which transformers would
    otherwise apply, since it fills every setting a call leaves unset from `model.generation_config`."""
    shipped = getattr(model, "generation_config", None)
    return GenerationConfig(
        bos_token_id=getattr(shipped, "bos_token_id", None),
        eos_token_id=getattr(shipped, "eos_token_id", None),
        pad_token_id=start,
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
    """Sample token sequences from a decoder-only causal LM (the dense teacher), as distillation data for its
    pruned copy.

    Each sequence is `start_token_id` followed by `length - 1` tokens drawn from the model's full next-token
    distribution at `temperature`: no top-k, top-p, repetition penalty or any other sampling setting the model's
    `generation_config` ships (they are set aside for the call). transformers' `generate` runs with a static KV
    cache. The end-of-sequence token is never drawn (`min_new_tokens`), so every sequence has `length` tokens;
    the distillation loss still sees the teacher's full distribution, end-of-sequence included, at every position.
    Sampling uses its own seeded random state: the global one (of the CPU and every CUDA device the model uses) is
    left as it was.

    On a GPU, transformers compiles the decode step of a static-cache `generate` (`torch.compile`; transformers
    5.17 on an NVIDIA H200: the first batch of 256 x 512 tokens of a 135M-parameter model took 41.6 s, compilation
    included). Every batch therefore has the same size, `ceil(num_sequences / ceil(num_sequences / batch_size))`
    (at most `batch_size`); the last one is sampled whole and cut, so that it does not compile again.

    Args:
        model: a transformers decoder-only causal LM (`generate` and a `bos_token_id`, or pass `start_token_id`),
            on the device it should run on; it is used in eval mode and not changed.
        num_sequences: how many sequences (an integer >= 1).
        length: tokens per sequence, the start token included (an integer >= 2, at most the model's
            `max_position_embeddings`).
        batch_size: at most this many sequences are sampled together (>= 1); memory grows with
            `batch_size * length`.
        start_token_id: the first token of every sequence (default: the model's `bos_token_id`).
        temperature: softmax temperature of the sampling (a finite number > 0).
        seed: seed of the sampling (an integer). The seed, `num_sequences` and `batch_size` together decide the
            sequences (on the same device and versions): asking for more sequences with the same seed does not
            extend an earlier set.
        show_progress: a progress bar over the batches.

    Returns:
        `torch.int64` tensor `[num_sequences, length]` on the CPU.

    Raises:
        ValueError: a count, length, start token or temperature out of range, no start token, or an
            encoder-decoder model.
        TypeError: a model without `generate`.
        RuntimeError: `generate` returned sequences of another shape.

    Example:
        >>> ids = sample_teacher_sequences(teacher, 1024, 512, batch_size=256)  # doctest: +SKIP
        >>> data = [{"input_ids": row, "labels": row} for row in ids]
    """
    num_sequences = _integer("num_sequences", num_sequences, 1)
    length = _integer("length", length, 2)
    batch_size = _integer("batch_size", batch_size, 1)
    seed = _integer("seed", seed, -(2**63))
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(float(temperature))
        or not float(temperature) > 0
    ):
        raise ValueError(
            f"sample_teacher_sequences: temperature must be a finite number > 0, got {temperature!r}"
        )
    if not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"sample_teacher_sequences needs a causal LM with generate(), got {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"sample_teacher_sequences samples from a decoder-only causal LM; {type(model).__name__} is an "
            "encoder-decoder model (its output would depend on an encoder input)"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise ValueError(
            f"sample_teacher_sequences: length {length} is more than the model's max_position_embeddings "
            f"({positions})"
        )
    start = _start_token(model, start_token_id)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and not 0 <= start < vocab:
        raise ValueError(
            f"sample_teacher_sequences: start_token_id {start} is outside the vocabulary (0..{vocab - 1})"
        )
    params = list(model.parameters())
    device = getattr(model, "device", None) or params[0].device
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    per_batch = math.ceil(num_sequences / math.ceil(num_sequences / batch_size))
    modes = {module: module.training for module in model.modules()}
    # every transformers model inside (a PEFT wrapper generates with its base model's generation_config)
    owners = [m for m in model.modules() if isinstance(m, PreTrainedModel)] or [model]
    missing = object()
    shipped = {m: m.__dict__.get("generation_config", missing) for m in owners}
    model.eval()
    out = []
    try:
        for owner in owners:
            owner.generation_config = _neutral_generation_config(owner, start)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for first in tqdm(
                range(0, num_sequences, per_batch),
                desc="sampling from the teacher",
                unit="batch",
                disable=not show_progress,
            ):
                n = min(per_batch, num_sequences - first)
                # always a full batch: a new batch size would compile the decode step again
                prompt = torch.full((per_batch, 1), start, dtype=torch.long, device=device)
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
                )
                if ids.shape != (per_batch, length):
                    raise RuntimeError(
                        f"generate returned shape {tuple(ids.shape)}, expected {(per_batch, length)}"
                    )
                out.append(ids[:n].cpu())
    finally:
        for owner, value in shipped.items():
            if value is missing:
                owner.__dict__.pop("generation_config", None)
            else:
                owner.generation_config = value
        for module, training in modes.items():
            module.training = training
    return torch.cat(out)
