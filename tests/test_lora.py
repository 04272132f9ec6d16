"""LoRA on 2:4 models: PEFT-wrapped targets, masked adapter updates, exact merges, saving and loading."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_semisparse import (
    AutoSparseModel,
    NoTargetsError,
    SparsityCallback,
    SparsityConfig,
    SparsityTrainer,
    is_nm_sparse,
    prune_24,
    save_sparse_pretrained,
    select_targets,
)
from hf_semisparse.errors import SparseCheckpointError
from tests.conftest import ToyDataset, assert_targets_24, make_model, training_args

peft = pytest.importorskip("peft")
from hf_semisparse.lora import (  # noqa: E402
    MaskedLoraVariant,
    UnmaskableAdapterError,
    load_sparse_lora,
    mask_lora,
    merge_sparse_lora,
)

LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "bert": ["query", "value", "intermediate.dense"],
    "gpt2": ["c_attn", "c_fc"],  # transformers' Conv1D
}


def lora_model(arch, **lora_kwargs):
    model = make_model(arch, **({"attention_dropout": 0.0} if arch == "llama" else {}))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], **lora_kwargs)
    return model, peft.get_peft_model(model, cfg)


def batch_of(arch, n=4):
    batch = torch.utils.data.default_collate([ToyDataset(arch)[i] for i in range(n)])
    batch.pop("labels")
    return batch


def pruned_reference(arch):
    """The base model as the trainer should leave it: magnitude 2:4 on the same initial weights."""
    model = make_model(arch)
    prune_24(model, show_progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_lora_result(arch, peft_model, reference):
    """Base unchanged but for the 2:4 zeros; adapters trained; merge exactly 2:4 with the unmerged logits."""
    base = peft_model.get_base_model()
    names = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    for name, value in reference.items():
        assert torch.equal(names[name], value), name
    trained_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b)  # B starts at zero
    peft_model.eval()
    batch = batch_of(arch)
    with torch.no_grad():
        unmerged = peft_model(**batch).logits
        with peft_model.disable_adapter():
            base_only = peft_model(**batch).logits
    merged = merge_sparse_lora(peft_model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert_targets_24(merged)
    with torch.no_grad():
        logits = merged(**batch).logits
    torch.testing.assert_close(logits, unmerged, atol=1e-5, rtol=0)
    assert (logits - base_only).abs().max() > 1e-4  # the adapters did change the function


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_peft_model_targets_are_the_base_layers(arch):
    plain, report = select_targets(make_model(arch), SparsityConfig())
    _, wrapped = lora_model(arch)
    targets, peft_report = select_targets(wrapped, SparsityConfig())
    assert [t.name for t in targets] == [t.name for t in plain]  # named as in the unwrapped model
    assert all(t.module.weight.requires_grad is False for t in targets if ".lora_" not in t.name)
    adapters = [d for d in peft_report.skipped if ".lora_" in d.name]
    assert adapters and all("PEFT adapter" in d.reason for d in adapters)
    assert not any("task head" in d.reason for d in peft_report.decisions if d.name in report.targets)
    # an explicit target_modules list names base layers as users know them
    explicit, _ = select_targets(wrapped, SparsityConfig(target_modules=[LORA_TARGETS[arch][0]]))
    assert explicit and all(t.name.endswith(LORA_TARGETS[arch][0]) for t in explicit)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_lora_training_keeps_model_24(arch, entry, tmp_path):
    _, peft_model = lora_model(arch)
    args = TrainingArguments(**training_args(tmp_path, max_steps=6))
    if entry == "trainer":
        trainer = SparsityTrainer(model=peft_model, args=args, train_dataset=ToyDataset(arch))
    else:
        trainer = Trainer(
            model=peft_model, args=args, train_dataset=ToyDataset(arch), callbacks=[SparsityCallback()]
        )
    trainer.train()
    masked = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    assert masked and all(isinstance(m.lora_variant["default"], MaskedLoraVariant) for m in masked)
    assert_lora_result(arch, peft_model, pruned_reference(arch))


def test_masked_update_is_what_merge_adds():
    """Forward and merge agree layer by layer, and only kept base positions change."""
    model, peft_model = lora_model("gpt2")
    prune_24(model, show_progress=False)
    mask_lora(peft_model)
    layer = peft_model.base_model.model.transformer.h[0].mlp.c_fc
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        unmerged = layer(x)
        before = layer.base_layer.weight.clone()
        layer.merge()
        after = layer.base_layer.weight.clone()
        merged = layer(x)
        layer.unmerge()
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert ((after != before) <= (before != 0)).all() and (after != before).any()
    assert is_nm_sparse(after.t())
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=0)


def masked_lora_layer(arch, dtype, **lora_kwargs):
    """An adapted 2:4 layer of a tiny `arch` model (gpt2: Conv1D base), B random, in `dtype`, training mode."""
    model, peft_model = lora_model(arch, **lora_kwargs)
    prune_24(model, show_progress=False)
    mask_lora(peft_model)
    peft_model.to(dtype).train()
    name = {"llama": "model.layers.0.mlp.up_proj", "gpt2": "transformer.h.0.mlp.c_fc"}[arch]
    layer = peft_model.get_submodule(f"base_model.model.{name}")
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    if layer.lora_B["default"].bias is not None:
        torch.nn.init.normal_(layer.lora_B["default"].bias)
    return layer


def plain_formula(layer, x):
    """`base(x) + dropout(x) @ (mask * (B @ A) * scale)^T (+ lora bias * scale)`, by plain autograd."""
    base = layer.get_base_layer()
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight  # F.linear's layout
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    scale = layer.scaling["default"]
    delta = torch.where(weight != 0, lora_b.weight @ lora_a.weight * scale, 0.0)
    y = F.linear(x, weight, base.bias) + F.linear(layer.lora_dropout["default"](x), delta)
    return y if lora_b.bias is None else y + lora_b.bias * scale


def grad_graph_names(tensor):
    """Type names of the autograd nodes behind `tensor`."""
    seen, stack = {}, [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            stack.extend(next_node for next_node, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "frozen, lora_kwargs, lead",
    [
        ((), {}, (3, 5)),
        (("lora_A",), {"lora_bias": True}, (7,)),
        (("lora_B",), {"lora_dropout": 0.3}, (2, 3, 4)),
        (("x",), {}, (3, 5)),
        (("lora_A", "lora_B"), {}, (3, 5)),  # adapters frozen, the input gradient only
    ],
)
def test_masked_update_gradients_equal_plain_autograd(arch, frozen, lora_kwargs, lead):
    """The masked update's own backward gives autograd's gradients through the plain formula (float64)."""
    layer = masked_lora_layer(arch, torch.float64, **lora_kwargs)
    for name in ("lora_A", "lora_B"):
        if name in frozen:
            getattr(layer, name)["default"].weight.requires_grad_(False)
    x = torch.randn(*lead, layer.in_features, dtype=torch.float64, requires_grad="x" not in frozen)
    grad_y = torch.randn(*lead, layer.out_features, dtype=torch.float64)
    inputs = [t for t in (x, *layer.parameters()) if t.requires_grad]
    outputs = []
    for forward in (layer, lambda x: plain_formula(layer, x)):
        torch.manual_seed(1)  # the same dropout
        y = forward(x)
        outputs.append((y, torch.autograd.grad(y, inputs, grad_y)))
    (y, grads), (y_ref, grads_ref) = outputs
    assert "_MaskedLoraLinearBackward" in grad_graph_names(y)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    assert len(grads) == len(grads_ref) == len(inputs) >= 1
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_update_keeps_no_dense_update_for_the_backward(arch):
    """Training keeps the layer's input, A, B and the bool mask for the backward, not the `[out, in]` float update
    (the memory that `_MaskedLoraLinear` exists to save)."""
    layer = masked_lora_layer(arch, torch.float32)
    params = {p.data_ptr() for p in layer.parameters()}
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    big = [
        tuple(t.shape)
        for t in saved
        if t.is_floating_point()
        and t.numel() >= layer.in_features * layer.out_features
        and t.data_ptr() not in params
    ]
    assert big == []
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # the hooks did see the forward's saved tensors
    y.sum().backward()  # and the backward still runs from what was kept
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_update_under_bf16_autocast_computes_as_autocast(arch):
    """Under CPU bf16 autocast the update's GEMMs run in bf16 as `F.linear` would, gradients land in fp32."""
    layer = masked_lora_layer(arch, torch.float32)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    grad_y = torch.randn(3, 5, layer.out_features, dtype=torch.bfloat16)
    inputs = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    outputs = []
    for forward in (layer, lambda x: plain_formula(layer, x)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        outputs.append((y, torch.autograd.grad(y, inputs, grad_y)))
    (y, grads), (y_ref, grads_ref) = outputs
    assert "_MaskedLoraLinearBackward" in grad_graph_names(y)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=1e-6)  # 2 bf16 ulps: the same bf16 GEMMs
    for grad, grad_ref, tensor in zip(grads, grads_ref, inputs, strict=True):
        assert grad.dtype == tensor.dtype == torch.float32
        torch.testing.assert_close(grad, grad_ref, rtol=2**-7, atol=1e-6)
    # and not fp32 arithmetic: the fp32 update's gradients differ from autocast's by bf16 rounding
    fp32_grad_a = torch.autograd.grad(plain_formula(layer, x), inputs[1], grad_y.float())[0]
    assert (fp32_grad_a - grads[1]).abs().max() > 1e-3 * fp32_grad_a.abs().max()


