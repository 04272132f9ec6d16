"""The FP8 rows of the benchmarks on the CPU: `benchmarks/dense_fp8.py`'s math and refusals (its float32 emulation
and a stand-in for `torch._scaled_mm`), and `bench_generate.py --dtypes fp8` / `bench_inference.py --fp8`'s
arguments, JSON, ratios and tables with fake timings. Nothing here is timed; the GPU runs are in docs/guides/fp8.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_semisparse.kernels import cutlass_fp8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generate  # noqa: E402
import bench_inference  # noqa: E402
import dense_fp8  # noqa: E402
from dense_fp8 import DenseFp8Linear, to_dense_fp8  # noqa: E402


def linear(out_f=48, in_f=64, dtype=torch.bfloat16, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def activations(shape=(2, 5, 64), dtype=torch.bfloat16, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x = x * torch.logspace(-3, 2, shape[-2])[:, None]  # tokens of very different magnitudes
    x[0, 0] = 0.0  # an all-zero token: scale 1
    return x.to(dtype)


def tiny_llama(dtype=torch.bfloat16, layers=2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


# ------------------------------------------------------------------------------------------ DenseFp8Linear
@pytest.fixture(autouse=True)
def fast_accum_and_rng():
    """Each test starts, and leaves, with fast accumulation not refused; the global RNG is left as it was found
    (these tests seed it, and other files' unseeded draws must not depend on whether they ran)."""
    dense_fp8.FAST_ACCUM[0] = True
    with torch.random.fork_rng():
        yield
    dense_fp8.FAST_ACCUM[0] = True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_fp8_linear_is_the_fp8_formula(dtype):
    """Against a float64 reference of the documented formula, computed from first principles: per-channel and
    per-token absmax / 448, e4m3 codes, products of codes, both scales, the output dtype, then the bias."""
    lin = linear(dtype=dtype)
    layer = DenseFp8Linear(lin, emulate=True)

    def e4m3_rows(t):  # the documented steps, each one correctly rounded float32 operation
        t = t.float()
        amax = t.abs().amax(1)
        scale = torch.where(amax > 0, amax / torch.tensor(448.0), torch.tensor(1.0))
        inv = torch.tensor(1.0) / scale
        return (t * inv[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale

    codes_w, scale_w = e4m3_rows(lin.weight.detach())
    w = lin.weight.detach().double()
    torch.testing.assert_close(
        layer.weight_scale.reshape(-1).double(), w.abs().amax(1) / 448.0, rtol=2**-23, atol=0
    )
    assert torch.equal(layer.weight_scale.reshape(-1), scale_w)
    assert torch.equal(layer.weight_fp8.view(torch.uint8), codes_w.view(torch.uint8))

    x = activations(dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    codes_x, scale_x = e4m3_rows(x.reshape(-1, 64))
    acc = codes_x.double() @ codes_w.double().t() * scale_x.double()[:, None] * scale_w.double()[None, :]
    # rounded to the model dtype, then the bias added in it (after the GEMM, as `torch._scaled_mm` + bias)
    ref = (acc.to(dtype) + lin.bias.detach()).reshape(2, 5, 48)
    # float32 sums of exact products against float64 ones: one rounding of the output apart at most
    ulp = (2**-8 if dtype is torch.bfloat16 else 2**-11) * 2
    torch.testing.assert_close(y, ref, rtol=0, atol=ulp * ref.abs().max().item())
    assert (y != ref).float().mean() < 0.05
    assert (y[0, 0] == lin.bias.detach()).all()  # the all-zero token: the bias alone
    # and it is FP8: e4m3's 3 mantissa bits put it a few percent from the unquantised layer, not at bf16 rounding
    exact = F.linear(x.double(), w, lin.bias.detach().double())
    err = ((y.double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 6e-2, err


def test_dense_fp8_linear_calls_scaled_mm_as_torch_requires(monkeypatch):
    """The `torch._scaled_mm` path, run on the CPU with a stand-in that checks what torch's CUDA kernel requires:
    row-major e4m3 activations, a column-major e4m3 weight, float32 scales `[tokens, 1]` and `[1, out]`."""
    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
        m, k = a.shape
        n = b.shape[1]
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert a.is_contiguous() and b.shape == (k, n) and b.stride() == (1, k)  # column-major second operand
        assert scale_a.shape == (m, 1) and scale_b.shape == (1, n)
        assert scale_a.dtype == scale_b.dtype == torch.float32
        calls.append((m, k, n, out_dtype, use_fast_accum))
        return dense_fp8.emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    dense_fp8.FAST_ACCUM[0] = True
    layer = DenseFp8Linear(linear(), emulate=True)
    expected = layer(activations())
    layer.emulate = False  # the GPU path, with the stand-in
    assert torch.equal(layer(activations()), expected)
    assert calls == [(10, 64, 48, torch.bfloat16, True)]


@pytest.fixture
def cpu_scaled_mm(monkeypatch):
    """The CPU as the FP8 device: this torch's `torch._scaled_mm` runs e4m3 with rowwise scales on the CPU too
    (refused where it does not)."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16
        )
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm does not run on the CPU here: {exc}")
    monkeypatch.setattr(dense_fp8, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_the_real_scaled_mm_path_gives_the_emulated_result_and_compiles_without_graph_breaks(cpu_scaled_mm):
    model = tiny_llama()
    emulated = tiny_llama()
    report = to_dense_fp8(model, fused_quantizer=False)
    to_dense_fp8(emulated, emulate=True)
    assert len(report.converted) == 14 and report.fast_accum is True
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        logits = model(ids).logits
        ref = emulated(ids).logits
        # the same codes and scales; only the float32 summation order may differ, then bf16 rounding
        assert ((logits.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break would raise
        assert torch.equal(compiled(ids).logits, logits)


@pytest.mark.slow
def test_the_compiled_quantizer_writes_the_codes_of_quantize_rows(cpu_scaled_mm):
    """`fused_quantize_rows` (inductor, here on the CPU) against the torch ops one by one, on rows with ties, tiny
    values, zeros and -0.0: the same codes and scales (about 20 s of compiling on a small CPU)."""
    x = activations((3, 40, 64), dtype=torch.bfloat16).reshape(-1, 64)
    # absmax 448: scale 1, and the other values fall halfway between e4m3 neighbours (ties, to even)
    x[5] = torch.tensor([448, 272, 304, -272, 17, 19, 8.5, 9.5] * 8, dtype=torch.bfloat16)
    x[6] = (torch.randn(64) * 1e-37).to(torch.bfloat16)
    x[7, :3] = -0.0
    q, scale = dense_fp8.fused_quantize_rows(x)
    q_ref, scale_ref = cutlass_fp8.quantize_rows(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert q[5, :8].float().tolist() == [448, 256, 320, -256, 16, 20, 8, 10]
    layer = DenseFp8Linear(linear())
    assert layer.fused_quantizer and torch.equal(
        layer(x[None]), DenseFp8Linear(linear(), fused_quantizer=False)(x[None])
    )


def test_scaled_mm_falls_back_without_fast_accumulation_only_when_that_is_what_was_refused(
    monkeypatch, capsys
):
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    ones = torch.ones(16, 1)
    dense_fp8.FAST_ACCUM[0] = True

    def refuses_fast_accum(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
        if use_fast_accum:
            raise RuntimeError("use_fast_accum is not supported with rowwise scaling")
        return dense_fp8.emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", refuses_fast_accum)
    out = dense_fp8.scaled_mm(a, a.t(), ones, ones.t(), torch.bfloat16)
    assert (out == 16).all() and dense_fp8.FAST_ACCUM[0] is False
    assert "refused use_fast_accum=True" in capsys.readouterr().out

    dense_fp8.FAST_ACCUM[0] = True

    def refuses_everything(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
        raise ValueError(f"Only bf16 and fp16 high precision output types ({use_fast_accum})")

    monkeypatch.setattr(torch, "_scaled_mm", refuses_everything)
    with pytest.raises(ValueError, match=r"output types \(True\)"):  # the first error, not the retry's
        dense_fp8.scaled_mm(a, a.t(), ones, ones.t(), torch.float32)
    assert dense_fp8.FAST_ACCUM[0] is True  # not blamed on fast accumulation


def test_dense_fp8_linear_refuses_what_scaled_mm_cannot_take(monkeypatch):
    with pytest.raises(ValueError, match="dtype torch.float32"):
        DenseFp8Linear(linear(dtype=torch.float32), emulate=True)
    with pytest.raises(ValueError, match="shape 40x64.*multiples of 16"):
        DenseFp8Linear(linear(out_f=40), emulate=True)
    with pytest.raises(ValueError, match="on cpu: torch._scaled_mm runs on CUDA"):
        DenseFp8Linear(linear())
    with pytest.raises(ValueError, match="not nn.Linear"):
        DenseFp8Linear(nn.Embedding(16, 16), emulate=True)
    # a GPU without FP8 tensor cores (the CPU stands in for a CUDA device)
    monkeypatch.setattr(dense_fp8, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(ValueError, match="compute capability 8.6: FP8 tensor cores need 8.9"):
        DenseFp8Linear(linear())
    layer = DenseFp8Linear(linear(), emulate=True)
    with pytest.raises(TypeError, match="runs torch.bfloat16 activations, got torch.float16"):
        layer(activations(dtype=torch.float16))
    with pytest.raises(ValueError, match="last dimension 64"):
        layer(torch.zeros(3, 32, dtype=torch.bfloat16))


def test_dense_fp8_linear_takes_conv1d():
    from transformers.pytorch_utils import Conv1D

    lin = linear()
    conv = Conv1D(48, 64).to(torch.bfloat16)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    x = activations()
    assert torch.equal(DenseFp8Linear(conv, emulate=True)(x), DenseFp8Linear(lin, emulate=True)(x))


def test_to_dense_fp8_converts_what_accelerate_24_would_and_reports_the_rest():
    model = tiny_llama()
    report = to_dense_fp8(model, emulate=True)
    projections = [n for n, m in model.named_modules() if isinstance(m, DenseFp8Linear)]
    assert sorted(report.converted) == sorted(projections) and len(projections) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and "LM head" in report.skipped["lm_head"]
    assert "14 linear layers on dense FP8" in str(report)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    with_head = tiny_llama()
    assert "lm_head" in to_dense_fp8(with_head, include_lm_head=True, emulate=True).converted
    assert isinstance(with_head.lm_head, DenseFp8Linear)


def test_to_dense_fp8_leaves_task_heads_of_encoders():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128
    )
    model = BertForSequenceClassification(config).to(torch.bfloat16).eval()
    report = to_dense_fp8(model, emulate=True)
    assert sorted(name.split("layer.0.")[1] for name in report.converted) == sorted(
        ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
        + ["intermediate.dense", "output.dense"]
    )
    assert set(report.skipped) == {"bert.pooler.dense", "classifier"}  # as prune_24 leaves them dense
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (2, 8))).logits).all()


def test_to_dense_fp8_takes_named_targets_and_changes_nothing_on_error():
    model = tiny_llama()
    report = to_dense_fp8(model, targets=["model.layers.0.mlp.down_proj"], emulate=True)
    assert report.converted == ["model.layers.0.mlp.down_proj"]
    assert sum(isinstance(m, DenseFp8Linear) for m in model.modules()) == 1

    model = tiny_llama()
    with pytest.raises(ValueError, match="no module named 'model.layers.9.mlp'"):
        to_dense_fp8(model, targets=["model.layers.0.mlp.up_proj", "model.layers.9.mlp"], emulate=True)
    model.model.layers[1].mlp.down_proj = nn.Linear(128, 40).to(
        torch.bfloat16
    )  # 40 outputs: not a multiple of 16
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj: shape 40x128"):
        to_dense_fp8(
            model, targets=["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"], emulate=True
        )
    assert not any(isinstance(m, DenseFp8Linear) for m in model.modules())  # the first target untouched too
    report = to_dense_fp8(model, emulate=True)  # by default: skipped, with the reason
    assert "shape 40x128" in report.skipped["model.layers.1.mlp.down_proj"]


# ------------------------------------------------------------------------------------------ bench_generate
def test_bench_generate_arguments():
    args = bench_generate.parse_args(
        ["--dtypes", "fp8", "bf16", "fp8", "--batches", "1", "8", "--ttft", "1x2048"]
    )
    assert args.dtypes == ["fp8", "bf16"] and args.batches == [1, 8] and args.ttft == [(1, 2048)]
    assert bench_generate.DTYPES["fp8"] is torch.bfloat16  # fp8 runs three models built in bf16
    assert bench_generate.labels_of("fp8") == ("dense", "dense_fp8", "ours")
    assert bench_generate.labels_of("fp16") == ("dense", "ours")
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--dtypes", "int8"])
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--ttft", "2048"])


def test_ratios_against_dense_and_dense_fp8():
    row = {"compiled_dense_tokens_per_s": 100.0, "compiled_dense_fp8_tokens_per_s": 150.0}
    row["compiled_ours_tokens_per_s"] = 180.0
    bench_generate.add_ratios(row, "compiled_", ("dense", "dense_fp8", "ours"))
    assert row["compiled_speedup"] == pytest.approx(1.8)
    assert row["compiled_ours_vs_dense_fp8"] == pytest.approx(1.2)
    assert row["compiled_dense_fp8_vs_dense"] == pytest.approx(1.5)
    ttft = {"dense_ms": 60.0, "dense_fp8_ms": 40.0, "ours_ms": 30.0}
    bench_generate.add_ratios(ttft, "", ("dense", "dense_fp8", "ours"), field="ms")  # times: inverted
    assert ttft["speedup"] == pytest.approx(2.0)
    assert ttft["ours_vs_dense_fp8"] == pytest.approx(4 / 3)
    assert ttft["dense_fp8_vs_dense"] == pytest.approx(1.5)
    plain = {"eager_dense_tokens_per_s": 40.0, "eager_ours_tokens_per_s": 50.0}
    bench_generate.add_ratios(plain, "eager_", ("dense", "ours"))
    assert plain == {**plain, "eager_speedup": pytest.approx(1.25)} and "eager_ours_vs_dense_fp8" not in plain


RATES = {"dense": 100.0, "dense_fp8": 150.0, "ours": 180.0}  # tokens/s per sequence on the compiled path
TTFT_MS = {"dense": 60.0, "dense_fp8": 40.0, "ours": 30.0}


class FakeGPU:
    """What bench_generate does on a GPU, on the CPU: tiny models (labelled), generate and TTFT with fixed
    timings, logits that differ a little per model."""

    def __init__(self, monkeypatch, fp8_reason: str | None = None, fail: tuple = ()) -> None:
        self.built, self.generated, self.fail = [], [], fail  # fail: (label, compiled) pairs that raise
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(bench_generate, "DEVICE", "cpu")
        monkeypatch.setattr(bench_generate, "env_info", lambda: {"gpu": "NVIDIA H200 (fake)"})
        monkeypatch.setattr(bench_generate, "copy_bandwidth", lambda: 4e12)
        monkeypatch.setattr(bench_generate, "build_variants", self.build_variants)
        monkeypatch.setattr(bench_generate, "generate", self.generate)
        monkeypatch.setattr(bench_generate, "ttft_ms", lambda model, *a: TTFT_MS[model.label])
        # the FP8 kernels' own check, as on a GPU they cannot run on
        monkeypatch.setattr(cutlass_fp8, "why_unavailable", lambda device, dtype, n, k: fp8_reason)

    def build_variants(self, args, name, result):
        self.built.append(name)
        result.update(build_s=0.1, warmup_s=0.2, warmup="fake", accelerate_report="fake")
        models = {}
        for label in bench_generate.labels_of(name):
            model = tiny_llama(bench_generate.DTYPES[name], layers=1)
            if label == "dense_fp8":
                to_dense_fp8(model, emulate=True)
            model.label = label
            models[label] = model
        return models

    def generate(self, model, ids, new_tokens, compiled, scores=False):
        self.generated.append((model.label, ids.shape[0], compiled))
        if (model.label, compiled) in self.fail:
            raise RuntimeError(f"{model.label} cannot compile (fake)")
        g = torch.Generator().manual_seed(ids.shape[0])
        base = [torch.randn(ids.shape[0], 96, generator=g) * 10 for _ in range(new_tokens)]
        noise = {"dense": 0.0, "dense_fp8": 0.02, "ours": 0.03}[model.label]
        logits = [step + noise * torch.randn(step.shape, generator=g) for step in base]
        sequences = torch.cat([ids, torch.stack([step.argmax(-1) for step in logits], 1)], 1)
        out = SimpleNamespace(sequences=sequences, logits=logits) if scores else sequences
        rate = RATES[model.label] * ids.shape[0] * (1.0 if compiled else 0.25)
        return {
            "out": out,
            "tokens_per_s": rate,
            "first_step_ms": 1.0,
            "peak_bytes": 10,
            "peak_extra_bytes": 5,
        }


def run_generate(tmp_path, dtypes: list[str], batches=("1", "64")) -> tuple[dict, str]:
    out = tmp_path / "gen.json"
    argv = ["--layers", "1", "--dtypes", *dtypes, "--batches", *batches, "--eager-batches", "1"]
    argv += ["--prompt", "4", "--new-tokens", "6", "--ttft", "1x16", "--new-prompt", "7"]
    argv += ["--reference-batches", "--gemm-table", "--out", str(out)]
    bench_generate.main(argv)
    return json.loads(out.read_text())


def test_bench_generate_fp8_run_writes_three_models_ratios_and_accuracy(tmp_path, monkeypatch, capsys):
    fake = FakeGPU(monkeypatch)
    results = run_generate(tmp_path, ["fp8"])
    assert fake.built == ["fp8"] and "skipped" not in results
    (run,) = results["runs"]
    assert run["dtype"] == "fp8" and run["models"]["dense"] == "bf16"
    one, big = run["decode"]
    for label, rate in RATES.items():
        assert (
            one[f"compiled_{label}_tokens_per_s"] == rate
            and big[f"compiled_{label}_tokens_per_s"] == 64 * rate
        )
        assert one[f"eager_{label}_tokens_per_s"] == rate / 4
        assert one[f"compiled_{label}_first_call_s"] >= 0 and one[f"compiled_{label}_peak_bytes"] == 10
    assert "eager_speedup" not in big  # eager only for --eager-batches
    for row in (one, big):
        assert row["compiled_speedup"] == pytest.approx(1.8)
        assert row["compiled_ours_vs_dense_fp8"] == pytest.approx(1.2)
        assert row["compiled_dense_fp8_vs_dense"] == pytest.approx(1.5)
    # accuracy of both FP8 models against dense bf16: ours under the key fp16/bf16 runs use for ours
    ours, dfp8 = one["compiled_accuracy"], one["compiled_dense_fp8_accuracy"]
    assert 0 < dfp8["max_rel_error"] < ours["max_rel_error"] < 0.01  # the fake's noise: 0.02 and 0.03 of 10
    assert ours["steps_compared"] >= 1 and 0 <= ours["equal_tokens"] <= 1
    assert set(big["compiled_accuracy"]) == {"equal_tokens"}  # batch > 32: tokens only (no logits kept)
    (ttft,) = run["ttft"]
    assert ttft["speedup"] == pytest.approx(2.0) and ttft["ours_vs_dense_fp8"] == pytest.approx(4 / 3)
    assert set(run["weight_bytes"]) == set(run["linear_weight_bytes"]) == {"dense", "dense_fp8", "ours"}
    lb = run["linear_weight_bytes"]
    # one block's 7 projections: 2 bytes per bf16 weight, 1 per e4m3 weight plus 4 per output channel
    weights = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3
    outputs = 64 * 2 + 32 * 2 + 128 * 2 + 64
    assert lb["dense"] == 2 * weights and lb["dense_fp8"] == weights + 4 * outputs
    assert run["new_prompt_length_first_call_s_dense_fp8"] >= 0
    assert {(label, 1, True) for label in RATES} <= set(fake.generated)
    table = capsys.readouterr().out
    assert "| 1 | compiled | 100 | 150 | 180 | 1.80x | 1.20x | 1.50x |" in table
    assert "| 1 | eager | 25 | 38 | 45 | 1.80x | 1.20x | 1.50x |" in table
    assert "vs dense bf16 2.00x, vs dense FP8 1.33x" in table
    assert "dense FP8 weights" in table


def test_bench_generate_skips_fp8_with_the_reason_and_runs_the_other_dtypes(tmp_path, monkeypatch, capsys):
    reason = "the FP8 2:4 kernels are built for compute capability 9.0 (Hopper), this GPU is 8.0"
    fake = FakeGPU(monkeypatch, fp8_reason=reason)
    results = run_generate(tmp_path, ["bf16", "fp8"], batches=("1",))
    assert fake.built == ["bf16"]
    assert [run["dtype"] for run in results["runs"]] == ["bf16"]
    assert results["skipped"] == {"fp8": f"fp8 rows skipped: {reason}"}
    (row,) = results["runs"][0]["decode"]
    assert row["compiled_speedup"] == pytest.approx(1.8) and "compiled_ours_vs_dense_fp8" not in row
    assert {label for label, *_ in fake.generated} == {"dense", "ours"}
    out = capsys.readouterr().out
    assert out.count(reason) == 2  # said when skipping, and again with the tables
    assert "| 1 | 100 | 180 | 1.80x | 25 | 45 | 1.80x |" in out  # the bf16 table as before


def test_a_failing_baseline_loses_no_other_measurement(tmp_path, monkeypatch, capsys):
    FakeGPU(monkeypatch, fail=(("dense_fp8", True),))
    results = run_generate(tmp_path, ["fp8"], batches=("1",))
    (row,) = results["runs"][0]["decode"]
    assert "dense_fp8 cannot compile (fake)" in row["compiled_dense_fp8_error"]
    assert row["compiled_speedup"] == pytest.approx(1.8) and "compiled_ours_vs_dense_fp8" not in row
    assert "compiled_dense_fp8_accuracy" not in row and "max_rel_error" in row["compiled_accuracy"]
    assert row["eager_ours_vs_dense_fp8"] == pytest.approx(1.2)  # eager dense FP8 still ran
    out = capsys.readouterr().out
    assert "| 1 | compiled | dense_fp8 failed: RuntimeError('dense_fp8 cannot compile (fake)')" in out
    assert "| 1 | compiled | 100 | - | 180 | 1.80x | - | - |" in out


# ------------------------------------------------------------------------------------------ bench_inference
def test_bench_inference_fp8_ratios_and_table(capsys):
    row = {"model": "bert-base", "batch": 4, "seq": 384, "dtype": "bf16"}
    times = {"dense": 8.0, "dense-fp8": 6.0, "ours-fp8": 5.0, "dense+graphs": 6.0}
    times.update({"dense-fp8+graphs": 4.0, "ours-fp8+graphs": 3.0})
    for name, ms in times.items():
        row[name] = {
            "median_ms": ms,
            "rel_err": 0.0 if name.startswith("dense+") or name == "dense" else 0.03,
        }
    row["fp8_weight_bytes"] = {"dense": 2 * 2**20, "dense-fp8": 2**20, "ours-fp8": 2**19}
    bench_inference.fp8_ratios(row, graphs=True)
    assert row["ours-fp8_vs_dense"] == pytest.approx(1.6)
    assert row["ours-fp8_vs_dense-fp8"] == pytest.approx(1.2)
    assert row["dense-fp8_vs_dense"] == pytest.approx(8 / 6)
    assert row["ours-fp8+graphs_vs_dense+graphs"] == pytest.approx(2.0)
    assert row["ours-fp8+graphs_vs_dense-fp8+graphs"] == pytest.approx(4 / 3)
    skipped = {"model": "bert-large", "dtype": "bf16", "skipped": "bert-large: FP8 2:4 cannot run (test)"}
    bench_inference.print_fp8_table([row, skipped])
    out = capsys.readouterr().out
    assert "| bert-base | 4 | eager | 8.00 | 6.00 | 5.00 | 1.60x | 1.20x | 1.33x | 3.0e-02 | 3.0e-02 |" in out
    assert "| bert-base | 4 | graphs | 6.00 | 4.00 | 3.00 | 2.00x | 1.33x | 1.50x |" in out
    assert "FP8 rows skipped: bert-large: FP8 2:4 cannot run (test)" in out
    assert "dense 2.0 MiB, dense FP8 1.0 MiB, FP8 2:4 0.5 MiB" in out


def test_bench_inference_fp8_row_without_a_failed_variant(capsys):
    row = {"model": "bert-base", "batch": 16, "seq": 384, "dtype": "bf16"}
    row.update(dense={"median_ms": 9.0, "rel_err": 0.0}, **{"ours-fp8": {"median_ms": 6.0, "rel_err": 0.03}})
    row["dense-fp8_error"] = "RuntimeError('no rowwise _scaled_mm (fake)')"
    row["fp8_weight_bytes"] = {"dense": 2**20, "dense-fp8": 2**19, "ours-fp8": 2**18}
    bench_inference.fp8_ratios(row, graphs=True)
    assert row["ours-fp8_vs_dense"] == pytest.approx(1.5)
    assert not any("dense-fp8" in key and key.endswith("dense") for key in row if "_vs_" in key)
    assert "ours-fp8_vs_dense-fp8" not in row and "ours-fp8+graphs_vs_dense+graphs" not in row
    bench_inference.print_fp8_table([row])
    out = capsys.readouterr().out
    assert (
        "| bert-base | 16 | eager | dense-fp8 failed: RuntimeError('no rowwise _scaled_mm (fake)') |" in out
    )
    assert "| bert-base | 16 | eager | 9.00 | - | 6.00 | 1.50x | - | - | - | 3.0e-02 |" in out


def test_bench_inference_fp8_shapes_and_skip_reasons(monkeypatch):
    seen = []

    def why_unavailable(device, dtype, n, k):
        seen.append((n, k))
        return None if k % 256 == 0 else f"shape {n}x{k}: needs in_features % 256 == 0"

    monkeypatch.setattr(cutlass_fp8, "why_unavailable", why_unavailable)
    # BERT-base (768 = 3 x 256) and BERT-large (1024) shapes all fit the FP8 kernels
    assert bench_inference.fp8_skip_reason("bert-base", torch.bfloat16) is None
    assert bench_inference.fp8_skip_reason("bert-large", torch.bfloat16) is None
    assert seen[:3] == [(768, 768), (3072, 768), (768, 3072)]
    monkeypatch.setitem(
        bench_inference.MODELS,
        "narrow",
        dict(hidden_size=576, num_hidden_layers=1, num_attention_heads=9, intermediate_size=1536),
    )
    assert bench_inference.fp8_skip_reason("narrow", torch.bfloat16) == (
        "narrow: FP8 2:4 cannot run its 576x576 layers: shape 576x576: needs in_features % 256 == 0"
    )


def test_bench_inference_fp8_skips_each_model_with_its_reason(monkeypatch, capsys):
    monkeypatch.setattr(cutlass_fp8, "why_unavailable", lambda device, dtype, n, k: "not built in /nowhere")
    saved = []
    args = SimpleNamespace(models=["bert-base", "bert-large"], fp8_dtype="bf16")
    rows = bench_inference.bench_fp8_models(args, saved.append)
    assert [r["skipped"] for r in rows] == [
        "bert-base: FP8 2:4 cannot run its 768x768 layers: not built in /nowhere",
        "bert-large: FP8 2:4 cannot run its 1024x1024 layers: not built in /nowhere",
    ]
    assert saved[-1] == rows and "FP8 rows skipped: bert-base" in capsys.readouterr().out


def test_reference_error_lines_decode_steps_up_with_the_teacher_forced_positions():
    """`dense_vs_itself` (and the float32 comparison) read the logits of position p for the token at p + 1: a model
    against itself in float32 agrees to rounding, and a one-position shift would not."""
    model = tiny_llama(torch.float32, layers=2)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            attention_mask=torch.ones_like(ids),
            pad_token_id=0,
        )
    same = bench_generate.reference_error(model, out.sequences, out.logits, prompt=5, steps=4)
    assert same["max_rel_error"] < 1e-5
    shifted = bench_generate.reference_error(model, out.sequences, out.logits[1:] + out.logits[:1], 5, 4)
    assert shifted["median_rel_error"] > 0.1


def test_the_dense_models_spread_against_itself_is_reported_for_reference_batches(tmp_path, monkeypatch):
    FakeGPU(monkeypatch)
    out = tmp_path / "gen.json"
    argv = ["--layers", "1", "--dtypes", "bf16", "--batches", "1", "--eager-batches", "--prompt", "4"]
    argv += ["--new-tokens", "6", "--ttft", "--reference-batches", "1", "--gemm-table", "--out", str(out)]
    bench_generate.main(argv)
    accuracy = json.loads(out.read_text())["runs"][0]["decode"][0]["compiled_accuracy"]
    assert set(accuracy["vs_fp32"]) == {"dense", "ours"}
    itself = accuracy["dense_vs_itself"]
    assert itself["values"] == 5  # dense's own 6 steps but the first, whatever ours agreed on
    assert itself["median_rel_error"] > 0  # the fake's logits are not the model's


def test_sparse_lm_head_prunes_the_head_too(monkeypatch):
    monkeypatch.setattr(
        bench_generate,
        "LLAMA3_8B",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 96,
        },
    )
    monkeypatch.setattr(bench_generate, "DEVICE", "cpu")
    assert bench_generate.parse_args(["--sparse-lm-head"]).sparse_lm_head
    for sparse in (False, True):
        model = bench_generate.build_model(1, torch.float32, sparse_lm_head=sparse)
        head = model.lm_head.weight.view(-1, 4)
        assert bool(((head != 0).sum(-1) <= 2).all()) is sparse
        assert bool(((model.model.layers[0].mlp.up_proj.weight.view(-1, 4) != 0).sum(-1) <= 2).all())


def test_reference_error_can_leave_out_the_first_steps():
    model = tiny_llama(torch.float32, layers=1)
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    sequences = torch.cat([ids, torch.tensor([[5, 6, 7]])], 1)
    with torch.no_grad():
        ref = model(sequences[:, :7]).logits[0, 4:]  # the logits of steps 0, 1 and 2
    logits = [torch.randn(1, 96) * 100, ref[1:2].clone(), ref[2:3].clone()]  # step 0 far off, then exact
    assert bench_generate.reference_error(model, sequences, logits, 5, 3)["max_rel_error"] > 0.5
    assert (
        bench_generate.reference_error(model, sequences, logits, 5, 3, first_step=1)["max_rel_error"] < 1e-6
    )
