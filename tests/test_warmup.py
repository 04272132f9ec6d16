"""Token-count buckets, chunked 2:4 GEMMs and the ahead-of-serving warm-up, on the CPU.

The kernel library is replaced by stand-ins: a plan computes `x @ W^T + b` into its output rows with torch on the
CPU, and the search is a counter. What is checked is the host logic: which sizes get searched, which get planned,
that a token count off the ladder runs as row blocks whose results equal one dense GEMM, and that after a warm-up
no call searches or plans. The kernels themselves run on the GPU in tests/gpu/check_generate_gpu.py.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch import nn

from hf_semisparse import compute_nm_mask
from hf_semisparse.kernels import buckets, prepare_generation, prepare_token_counts
from hf_semisparse.kernels import linear as linear_mod
from hf_semisparse.kernels.cusparselt import AlgConfig
from hf_semisparse.kernels.linear import ChunkedPlan, SemiSparseLinear
from hf_semisparse.kernels.tuning import TuningCache
from tests.conftest import make_model

# ---------------------------------------------------------------------------------------------- the ladder


def test_decode_sizes_are_powers_of_two_from_16():
    assert [buckets.bucket_for(m) for m in (1, 16, 17, 33, 100, 256)] == [16, 16, 32, 64, 128, 256]
    assert buckets.ladder(256) == [16, 32, 64, 128, 256]


def test_two_sizes_per_octave_above_256():
    assert buckets.ladder(2048, 257) == [384, 512, 768, 1024, 1536, 2048]
    assert buckets.bucket_for(2000) == 2048 and buckets.bucket_for(2049) == 3072


@pytest.mark.parametrize("m", [*range(16, 4097, 16), 24576, 98304, 16000, 65536 + 16])
def test_every_multiple_of_16_splits_exactly_into_ladder_sizes(m):
    blocks = buckets.split_into_buckets(m)
    assert sum(blocks) == m
    assert all(buckets.is_bucket(b) for b in blocks)
    assert blocks == sorted(blocks, reverse=True)
    if buckets.is_bucket(m):
        assert blocks == [m]
    assert len(blocks) <= 2 + m.bit_length() // 2  # a few GEMMs, never one per 16 rows


def test_padding_above_the_decode_sizes_is_bounded_and_uses_few_gemms():
    for m in range(257, 40000, 7):
        padded = buckets.padded_tokens(m)
        blocks = buckets.split_into_buckets(padded)
        assert padded >= m and padded % buckets.M_MULTIPLE == 0
        assert padded - m <= max(m // 8 + buckets.M_MULTIPLE, buckets.DECODE_MAX)
        assert sum(1 for b in blocks if b < buckets.DECODE_MAX) <= 1  # one small GEMM at most
    assert buckets.padded_tokens(2000) == 2048  # 2.4% padding: one GEMM
    assert buckets.split_into_buckets(buckets.padded_tokens(300)) == [256, 64]  # not 256 + 32 + 16


def test_anchors_are_the_powers_of_two_below():
    assert [buckets.anchor_of(b) for b in (16, 256, 384, 512, 768, 1536, 2048)] == [
        16,
        256,
        256,
        512,
        512,
        1024,
        2048,
    ]
    with pytest.raises(ValueError, match="not a ladder size"):
        buckets.anchor_of(320)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_token_counts_are_refused(bad):
    with pytest.raises(ValueError):
        buckets.bucket_for(bad)
    with pytest.raises(ValueError):
        buckets.split_into_buckets(40)  # not a multiple of 16


# ---------------------------------------------------------------------------------------------- stand-ins


class _Handle:
    device = torch.device("cpu")
    device_name = "stand-in GPU"
    version = 800

    def __init__(self):
        self.selections = 0

    def compress(self, weight):
        return weight.clone()

    def selection(self, *args, **kwargs):
        self.selections += 1
        return None


class _Plan:
    """x @ W^T + b on the CPU, into the given output rows (what a cuSPARSELt plan computes on the GPU)."""

    made: list[int] = []

    def __init__(self, handle, n, k, m, dtype, bias=None, alg=None, selection=None, **_):
        self.n, self.k, self.m, self.bias, self.alg = n, k, m, bias, alg
        self.workspace_size = 64 * m
        _Plan.made.append(m)

    def run(self, compressed, x, out, workspace, stream, c=None):
        x, out2 = x.reshape(-1, self.k), out.view(-1, self.n)  # the kernels read pointers: any leading shape
        assert x.shape[0] == self.m and out2.shape[0] == self.m, "a plan runs exactly its own token count"
        assert workspace is None or workspace.numel() >= self.workspace_size
        y = x.float() @ compressed.float().t()
        if self.bias is not None:
            y = y + self.bias.float()
        if c is not None:
            y = y + c.reshape(-1, self.n).float()
        out2.copy_(y.to(out.dtype))


class _Backend:
    def __init__(self, cache):
        self.cache, self.margin, self.prepared = cache, 0.03, False
        self._handle = _Handle()
        self.searches: list[tuple[int, int, int, bool]] = []

    def handle(self, device):
        return self._handle

    def workspace(self, device, stream, size):
        return torch.empty(size, dtype=torch.uint8) if size else None


@pytest.fixture
def gpu_standins(monkeypatch, tmp_path):
    backend = _Backend(TuningCache(str(tmp_path / "tuning.json")))

    def search(handle, n, k, m, dtype, bias, gelu, compressed, x, stream, dense=None, c=None, quick=False):
        assert x.shape == (m, k)
        backend.searches.append((n, k, m, quick))
        return AlgConfig(m % 7), 10.0, (20.0 if dense is not None else None)

    _Plan.made = []
    monkeypatch.setattr(linear_mod, "_BACKEND", backend)
    monkeypatch.setattr(linear_mod, "MatmulPlan", _Plan)
    monkeypatch.setattr(linear_mod, "search_alg", search)
    monkeypatch.setattr(linear_mod, "_current_stream", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return backend


def _layer(n=32, k=64, keep_dense=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(compute_nm_mask(lin.weight))
    return lin, SemiSparseLinear(lin, keep_dense=keep_dense)


def _run_as_on_gpu(layer, x):
    """`SemiSparseLinear`'s CUDA path (padding, routing, plans), run with the CPU stand-ins."""
    return layer._cuda_forward(x, (0, x.numel()), layer._fast.get((0, x.numel()), linear_mod._UNSET), None)