def test_bf16_mixed_precision_and_gradient_accumulation(tmp_path):
    _, peft_model = lora_model("llama")
    args = TrainingArguments(
        **training_args(tmp_path, max_steps=4, per_device_train_batch_size=4),
        gradient_accumulation_steps=2,
        bf16=True,
    )
    trainer = SparsityTrainer(model=peft_model, args=args, train_dataset=ToyDataset("llama"))
    trainer.train()
    assert trainer.state.global_step == 4
    # accelerate runs the trained model's forward under bf16 autocast; compare in fp32 without that wrapper
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())
    assert_lora_result("llama", peft_model, pruned_reference("llama"))


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def run(out, stop=None, resume=None):
        _, peft_model = lora_model("llama")
        args = TrainingArguments(**training_args(out, max_steps=6, save_strategy="steps", save_steps=3))
        trainer = SparsityTrainer(
            model=peft_model,
            args=args,
            train_dataset=ToyDataset("llama"),
            callbacks=[StopAt(stop)] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return peft_model

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=3)
    resumed = run(tmp_path / "b", resume=True)  # a fresh dense base: the masks come from the checkpoint
    adapters = {n: p for n, p in straight.named_parameters() if "lora_" in n}
    for name, p in resumed.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, adapters[name], atol=1e-6, rtol=0)
    assert_lora_result("llama", resumed, pruned_reference("llama"))


