"""SiLU-gated MLPs over joined gate/up projections (`kernels/gated_mlp.py`), on the CPU.

The Triton kernel itself runs on a GPU (tests/gpu/check_kernels_gpu.py); here `silu_mul` is replaced by torch's
two ops and the device check is lifted, so what is tested is which MLPs take the fused forward, when it is taken,
and that it computes what the model's own forward computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_semisparse import prune_24
from hf_semisparse.kernels import gated_mlp
from hf_semisparse.kernels.projections import fuse_projections
from tests.conftest import make_model


def _joined_llama():
    model = make_model("llama").eval()
    prune_24(model, show_progress=False)
    reference = copy.deepcopy(model)
    names = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    fuse_projections(model, names)
    return model, reference


@pytest.fixture(autouse=True)
def triton_present(monkeypatch):
    """Triton taken as installed (CPU builds of torch come without it; the kernel itself is replaced where it
    would run), and no failure of it remembered from another test."""
    if gated_mlp.triton is None:
        monkeypatch.setattr(gated_mlp, "triton", object())
    monkeypatch.setattr(gated_mlp, "_GAVE_UP", [])


@pytest.fixture
def fused_on_cpu(backend, monkeypatch):
    """The fused forward's device check lifted, and `silu_mul` counted and computed by torch."""
    calls = []

    def silu_mul(y):
        calls.append(tuple(y.shape))
        n = y.shape[1] // 2
        return F.silu(y[:, :n]) * y[:, n:]

    monkeypatch.setattr(gated_mlp, "_runs_triton", lambda x: True)
    monkeypatch.setattr(gated_mlp, "silu_mul", silu_mul)
    return calls


def test_gated_mlps_over_joined_projections_take_the_fused_forward(fused_on_cpu):
    model, reference = _joined_llama()
    fused = gated_mlp.fuse_gated_mlps(model)
    layers = len(model.model.layers)
    assert fused == [f"model.layers.{i}.mlp" for i in range(layers)]
    hidden = model.config.intermediate_size
    ids = torch.randint(3, 100, (2, 150))  # 300 tokens per GEMM: a prefill size
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert fused_on_cpu == [(300, 2 * hidden)] * layers  # one pass per MLP over the joined output


@pytest.mark.parametrize("case", ["decode size", "compiling", "hooked", "separate"])
def test_the_models_own_forward_runs_where_the_fused_one_does_not_apply(fused_on_cpu, monkeypatch, case):
    model, reference = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)
    ids = torch.randint(3, 100, (2, 150))
    if case == "decode size":
        ids = ids[:, :100]  # 200 tokens
    elif case == "compiling":
        monkeypatch.setattr(gated_mlp, "_is_compiling", lambda: True)
    elif case == "hooked":  # a hook on a projection (activation capture) must still see its call
        seen = []
        model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    else:
        model.model.layers[0].mlp.gate_proj.group.separate = True
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    if case == "hooked":
        assert seen and len(fused_on_cpu) == len(model.model.layers) - 1
    elif case == "separate":
        assert len(fused_on_cpu) == len(model.model.layers) - 1
    else:
        assert not fused_on_cpu


def test_only_silu_gated_mlps_of_one_joined_group_are_fused(backend):
    model, _ = _joined_llama()
    model.model.layers[0].mlp.act_fn = nn.GELU()  # another activation: the model's forward stays
    fused = gated_mlp.fuse_gated_mlps(model)
    assert "model.layers.0.mlp" not in fused and len(fused) == len(model.model.layers) - 1

    class OtherMLP(nn.Module):  # same children, another formula
        def __init__(self, mlp):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
                mlp.gate_proj,
                mlp.up_proj,
                mlp.down_proj,
                mlp.act_fn,
            )

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    other = _joined_llama()[0]
    other.model.layers[1].mlp = OtherMLP(other.model.layers[1].mlp)
    assert "model.layers.1.mlp" not in gated_mlp.fuse_gated_mlps(other)
    bert = make_model("bert")
    prune_24(bert, show_progress=False)
    fuse_projections(bert, {name for name, m in bert.named_modules() if type(m) is nn.Linear})
    assert gated_mlp.fuse_gated_mlps(bert) == []


def test_silu_mul_refuses_what_it_cannot_take(monkeypatch):
    for bad in (torch.zeros(4), torch.zeros(4, 5), torch.zeros(6, 4).t()):
        with pytest.raises(ValueError, match=r"\[rows, 2n\]"):
            gated_mlp.silu_mul(bad)
    monkeypatch.setattr(gated_mlp, "triton", None)
    with pytest.raises(RuntimeError, match="Triton"):
        gated_mlp.silu_mul(torch.zeros(4, 8))


def test_the_warm_up_runs_the_kernel_once_per_dtype_and_device(fused_on_cpu, monkeypatch):
    model, _ = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)
    monkeypatch.setattr(gated_mlp, "_runs_triton", lambda x: x.is_cuda)  # as with Triton installed
    assert gated_mlp.compile_silu_mul(model) == 0  # CPU weights: nothing to compile
    monkeypatch.setattr(gated_mlp, "_runs_triton", lambda x: True)
    assert gated_mlp.compile_silu_mul(model) == 1  # two MLPs of one dtype and device: one run
    assert fused_on_cpu == [(1, 2 * model.config.intermediate_size)]


