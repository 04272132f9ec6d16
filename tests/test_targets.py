import math
import re

import pytest
import torch
from torch import nn

from hf_semisparse import NoTargetsError, SparsityConfig, select_targets
from tests.conftest import make_model


@pytest.mark.parametrize(
    "arch,head",
    [
        ("bert", "classifier"),
        ("distilbert", "classifier"),
        ("roberta", "classifier"),
        ("gpt2", "lm_head"),
        ("llama", "lm_head"),
        ("t5", "lm_head"),
    ],
)
def test_default_targets_skip_heads(arch, head):
    model = make_model(arch)
    targets, report = select_targets(model, SparsityConfig())
    names = [t.name for t in targets]
    assert names and all(head not in n.split(".") for n in names)
    skipped = {d.name: d.reason for d in report.skipped}
    assert any(head in name for name in skipped)
    for t in targets:
        out_f, in_f = t.shape
        assert in_f % 16 == 0 and out_f % 16 == 0


def test_gpt2_conv1d_is_transposed():
    model = make_model("gpt2")
    targets, _ = select_targets(model, SparsityConfig())
    c_fc = next(t for t in targets if t.name.endswith("mlp.c_fc"))
    assert c_fc.transposed
    assert c_fc.shape == (256, 64)  # [out, in] although the Conv1D weight is [in, out]
    assert tuple(c_fc.weight.shape) == (64, 256)


def test_names_and_regex_selection():
    model = make_model("bert")
    targets, _ = select_targets(model, SparsityConfig(target_modules=["query", "value"]))
    assert {t.name.rsplit(".", 1)[1] for t in targets} == {"query", "value"}
    targets, _ = select_targets(model, SparsityConfig(target_modules=r".*layer\.0\..*dense"))
    assert all(".layer.0." in t.name for t in targets) and len(targets) == 3
    targets, _ = select_targets(model, SparsityConfig(exclude_modules=["classifier", "attention"]))
    # a user exclude list replaces the defaults, so the pooler is now a target too
    assert all("attention" not in t.name for t in targets)
    assert sorted(t.name.split(".")[-2] for t in targets) == [
        "intermediate",
        "intermediate",
        "output",
        "output",
        "pooler",
    ]


def test_regex_matching_nothing_lists_skipped_modules():
    model = make_model("bert")
    with pytest.raises(NoTargetsError, match="selects no module") as info:
        select_targets(model, SparsityConfig(target_modules=r".*nonexistent.*"))
    assert "not in target_modules" in str(info.value)
    assert "bert.encoder.layer.0.attention.self.query" in str(info.value)


def test_explicit_target_with_bad_in_features_raises():
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32))
    with pytest.raises(ValueError, match="in_features 6 is not a multiple of 4"):
        select_targets(model, SparsityConfig(target_modules=["0"], min_features=1, kernel_multiple=4))
    # by default it is only skipped, with the reason
    _, report = select_targets(model, SparsityConfig(min_features=1, kernel_multiple=4))
    assert "not a multiple of 4" in next(d.reason for d in report.decisions if d.name == "0")


def test_unsupported_module_type_raises():
    model = make_model("bert")
    with pytest.raises(TypeError, match="Embedding"):
        select_targets(model, SparsityConfig(target_modules=["word_embeddings"]))


def test_small_and_odd_shapes_are_skipped_with_reason():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 64), nn.Linear(64, 40), nn.Linear(64, 64))
    model[3].weight.data = model[3].weight.data.to(torch.float64)
    with pytest.raises(NoTargetsError) as info:
        select_targets(model, SparsityConfig())
    text = str(info.value)
    assert "too small" in text and "multiple of 16" in text and "float64" in text


def test_fsdp1_wrapped_model_is_a_clear_error(monkeypatch):
    class FakeFSDP1(torch.nn.Module):  # stands in for FullyShardedDataParallel, which needs a process group
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    model = make_model("bert")
    model.bert.encoder.layer[0] = FakeFSDP1(model.bert.encoder.layer[0])
    monkeypatch.setattr("hf_semisparse.targets.FSDP1_TYPES", (FakeFSDP1,))
    with pytest.raises(NotImplementedError, match="fsdp_version': 2"):
        select_targets(model, SparsityConfig())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("excludes", [[], None, r"nothing\.matches", ["classifier"]])
