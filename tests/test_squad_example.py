"""The SQuAD workflow (examples/squad) end to end in its smoke configuration, on the real offline data."""

import json
import os
import shutil
import sys

import pytest
import torch

from hf_semisparse import AutoSparseModel
from tests.conftest import SHARED

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "squad"))

import run_squad  # noqa: E402
from squad_data import SquadDataError, read_squad_json  # noqa: E402

if not os.path.isdir(os.path.join(SHARED, "data", "squad")):
    pytest.fail(
        f"the SQuAD workflow tests need the offline data in {SHARED} (set HF_SEMISPARSE_SHARED)",
        pytrace=False,
    )

TRAIN = os.path.join(SHARED, "data", "squad", "squad-v1.1-train-first11.json")
VALID = os.path.join(SHARED, "data", "squad", "xquad-en.json")
MODEL = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")


def smoke_args(out, model=MODEL, train=TRAIN, valid=VALID):
    return [
        "--smoke",
        "--model",
        model,
        "--train-file",
        train,
        "--validation-file",
        valid,
        "--output-dir",
        str(out),
    ]


def test_smoke_run_end_to_end(tmp_path):
    out = run_squad.main([*smoke_args(tmp_path), "--license", "apache-2.0"])
    assert out["label"].startswith("SMOKE RUN")
    assert list(out["results"]) == ["dense", "one-shot 2:4", "recovered 2:4", "loaded sparse checkpoint"]
    for r in out["results"].values():
        assert 0.0 <= r["exact_match"] <= 100.0 and 0.0 <= r["f1"] <= 100.0
    assert out["targets_all_24"] and out["sparsified_layers"] == 12
    # the checkpoint holds exactly the recovered weights: same answers after the round trip (CPU, fp32)
    assert out["results"]["loaded sparse checkpoint"]["f1"] == out["results"]["recovered 2:4"]["f1"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == out["results"] and "--smoke" in saved["command"]
    card = (tmp_path / "sparse" / "README.md").read_text()
    assert "| recovered 2:4 |" in card and "run_squad.py" in card
    snippet = f'from_pretrained("{os.path.normpath(tmp_path / "sparse")}"'
    assert snippet in card  # the saved folder, not a made-up Hub id
    assert f"# {tmp_path.name}" in card  # titled after the run's folder, not "sparse"
    assert "> **SMOKE RUN: tiny model, few examples; these numbers mean nothing**" in card
    head = card.split("---")[1]  # the metadata: the license given, no base model (a tiny random BERT)
    assert "license: apache-2.0" in head and "base_model" not in head and "is a model pruned to" in card
    assert "`transformers.BertForQuestionAnswering.from_pretrained`" in card and "ForCausalLM" not in card
    assert "| dense |" in (tmp_path / "results.md").read_text()
    loaded = AutoSparseModel.from_pretrained(tmp_path / "sparse")
    assert isinstance(loaded, torch.nn.Module) and (tmp_path / "sparse" / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--base-model", "org/bert"], "--base-model: a --smoke run trains a tiny random BERT"),
        (["--base-model", "not a hub id"], "--base-model 'not a hub id' is not a Hub repo id"),
    ],
)
def test_a_base_model_a_smoke_run_cannot_have_or_that_is_not_a_hub_id_is_refused_first(
    tmp_path, capsys, extra, said
):
    args = smoke_args(tmp_path / "out")
    if "not a hub id" in extra:
        args.remove("--smoke")
    with pytest.raises(SystemExit):
        run_squad.main([*args, *extra])
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_folder_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(SquadDataError, match="no such model folder"):
        run_squad.main(smoke_args(tmp_path / "out", model=str(tmp_path / "missing")))
    assert not (tmp_path / "out").exists()


def test_not_squad_shaped_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [1, 2]}))
    with pytest.raises(SquadDataError, match="not SQuAD-shaped"):
        run_squad.main(smoke_args(tmp_path / "out", train=str(bad)))
    assert not (tmp_path / "out").exists()  # failed before any training


