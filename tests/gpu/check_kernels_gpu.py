"""GPU-only checks of the cuSPARSELt backend. Not collected by the CPU suite (the file name does not start with
`test_`); run on a CUDA machine with:

    PYTHONPATH=src python -m pytest -q tests/gpu/check_kernels_gpu.py

Numerical checks compare against a float64 reference: ||y - ref|| / ||ref|| under 2e-3 for fp16 and 1e-2 for
bf16 (fp32 accumulation in both).
"""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from hf_semisparse import compute_nm_mask, prune_24
from hf_semisparse.kernels import accelerate_24, semi_sparse_layers, why_not_accelerated
from hf_semisparse.kernels import linear as linear_mod
from hf_semisparse.kernels.cusparselt import AlgConfig, CusparseLtError, Handle, MatmulPlan
from hf_semisparse.kernels.linear import SemiSparseLinear, SparseGemmBackend
from hf_semisparse.kernels.tuning import SAFE_MAX_ALG_ID, TuningCache, search_alg

if not torch.cuda.is_available():
    pytest.fail("these checks need a CUDA GPU", pytrace=False)

DEV = torch.device("cuda")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def fresh_backend(tmp_path):
    linear_mod._BACKEND = SparseGemmBackend(cache=TuningCache(str(tmp_path / "tuning.json")))
    yield
    linear_mod._BACKEND = None