def test_compiled_models_trace_the_models_own_forward(fused_on_cpu):
    model, reference = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(3, 100, (2, 150))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not fused_on_cpu  # inductor fuses the SiLU product itself


@pytest.mark.parametrize("tokens, fused", [(256, False), (257, True)])
def test_the_fused_forward_starts_above_the_decode_sizes(fused_on_cpu, tokens, fused):
    model, reference = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)
    ids = torch.randint(3, 100, (1, tokens))
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert bool(fused_on_cpu) is fused


def test_a_global_forward_hook_takes_the_models_forward(fused_on_cpu):
    model, reference = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    try:
        with torch.inference_mode():
            model(input_ids=torch.randint(3, 100, (1, 300)))
    finally:
        handle.remove()
    assert not fused_on_cpu  # the hook sees every module, the activation too
    assert any("SiLU" in name for name in seen)


def test_hooks_on_the_activation_and_inputs_that_need_a_gradient_take_the_models_forward(fused_on_cpu):
    model, reference = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)
    seen = []
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    ids = torch.randint(3, 100, (1, 300))
    with torch.inference_mode():
        model(input_ids=ids)
    assert seen and len(fused_on_cpu) == len(model.model.layers) - 1
    fused_on_cpu.clear()
    out = model(input_ids=ids).logits  # autograd on: silu_mul has no backward
    out.sum().backward()
    assert not fused_on_cpu and model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_a_failing_kernel_sends_the_mlps_back_to_their_own_forward_for_good(backend, monkeypatch, caplog):
    model, reference = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)
    monkeypatch.setattr(gated_mlp, "_runs_triton", lambda x: True)
    tried = []

    def broken(y):
        tried.append(y.shape)
        raise RuntimeError("no C compiler for Triton's launcher (fake)")

    monkeypatch.setattr(gated_mlp, "silu_mul", broken)
    ids = torch.randint(3, 100, (1, 300))
    with torch.inference_mode(), caplog.at_level("WARNING"):
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert len(tried) == 1  # once in the process, not once per MLP or per call
    assert caplog.text.count("one-pass SiLU product of gated MLPs failed") == 1
    assert gated_mlp.fuse_gated_mlps(_joined_llama()[0]) == []  # nor given to models accelerated later
    monkeypatch.setattr(gated_mlp, "_GAVE_UP", [])
    other, _ = _joined_llama()
    gated_mlp.fuse_gated_mlps(other)
    monkeypatch.setattr(gated_mlp, "_runs_triton", lambda x: True)
    assert gated_mlp.compile_silu_mul(other) == 0  # the warm-up's run failed: every MLP unfused
    assert all("forward" not in layer.mlp.__dict__ for layer in other.model.layers)


def test_out_of_memory_is_raised_not_taken_for_a_broken_kernel(fused_on_cpu, monkeypatch):
    model, _ = _joined_llama()
    gated_mlp.fuse_gated_mlps(model)

    def out_of_memory(y):
        raise torch.OutOfMemoryError("fake")

    monkeypatch.setattr(gated_mlp, "silu_mul", out_of_memory)
    with torch.inference_mode(), pytest.raises(torch.OutOfMemoryError):
        model(input_ids=torch.randint(3, 100, (1, 300)))
    assert not gated_mlp._GAVE_UP


def test_without_triton_no_mlp_is_given_the_fused_forward(backend, monkeypatch):
    monkeypatch.setattr(gated_mlp, "triton", None)
    model, _ = _joined_llama()
    assert gated_mlp.fuse_gated_mlps(model) == []
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)


def test_unfuse_and_mlps_patched_by_someone_else(backend):
    model, _ = _joined_llama()
    mine = lambda x: x  # noqa: E731 - an instance forward put there by another library
    model.model.layers[0].mlp.forward = mine
    fused = gated_mlp.fuse_gated_mlps(model)
    assert "model.layers.0.mlp" not in fused and model.model.layers[0].mlp.forward is mine
    assert gated_mlp.unfuse_gated_mlps(model) == fused and model.model.layers[0].mlp.forward is mine
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers[1:])


@pytest.mark.parametrize(
    "body, fused",
    [
        ("return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))", True),
        ("out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return out", True),
        ("return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2", False),
        (
            "h = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return F.dropout(h)",
            False,
        ),
        ("return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))", False),
        ("@decorated", False),
    ],
)
def test_the_mlps_forward_is_read_whole(body, fused, tmp_path, monkeypatch):
    import importlib.util

    path = tmp_path / "mlp_under_test.py"
    decorator = ""
    if body == "@decorated":  # a decorator may change what the forward computes
        decorator, body = (
            "    @staticmethod\n",
            "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
        )
    path.write_text(
        "import torch.nn.functional as F\nfrom torch import nn\n\n\nclass MLP(nn.Module):\n"
        f"{decorator}    def forward(self, hidden_state):\n        {body.replace('(x)', '(hidden_state)')}\n"
    )
    spec = importlib.util.spec_from_file_location("mlp_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mlp = module.MLP()
    mlp.act_fn = nn.SiLU()
    assert gated_mlp._is_gated_silu_mlp(mlp) is fused