# ---------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("tokens", [1, 5, 16, 100, 256, 300, 1000, 2000, 2048])
def test_any_token_count_computes_the_linear_layer(gpu_standins, tokens):
    lin, layer = _layer()
    x = torch.randn(1, tokens, 64)
    torch.testing.assert_close(_run_as_on_gpu(layer, x), lin(x), rtol=1e-5, atol=1e-5)
    route = layer._fast[(0, x.numel())]
    padded = buckets.padded_tokens(tokens)
    if buckets.is_bucket(padded):
        assert route.m == padded and not isinstance(route, ChunkedPlan)
    else:
        assert isinstance(route, ChunkedPlan)
        assert [size for _, size, _ in route.pieces] == buckets.split_into_buckets(padded)


def test_chunked_plan_adds_the_residual_per_block():
    torch.manual_seed(0)
    w, b = torch.randn(8, 16), torch.randn(8)
    pieces, start = [], 0
    for size in (32, 16):
        pieces.append((start, size, _Plan(None, 8, 16, size, torch.float32, bias=b)))
        start += size
    plan = ChunkedPlan(pieces, 8, 16)
    x, c = torch.randn(3, 16, 16), torch.randn(3, 16, 8)
    out = torch.full((3, 16, 8), float("nan"))
    plan.run(w, x, out, None, 0, c=c)
    torch.testing.assert_close(out, x @ w.t() + b + c)
    assert plan.workspace_size == 64 * 32


def test_sizes_on_the_ladder_are_searched_once_each_and_shared_by_layers(gpu_standins):
    _, first = _layer(seed=0)
    _, second = _layer(seed=1)  # same shape: shares the decisions
    for layer in (first, second):
        for tokens in (3, 9, 16, 1100):
            _run_as_on_gpu(layer, torch.randn(tokens, 64))
    searched = sorted(m for _, _, m, _ in gpu_standins.searches)
    assert searched == sorted({16, 1536, 1024, 128})  # 1100 -> 1024 + 128 (80 padded), decided as 1536