def sparse_linear(n, k, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        w = torch.randn(n, k, generator=g) / k**0.5
        lin.weight.copy_(w * compute_nm_mask(w))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin.to(DEV, dtype)


def rel_err(y, ref):
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


def run_poisoned(plan, compressed, x):
    """`plan`'s output for `x`, written into a buffer filled with NaN first: every element must be written."""
    out = torch.full((x.shape[0], plan.n), float("nan"), device=DEV, dtype=x.dtype)
    ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=DEV)
    plan.run(compressed, x, out, ws, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out


def reference(lin, x):
    y = x.double() @ lin.weight.double().t()
    return y + lin.bias.double() if lin.bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", [(768, 768, 1536), (3072, 768, 6144), (768, 3072, 100), (64, 64, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_plan_matches_float64_reference(dtype, n, k, m, bias):
    lin = sparse_linear(n, k, dtype, bias)
    handle = Handle(DEV)
    compressed = handle.compress(lin.weight.detach())
    assert compressed.numel() * 1 < lin.weight.numel() * 2 * 0.6  # bytes: values + metadata < 0.6x dense
    mp = -(-m // 16) * 16
    x = torch.randn(mp, k, device=DEV, dtype=dtype)
    plan = MatmulPlan(handle, n, k, mp, dtype, bias=lin.bias)
    assert rel_err(run_poisoned(plan, compressed, x), reference(lin, x)) < TOL[dtype]
    # every algorithm the search may pick computes the same function (checked on one shape, to keep this fast)
    all_ids = range(min(plan.max_alg_id(), SAFE_MAX_ALG_ID) + 1)
    for alg_id in all_ids if (n, k, m) == (768, 768, 1536) else []:
        try:
            other = MatmulPlan(handle, n, k, mp, dtype, bias=lin.bias, alg=AlgConfig(alg_id))
        except CusparseLtError:
            continue
        assert rel_err(run_poisoned(other, compressed, x), reference(lin, x)) < TOL[dtype], alg_id
    stream = torch.cuda.current_stream().cuda_stream
    alg, us, _ = search_alg(handle, n, k, mp, dtype, lin.bias, False, compressed, x, stream)
    assert us > 0 and alg.alg_id <= SAFE_MAX_ALG_ID
    best = MatmulPlan(handle, n, k, mp, dtype, bias=lin.bias, alg=alg)
    assert rel_err(run_poisoned(best, compressed, x), reference(lin, x)) < TOL[dtype]


def test_plans_sharing_one_selection():
    """Plans of two layers (own weights, own biases) made from one cached selection are each right."""
    dtype, n, k, m = torch.float16, 1536, 384, 4096
    handle = Handle(DEV)
    layers = [sparse_linear(n, k, dtype, seed=s) for s in (1, 2)]
    proto = handle.selection(n, k, m, dtype, True, False, AlgConfig(1))
    assert handle.selection(n, k, m, dtype, True, False, AlgConfig(1)) is proto  # made once per problem
    assert handle.selection(n, k, m, dtype, True, False, AlgConfig(0)) is not proto
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    plans = [
        MatmulPlan(handle, n, k, m, dtype, bias=lin.bias, alg=AlgConfig(1), selection=proto) for lin in layers
    ]
    assert proto.selected_alg == AlgConfig(1)  # a cached selection is never changed
    with pytest.raises(ValueError, match="cannot share"):
        MatmulPlan(handle, n, k, m + 16, dtype, bias=layers[0].bias, alg=AlgConfig(1), selection=proto)
    with pytest.raises(ValueError, match="never changed"):
        MatmulPlan(handle, n, k, m, dtype, bias=layers[0].bias, alg=AlgConfig(0), selection=proto)
    for lin, plan in zip(layers, plans, strict=True):
        out = run_poisoned(plan, handle.compress(lin.weight.detach()), x)
        assert rel_err(out, reference(lin, x)) < TOL[dtype]


@pytest.mark.parametrize("keep_dense", [True, False])
def test_semisparse_linear_module(keep_dense):
    lin = sparse_linear(1024, 512, torch.float16)
    layer = SemiSparseLinear(lin, keep_dense=keep_dense)
    for m in (48, 4096, 4096, 37):  # a new M -> one new decision; 37 is padded to 48, a known M
        x = torch.randn(m, 512, device=DEV, dtype=torch.float16)
        with torch.inference_mode():
            y = layer(x)
        assert y.shape == (m, 1024)
        assert rel_err(y, reference(lin, x)) < 2e-3
    assert len(linear_mod.get_backend().cache) == 2
    x3 = torch.randn(2, 24, 512, device=DEV, dtype=torch.float16)
    assert rel_err(layer(x3), reference(lin, x3)) < 2e-3
    strided = torch.randn(24, 2, 512, device=DEV, dtype=torch.float16).transpose(0, 1)  # not contiguous
    assert rel_err(layer(strided), reference(lin, strided)) < 2e-3
    if not keep_dense:
        assert layer.weight is None
        assert all(d.use_sparse for d in linear_mod.get_backend().cache._entries.values())


def test_decisions_persist_across_processes(tmp_path, monkeypatch):
    path = str(tmp_path / "persist.json")
    linear_mod._BACKEND = SparseGemmBackend(cache=TuningCache(path))
    lin = sparse_linear(768, 768, torch.float16)
    layer = SemiSparseLinear(lin)
    x = torch.randn(2048, 768, device=DEV, dtype=torch.float16)
    y1 = layer(x)
    assert os.path.isfile(path)
    # a "restarted process": new backend reading the file must not search again
    linear_mod._BACKEND = SparseGemmBackend(cache=TuningCache(path))
    calls = []
    monkeypatch.setattr(linear_mod, "search_alg", lambda *a, **k: calls.append(1))
    y2 = SemiSparseLinear(lin)(x)
    assert not calls
    torch.testing.assert_close(y1, y2)


def test_cuda_graph_capture_after_warmup():
    lin = sparse_linear(3072, 768, torch.float16)
    layer = SemiSparseLinear(lin, keep_dense=False)
    x = torch.randn(4096, 768, device=DEV, dtype=torch.float16)
    eager = layer(x)  # warm-up: tunes and builds the plan
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x)  # plan and workspace for this stream
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        captured = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(captured, reference(lin, x)) < 2e-3
    assert not torch.equal(captured, eager)


def test_torch_compile_fullgraph():
    lin = sparse_linear(1024, 1024, torch.float16)
    model = torch.nn.Sequential(SemiSparseLinear(lin), torch.nn.GELU())
    x = torch.randn(2048, 1024, device=DEV, dtype=torch.float16)
    eager = model(x)
    # aot_eager traces the whole graph through the op's fake implementation (fullgraph: no graph break)
    # without spending a minute compiling Triton kernels for the GELU
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=2e-3, atol=2e-3)