def test_save_adapter_and_load_on_sparse_base(tmp_path):
    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "base")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=LORA_TARGETS["llama"]))
    args = TrainingArguments(**training_args(tmp_path / "run", max_steps=4))
    SparsityTrainer(model=peft_model, args=args, train_dataset=ToyDataset("llama")).train()
    peft_model.save_pretrained(tmp_path / "adapter")  # PEFT's own format: the adapter weights only
    peft_model.eval()
    batch = batch_of("llama")
    with torch.no_grad():
        expected = peft_model(**batch).logits

    base = AutoSparseModel.from_pretrained(tmp_path / "base")
    loaded = load_sparse_lora(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
    # the plain PEFT entry point works too; mask_lora restores the trained function
    plain = peft.PeftModel.from_pretrained(
        AutoSparseModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    assert mask_lora(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=0)
    merged = merge_sparse_lora(loaded)
    assert_targets_24(merged)
    save_sparse_pretrained(merged, tmp_path / "merged")  # refuses anything that is not 2:4


def test_merging_an_unmasked_lora_into_24_model_is_refused():
    model = make_model("llama")
    prune_24(model, show_progress=False)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*mask_lora"):
        merge_sparse_lora(peft_model)
    assert any("lora_" in n for n, _ in peft_model.named_parameters())  # nothing merged
    assert mask_lora(peft_model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert_targets_24(merge_sparse_lora(peft_model))


@pytest.mark.parametrize(
    "make_config, match",
    [
        (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoraLinearVariant"),
        (lambda: peft.LoHaConfig(r=4, target_modules=["q_proj"]), "loha"),
    ],
)
@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_adapter_that_cannot_be_masked_is_refused_before_training(make_config, match, entry, tmp_path):
    model = make_model("llama")
    peft_model = peft.get_peft_model(model, make_config())
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    args = TrainingArguments(**training_args(tmp_path, max_steps=2))
    with pytest.raises(UnmaskableAdapterError, match=rf"model\.layers\.0\.self_attn\.q_proj.*{match}"):
        if entry == "trainer":
            SparsityTrainer(model=peft_model, args=args, train_dataset=ToyDataset("llama"))
        else:
            Trainer(
                model=peft_model, args=args, train_dataset=ToyDataset("llama"), callbacks=[SparsityCallback()]
            ).train()
    for name, p in peft_model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_target_in_modules_to_save_is_refused(tmp_path):
    model = make_model("llama")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["k_proj"])
    peft_model = peft.get_peft_model(model, cfg)
    with pytest.raises(UnmaskableAdapterError, match="k_proj.*modules_to_save"):
        SparsityTrainer(
            model=peft_model,
            args=TrainingArguments(**training_args(tmp_path, max_steps=1)),
            train_dataset=ToyDataset("llama"),
        )


def test_peft_model_without_targets_still_explains(tmp_path):
    _, peft_model = lora_model("llama")
    with pytest.raises(NoTargetsError, match="PEFT adapter"):
        select_targets(peft_model, SparsityConfig(min_features=4096))


def test_mask_lora_leaves_dense_layers_plain():
    model, peft_model = lora_model("llama")
    prune_24(model, SparsityConfig(target_modules=["q_proj"]), show_progress=False)
    names = mask_lora(peft_model)
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    v_proj = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert "default" not in v_proj.lora_variant  # dense base: plain LoRA, nothing to mask
    snapshot = copy.deepcopy(peft_model.state_dict())
    assert mask_lora(peft_model) == names  # idempotent
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in snapshot.items())


def test_adapter_on_base_loaded_by_plain_from_pretrained(tmp_path):
    """`import hf_semisparse` + plain transformers `from_pretrained` of our checkpoint, then PEFT's own
    `PeftModel.from_pretrained` + `mask_lora` (or `load_sparse_lora`): the trained function, merge exactly 2:4."""
    import transformers

    model = make_model("llama", attention_dropout=0.0)
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "base")
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, target_modules=LORA_TARGETS["llama"], init_lora_weights=False)  # B nonzero
    peft_model = peft.get_peft_model(model, cfg)
    mask_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = batch_of("llama")
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits

    def plain_base():
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")

    plain = peft.PeftModel.from_pretrained(plain_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        unmasked = plain(**batch).logits
    assert (unmasked - expected).abs().max() > 1e-4  # PEFT alone runs the adapter unmasked
    assert sorted(mask_lora(plain)) == sorted(
        f"model.layers.{i}.{part}"
        for i in range(2)
        for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
    )
    loaded = load_sparse_lora(plain_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
    merged = merge_sparse_lora(loaded)
    assert_targets_24(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["peft_model", "base_model"])
def test_saving_a_model_that_holds_adapters_is_refused_before_anything_is_written(which, tmp_path):
    model = make_model("llama")
    prune_24(model, show_progress=False)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    subject = peft_model if which == "peft_model" else peft_model.get_base_model()
    with pytest.raises(SparseCheckpointError, match="holds PEFT adapters.*q_proj.*unload.*merge_sparse_lora"):
        save_sparse_pretrained(subject, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the way out the message names: the base without its adapters
    save_sparse_pretrained(copy.deepcopy(peft_model).unload(), tmp_path / "base", show_progress=False)
    assert_targets_24(AutoSparseModel.from_pretrained(tmp_path / "base", accelerate=False))


def test_saving_a_prompt_learning_model_names_its_base_model(tmp_path):
    model = make_model("llama")
    prune_24(model, show_progress=False)
    config = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    peft_model = peft.get_peft_model(model, config)
    with pytest.raises(SparseCheckpointError, match="prompt-learning.*get_base_model"):
        save_sparse_pretrained(peft_model, tmp_path / "out")
    save_sparse_pretrained(peft_model.get_base_model(), tmp_path / "base", show_progress=False)
    assert_targets_24(AutoSparseModel.from_pretrained(tmp_path / "base", accelerate=False))