def test_heads_stay_out_however_excludes_are_given(tied, excludes):
    # T5ForConditionalGeneration has no `transformer` child (its base_model_prefix): lm_head is found as the output
    # embeddings; untied (T5 v1.1, flan-t5) it used to be pruned as soon as exclude_modules dropped "lm_head"
    model = make_model("t5", tie_word_embeddings=tied)
    if (
        not tied and model.lm_head.weight is model.shared.weight
    ):  # transformers 5.24 ties T5's head regardless
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert (model.lm_head.weight is model.shared.weight) == tied
    targets, report = select_targets(model, SparsityConfig(exclude_modules=excludes))
    assert "lm_head" not in [t.name for t in targets]
    assert next(d.reason for d in report.decisions if d.name == "lm_head").startswith("task head")
    for arch, head in [("llama", "lm_head"), ("bert", "classifier")]:
        targets, _ = select_targets(make_model(arch), SparsityConfig(exclude_modules=excludes))
        assert head not in [t.name for t in targets]
    named = SparsityConfig(target_modules=["lm_head"], exclude_modules=excludes)
    if tied:  # named explicitly but tied to the input embeddings: refused, naming the shared weight
        with pytest.raises(ValueError, match=r"lm_head: weight tied to .*shared\.weight"):
            select_targets(model, named)
    else:
        targets, _ = select_targets(model, named)
        assert [t.name for t in targets] == ["lm_head"]  # named explicitly (and not excluded): selected


@pytest.mark.parametrize(
    "arch, tie", [("gpt2", "; its weight is tied to transformer.wte.weight"), ("llama", "")]
)
def test_report_says_why_a_default_excluded_head_stays_dense(arch, tie):
    from hf_semisparse.config import DEFAULT_EXCLUDE_MODULES

    model = make_model(arch)
    reasons = {d.name: d.reason for d in select_targets(model, SparsityConfig())[1].decisions}
    assert (
        reasons["lm_head"] == f"a head (output, task or pooler), left dense by default (exclude_modules){tie}"
    )
    # the defaults and more: the defaults are still named as such, the user's own entries as theirs
    config = SparsityConfig(exclude_modules=[*DEFAULT_EXCLUDE_MODULES, "q_proj", "c_attn"])
    reasons = {d.name: d.reason for d in select_targets(model, config)[1].decisions}
    assert reasons["lm_head"].startswith("a head (output, task or pooler)")
    attention = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    assert reasons[attention] == "in exclude_modules"
    # no exclusions at all: the head is still a head, and still tied
    reasons = {
        d.name: d.reason for d in select_targets(model, SparsityConfig(exclude_modules=[]))[1].decisions
    }
    assert reasons["lm_head"] == f"task head (outside the base model){tie}"
    # a list of the user's own that names the head: theirs
    reasons = {
        d.name: d.reason
        for d in select_targets(model, SparsityConfig(exclude_modules=["lm_head"]))[1].decisions
    }
    assert reasons["lm_head"] == "in exclude_modules"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_head_tied_to_the_embedding_is_counted_once_in_the_sparsified_share(arch):
    """gpt2's lm_head shares wte's weight: the share is over the model's distinct weights (llama: not tied)."""
    model = make_model(arch)
    report = select_targets(model, SparsityConfig())[1]
    sizes = {d.name: d.numel for d in report.decisions}
    tied = [d.name for d in report.decisions if d.tied_to_listed]
    assert tied == (["lm_head"] if arch == "gpt2" else [])
    distinct = sum(n for name, n in sizes.items() if name not in tied)
    assert report.sparsified_share == pytest.approx(
        sum(d.numel for d in report.decisions if d.selected) / distinct
    )
    assert ("tied ones counted once" in str(report)) == (arch == "gpt2")
    modules = report.to_dict()["modules"]  # the JSON form adds up to its share too
    distinct = sum(math.prod(m["shape"]) for m in modules if not m["tied_to_listed"])
    sparsified = sum(math.prod(m["shape"]) for m in modules if m["sparsified"])
    assert report.to_dict()["sparsified_share"] == pytest.approx(sparsified / distinct, abs=1e-4)


@pytest.mark.parametrize(
    "config, hint",
    [
        (SparsityConfig(target_modules=["lm_head"]), "pass exclude_modules=[] to prune one"),
        (SparsityConfig(target_modules=["mlp"]), "not a parent such as 'mlp'"),
        (SparsityConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), "narrow exclude_modules"),
    ],
)
def test_an_empty_selection_says_its_likely_cause_first(config, hint):
    with pytest.raises(NoTargetsError, match=re.escape(hint)) as caught:
        select_targets(make_model("llama"), config)
    assert str(caught.value).index(hint) < str(caught.value).index("What was found")
