"""The weight pass after each optimizer step is skipped only where the optimizer provably keeps pruned weights at
zero, and skipping it changes nothing: same weights bit for bit, exactly 2:4 after every step."""

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments
from transformers.optimization import Adafactor

from hf_semisparse import Sparsifier, SparsityConfig, SparsityTrainer, is_nm_sparse
from hf_semisparse.pruning.optimizers import zero_preserving_optimizer
from tests.conftest import ToyDataset, assert_targets_24, make_model, training_args

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "adamw-fused": (torch.optim.AdamW, {"weight_decay": 0.1, "fused": True}),  # the Trainer's default
    "adam-l2": (torch.optim.Adam, {"weight_decay": 0.1, "amsgrad": True}),
    "sgd-nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
}


class StrayZeroSpy(TrainerCallback):
    """After every optimizer step (and every other callback's work on it): the largest |w| where a mask prunes."""

    def __init__(self, sparsity_callback) -> None:
        self.sparsity_callback = sparsity_callback
        self.worst = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        sp = self.sparsity_callback.sparsifier
        if not sp.has_masks:
            return
        pruned = [t.weight.detach()[~sp.masks[t.name]] for t in sp.targets]
        self.worst.append(max((float(w.abs().max()) for w in pruned if w.numel()), default=0.0))


def train(tmp_path, optimizer, weight_pass, config=None, **overrides):
    model = make_model("bert")
    cls, kwargs = OPTIMIZERS[optimizer]
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=12, **overrides)),
        train_dataset=ToyDataset("bert"),
        sparsity_config=config,
        optimizer_cls_and_kwargs=(cls, {"lr": 2e-3, **kwargs}),
    )
    callback = trainer.sparsity_callback
    callback.weight_pass = weight_pass
    spy = StrayZeroSpy(callback)
    trainer.add_callback(spy)
    trainer.train()
    return model, callback, spy


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "config",
    [
        None,
        SparsityConfig(start_step=4),
        SparsityConfig(schedule="gradual", start_step=1, end_step=7, prune_every=2),
    ],
    ids=["oneshot", "after-dense-steps", "gradual"],
)
def test_skipped_weight_pass_changes_nothing(tmp_path, optimizer, config):
    always, always_cb, _ = train(tmp_path / "always", optimizer, "always", config)
    auto, auto_cb, spy = train(tmp_path / "auto", optimizer, "auto", config)
    assert always_cb.skipped_weight_passes == 0
    assert auto_cb.skipped_weight_passes >= 4  # the pass really was skipped...
    assert spy.worst and max(spy.worst) == 0.0  # ...and every pruned weight stayed exactly zero at every step
    for (name, p), (_, q) in zip(always.named_parameters(), auto.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert_targets_24(auto)


def test_optimizer_state_must_be_masked_and_checkpoints_are_checked(tmp_path, monkeypatch, caplog):
    """Pruning after dense steps leaves momentum on the pruned weights: without masking it, Adam moves them off
    zero. The check before each checkpoint finds that, re-zeros them and turns the pass back on."""
    monkeypatch.setattr(Sparsifier, "mask_optimizer_state", lambda self, optimizer: None)
    config = SparsityConfig(start_step=4)
    with caplog.at_level("ERROR", logger="hf_semisparse"):
        model, callback, spy = train(tmp_path, "adamw", "auto", config, save_strategy="steps", save_steps=8)
    assert max(spy.worst) > 0  # the state masking is what keeps the zeros
    assert "pruned weights were non-zero" in caplog.text
    assert callback.weight_pass == "always" and not callback.optimizer_keeps_zeros
    saved = load_file(tmp_path / "checkpoint-8" / "model.safetensors")  # checked and re-zeroed before writing
    for t in callback.sparsifier.targets:
        assert is_nm_sparse(saved[f"{t.name}.weight"]), t.name
    assert_targets_24(model)


def test_other_optimizers_keep_the_weight_pass(tmp_path):
    model = make_model("bert")
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=6)),
        train_dataset=ToyDataset("bert"),
        optimizer_cls_and_kwargs=(Adafactor, {"lr": 1e-3, "relative_step": False, "scale_parameter": False}),
    )
    trainer.train()
    assert trainer.sparsity_callback.skipped_weight_passes == 0
    assert_targets_24(model)


def test_zero_preserving_optimizer_recognises_only_what_it_can_prove():
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(2)]

    class MyAdamW(torch.optim.AdamW):  # may override step
        pass

    adamw = torch.optim.AdamW(params)
    assert zero_preserving_optimizer(adamw, params) is adamw
    assert zero_preserving_optimizer(AcceleratedOptimizer(adamw, device_placement=False), params) is adamw
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert zero_preserving_optimizer(sgd, params) is sgd
    assert zero_preserving_optimizer(torch.optim.Adam(params, eps=0.0), params) is None  # 0 / (0 + 0)
    assert zero_preserving_optimizer(MyAdamW(params), params) is None
    assert (
        zero_preserving_optimizer(torch.optim.AdamW(params[:1]), params) is None
    )  # a weight it does not own
    assert zero_preserving_optimizer(Adafactor(params, lr=1e-3, relative_step=False), params) is None


def test_mask_optimizer_state_zeros_only_pruned_entries():
    model = make_model("bert")
    sp = Sparsifier(model, SparsityConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(**torch.utils.data.default_collate([ToyDataset("bert")[i] for i in range(4)])).loss.backward()
    optimizer.step()
    sp.update_masks(1.0)
    before = {t.name: {k: v.clone() for k, v in optimizer.state[t.weight].items()} for t in sp.targets}
    sp.mask_optimizer_state(optimizer)
    for t in sp.targets:
        mask = sp.masks[t.name]
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[t.weight][key]
            assert (state[~mask] == 0).all() and before[t.name][key][~mask].abs().sum() > 0, (t.name, key)
            assert torch.equal(state[mask], before[t.name][key][mask]), (t.name, key)
        assert torch.equal(optimizer.state[t.weight]["step"], before[t.name]["step"])