def test_after_prepare_no_call_searches_or_plans(gpu_standins):
    _, layer = _layer()
    report = prepare_token_counts(nn.Sequential(layer), max_tokens=4096, progress=False)
    assert report.token_counts == buckets.ladder(4096) and report.layers == 1 and report.shapes == 1
    anchors = sorted({buckets.anchor_of(m) for m in report.token_counts})
    assert sorted(m for _, _, m, _ in gpu_standins.searches) == anchors  # searched at powers of two only
    assert all(quick for *_, quick in gpu_standins.searches)
    assert gpu_standins.prepared
    searches, plans = len(gpu_standins.searches), len(_Plan.made)
    for tokens in (1, 7, 77, 257, 1000, 2222, 4000, 4096):
        x = torch.randn(tokens, 64)
        out = _run_as_on_gpu(layer, x)
        torch.testing.assert_close(out, _dense(layer, x), rtol=1e-5, atol=1e-5)
    assert len(gpu_standins.searches) == searches and len(_Plan.made) == plans


def _dense(layer, x):
    return x @ layer.compressed.t() + layer.bias


def test_sizes_between_anchors_take_the_anchor_algorithm(gpu_standins):
    _, layer = _layer()
    prepare_token_counts(nn.Sequential(layer), max_tokens=1536, min_tokens=1024, progress=False)
    handle = gpu_standins._handle
    anchor = gpu_standins.cache.get(layer._shape_key(handle, 1024, torch.float32))
    between = gpu_standins.cache.get(layer._shape_key(handle, 1536, torch.float32))
    assert between.alg == anchor.alg and between.use_sparse == anchor.use_sparse
    assert "1024-token search" in between.reason


