"""The LLM example (`examples/llm/prune_and_recover_llm.py`) runs end to end on a tiny Llama on the CPU: prune,
recover on text and teacher samples, save a compressed checkpoint that loads with plain `from_pretrained`, and
refuses bad input before it changes or writes anything."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_semisparse import is_nm_sparse
from tests.conftest import MINILM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.isdir(MINILM), reason=f"needs {MINILM} (HF_SEMISPARSE_SHARED)")


def load_example():
    spec = importlib.util.spec_from_file_location(
        "prune_and_recover_llm", os.path.join(ROOT, "examples", "llm", "prune_and_recover_llm.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does (its dataclass looks its module up)
    spec.loader.exec_module(module)
    return module


def common(tiny_llm, out):
    return [
        "--model", str(tiny_llm / "model"), "--train-text", str(tiny_llm / "calib"),
        "--eval-text", str(tiny_llm / "eval.txt"), "--output-dir", str(out), "--device", "cpu",
        "--calibration-samples", "4", "--seq", "32", "--calibration-batch", "2", "--eval-tokens", "256",
        "--eval-window", "64", "--teacher-batch", "2", "--reconstruct-epochs", "0", "--recover-steps", "0",
    ]  # fmt: skip


def test_the_llm_workflow_end_to_end(tiny_llm):
    example = load_example()
    out = tiny_llm / "run"
    result = example.main(
        [
            *common(tiny_llm, out), "--reconstruct-epochs", "1", "--recover-steps", "3", "--recover-batch", "2",
            "--recover-lr", "1e-3", "--teacher-fraction", "0.5", "--teacher-pool", "2",
        ]
    )  # fmt: skip
    names = [r["name"] for r in result["results"]]
    assert names == [
        "dense",
        "sparsegpt 2:4 + reconstruction (1 epochs)",
        "+ distillation",
        "loaded checkpoint",
    ]
    recovered, loaded = result["results"][2]["perplexity"], result["results"][3]["perplexity"]
    assert loaded == pytest.approx(recovered, rel=1e-4)  # the checkpoint holds the recovered model
    assert result["recovery"]["tokens"] == 3 * 2 * 32 and result["recovery"]["sample_seconds"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, after import hf_semisparse
    mlp = model.model.layers[0].mlp
    assert all(is_nm_sparse(lin.weight) for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["mask_source"] == "sparsegpt"  # the recovery kept SparseGPT's masks
    card = (out / "README.md").read_text()
    assert "+ distillation" in card and "prune_and_recover_llm.py" in card and "| loaded checkpoint |" in card
    # rendered from the saved folder: the facts of the files, and a load snippet that finds them
    assert f"{result['target_bytes_ratio']:.2f}" in card and "stored dense" not in card
    assert f'from_pretrained("{os.path.normpath(out)}"' in card
    assert "license: other" in card and "base_model" not in card  # a local --model names no base model
    assert "`transformers.LlamaForCausalLM.from_pretrained`" in card
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    assert {"results.json", "results.md", "config.json"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(out) if os.path.isdir(out / n)]  # no Trainer leftovers
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == result["results"]
    modules = {m["name"]: m for m in saved["sparsity_report"]["modules"]}
    assert modules["model.layers.0.mlp.down_proj"]["sparsified"] and not modules["lm_head"]["sparsified"]
    assert "| loaded checkpoint |" in (out / "results.md").read_text()


def test_magnitude_without_recovery_saved_in_the_dtype_asked(tiny_llm):
    out = tiny_llm / "run"
    result = load_example().main(
        [*common(tiny_llm, out), "--method", "magnitude", "--save-dtype", "bfloat16"]
    )
    assert [r["name"] for r in result["results"]] == ["dense", "magnitude 2:4", "loaded checkpoint"]
    assert result["recovery"] is None
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    pruned, loaded = result["results"][1]["perplexity"], result["results"][2]["perplexity"]
    assert loaded == pytest.approx(pruned, rel=0.05) and loaded != pruned  # bf16 weights, evaluated as saved


def test_the_saved_dtype_defaults_to_the_one_the_config_records(tiny_llm):
    from transformers import AutoConfig

    example = load_example()
    config = AutoConfig.from_pretrained(tiny_llm / "model")
    assert example.saved_dtype(config, "auto") == torch.float32
    config.dtype = "float16"
    assert example.saved_dtype(config, "auto") == torch.float16
    assert example.saved_dtype(config, "bfloat16") == torch.bfloat16


def test_the_cards_license_is_the_base_models(tiny_llm):
    (tiny_llm / "model" / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    out = tiny_llm / "run"
    load_example().main([*common(tiny_llm, out), "--method", "magnitude"])
    assert "license: mit" in (out / "README.md").read_text()


def example_that_must_not_start(monkeypatch):
    """The example, with loading the model and pruning made to fail: a check that passes them comes too late."""
    example = load_example()

    def too_late(*args, **kwargs):
        raise AssertionError("the model was loaded or pruned before the input was refused")

    monkeypatch.setattr(example, "load_dense", too_late)
    monkeypatch.setattr(example, "prune_24", too_late)
    return example


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--teacher-fraction", "1.5"], "--teacher-fraction is a fraction"),
        (["--seq", "1"], "--seq must be at least 2"),
        (["--eval-window", "1"], "--eval-window must be at least 2"),
        (["--recover-steps", "-1"], "--recover-steps must be 0 or more"),
        (["--method", "magnitude", "--reconstruct-epochs", "2"], "needs calibration data"),
        (["--teacher-pool", "0"], "--teacher-pool must be at least 1"),
        (["--distill-temperature", "0"], "--distill-temperature must be a finite number > 0"),
        (["--recover-lr", "nan"], "--recover-lr must be a finite number > 0"),
        (["--reconstruct-lr", "-1"], "--reconstruct-lr must be a finite number > 0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tiny_llm, capsys, monkeypatch, extra, message):
    with pytest.raises(SystemExit):
        example_that_must_not_start(monkeypatch).main([*common(tiny_llm, tiny_llm / "run"), *extra])
    assert message in capsys.readouterr().err
    assert not (tiny_llm / "run").exists()


def test_a_model_without_a_start_token_is_refused_before_any_work(tiny_llm, monkeypatch):
    for name in ("config.json", "generation_config.json"):
        path = tiny_llm / "model" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "bos_token_id": None}))
    example = example_that_must_not_start(monkeypatch)
    with pytest.raises(SystemExit, match="records no bos_token_id"):
        example.main([*common(tiny_llm, tiny_llm / "run"), "--recover-steps", "2"])
    from transformers import AutoConfig

    model = str(tiny_llm / "model")
    assert example.start_token(model, AutoConfig.from_pretrained(model)) is None


def test_a_folder_of_other_files_is_refused_and_left_alone(tiny_llm, capsys, monkeypatch):
    (tiny_llm / "run").mkdir()
    (tiny_llm / "run" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite is for a checkpoint folder only
        with pytest.raises(SystemExit):
            example_that_must_not_start(monkeypatch).main([*common(tiny_llm, tiny_llm / "run"), *extra])
        assert "holds no checkpoint" in capsys.readouterr().err
    assert os.listdir(tiny_llm / "run") == ["notes.txt"]


@pytest.mark.parametrize("where", ["model", "cwd", "above-model"])
def test_a_destination_that_could_lose_files_is_refused_even_with_overwrite(
    tiny_llm, capsys, monkeypatch, where
):
    (tiny_llm / "work").mkdir()
    monkeypatch.chdir(tiny_llm / "work")  # empty: refused as the current folder, not for its files
    out = {"model": tiny_llm / "model", "cwd": ".", "above-model": tiny_llm}[where]
    before = sorted(os.listdir(tiny_llm / "model"))
    with pytest.raises(SystemExit):
        example_that_must_not_start(monkeypatch).main([*common(tiny_llm, out), "--overwrite"])
    assert "--output-dir" in capsys.readouterr().err
    assert sorted(os.listdir(tiny_llm / "model")) == before


def test_a_dense_checkpoint_folder_is_refused_even_with_overwrite_and_hidden_files_are_no_checkpoint(
    tiny_llm, capsys, monkeypatch
):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llm / "model").save_pretrained(tiny_llm / "dense")
    before = sorted(os.listdir(tiny_llm / "dense"))
    with pytest.raises(SystemExit):
        example_that_must_not_start(monkeypatch).main([*common(tiny_llm, tiny_llm / "dense"), "--overwrite"])
    assert "--output-dir" in capsys.readouterr().err
    assert sorted(os.listdir(tiny_llm / "dense")) == before
    (tiny_llm / "fresh").mkdir()
    (tiny_llm / "fresh" / ".gitkeep").write_text("")
    result = load_example().main([*common(tiny_llm, tiny_llm / "fresh"), "--method", "magnitude"])
    assert result["checkpoint"] == str(tiny_llm / "fresh")


@pytest.mark.parametrize(
    ("device", "count", "message"),
    [("cuda", 0, "no CUDA device here"), ("cuda:1", 2, "runs on one GPU"), ("cuda", 2, "runs on one GPU")],
)
def test_the_gpu_it_runs_on_is_checked_before_any_work(tiny_llm, capsys, monkeypatch, device, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(SystemExit):
        example_that_must_not_start(monkeypatch).main(
            [*common(tiny_llm, tiny_llm / "run"), "--device", device]
        )
    assert message in capsys.readouterr().err


def test_an_earlier_runs_folder_takes_overwrite(tiny_llm, capsys):
    out = tiny_llm / "run"
    example = load_example()
    example.main([*common(tiny_llm, out), "--method", "magnitude"])
    with pytest.raises(SystemExit):
        example.main([*common(tiny_llm, out), "--method", "magnitude"])
    assert "holds a 2:4 checkpoint: give another folder, or --overwrite" in capsys.readouterr().err
    result = example.main([*common(tiny_llm, out), "--method", "magnitude", "--overwrite", "--seed", "1"])
    assert json.loads((out / "results.json").read_text())["args"]["seed"] == 1 == result["args"]["seed"]


def test_a_text_too_short_for_the_windows_fails_before_the_model_changes(tiny_llm, monkeypatch):
    (tiny_llm / "short.txt").write_text("To be.", encoding="utf-8")
    args = common(tiny_llm, tiny_llm / "run")
    args[args.index("--train-text") + 1] = str(tiny_llm / "short.txt")
    example = example_that_must_not_start(monkeypatch)
    with pytest.raises(SystemExit, match="error: the text has .* too few for windows of 32"):
        example.main(args)
    assert not (tiny_llm / "run").exists()
    with pytest.raises(SystemExit, match="error: .*missing: no such file or folder"):
        args[args.index("--train-text") + 1] = str(tiny_llm / "missing")
        example.main(args)


@pytest.mark.parametrize("case", ["encoder", "context"])
def test_a_model_the_workflow_cannot_take_is_refused_before_any_work(tiny_llm, monkeypatch, case):
    args = common(tiny_llm, tiny_llm / "run")
    if case == "encoder":  # a BERT encoder: transformers would load it as BertLMHeadModel with a random head
        args[args.index("--model") + 1] = MINILM
        message = "BertModel model, not a decoder-only causal LM"
    else:
        args[args.index("--seq") + 1] = "200"  # the tiny Llama's context is 128
        message = "--seq 200 is longer than the model's context"
    with pytest.raises(SystemExit, match=message):
        example_that_must_not_start(monkeypatch).main(args)
    assert not (tiny_llm / "run").exists()


def test_hidden_files_of_a_text_folder_are_not_read(tiny_llm):
    (tiny_llm / "calib" / "._plays.txt").write_bytes(b"\x00\x05\x16\x07 not utf-8 \xff")  # macOS metadata
    assert load_example().read_text(tiny_llm / "calib") == (tiny_llm / "calib" / "plays.txt").read_text()


def test_the_recovery_rows_mix_text_windows_and_teacher_samples(tiny_llm):
    """`llm_recipe.recovery_rows`: the asked share sampled from the teacher, a smaller pool repeated."""
    example = load_example()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llm / "model")
    ids = torch.arange(1000, 1400)  # not ids the sampler starts with: the cut windows are known
    rows, seconds = example.recovery_rows(
        teacher, ids, 6, 8, teacher_fraction=0.5, teacher_pool=2, batch_size=2, seed=0
    )
    cut = [r for r in rows if r[0] >= 1000 and torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 8))]
    sampled = [r for r in rows if r[0] == teacher.config.bos_token_id]
    assert len(rows) == 6 and len(cut) == 3 and len(sampled) == 3 and seconds > 0
    assert len({tuple(r.tolist()) for r in sampled}) == 2
    with pytest.raises(ValueError, match="teacher_pool must be at least 1"):
        example.recovery_rows(teacher, ids, 6, 8, teacher_fraction=0.5, teacher_pool=0)
    with pytest.raises(ValueError, match="too few for windows of 8"):
        example.recovery_rows(teacher, ids[:8], 6, 8, teacher_fraction=0.5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        example.perplexity(teacher, ids, 1, "cpu")