def test_answer_offsets_that_do_not_match(tmp_path):
    with open(VALID) as f:
        data = json.load(f)
    qa = data["data"][0]["paragraphs"][0]["qas"][0]
    qa["answers"][0]["answer_start"] += 3
    bad = tmp_path / "shifted.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(SquadDataError, match=qa["id"]):
        read_squad_json(str(bad))
    with pytest.raises(SquadDataError, match="does not occur at offset"):
        run_squad.main(smoke_args(tmp_path / "out", valid=str(bad)))
    assert not (tmp_path / "out").exists()


def test_model_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(os.path.join(MODEL, "config.json"), folder / "config.json")
    with pytest.raises(SquadDataError, match="no tokenizer"):
        run_squad.main(smoke_args(tmp_path / "out", model=str(folder)))
    assert not (tmp_path / "out").exists()


def test_smoke_run_with_a_calibrated_method_and_distillation(tmp_path):
    out = run_squad.main(smoke_args(tmp_path) + ["--method", "wanda", "--distill", "--lora"])
    assert out["method"] == "wanda" and out["distill"] and out["targets_all_24"]
    assert out["results"]["loaded sparse checkpoint"]["f1"] == out["results"]["recovered 2:4"]["f1"]
    # masked LoRA from the same one-shot model: merged exactly 2:4, far fewer trained parameters
    assert 0.0 <= out["results"]["recovered 2:4, masked LoRA (merged)"]["f1"] <= 100.0
    assert out["lora"]["targets_all_24"]
    assert 0 < out["lora"]["trainable_parameters"] < out["recovery_cost"]["trainable_parameters"] / 2


def test_compare_methods_smoke(tmp_path):
    import compare_methods

    out = compare_methods.main(smoke_args(tmp_path) + ["--methods", "magnitude", "sparsegpt"])
    assert out["label"].startswith("SMOKE RUN")
    assert [row["method"] for row in out["methods"]] == ["magnitude", "sparsegpt"]
    for row in out["methods"]:
        for key in ("one-shot", "recovered", "recovered + distillation"):
            assert 0.0 <= row[key]["f1"] <= 100.0, (row["method"], key)
        assert row["recovered is 2:4"] and row["recovered + distillation is 2:4"]
        assert row["seconds"] >= 0 and row["peak_gpu_mib"] is None  # CPU: no GPU memory to report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"] == out["methods"] and "--smoke" in saved["command"]
    table = (tmp_path / "results.md").read_text()
    assert "| magnitude |" in table and "| sparsegpt |" in table and "| wanda |" not in table


def test_sweep_recovery_smoke(tmp_path):
    import sweep_recovery

    recipes = [
        "plain:method=magnitude",
        "hidden:method=magnitude,distill=true,distill_hidden=1.0,scheduler=linear,warmup_ratio=0.1,epochs=2",
    ]
    argv = smoke_args(tmp_path) + [arg for r in recipes for arg in ("--recipe", r)]
    out = sweep_recovery.main(argv)
    assert [r["name"] for r in out["recipes"]] == ["plain", "hidden"]
    hidden = out["recipes"][1]["recipe"]
    assert hidden["distill"] and hidden["distill_hidden"] == 1.0 and hidden["epochs"] == 2.0
    assert hidden["scheduler"] == "linear" and out["recipes"][0]["recipe"]["distill_hidden"] == 0.0
    for row in out["recipes"]:
        assert row["all 2:4"] and 0.0 <= row["recovered"]["f1"] <= 100.0
        assert row["f1 gap to dense"] == pytest.approx(row["recovered"]["f1"] - out["dense"]["f1"], abs=0.01)
    # both recipes started from one one-shot copy of one dense model
    assert out["recipes"][0]["one-shot"] == out["recipes"][1]["one-shot"]
    assert "| hidden |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-colon", "is not 'name:key=value"),
        ("x:epochs", "is not key=value"),
        ("x:speed=3", "is not key=value"),
        ("x:distill=maybe", "true or false"),
        ("x:method=random", "unknown method"),
        ("x:scheduler=step", "unknown scheduler"),
        ("x:distill_hidden=1.0", "needs distillation"),
    ],
)
def test_sweep_recovery_rejects_bad_recipes_before_training(tmp_path, capsys, spec, message):
    import sweep_recovery

    with pytest.raises(SystemExit):
        sweep_recovery.parse_args(smoke_args(tmp_path) + ["--recipe", spec])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