def test_threads_and_devices():
    lin = sparse_linear(1024, 1024, torch.float16)
    layer = SemiSparseLinear(lin)
    # searches in four threads at once, two of them at counts off the ladder (their search inputs are drawn
    # while another thread may be capturing a CUDA graph)
    xs = [torch.randn(m, 1024, device=DEV, dtype=torch.float16) for m in (1100, 2048, 3000, 4096)]
    errors = []

    def work(x):
        try:
            for _ in range(5):
                assert rel_err(layer(x), reference(lin, x)) < 2e-3
        except Exception as exc:  # noqa: BLE001 - report any failure from the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024, vocab_size=1000
    )
    model = BertForQuestionAnswering(cfg).eval()
    prune_24(model)
    return model


@pytest.mark.parametrize("keep_dense", [True, False])
def test_accelerate_24_model_logits(keep_dense):
    model = tiny_bert().to(DEV, torch.float16)
    fast = copy.deepcopy(model)
    report = accelerate_24(fast, keep_dense=keep_dense)
    assert len(report.accelerated) == 12 and not report.reason
    assert len(report.fused_residual) == 4  # attention output and feed-forward output, per layer
    assert report.fused_projections == [
        f"bert.encoder.layer.{i}.attention.self.query+key+value" for i in (0, 1)
    ]
    joined = [layer for layer in semi_sparse_layers(fast) if layer.out_features == 3 * 256]
    assert len(joined) == 2
    ids = torch.randint(0, 1000, (16, 128), device=DEV)
    with torch.inference_mode():
        ref = model(input_ids=ids)
        out = fast(input_ids=ids)
        for layer in joined:  # force the joined GEMMs onto the 2:4 kernel
            if keep_dense:
                layer.set_dispatch(16 * 128, True)
        sparse = fast(input_ids=ids)
    for name in ("start_logits", "end_logits"):
        assert rel_err(out[name], ref[name].double()) < 2e-3
        assert rel_err(sparse[name], ref[name].double()) < 2e-3
    assert all(layer.runs_sparse(16 * 128) for layer in joined)


def test_joined_projections_under_torch_compile_and_graphs():
    model = tiny_bert().to(DEV, torch.float16)
    fast = copy.deepcopy(model)
    accelerate_24(fast)
    ids = torch.randint(0, 1000, (8, 128), device=DEV)
    with torch.inference_mode():
        ref = model(input_ids=ids).start_logits.double()
    assert_compiled_and_replayed_match(fast, ids, ref)


def assert_compiled_and_replayed_match(fast, ids, ref):
    """`fast` under `torch.compile(fullgraph=True)` and replayed by `CUDAGraphedModel` (twice) gives `ref`'s
    start logits within 2e-3."""
    from hf_semisparse.kernels import CUDAGraphedModel

    with torch.inference_mode():
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")(input_ids=ids).start_logits
    assert rel_err(compiled, ref) < 2e-3
    graphed = CUDAGraphedModel(fast, tune=False)
    for _ in range(2):
        assert rel_err(graphed(input_ids=ids).start_logits, ref) < 2e-3


def test_plans_follow_the_module_when_it_moves():
    lin = sparse_linear(512, 512, torch.float16)
    layer = SemiSparseLinear(lin)
    x = torch.randn(256, 512, device=DEV, dtype=torch.float16)
    layer(x)
    layer.to(torch.device("cuda", 0))  # new bias storage: cached plans are dropped and rebuilt
    layer.bias.data = layer.bias.data.clone()
    layer._apply(lambda t: t)
    assert rel_err(layer(x), reference(lin, x)) < 2e-3


