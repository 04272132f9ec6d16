import json

import pytest

from hf_semisparse import SparsityConfig


def test_json_round_trip(tmp_path):
    cfg = SparsityConfig(
        target_modules=r".*encoder.*dense",
        schedule="gradual",
        start_step=2,
        end_step=20,
        prune_every=3,
        n=2,
        m=4,
    )
    path = cfg.save_pretrained(tmp_path)
    with open(path) as f:
        assert json.load(f)["end_step"] == 20
    assert SparsityConfig.from_pretrained(tmp_path) == cfg
    assert SparsityConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="random"), "method"),
        (dict(schedule="linear"), "schedule"),
        (dict(n=4, m=4), "n < m"),
        (dict(schedule="gradual"), "end_step"),
        (dict(schedule="gradual", start_step=5, end_step=5), "end_step"),
        (dict(target_modules="(unclosed"), "regex"),
        (dict(mask_update_every=5), "freeze_step"),
        (dict(kernel_multiple=6), "multiple"),
        (dict(start_step=-1), "start_step"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_unknown_field_and_bad_file(tmp_path):
    with pytest.raises(ValueError, match="Unknown SparsityConfig fields"):
        SparsityConfig.from_dict({"sparsity": 0.5})
    (tmp_path / "sparsity_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SparsityConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        SparsityConfig.from_pretrained(tmp_path / "missing")


def test_cubic_gradual_schedule():
    cfg = SparsityConfig(schedule="gradual", start_step=10, end_step=20, prune_every=5)
    assert cfg.level_at(9) == 0.0
    assert cfg.level_at(10) == 0.0
    assert cfg.level_at(15) == pytest.approx(1 - 0.5**3)
    assert cfg.level_at(20) == 1.0 and cfg.level_at(100) == 1.0
    levels = [cfg.level_at(s) for s in range(10, 21)]
    assert levels == sorted(levels)
    assert [s for s in range(30) if cfg.is_prune_step(s)] == [10, 15, 20]


def test_oneshot_and_reselection_steps():
    assert [s for s in range(10) if SparsityConfig(start_step=3).is_prune_step(s)] == [3]
    cfg = SparsityConfig(mask_update_every=4, freeze_step=10)
    assert [s for s in range(20) if cfg.is_prune_step(s)] == [0, 4, 8, 10]
    assert cfg.uses_dense_shadow(9) and not cfg.uses_dense_shadow(10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(start_step=True), TypeError, "start_step must be an int, got bool"),
        (dict(n="2"), TypeError, "n must be an int, got str '2'; write n=2"),
        (dict(end_step=2.5, schedule="gradual"), TypeError, "end_step must be an int or None"),
        (dict(method=None), TypeError, "method must be a str"),
    ],
)
def test_field_types(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsityConfig(**kwargs)


def test_assignment_is_validated_and_refused_values_are_not_kept():
    import dataclasses

    cfg = SparsityConfig()
    with pytest.raises(ValueError, match=r"0 < n < m, got n=5, m=4.*left at 2.*dataclasses.replace"):
        cfg.n = 5
    assert cfg.n == 2
    with pytest.raises(TypeError, match="start_step must be an int, got bool"):
        cfg.start_step = True
    assert cfg.start_step == 0 and cfg.start_step is not True
    with pytest.raises(ValueError, match="end_step"):
        cfg.schedule = "gradual"  # needs end_step too: change both at once
    assert cfg.schedule == "oneshot"
    gradual = dataclasses.replace(cfg, schedule="gradual", end_step=100)
    gradual.end_step = 200
    assert gradual.level_at(200) == 1.0
    cfg.target_modules = ("query", "value")
    assert cfg.target_modules == ["query", "value"]
    with pytest.raises(ValueError, match="regex"):
        cfg.exclude_modules = "(unclosed"
    assert cfg == SparsityConfig(target_modules=["query", "value"])
