"""Unmerged LoRA serving: `accelerate_24` on a PEFT model puts the 2:4 base layers on our kernels, the adapters stay.

cuSPARSELt cannot run on this CPU machine. Stand-ins: the `backend` fixture (tests/conftest.py) "compresses" by
copying the weight, `accelerate_24` is told the CPU is the kernels' device, and a 2:4 layer's GPU call becomes a
GEMM with its compressed copy, so a layer that kept no dense weight still computes from what it holds. What is
tested is the logic around the kernels: which layers are replaced and how they are named, that masked adapters
take their mask from what was kept (the dense weight is gone), refusals, and that nothing changes on an error.
tests/gpu/check_lora_gpu.py checks the same on real kernels.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers

from hf_semisparse import kernels, prune_24
from hf_semisparse.kernels.linear import SemiSparseLinear, _finish
from hf_semisparse.lora_serving import MASK_BITS, MergeOnKernelsError, pack_mask, unpack_mask
from tests.conftest import make_model

peft = pytest.importorskip("peft")
from hf_semisparse.lora import mask_lora, merge_sparse_lora  # noqa: E402

DTYPE = torch.bfloat16
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],  # transformers' Conv1D
    "bert": ["query", "value", "intermediate.dense"],  # an encoder: fused residual adds beside the adapters
}


@pytest.fixture
def kernels_on_cpu(backend, monkeypatch):
    monkeypatch.setattr(kernels, "why_not_accelerated", lambda device, dtype: None)
    monkeypatch.setattr(kernels, "KERNEL_DEVICE_TYPE", "cpu")

    def from_compressed(self, x, key, plan, residual=None, gelu=False):
        # the stand-in's compressed buffer is the [out, in] weight itself: never the dense `weight` attribute
        return _finish(F.linear(x, self._c, self._b), residual, gelu)

    monkeypatch.setattr(SemiSparseLinear, "_dispatch", from_compressed)
    return backend


def served(arch, masked=True, adapters=("default",)):
    """A 2:4 `arch` model in bf16 with random (nonzero) LoRA adapters on some 2:4 layers, in eval mode."""
    model = make_model(arch, **({"attention_dropout": 0.0} if arch == "llama" else {}))
    model.eval()
    prune_24(model, show_progress=False)
    model = model.to(DTYPE)
    peft_model = None
    for i, name in enumerate(adapters):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=LORA_TARGETS[arch],
            init_lora_weights=False,  # B is random, not zero: the adapter path changes the output
            fan_in_fan_out=arch == "gpt2",
        )
        if peft_model is None:
            peft_model = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    if masked:
        assert mask_lora(peft_model)
    return peft_model.eval()


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def lora_layers(model):
    from peft.tuners.lora.layer import Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear)}


IDS = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(0))


def test_mask_bits_round_trip():
    mask = torch.rand(24, 64) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 8)  # 1 bit per weight
    assert torch.equal(unpack_mask(packed), mask)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_mask(torch.ones(4, 12, dtype=torch.bool))


@pytest.mark.parametrize("keep_dense", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_masked_lora_serves_unmerged_on_kernel_bases(arch, keep_dense, kernels_on_cpu):
    model = served(arch)
    expected = logits(model, IDS)
    with model.disable_adapter():
        base_only = logits(model, IDS)
    assert (expected - base_only).float().norm() > 1e-2 * base_only.float().norm()  # the adapters matter
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}

    report = kernels.accelerate_24(model, keep_dense=keep_dense)

    layers = lora_layers(model)
    names = {n.split("base_model.model.", 1)[1] for n in layers}
    assert names <= set(report.accelerated)  # plain-model names, no "base_layer"
    assert not any("base_layer" in n or "lora_" in n for n in report.accelerated)
    assert not any("lora_" in n for n in report.skipped)  # the adapters are never candidates
    if arch == "bert":  # the output blocks' dense layers carry no adapter: their residual add is fused
        assert len(report.fused_residual) == 4
    for layer in layers.values():
        base = layer.get_base_layer()
        assert isinstance(base, SemiSparseLinear)
        assert (base.weight is None) is not keep_dense
        bits = layer._buffers[MASK_BITS]
        assert bits.dtype == torch.uint8 and bits.numel() * 8 == base.out_features * base.in_features
    assert {n: p for n, p in model.named_parameters() if "lora_" in n} == adapters  # the very same tensors
    torch.testing.assert_close(logits(model, IDS), expected, atol=0, rtol=0)


def test_mixed_adapter_batches_on_kernel_bases(kernels_on_cpu):
    """Several adapters on one accelerated base, chosen per sample (PEFT's `adapter_names`)."""
    model = served("llama", adapters=("first", "second"))
    choice = ["first", "second"]
    expected = logits(model, IDS, adapter_names=choice)
    model.set_adapter("second")
    only_b = logits(model, IDS)
    kernels.accelerate_24(model, keep_dense=False)
    torch.testing.assert_close(logits(model, IDS, adapter_names=choice), expected, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, IDS), only_b, atol=0, rtol=0)
    assert (expected[0] - only_b[0]).abs().max() > 1e-2  # sample 0 did run adapter "first"