def test_fallbacks_say_why():
    model = tiny_bert()
    assert "cpu" in accelerate_24(model).reason
    assert "float32" in accelerate_24(model.to(DEV)).reason
    assert why_not_accelerated(DEV, torch.float16) is None
    dense = BertForQuestionAnswering(
        BertConfig(
            hidden_size=256,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=1024,
            vocab_size=1000,
        )
    ).to(DEV, torch.float16)
    assert "no linear layer is exactly 2:4" in accelerate_24(dense).reason


def test_cuda_graphed_model_replays_what_eager_computes():
    from hf_semisparse.kernels import CUDAGraphedModel

    model = tiny_bert().to(DEV, torch.float16)
    accelerate_24(model)
    graphed = CUDAGraphedModel(model, max_graphs=2, tune=False)
    for batch in (2, 8, 2, 4, 2):  # 2 and 8 captured; 4 pushes 8 out; 2 stays
        ids = torch.randint(0, 1000, (batch, 128), device=DEV)
        out = graphed(input_ids=ids)
        with torch.inference_mode():
            eager = model(input_ids=ids)
        for name in ("start_logits", "end_logits"):
            # the same kernels, replayed: as close as eager is to itself
            assert rel_err(out[name], eager[name].double()) < 1e-3, (batch, name)
    assert graphed.captures == 3 and len(graphed._graphs) == 2
    first = graphed(input_ids=torch.randint(0, 1000, (2, 128), device=DEV)).start_logits
    second = graphed(input_ids=torch.randint(0, 1000, (2, 128), device=DEV)).start_logits
    assert not torch.equal(first, second)  # outputs are copies, not the graph's buffers