def test_prepare_refuses_models_without_24_layers_and_bad_sizes(gpu_standins, monkeypatch):
    with pytest.raises(ValueError, match="accelerate_24"):
        prepare_token_counts(nn.Sequential(nn.Linear(4, 4)), max_tokens=16, progress=False)
    _, layer = _layer()
    with pytest.raises(ValueError, match="min_tokens"):
        prepare_token_counts(nn.Sequential(layer), max_tokens=8, min_tokens=16, progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        prepare_generation(nn.Sequential(layer), max_batch_size=0)
    monkeypatch.setenv("HF_SEMISPARSE_PLAN_THREADS", "all")
    with pytest.raises(ValueError, match="HF_SEMISPARSE_PLAN_THREADS"):
        prepare_token_counts(nn.Sequential(layer), max_tokens=16, progress=False)
    assert not gpu_standins.searches  # nothing was started


def test_prepare_generation_covers_prefill_and_decode(gpu_standins):
    _, layer = _layer()
    report = prepare_generation(nn.Sequential(layer), max_batch_size=4, max_prompt_length=300, progress=False)
    assert report.token_counts[0] == 16 and report.token_counts[-1] == buckets.bucket_for(1200)


class _TinyLM(nn.Module):
    """A body layer and a 2:4 output head, with transformers' head accessor and (optionally) `logits_to_keep`."""

    def __init__(self, logits_to_keep: bool):
        super().__init__()
        _, self.body = _layer(n=32, k=64, seed=0)
        _, self.lm_head = _layer(n=48, k=32, seed=1)
        self._keeps = logits_to_keep

    def get_output_embeddings(self):
        return self.lm_head

    def _supports_logits_to_keep(self):
        return self._keeps


def _searched_sizes(backend, n):
    return sorted(m for shape_n, _, m, _ in backend.searches if shape_n == n)


def test_prepare_generation_prepares_a_24_head_for_the_last_positions_only(gpu_standins):
    report = prepare_generation(_TinyLM(True), max_batch_size=40, max_prompt_length=300, progress=False)
    body = sorted({buckets.anchor_of(m) for m in buckets.ladder(40 * 300)})
    assert _searched_sizes(gpu_standins, 32) == body
    assert _searched_sizes(gpu_standins, 48) == [16, 32, 64]  # the ladder up to 40 tokens
    assert report.head_token_counts == [16, 32, 64] and report.shapes == 2
    assert "output head up to 64 tokens" in str(report)
    searches = len(gpu_standins.searches)
    model = _TinyLM(True)  # same shapes: every decision comes from the tuning cache
    prepare_generation(model, max_batch_size=40, max_prompt_length=300, progress=False)
    assert len(gpu_standins.searches) == searches
    for tokens in (1, 40):  # what generate passes the head runs without a search
        _run_as_on_gpu(model.lm_head, torch.randn(tokens, 32))
    assert len(gpu_standins.searches) == searches


def test_head_sizes_at_the_edges(gpu_standins):
    model = _TinyLM(True)
    _, model.lm_head = _layer(n=32, k=64, seed=1)  # the body's shape: two groups of sizes, one weight shape
    report = prepare_token_counts(model, max_tokens=512, min_tokens=32, head_max_tokens=16, progress=False)
    assert report.head_token_counts == [32] and report.shapes == 1  # never below min_tokens
    report = prepare_token_counts(model, max_tokens=512, head_max_tokens=512, progress=False)
    assert report.head_token_counts is None  # as many as the rest: no separate sizes
    report = prepare_generation(model, max_batch_size=4, head_max_tokens=None, progress=False)
    assert report.head_token_counts is None  # asked for every size


def test_a_head_that_computes_every_position_is_prepared_for_every_size(gpu_standins):
    report = prepare_generation(_TinyLM(False), max_batch_size=4, max_prompt_length=300, progress=False)
    assert _searched_sizes(gpu_standins, 48) == _searched_sizes(gpu_standins, 32)
    assert report.head_token_counts is None and "output head" not in str(report)
    with pytest.raises(ValueError, match="head_max_tokens"):
        prepare_token_counts(_TinyLM(True), max_tokens=64, head_max_tokens=0, progress=False)


def test_capture_of_an_unprepared_size_runs_without_search_and_says_so(gpu_standins, monkeypatch, caplog):
    lin, layer = _layer(keep_dense=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(linear_mod, "_SAID", set())
    x = torch.randn(40, 64)
    with caplog.at_level("WARNING"):
        out = _run_as_on_gpu(layer, x)
    torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)
    assert not gpu_standins.searches
    assert "inside a CUDA graph capture" in caplog.text and "prepare" in caplog.text
    assert (0, x.numel()) not in layer._fast  # not remembered: decided properly outside the capture


# ---------------------------------------------------------------------------------------------- decoders


def test_a_layer_without_dense_weight_refuses_a_state_dict(gpu_standins):
    model = nn.Sequential(_layer(keep_dense=False)[1])
    with pytest.raises(RuntimeError, match=r"0 keeps only its compressed 2:4 weight.*Save the model before"):
        model.state_dict()
    assert "0.weight" in nn.Sequential(_layer(keep_dense=True)[1]).state_dict()


def test_a_decision_made_without_dense_is_searched_again_for_a_layer_that_keeps_dense(gpu_standins):
    _run_as_on_gpu(_layer(keep_dense=False)[1], torch.randn(16, 64))
    _run_as_on_gpu(_layer(keep_dense=True)[1], torch.randn(16, 64))  # must compare with dense itself
    _run_as_on_gpu(_layer(keep_dense=True)[1], torch.randn(16, 64))  # now decided with dense: no search
    assert [m for _, _, m, _ in gpu_standins.searches] == [16, 16]


def test_generative_decoders_are_recognised():
    from hf_semisparse.kernels import is_generative_decoder

    from .conftest import make_model

    assert is_generative_decoder(make_model("llama")) and is_generative_decoder(make_model("gpt2"))
    assert not is_generative_decoder(make_model("bert")) and not is_generative_decoder(make_model("t5"))


def _search_stand_ins(max_id: int, built: list | None = None):
    """A cuSPARSELt plan and handle for `tuning.search_alg` on the CPU: plans of a shape whose largest algorithm
    id is `max_id` (each built one appended to `built`), a handle with siblings that records adopted plans."""

    class Plan:
        workspace_size = 0

        def __init__(self, handle, n, k, m, dtype, bias=None, gelu=False, alg=None):
            self.alg, self.handle = alg, handle
            if built is not None:
                built.append((m, alg, handle))

        def run(self, *args, **kwargs):
            pass

        def max_alg_id(self):
            return max_id

    class Handle:
        device_name = "stand-in"

        def __init__(self):
            self.adopted, self.adopted_bias = [], []

        def sibling(self):
            return Handle()

        def adopt_selection(self, plan, bias):
            self.adopted.append(plan)
            self.adopted_bias.append(bias)

    return Plan, Handle


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_quick_searches_try_every_id_at_decode_sizes_and_the_first_searchs_fastest_at_prefill(
    monkeypatch, capability
):
    """A quick search tries every id at decode sizes (on an H200 the fastest ids at 128-256 tokens were not among
    the 16-token search's fastest), ids 0-15 at a shape's first prefill size, and that search's fastest ids (plus
    ids 0-1) at later prefill sizes; ids above the shape's own maximum are never timed."""
    from hf_semisparse.kernels import tuning

    assert tuning.candidate_alg_ids(40, quick=False, ranking=None) == list(range(41))
    assert tuning.candidate_alg_ids(35, quick=True, ranking=None) == list(range(36))
    assert tuning.candidate_alg_ids(35, quick=True, ranking=[10, 7, 11, 0, 4]) == list(range(36))
    assert tuning.candidate_alg_ids(35, quick=True, ranking=None, decode=False) == list(range(16))
    assert tuning.candidate_alg_ids(21, quick=True, ranking=[10, 7, 11, 5, 4], decode=False) == [
        0,
        1,
        5,
        7,
        10,
        11,
    ]
    assert tuning.candidate_alg_ids(2, quick=True, ranking=[10], decode=False) == [0, 1, 2]  # ids it has

    speed = {10: 19.0, 7: 24.0, 11: 36.0, 0: 48.6}  # us per id, others slower
    timed: list[list[int]] = []
    splits: list[list[int]] = []
    Plan, FakeHandle = _search_stand_ins(21)

    def time_us(fn, **kwargs):
        plan = fn.__defaults__[0]
        timed[-1].append(plan.alg.alg_id)
        splits[-1].append(plan.alg.split_k)
        return speed.get(plan.alg.alg_id, 100.0) * (plan.alg.split_k if plan.alg.split_k > 0 else 1.5)

    monkeypatch.setattr(tuning, "MatmulPlan", Plan)
    monkeypatch.setattr(tuning, "time_cuda_us", time_us)
    monkeypatch.setattr(tuning, "time_interleaved", lambda fns, **kw: {k: time_us(f) for k, f in fns.items()})
    monkeypatch.setattr(tuning.torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(tuning, "_SHAPE_RANKING", {})
    x = torch.zeros(16, 256)  # K 256: split-K candidates need K / splits >= 64
    for m in (16, 128):
        timed.append([])
        splits.append([])
        alg, us, _ = tuning.search_alg(
            FakeHandle(), 64, 256, m, torch.bfloat16, None, False, None, x, 0, quick=True
        )
        assert alg.alg_id == 10 and us == 19.0
    first, second = (set(t) for t in timed)
    assert first == second == set(range(22))  # every id the shape has (max_alg_id 21), at every decode size
    timed.append([])  # a prefill size ranks on its own: its first quick search tries ids 0-15
    splits.append([])
    tuning.search_alg(FakeHandle(), 64, 256, 512, torch.bfloat16, None, False, None, x, 0, quick=True)
    assert set(range(16)) == set(timed[-1])
    timed.append([])
    splits.append([])
    tuning.search_alg(FakeHandle(), 64, 256, 1024, torch.bfloat16, None, False, None, x, 0, quick=True)
    assert set(timed[-1]) == {0, 1, 7, 10, 11}  # the 512-token search's fastest four (10, 7, 11, 0), and 0-1
    decode_splits, prefill_splits = set(splits[0] + splits[1]), set(splits[2] + splits[3])
    if capability == (
        9,
        0,
    ):  # cuSPARSELt 0.8 refused split-K on an H200: Segment-K (-1), at decode sizes only
        assert -1 in decode_splits and not {s for s in decode_splits | prefill_splits if s > 1}
    else:  # split-K at decode sizes, no Segment-K before Hopper
        assert {2, 4} <= decode_splits and -1 not in decode_splits | prefill_splits
    assert prefill_splits == {1}


def test_a_warm_up_of_one_weight_shape_builds_248_cusparselt_candidates_on_hopper(monkeypatch):
    """The candidate count behind the fp16 warm-up figure in docs/guides/generation.md: Llama-3-8B's warm-up up to
    65536 tokens searches 5 decode and 8 prefill anchor sizes per weight shape: every id (36) plus two Segment-K
    variants at each decode size, ids 0-15 at the first prefill size and 6 ids at the others. At about 0.18 s of
    host time per candidate (H200) these are built in worker threads (`plan_threads`)."""
    from hf_semisparse.kernels import tuning

    speed = {22: 9.0, 18: 10.0, 25: 11.0, 16: 12.0, 12: 50.0, 13: 60.0, 14: 70.0, 15: 80.0}  # us; others 100
    candidates = []
    # 52: cuSPARSELt 0.8's fp16 ids at 16 tokens on an H200; the search stops at 35
    Plan, FakeHandle = _search_stand_ins(52, candidates)

    def time_us(fn, **kwargs):
        plan = fn.__defaults__[0]
        return speed.get(plan.alg.alg_id, 100.0) * (1.0 if plan.alg.split_k == 1 else 1.5)

    monkeypatch.setattr(tuning, "MatmulPlan", Plan)
    monkeypatch.setattr(tuning, "time_cuda_us", time_us)
    monkeypatch.setattr(tuning, "time_interleaved", lambda fns, **kw: {k: time_us(f) for k, f in fns.items()})
    monkeypatch.setattr(tuning.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tuning, "_SHAPE_RANKING", {})
    monkeypatch.setattr(tuning, "SAFE_MAX_ALG_ID", 35)  # the default, whatever HF_SEMISPARSE_MAX_ALG_ID says
    anchors = sorted({buckets.anchor_of(m) for m in buckets.ladder(65536)})
    assert len(anchors) == 13
    monkeypatch.setenv("HF_SEMISPARSE_PLAN_THREADS", "4")
    x = torch.zeros(16, 4096)
    handle = FakeHandle()
    for m in anchors:
        tuning.search_alg(handle, 4096, 4096, m, torch.float16, None, False, None, x, 0, quick=True)
    per_size = [sum(1 for size, _, h in candidates if size == m and h is not handle) for m in anchors]
    assert per_size == [38, 38, 38, 38, 38, 16, 6, 6, 6, 6, 6, 6, 6]
    assert sum(per_size) == 248  # all in worker threads
    # each prefill size's winner is built once more on the caller's handle, for the layers' plans
    assert [m for m, _, h in candidates if h is handle] == anchors[5:]


@pytest.mark.parametrize(
    "dtype, cutlass_built, kernel, warned",
    [
        (torch.bfloat16, True, "cutlass", False),  # Hopper with our kernels: every layer on CUTLASS
        (torch.bfloat16, False, "cusparselt", True),  # no CUTLASS: cuSPARSELt, and why that is slow is said
        (torch.float16, True, "cusparselt", False),  # fp16: cuSPARSELt's plain GEMMs were the faster ones
    ],
)
def test_bf16_decoders_run_on_cutlass_where_it_can_run(
    backend, monkeypatch, caplog, dtype, cutlass_built, kernel, warned
):
    """cuSPARSELt 0.8's bf16 kernels ran slower than dense at decode sizes on an H200, our CUTLASS ones faster:
    "auto" puts every layer of a bf16 decoder on CUTLASS where it can run (stand-in kernels on the CPU)."""
    import hf_semisparse.kernels as kernels
    from hf_semisparse import prune_24
    from hf_semisparse.kernels import cutlass_sm90

    monkeypatch.setattr(kernels, "_SAID", set())
    monkeypatch.setattr(kernels, "why_not_accelerated", lambda device, dtype: None)
    monkeypatch.setattr(kernels, "KERNEL_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(
        cutlass_sm90, "why_unavailable", lambda *args: None if cutlass_built else "not built (stand-in)"
    )
    model = make_model("llama")
    prune_24(model, show_progress=False)
    model = model.to(dtype)
    with caplog.at_level(logging.WARNING):
        report = kernels.accelerate_24(model)
    assert report.ok and not report.keep_dense and report.fused_projections
    assert set(report.kernels) == {kernel}, report.kernels
    assert ("bf16 decoder: " in caplog.text and "run on cuSPARSELt" in caplog.text) is warned

    encoder = make_model("bert")  # not a decoder: plain GEMMs stay on cuSPARSELt in bf16 too
    prune_24(encoder, show_progress=False)
    report = kernels.accelerate_24(encoder.to(dtype), fuse_residual=False, fuse_gelu=False)
    assert set(report.kernels) == {"cusparselt"}, report.kernels


def test_prepare_generation_adds_decode_pad_buffers_only_when_asked(gpu_standins):
    _, layer = _layer()
    report = prepare_generation(nn.Sequential(layer), max_batch_size=20, max_prompt_length=8, progress=False)
    assert report.pad_buffer_bytes == 0 and not layer._pad_rows
    report = prepare_generation(
        nn.Sequential(layer), max_batch_size=20, max_prompt_length=8, pad_buffers=True, progress=False
    )
    assert sorted(layer._pad_rows) == [16, 32]  # the decode sizes of 1 to 20 sequences
    assert all(rows.shape == (m, 64) for m, rows in layer._pad_rows.items())
    assert report.pad_buffer_bytes == (16 + 32) * 64 * layer._pad_rows[16].element_size()


def test_pad_buffers_refuse_sizes_off_the_decode_ladder(backend):
    layer = SemiSparseLinear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"ladder sizes up to 256 tokens, got \[24, 512\]"):
        layer.add_pad_buffers([16, 24, 512])
    assert not layer._pad_rows  # nothing added
    layer.add_pad_buffers([16])
    layer.to(torch.float64)
    assert not layer._pad_rows  # moved: the buffers go with the plans


def test_pad_buffers_made_in_inference_mode_can_be_written_outside_it(backend):
    layer = SemiSparseLinear(nn.Linear(64, 32))
    with torch.inference_mode():
        layer.add_pad_buffers([16])
    with torch.no_grad():
        layer._pad_rows[16][:1].copy_(torch.ones(1, 64))  # what a compiled step under no_grad does


@pytest.mark.parametrize(
    "threads, tokens, compiled, with_dense",
    [
        (1, 16, False, True),
        (2, 16, False, True),
        (1, 512, False, True),
        (2, 512, False, True),
        (2, 512, False, False),
        (2, 16, True, True),
        (2, 512, True, True),
    ],
)
def test_worker_threads_build_candidates_and_the_layers_plan_on_the_callers_handle(
    monkeypatch, threads, tokens, compiled, with_dense
):
    """Outside compiled calls candidates are built by worker threads (their own cuSPARSELt handles) and ranked by
    CUDA graph replays: on an H200 a model whose layers ran plans made from those handles decoded slower eager
    (2026-12-03). At prefill sizes the winner is built again on the caller's handle, timed eagerly against dense,
    and its selection kept for the layers' plans; at decode sizes (graph-timed to the end) the layers make their
    own. Inside a compiled call every candidate is built on the caller's handle and timed eagerly. The selection
    kept is adopted with the layer's own bias tensor (its descriptor holds that address)."""
    from hf_semisparse.kernels import tuning

    built = []
    Plan, FakeHandle = _search_stand_ins(5, built)
    graphs, eager_finals = [], []

    def time_us(fn, graph=False, **kw):
        graphs.append(graph)
        return 10.0 + 5 - fn.__defaults__[0].alg.alg_id  # id 5 fastest

    def interleaved(fns, graph=False, **kw):
        if not graph:
            eager_finals.append(sorted(map(str, fns)))
        return {key: (1.0 if key == "dense" else time_us(fn, graph=graph)) for key, fn in fns.items()}

    monkeypatch.setenv("HF_SEMISPARSE_PLAN_THREADS", str(threads))
    monkeypatch.setattr(tuning, "MatmulPlan", Plan)
    monkeypatch.setattr(tuning, "time_cuda_us", time_us)
    monkeypatch.setattr(tuning, "time_interleaved", interleaved)
    monkeypatch.setattr(tuning.torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(tuning, "_SHAPE_RANKING", {})
    handle = FakeHandle()
    x, bias = torch.zeros(tokens, 64), torch.zeros(64)
    with tuning.compiled_call() if compiled else contextlib.nullcontext():
        alg, us, dense_us = tuning.search_alg(
            handle,
            64,
            64,
            tokens,
            torch.float16,
            bias,
            False,
            None,
            x,
            0,
            dense=(lambda: x) if with_dense else None,
            quick=True,
        )
    assert alg.alg_id == 5 and alg.split_k == 1 and dense_us == (1.0 if with_dense else None) and us == 10.0
    on_caller = [a for _, a, h in built if h is handle]
    kept = [p.alg for p in handle.adopted]
    if compiled:  # everything on the caller's handle, timed eagerly
        assert len(on_caller) == len(built) and not any(graphs) and kept == [alg]
    elif tokens <= tuning.GRAPH_TIMING_MAX_M:  # decode: graph replays to the end
        assert all(graphs) and eager_finals == []
        if threads == 1:  # built here: the winner's selection is kept
            assert len(on_caller) == len(built) and kept == [alg]
        else:
            assert on_caller == [] and kept == []
    else:  # prefill: ranked on the GPU alone, the winner (built again here) timed eagerly against dense
        assert eager_finals == ([["dense", "sparse"]] if with_dense else []) and kept == [alg]
        assert len(on_caller) == len(built) if threads == 1 else on_caller == [alg]
    assert all(p.handle is handle for p in handle.adopted)
    assert all(b is bias for b in handle.adopted_bias)


@pytest.mark.parametrize(
    "first_ms, call_ms, graph, calls",
    [
        (0.02, 0.02, False, 1 + 1 + 3 * 5),  # short: 5 calls per sample
        (5.0, 0.02, False, 1 + 1 + 3 * 5),  # only the first call is slow (a kernel loaded): still short
        (2.0, 2.0, False, 1 + 1 + 3 * 2),  # long: one timed call per sample, after an untimed one
        (2.0, 2.0, True, 1 + 1 + 1 + 3),  # replayed: the side stream's warm-up, then one call per replay
    ],
)
def test_long_kernels_are_timed_one_call_per_sample(monkeypatch, first_ms, call_ms, graph, calls):
    """A kernel of a millisecond or more (large prefill sizes) is timed one call per sample, eagerly with an
    untimed call before it so that no launch gap enters the sample: more calls would only add GPU time to a warm-up. Whether a
    kernel is that long is judged after the warm-up (a first call can load the kernel), and shorter ones keep
    several calls per sample. Either way the time is per call."""
    from hf_semisparse.kernels import tuning

    ran = []  # the duration (ms) of each call of the timed function, on a fake GPU clock
    capturing = []  # the graph being captured, while one is

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            self.at = sum(ran)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:  # replays the calls made while it was captured
        def __init__(self):
            self.calls = []

        def replay(self):
            for call in self.calls:
                call()

    @contextlib.contextmanager
    def capture(graph, stream=None, capture_error_mode="global"):
        capturing.append(graph)
        yield
        capturing.pop()

    def fn():
        if capturing:
            capturing[-1].calls.append(fn)  # recorded, not run
        else:
            ran.append(first_ms if not ran else call_ms)

    _fake_cuda_timing(monkeypatch, Event, Graph, capture, Stream)
    us = tuning.time_cuda_us(fn, warmup=1, repeats=3, inner=5, graph=graph)
    assert us == pytest.approx(call_ms * 1e3) and len(ran) == calls


def test_graph_timed_searches_in_several_threads_capture_one_at_a_time(monkeypatch):
    """torch registers its default CUDA generator with every capture and two captures at once fail (on an H200,
    four threads meeting new token counts broke each other's captures and left the generator unusable): captures
    are serialised, and in "thread_local" mode, so other threads' allocations do not break them."""
    import threading
    import time

    from hf_semisparse.kernels import tuning

    inside, most, modes = [0], [0], []
    guard = threading.Lock()

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 0.01

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def capture(graph, stream=None, capture_error_mode="global"):
        modes.append(capture_error_mode)
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)  # long enough for the other threads to try
        yield
        with guard:
            inside[0] -= 1

    _fake_cuda_timing(monkeypatch, Event, Graph, capture, Stream)
    threads = [
        threading.Thread(target=tuning.time_cuda_us, args=(lambda: None,), kwargs={"graph": True})
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert modes == ["thread_local"] * 4 and most[0] == 1


def test_search_inputs_come_from_a_generator_of_their_own(gpu_standins, monkeypatch):
    """Not torch's default generator, which is in capture state while another thread's search captures."""
    from hf_semisparse.kernels import tuning

    drawn_with, real = [], torch.randn

    def randn(*args, **kwargs):
        drawn_with.append(kwargs.get("generator"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    _, layer = _layer()
    prepare_token_counts(nn.Sequential(layer), max_tokens=64, progress=False)
    own = tuning.search_generator("cpu")
    assert drawn_with and all(generator is own for generator in drawn_with)
    assert own is not torch.default_generator and tuning.search_generator(torch.device("cpu")) is own


def test_the_warm_up_compiles_the_gated_mlps_kernel_only_for_prefill_sizes(gpu_standins, monkeypatch):
    from hf_semisparse.kernels import warmup

    compiled = []
    monkeypatch.setattr(warmup, "compile_silu_mul", lambda model: compiled.append(model))
    _, layer = _layer()
    model = nn.Sequential(layer)
    prepare_token_counts(model, max_tokens=256, progress=False)
    assert not compiled  # decode sizes only: the one-pass SiLU product never runs
    prepare_token_counts(model, max_tokens=4096, progress=False)
    assert compiled == [model]


def _fake_cuda_timing(monkeypatch, event, graph, capture, stream) -> None:
    """torch.cuda's events, graphs, captures and streams replaced by a test's stand-ins (`time_cuda_us`)."""
    from hf_semisparse.kernels import tuning

    cuda = tuning.torch.cuda
    monkeypatch.setattr(cuda, "Event", event)
    monkeypatch.setattr(cuda, "CUDAGraph", graph)
    monkeypatch.setattr(cuda, "graph", capture)
    monkeypatch.setattr(cuda, "Stream", stream)
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "current_stream", lambda *args: stream())
