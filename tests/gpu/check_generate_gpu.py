"""GPU checks of 2:4 decoders in generation: transformers' compiled static-cache generate (inductor's CUDA graph
trees), `torch.compile(fullgraph=True)`, `CUDAGraphedModel`, the warm-up, and token counts off the ladder. Not
collected by the CPU suite; run on a CUDA machine with:

    PYTHONPATH=src python -m pytest -q tests/gpu/check_generate_gpu.py

Logits are compared with the dense model holding the same 2:4 weights: ||ours - dense|| / ||dense|| under 2e-3 in
fp16 and 1e-2 in bf16 (both accumulate in fp32; the 2:4 kernels sum in another order).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_semisparse import prune_24
from hf_semisparse.kernels import CUDAGraphedModel, accelerate_24, prepare_generation, semi_sparse_layers
from hf_semisparse.kernels import linear as linear_mod
from hf_semisparse.kernels.buckets import padded_tokens, split_into_buckets
from hf_semisparse.kernels.cusparselt import AlgConfig
from hf_semisparse.kernels.linear import ChunkedPlan, SparseGemmBackend
from hf_semisparse.kernels.tuning import Decision, TuningCache

if not torch.cuda.is_available():
    pytest.fail("these checks need a CUDA GPU", pytrace=False)

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def fresh_backend(tmp_path):
    linear_mod._BACKEND = SparseGemmBackend(cache=TuningCache(str(tmp_path / "tuning.json")))
    torch._dynamo.reset()
    yield
    linear_mod._BACKEND = None
    torch._dynamo.reset()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def llama_pair(dtype, layers=2, seed=0):
    """A small Llama (shapes multiples of 64) pruned to 2:4, and an accelerated copy."""
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=1024,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    dense = LlamaForCausalLM(config).to("cuda", dtype).eval()
    dense.generation_config.eos_token_id = None
    prune_24(dense, show_progress=False)
    ours = copy.deepcopy(dense)
    report = accelerate_24(ours)
    assert report.ok and not report.keep_dense and report.fused_projections, report
    return dense, ours


def greedy(model, ids, new_tokens, static):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


@pytest.mark.parametrize("pad_buffers", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_static_cache_generate_runs_and_matches_dense(dtype, pad_buffers):
    dense, ours = llama_pair(dtype)
    prepare_generation(ours, max_batch_size=4, max_prompt_length=64, pad_buffers=pad_buffers, progress=False)
    for batch in (3,):
        ids = torch.randint(1, 1024, (batch, 37), device="cuda")
        ref = greedy(dense, ids, 12, static=True)
        for _ in range(2):  # the second call replays the recorded graphs
            out = greedy(ours, ids, 12, static=True)
            steps = int((out.sequences == ref.sequences).all(0).long().cumprod(0).sum()) - ids.shape[1]
            assert steps >= 1
            for step in range(steps):
                assert rel(out.logits[step], ref.logits[step]) < TOL[dtype], (batch, step)
    # the graph trees are intact: dense compiled generate still works in the same process, and ours eager too
    greedy(dense, ids, 4, static=True)
    eager = greedy(ours, ids, 4, static=False)
    assert rel(eager.logits[0], ref.logits[0]) < TOL[dtype]


@pytest.mark.parametrize("pad_buffers", [False, True])
def test_compiled_decode_runs_in_cuda_graphs_as_dense_does(pad_buffers):
    """Inductor's CUDA graph trees capture our decode steps, as they do dense's: no "skipping cudagraphs" (a
    skipped graph runs every kernel launch from Python; on an H200, 2026-12-01, our 2-block decode spent about 1 ms
    more host time per step than dense's, for the same GPU time). With pad buffers the graphs mutate them: they
    must count as static inputs (`mark_static_address`), or the trees skip the graph ("mutated inputs")."""
    from torch._dynamo.utils import counters

    dense, ours = llama_pair(torch.float16)
    prepare_generation(ours, max_batch_size=1, max_prompt_length=64, pad_buffers=pad_buffers, progress=False)
    ids = torch.randint(1, 1024, (1, 37), device="cuda")
    skips = {}
    for label, model in (("dense", dense), ("ours", ours)):
        torch._dynamo.reset()
        counters.clear()
        for _ in range(2):
            greedy(model, ids, 8, static=True)
        skips[label] = dict(counters["inductor"])
    print({label: {k: v for k, v in c.items() if "cudagraph" in k} for label, c in skips.items()})
    assert skips["dense"].get("cudagraph_skips", 0) == 0, "the control: dense decode should be captured"
    assert skips["ours"].get("cudagraph_skips", 0) == 0, skips["ours"]


def kernel_with_workspace(layer, m: int) -> AlgConfig | None:
    """A cuSPARSELt configuration for `layer` at `m` tokens that needs a workspace: split-K (Ampere; cuSPARSELt 0.8
    refuses it on an H200 with "invalid value") or Segment-K (compute capability 9.0+), over the algorithm ids."""
    from hf_semisparse.kernels.cusparselt import CusparseLtError, MatmulPlan

    handle = layer._handle(layer.compressed.device)
    for alg_id in range(36):
        for alg in (AlgConfig(alg_id, 4, 2, 3), AlgConfig(alg_id, -1, 1), AlgConfig(alg_id, -1, 2)):
            try:
                plan = MatmulPlan(handle, layer.out_features, layer.in_features, m, torch.float16, alg=alg)
            except CusparseLtError:
                continue
            if plan.workspace_size > 0:
                return alg
    return None


def test_workspace_of_a_segment_k_or_split_k_kernel_under_graph_trees():
    """A kernel with a workspace (split-K or Segment-K) under inductor's CUDA graph trees: the workspace must not
    come from the graph's pool (that failed with "tensor(s) in the cudagraph pool not tracked as outputs")."""
    dense, ours = llama_pair(torch.float16, layers=1)
    backend = linear_mod.get_backend()
    layers = semi_sparse_layers(ours)
    chosen = {}
    for layer in layers:  # decide every decode size as a kernel with a workspace, before any call
        handle = layer._handle(layer.compressed.device)
        for m in (16, 32):
            alg = kernel_with_workspace(layer, m)
            if alg is not None:
                chosen[(layer.out_features, layer.in_features, m)] = alg
                key = layer._shape_key(handle, m, torch.float16)
                backend.cache.put(key, Decision(True, alg, None, None, "test: a kernel with a workspace"))
    print("kernels with a workspace:", chosen)
    if not any(m == 16 for (_, _, m) in chosen):
        pytest.skip("no cuSPARSELt kernel with a workspace at 16 tokens on this GPU: nothing to check")
    compiled = torch.compile(ours, mode="reduce-overhead")
    ids = torch.randint(1, 1024, (2, 1), device="cuda")
    with torch.inference_mode():
        for _ in range(4):  # warm-up, recording, replays
            out = compiled(ids).logits
        ref = dense(ids).logits
    assert rel(out, ref) < TOL[torch.float16]


def test_unprepared_token_counts_under_compile_run_correctly(caplog):
    dense, ours = llama_pair(torch.float16)
    compiled = torch.compile(ours, mode="reduce-overhead")
    with torch.inference_mode(), caplog.at_level(logging.INFO):
        for batch in (3, 5):
            ids = torch.randint(1, 1024, (batch, 1), device="cuda")
            for _ in range(3):
                out = compiled(ids).logits
            assert rel(out, dense(ids).logits) < TOL[torch.float16]


def test_fullgraph_compile_of_a_forward_matches_eager():
    dense, ours = llama_pair(torch.bfloat16)
    ids = torch.randint(1, 1024, (2, 50), device="cuda")
    compiled = torch.compile(ours, fullgraph=True)
    with torch.inference_mode():
        assert rel(compiled(ids).logits, dense(ids).logits) < TOL[torch.bfloat16]


def test_cuda_graphed_model_with_compressed_weights_only():
    dense, ours = llama_pair(torch.float16)
    graphed = CUDAGraphedModel(ours)
    ids = torch.randint(1, 1024, (4, 1), device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            out = graphed(input_ids=ids).logits
        assert rel(out, dense(input_ids=ids).logits) < TOL[torch.float16]


def test_token_counts_off_the_ladder_run_as_row_blocks():
    dense, ours = llama_pair(torch.float16, layers=1)
    prepare_generation(ours, max_batch_size=1, max_prompt_length=4096, progress=False)  # one warm-up for all
    searched = len(linear_mod.get_backend().cache)
    for tokens in (300, 2000, 2048 + 16 + 5):
        ids = torch.randint(1, 1024, (1, tokens), device="cuda")
        with torch.inference_mode():
            first = ours(ids).logits  # builds the route; the second call runs it from the cache
            out = ours(ids).logits
            ref = dense(ids).logits
        assert rel(first, ref) < TOL[torch.float16] and rel(out, ref) < TOL[torch.float16], tokens
        assert len(linear_mod.get_backend().cache) == searched, f"a new decision after the warm-up ({tokens})"
        padded = padded_tokens(tokens)  # 2000 pads to the ladder's 2048 (one GEMM); 2069 runs as row blocks
        layer = semi_sparse_layers(ours)[0]
        route = layer._fast[(0, tokens * layer.in_features)]
        if len(split_into_buckets(padded)) > 1:
            assert isinstance(route, ChunkedPlan), tokens