@pytest.mark.parametrize("keep_dense", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("safe_merge", [True, False])
def test_merging_into_kernel_bases_is_refused_and_changes_nothing(
    masked, safe_merge, keep_dense, kernels_on_cpu
):
    model = served("llama", masked=masked)
    kernels.accelerate_24(model, keep_dense=keep_dense)  # with a dense copy too: no merge may touch it
    expected = logits(model, IDS)
    before = {n: m.get_base_layer().compressed.clone() for n, m in lora_layers(model).items()}
    # refused by the layer's own `merge`, before PEFT's safe merge copies a (possibly absent) dense weight
    refused, match = MergeOnKernelsError, r"model\.layers\.0\.self_attn\.q_proj.*merge_sparse_lora"
    with pytest.raises(refused, match=match):
        model.merge_and_unload(safe_merge=safe_merge)
    with pytest.raises(refused):
        model.merge_adapter(safe_merge=safe_merge)
    with pytest.raises(MergeOnKernelsError, match="Nothing was merged"):
        merge_sparse_lora(model)
    assert isinstance(model, peft.PeftModel)
    for name, layer in lora_layers(model).items():
        assert not layer.merged, name
        assert torch.equal(layer.get_base_layer().compressed, before[name]), name
    torch.testing.assert_close(logits(model, IDS), expected, atol=0, rtol=0)


def test_plain_lora_on_kernel_bases_computes_as_before(kernels_on_cpu):
    model = served("llama", masked=False)
    expected = logits(model, IDS)
    kernels.accelerate_24(model, keep_dense=False)
    assert not any(MASK_BITS in m._buffers for m in lora_layers(model).values())  # nothing to mask: no bits
    torch.testing.assert_close(logits(model, IDS), expected, atol=0, rtol=0)


def test_merged_adapter_is_refused_before_anything_changes(kernels_on_cpu):
    model = served("llama")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"q_proj has the adapters \['default'\] merged.*unmerge_adapter"):
        kernels.accelerate_24(model)
    assert not any(isinstance(m, SemiSparseLinear) for m in model.modules())
    assert not any(MASK_BITS in m._buffers for m in model.modules())
    model.unmerge_adapter()  # still possible: nothing was refused on the way
    kernels.accelerate_24(model)


def test_non_lora_adapter_on_a_24_layer_is_refused(kernels_on_cpu):
    model = make_model("llama")
    prune_24(model, show_progress=False)
    model = peft.get_peft_model(
        model.to(DTYPE),
        peft.IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.(up|down)_proj carries a peft\.tuners\.ia3\.layer\.Linear adapter",
    ):
        kernels.accelerate_24(model)
    assert not any(isinstance(m, SemiSparseLinear) for m in model.modules())