def test_captured_attention_gets_a_mask_only_where_eager_does(monkeypatch, caplog):
    """An unpadded batch replays attention without a mask (SDPA's fused kernels, as eager); a padded one keeps its
    mask, in its own graph. Both replay what eager computes. Before transformers 5.18 an unpadded batch is captured
    with a full mask (transformers builds one under capture), and CUDAGraphedModel says so."""
    import transformers
    from packaging.version import Version

    from hf_semisparse.kernels import CUDAGraphedModel
    from hf_semisparse.kernels.graphs import MASK_SKIP_UNDER_CAPTURE

    skips_mask = Version(transformers.__version__) >= MASK_SKIP_UNDER_CAPTURE

    model = tiny_bert().to(DEV, torch.float16)
    accelerate_24(model)
    graphed = CUDAGraphedModel(model, tune=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    captured_masks = []

    def spy(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            captured_masks.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 1000, (4, 128), device=DEV)
    padded = torch.ones_like(ids)
    padded[1:, 100:] = 0
    for mask, expect_masked in ((torch.ones_like(ids), not skips_mask), (padded, True)):
        captured_masks.clear()
        for _ in range(2):  # capture, then replay
            out = graphed(input_ids=ids, attention_mask=mask)
        assert captured_masks == [expect_masked] * 2, captured_masks  # one capture, 2 layers
        assert skips_mask or "builds a full attention mask" in caplog.text
        with torch.inference_mode():
            eager = model(input_ids=ids, attention_mask=mask)
        for name in ("start_logits", "end_logits"):
            assert rel_err(out[name], eager[name].double()) < 1e-3, (expect_masked, name)
    assert graphed.captures == 2


def test_wrong_input_width_is_an_error():
    layer = SemiSparseLinear(sparse_linear(256, 512, torch.float16))
    with pytest.raises(ValueError, match="last dimension 512"):
        layer(torch.randn(4, 128, device=DEV, dtype=torch.float16))  # 512 elements: reshapes, but wrong


@pytest.mark.skipif(
    torch.cuda.get_device_capability() < (9, 0), reason="Segment-K needs compute capability 9.0"
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_segment_k_matches_float64_reference(dtype):
    n, k, m = 3072, 768, 1536
    lin = sparse_linear(n, k, dtype)
    handle = Handle(DEV)
    compressed = handle.compress(lin.weight.detach())
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    ran = 0
    for alg_id in (0, 1, 5, 6):
        for mode in (1, 2):
            try:
                plan = MatmulPlan(handle, n, k, m, dtype, bias=lin.bias, alg=AlgConfig(alg_id, -1, mode))
            except CusparseLtError:
                continue
            assert rel_err(run_poisoned(plan, compressed, x), reference(lin, x)) < TOL[dtype], (alg_id, mode)
            ran += 1
    assert ran  # Segment-K exists on this GPU, so at least one configuration must have run


def test_set_dispatch_switches_between_kernels():
    lin = sparse_linear(768, 768, torch.float16)
    layer = SemiSparseLinear(lin)
    x = torch.randn(4, 512, 768, device=DEV, dtype=torch.float16)
    with pytest.raises(KeyError, match="have not run"):
        layer.set_dispatch(2048, True)
    assert layer.runs_sparse(2048) is None
    layer(x)
    assert layer.token_counts() == [2048]
    for use_sparse in (True, False, True):
        layer.set_dispatch(2048, use_sparse)
        assert layer.runs_sparse(2048) is use_sparse
        assert rel_err(layer(x), reference(lin, x)) < 2e-3
    lean = SemiSparseLinear(lin, keep_dense=False)
    lean(x)
    with pytest.raises(ValueError, match="keep_dense=False"):
        lean.set_dispatch(2048, False)


def test_tune_dispatch_keeps_the_fastest_whole_forward():
    from hf_semisparse.kernels import tune_dispatch
    from hf_semisparse.kernels.model_dispatch import group_of

    model = tiny_bert().to(DEV, torch.float16)
    fast = copy.deepcopy(model)
    accelerate_24(fast)
    ids = torch.randint(0, 1000, (8, 128), device=DEV)
    report = tune_dispatch(fast, input_ids=ids)
    assert report.token_counts == [1024]
    layers = semi_sparse_layers(fast)  # the joined query/key/value layers too
    assert set(report.choice) == {group_of(layer) for layer in layers}
    for layer in layers:  # the choice is what runs now
        assert layer.runs_sparse(1024) is report.choice[group_of(layer)]
    # never kept unless it beat everything dense in the final comparison
    if any(report.choice.values()):
        assert report.timings["final: chosen"] < report.timings["final: all dense"]
    with torch.inference_mode():
        ref, out = model(input_ids=ids), fast(input_ids=ids)
    for name in ("start_logits", "end_logits"):
        assert rel_err(out[name], ref[name].double()) < 2e-3


def test_cuda_graphed_model_tunes_dispatch_per_signature():
    from hf_semisparse.kernels import CUDAGraphedModel
    from hf_semisparse.kernels.model_dispatch import group_of

    model = tiny_bert().to(DEV, torch.float16)
    fast = copy.deepcopy(model)
    accelerate_24(fast)
    graphed = CUDAGraphedModel(fast)
    ids = torch.randint(0, 1000, (8, 128), device=DEV)
    out = graphed(input_ids=ids)
    (report,) = graphed.reports.values()
    assert graphed.captures >= 2 and len(graphed._graphs) == 1
    for layer in semi_sparse_layers(fast):
        assert layer.runs_sparse(1024) is report.choice[group_of(layer)]
    again = graphed(input_ids=ids)  # replayed, no more tuning
    assert len(graphed.reports) == 1
    with torch.inference_mode():
        ref = model(input_ids=ids)
    for name in ("start_logits", "end_logits"):
        assert rel_err(out[name], ref[name].double()) < 2e-3
        assert torch.equal(out[name], again[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_residual_matches_float64_reference(dtype, monkeypatch):
    lin = sparse_linear(768, 3072, dtype)
    layer = SemiSparseLinear(lin, keep_dense=False)  # every call sparse
    x = torch.randn(4, 96, 3072, device=DEV, dtype=dtype)
    r = torch.randn(4, 96, 768, device=DEV, dtype=dtype)
    ref = reference(lin, x) + r.double()
    fused = []
    run = MatmulPlan.run

    def spy(self, *args, **kwargs):
        fused.append(kwargs.get("c") is not None)
        return run(self, *args, **kwargs)

    with torch.inference_mode():
        layer(x)  # decided and planned here (the search runs the plan many times)
        monkeypatch.setattr(MatmulPlan, "run", spy)
        # searches the epilogue's algorithm with r as C and times it against a separate add, once per shape
        layer(x, residual=r)
        pays = layer.adds_residual_in_epilogue(4 * 96)
        assert pays is not None and fused[-1] is pays  # the last run is the forward itself
        for forced in (True, False):  # both ways compute the same, within the tolerance
            layer.set_residual_epilogue(4 * 96, forced)
            y = layer(x, residual=r)
            assert fused[-1] is forced
            assert rel_err(y, ref) < TOL[dtype]
        layer.set_residual_epilogue(4 * 96, True)
        # a residual the kernel cannot read as C (not contiguous) is added after the GEMM, same result
        strided = r.transpose(0, 1).contiguous().transpose(0, 1)
        y2 = layer(x, residual=strided)
        assert fused[-1] is False
        assert rel_err(y2, ref) < TOL[dtype]
        # a padded token count (37 -> 48) is added after the GEMM too
        x37, r37 = x.reshape(-1, 3072)[:37], r.reshape(-1, 768)[:37]
        y3 = layer(x37, residual=r37)
        assert rel_err(y3, reference(lin, x37) + r37.double()) < TOL[dtype]


def test_load_state_dict_compresses_the_new_weights():
    lin = sparse_linear(512, 512, torch.float16)
    layer = SemiSparseLinear(lin)
    x = torch.randn(256, 512, device=DEV, dtype=torch.float16)
    layer(x)
    layer.set_dispatch(256, True)  # the 2:4 kernel, which reads the compressed copy
    other = sparse_linear(512, 512, torch.float16, seed=1)
    layer.load_state_dict(other.state_dict())
    assert rel_err(layer(x), reference(other, x)) < 2e-3


def test_plans_built_in_worker_threads_compute_the_layer():
    """`plan_threads.build_plans`: plans built by worker threads (a sibling handle each) run on this thread, every
    output element written and within tolerance of float64. With two GPUs or more, on the second one: the workers
    take the caller's device and leave the caller's current device as it was."""
    from hf_semisparse.kernels.plan_threads import build_plans

    index = 1 if torch.cuda.device_count() > 1 else 0
    torch.cuda.set_device(index)
    try:
        device = torch.device("cuda", index)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(1024, 512, generator=g) / 512**0.5
        lin = torch.nn.Linear(512, 1024).to(device, torch.float16)
        with torch.no_grad():
            lin.weight.copy_((w * compute_nm_mask(w)).to(device, torch.float16))
        handle = Handle(torch.device("cuda"))  # the current device
        specs = [
            {"n": 1024, "k": 512, "m": 64, "dtype": torch.float16, "bias": lin.bias, "alg": AlgConfig(i)}
            for i in range(SAFE_MAX_ALG_ID + 1)
        ]
        plans = build_plans(handle, specs, threads=4)
        assert torch.cuda.current_device() == index
        built = [p for p in plans if p is not None]
        assert built and any(p.handle is not handle for p in built)
        assert all(p.handle.device.index == index for p in built)
        compressed = handle.compress(lin.weight.detach())
        x = torch.randn(64, 512, device=device, dtype=torch.float16)
        ref = reference(lin, x)
        max_id = built[0].max_alg_id()  # ids above it are never run (search_alg drops them)
        for plan in built:
            if plan.selected_alg.alg_id <= max_id:
                out = torch.full((64, 1024), float("nan"), device=device, dtype=torch.float16)
                ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=device)
                plan.run(compressed, x, out, ws, torch.cuda.current_stream(device).cuda_stream)
                torch.cuda.synchronize(device)
                assert rel_err(out, ref) < TOL[torch.float16], plan.selected_alg
    finally:
        torch.cuda.set_device(0)


@pytest.mark.parametrize("keep_dense", [False, True])
def test_a_warm_up_searches_in_threads_and_the_layer_runs_plans_of_the_main_handle(monkeypatch, keep_dense):
    """Every size's candidates are built by worker threads; a prefill size's winner is built again on this
    thread's handle (`threads=1`) and, where a dense weight is kept, timed eagerly against it; the plans the
    layer keeps, and runs, are built on the backend's handle of this thread (plans from worker handles ran eager
    decode slower on an H200)."""
    from hf_semisparse.kernels import prepare_token_counts, tuning

    threads = {}
    real = tuning.build_plans

    def spy(handle, specs, **kwargs):
        threads.setdefault(specs[0]["m"], set()).add(kwargs.get("threads"))
        return real(handle, specs, **kwargs)

    monkeypatch.setattr(tuning, "build_plans", spy)
    lin = sparse_linear(2048, 1024, torch.float16)
    layer = SemiSparseLinear(lin, keep_dense=keep_dense)
    prepare_token_counts(torch.nn.Sequential(layer), max_tokens=1024, progress=False)
    # None: plan_threads(), the CPUs this process has
    assert threads[16] == {None} and threads[1024] == {None, 1}
    decisions = linear_mod.get_backend().cache._entries.values()
    assert decisions and all((d.dense_us is not None) == keep_dense for d in decisions)
    main = linear_mod.get_backend().handle(DEV)
    assert layer._plans and all(plan.handle is main for plan in layer._plans.values())
    for m in (1, 16, 100, 256, 700, 1024):
        x = torch.randn(m, 1024, device=DEV, dtype=torch.float16)
        with torch.inference_mode():
            assert rel_err(layer(x), reference(lin, x)) < TOL[torch.float16]


def _silu_mul_inputs(rows, dtype):
    """(n, y): joined outputs of Llama-3-8B's width (14336, whole blocks of the kernel's 1024 columns) and of
    Llama-2-7B's (11008: a masked last block), contiguous and as a column block of a wider buffer."""
    for n in (14336, 11008):
        wide = torch.randn(rows, 2 * n + 64, device=DEV, dtype=dtype) * 4
        yield n, wide[:, : 2 * n].contiguous()
        yield n, wide[:, : 2 * n]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 300, 2048])
def test_silu_mul_matches_torchs_two_ops(dtype, rows):
    """The gated MLP's one-pass SiLU product (`gated_mlp.silu_mul`, Triton) against float64 and against torch's
    `F.silu(gate) * up`, on a joined output and on a column block of a wider buffer (row stride > 2n)."""
    from hf_semisparse.kernels.gated_mlp import silu_mul

    for n, y in _silu_mul_inputs(rows, dtype):
        got = silu_mul(y)
        assert got.is_contiguous() and got.shape == (rows, n) and got.dtype == dtype
        exact = torch.nn.functional.silu(y[:, :n].double()) * y[:, n:].double()
        assert rel_err(got, exact) < (4e-3 if dtype == torch.bfloat16 else 5e-4)
        torch_ops = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
        assert rel_err(got, torch_ops.double()) < (4e-3 if dtype == torch.bfloat16 else 5e-4)


def test_a_gated_mlp_over_joined_projections_runs_its_silu_product_in_one_pass(monkeypatch):
    """A Llama with gate/up joined: at a prefill size its MLPs take `silu_mul` and give the model's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_semisparse.kernels import gated_mlp

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    model = LlamaForCausalLM(cfg).to(DEV, torch.float16).eval()
    prune_24(model, show_progress=False)
    fast = copy.deepcopy(model)
    report = accelerate_24(fast)
    assert len(report.fused_gated_mlps) == 2, report
    calls = []
    real = gated_mlp.silu_mul
    monkeypatch.setattr(gated_mlp, "silu_mul", lambda y: calls.append(y.shape) or real(y))
    ids = torch.randint(0, 1000, (2, 300), device=DEV)
    with torch.inference_mode():
        ref = model(input_ids=ids).logits.double()
        out = fast(input_ids=ids).logits
    assert calls == [(600, 2048)] * 2
    assert rel_err(out, ref) < 2e-3
