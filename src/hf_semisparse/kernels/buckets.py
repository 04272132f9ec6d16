"""Token-count buckets: which GEMM sizes get a kernel decision and a plan of their own.

A serving process sees a new token count on almost every request (each prompt length, times the batch size).
Searching kernels for each one took 36-52 s per new prompt length on an H200 (cuSPARSELt's algorithm selection
alone costs about 0.2 s of host time per candidate). Instead, token counts fall on a fixed ladder of sizes:

- up to `DECODE_MAX` (256) tokens, the decode regime, powers of two from `M_MULTIPLE` (16): a count is padded up
  to its bucket. These GEMMs are bound by reading the weight, so the padded rows cost almost nothing;
- above it, `STEPS_PER_OCTAVE` (2) evenly spaced sizes per octave (384, 512, 768, 1024, 1536, ...). A count that is
  not on the ladder runs as several GEMMs over consecutive row blocks, each a ladder size
  (`split_into_buckets`), so no large GEMM is padded by more than `M_MULTIPLE - 1` rows.

Kernel searches run at anchor sizes only (the powers of two); the sizes between two anchors use the algorithm
found for the anchor below (`anchor_of`). A warm-up (`prepare_token_counts`) therefore searches about two sizes
per octave and plans the rest. Two sizes per octave (not more) keep a warm-up of Llama-3-8B's shapes
under two minutes: each size costs cuSPARSELt about 0.2 s of host time per weight shape to plan.
"""

from __future__ import annotations

M_MULTIPLE = 16  # every 2:4 GEMM's token count is a multiple of this (the kernels' tile granularity)
DECODE_MAX = 256
STEPS_PER_OCTAVE = 2


def _round_up(m: int, multiple: int) -> int:
    return -(-m // multiple) * multiple


def _octave_step(m: int) -> int:
    """The ladder's spacing in the octave (2^(e-1), 2^e] that holds `m` (> DECODE_MAX)."""
    top = 1 << (m - 1).bit_length()  # the power of two at or above m
    return max(top // 2 // STEPS_PER_OCTAVE, M_MULTIPLE)


def bucket_for(m: int) -> int:
    """The smallest ladder size holding `m` tokens (m >= 1).

    Example:
        >>> [bucket_for(m) for m in (1, 17, 200, 257, 2000, 2048)]
        [16, 32, 256, 384, 2048, 2048]
    """
    if m < 1:
        raise ValueError(f"a token count must be at least 1, got {m}")
    if m <= DECODE_MAX:
        return max(M_MULTIPLE, 1 << (m - 1).bit_length())
    return _round_up(m, _octave_step(m))


def padded_tokens(m: int) -> int:
    """The rows the 2:4 GEMMs of `m` tokens run (`split_into_buckets` of it gives the blocks).

    Up to `DECODE_MAX`: the bucket of `m`. Above: the bucket of `m` where that pads by at most an eighth (one
    GEMM); else `m` rounded up to `M_MULTIPLE` with the part below `DECODE_MAX` left by the large ladder blocks
    padded up to its bucket, so it runs as one GEMM: each block reads the whole weight, which costs as much as
    a decode-sized GEMM (on an H200, 38-85 us for Llama-3-8B's joined gate/up at 16-256 tokens).
    """
    if m <= DECODE_MAX:
        return bucket_for(m)
    rounded = _round_up(m, M_MULTIPLE)
    if bucket_for(rounded) - rounded <= rounded // 8:
        return bucket_for(rounded)
    large, rest = 0, rounded
    while rest > DECODE_MAX:
        block = bucket_at_or_below(rest)
        large, rest = large + block, rest - block
    return large + (bucket_for(rest) if rest else 0)


def is_bucket(m: int) -> bool:
    """Whether `m` is a ladder size."""
    return m >= 1 and bucket_for(m) == m


def ladder(max_tokens: int, min_tokens: int = 1) -> list[int]:
    """Every ladder size from the bucket of `min_tokens` up to the bucket of `max_tokens`, ascending."""
    if max_tokens < min_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) is below min_tokens ({min_tokens})")
    sizes, m = [], bucket_for(min_tokens)
    top = bucket_for(max_tokens)
    while m <= top:
        sizes.append(m)
        m = bucket_for(m + 1)
    return sizes


def anchor_of(bucket: int) -> int:
    """The power of two at or below a ladder size: the size whose kernel search `bucket` reuses."""
    if not is_bucket(bucket):
        raise ValueError(f"{bucket} is not a ladder size (bucket_for({bucket}) = {bucket_for(bucket)})")
    return 1 << (bucket.bit_length() - 1)


def bucket_at_or_below(m: int) -> int:
    """The largest ladder size not above `m` (m >= `M_MULTIPLE`)."""
    if m < M_MULTIPLE:
        raise ValueError(f"no ladder size is at or below {m}")
    if m <= DECODE_MAX:
        return 1 << (m.bit_length() - 1)
    step = _octave_step(m)
    return m // step * step  # the octave's lower end, a power of two, is a multiple of its step


def split_into_buckets(m: int) -> list[int]:
    """Row-block sizes, each on the ladder, that run `m` tokens (a positive multiple of `M_MULTIPLE`) as
    consecutive GEMMs: greedily the largest ladder size that fits, so they sum to `m` exactly; `[m]` where `m` is
    on the ladder.

    Example:
        >>> split_into_buckets(2000)
        [1536, 384, 64, 16]
    """
    if m % M_MULTIPLE or m < M_MULTIPLE:
        raise ValueError(f"{m} tokens: only positive multiples of {M_MULTIPLE} split into ladder sizes")
    blocks, rest = [], m
    while rest:
        blocks.append(bucket_at_or_below(rest))
        rest -= blocks[-1]
    return blocks