def test_adapter_added_after_acceleration_is_masked_with_the_kept_mask(kernels_on_cpu):
    """`load_adapter`/`add_adapter` after `accelerate_24`: `mask_lora` finds the kept mask (no dense weight)."""
    model = served("llama")
    kernels.accelerate_24(model, keep_dense=False)
    torch.manual_seed(7)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"], init_lora_weights=False)
    model.add_adapter("late", cfg)
    assert sorted(mask_lora(model)) == sorted(n.split("base_model.model.", 1)[1] for n in lora_layers(model))
    model.set_adapter("late")
    layer = next(iter(lora_layers(model).values()))
    x = torch.randn(3, layer.in_features, dtype=DTYPE)
    with torch.no_grad():
        update = layer(x) - layer.get_base_layer()(x)
    mask = unpack_mask(layer._buffers[MASK_BITS])
    delta = layer.lora_B["late"].weight.float() @ layer.lora_A["late"].weight.float() * layer.scaling["late"]
    masked, unmasked = x.float() @ (delta * mask).t(), x.float() @ delta.t()
    torch.testing.assert_close(update.float(), masked, atol=0.05, rtol=0.02)  # bf16 outputs
    assert (update.float() - unmasked).abs().max() > 0.5  # and not the unmasked update


def test_unload_keeps_the_base_on_kernels(kernels_on_cpu):
    model = served("llama")
    with model.disable_adapter():
        base_only = logits(model, IDS)
    kernels.accelerate_24(model, keep_dense=False)
    plain = model.unload()  # adapters dropped, nothing merged
    assert not lora_layers(plain)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, SemiSparseLinear)
    torch.testing.assert_close(logits(plain, IDS), base_only, atol=0, rtol=0)


def test_a_plain_adapter_added_after_acceleration_cannot_be_merged_either(kernels_on_cpu):
    model = served("llama", masked=False)
    kernels.accelerate_24(model, keep_dense=True)  # a dense copy that a merge would change, the kernels not
    torch.manual_seed(7)
    model.add_adapter("late", peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    before = {n: m.get_base_layer().weight.clone() for n, m in lora_layers(model).items()}
    for safe_merge in (True, False):
        with pytest.raises(MergeOnKernelsError, match="Nothing was merged"):
            model.merge_and_unload(safe_merge=safe_merge, adapter_names=["late"])
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, before[name]), name


def test_dora_on_a_24_layer_is_refused_before_anything_changes(kernels_on_cpu):
    model = make_model("llama").eval()
    prune_24(model, show_progress=False)
    model = peft.get_peft_model(
        model.to(DTYPE), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    with pytest.raises(
        ValueError, match=r"q_proj carries the adapter 'default' with the LoRA variant DoraLinear"
    ):
        kernels.accelerate_24(model)
    assert not any(isinstance(m, SemiSparseLinear) for m in model.modules())


def test_adapters_attached_by_transformers_own_peft_integration_are_served(kernels_on_cpu):
    model = make_model("llama", attention_dropout=0.0).eval()
    prune_24(model, show_progress=False)
    model = model.to(DTYPE)
    torch.manual_seed(3)
    try:
        model.add_adapter(
            peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        )
    except ValueError as exc:  # transformers 5.24 wants peft >= 0.22; .ci/older_transformers (5.17) runs this
        if "version of PEFT" not in str(exc):
            raise
        pytest.skip(f"transformers {transformers.__version__} refuses peft {peft.__version__}: {exc}")
    assert mask_lora(model)
    ids = IDS
    expected = logits(model, ids)
    report = kernels.accelerate_24(model)
    assert report.ok and "model.layers.0.self_attn.q_proj" in report.accelerated, report
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, SemiSparseLinear) and MASK_BITS in layer._buffers
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)
    with pytest.raises(MergeOnKernelsError):
        layer.merge()
