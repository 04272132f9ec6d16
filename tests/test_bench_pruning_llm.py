"""The real-LLM pruning benchmark runs end to end on a tiny Llama on the CPU, including a recovery in two stages
(`--save-recovered`, then `--start-from`), as the GPU runs use it."""

import importlib.util
import json
import os

import pytest
import torch

from tests.conftest import MINILM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.isdir(MINILM), reason=f"needs {MINILM} (HF_SEMISPARSE_SHARED)")


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_pruning_llm", os.path.join(ROOT, "benchmarks", "bench_pruning_llm.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_recovery_in_two_stages_goes_on_from_the_saved_model(tiny_llm):
    bench = load_bench()
    common = [
        "--calib-dir", str(tiny_llm / "calib"), "--eval-file", str(tiny_llm / "eval.txt"),
        "--samples", "4", "--seq", "32", "--batch-size", "2", "--eval-tokens", "256", "--window", "64",
        "--device", "cpu", "--recover-steps", "2", "--recover-batch", "2", "--recover-lr", "1e-3",
    ]  # fmt: skip
    first, second = tiny_llm / "first.json", tiny_llm / "second.json"
    bench.main(
        [
            "--model", str(tiny_llm / "model"), "--methods", "dense", "sparsegpt", *common,
            "--save-recovered", str(tiny_llm / "stage1"), "--out", str(first),
        ]
    )  # fmt: skip
    bench.main(
        [
            "--model", str(tiny_llm / "model"), "--methods", "sparsegpt", *common, "--recover-seed", "7",
            "--start-from", str(tiny_llm / "stage1"), "--out", str(second),
        ]
    )  # fmt: skip
    dense, pruned, recovered = json.loads(first.read_text())["runs"]
    assert [dense["method"], pruned["method"], recovered["method"]] == [
        "dense",
        "sparsegpt",
        "sparsegpt+distill",
    ]
    resumed, recovered_again = json.loads(second.read_text())["runs"]
    assert resumed["start_from"] == str(tiny_llm / "stage1") and resumed["prune_seconds"] == 0.0
    # the saved stage-1 model is what stage 2 starts from (compressed save and load are exact in float32)
    assert resumed["perplexity"] == pytest.approx(recovered["perplexity"], rel=1e-5)
    assert recovered_again["perplexity"] != recovered["perplexity"]  # it trained on


def test_staged_recovery_options_without_their_run_are_refused(tiny_llm, capsys):
    bench = load_bench()
    model = ["--model", str(tiny_llm / "model"), "--device", "cpu"]
    with pytest.raises(SystemExit):
        bench.main([*model, "--methods", "dense", "--start-from", str(tiny_llm / "model")])
    assert "put sparsegpt in --methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([*model, "--methods", "sparsegpt", "--save-recovered", str(tiny_llm / "out")])
    assert "give --recover-steps" in capsys.readouterr().err


def test_a_fraction_of_the_recovery_windows_is_sampled_from_the_teacher(tiny_llm):
    bench = load_bench()
    teacher = bench.load(str(tiny_llm / "model"), "cpu")
    train_ids = torch.arange(1000, 1400)  # not token ids the sampler starts with: the cut windows are known
    args = bench.argparse.Namespace(
        seed=0, recover_seed=None, recover_steps=3, recover_batch=2, seq=8, recover_generated=0.5,
        generate_batch=2, generate_temperature=1.0, generate_sequences=None,
    )  # fmt: skip
    data, seconds = bench.recovery_windows(teacher, train_ids, args)
    assert len(data) == 6 and seconds > 0
    rows = [d["input_ids"] for d in data]
    assert all(torch.equal(d["input_ids"], d["labels"]) and len(d["input_ids"]) == 8 for d in data)
    cut = [r for r in rows if r[0] >= 1000 and torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 8))]
    sampled = [r for r in rows if r[0] == teacher.config.bos_token_id]
    assert len(cut) == 3 and len(sampled) == 3
    assert len({tuple(r.tolist()) for r in sampled}) == 3
    args.generate_sequences = 2  # a pool of two sequences, repeated to fill the three windows
    data, _ = bench.recovery_windows(teacher, train_ids, args)
    sampled = [d["input_ids"] for d in data if d["input_ids"][0] == teacher.config.bos_token_id]
    assert len(sampled) == 3 and len({tuple(r.tolist()) for r in sampled}) == 2
    args.recover_generated = 0.0
    data, seconds = bench.recovery_windows(teacher, train_ids, args)
    assert seconds == 0.0 and all(d["input_ids"][0] >= 1000 for d in data)


def test_the_generated_fraction_is_checked(tiny_llm, capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_llm / "model"), "--device", "cpu", "--recover-generated", "1.5"])
    assert "--recover-generated is a fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_llm / "model"), "--device", "cpu", "--generate-sequences", "0"])
    assert "--generate-sequences must be at least 1" in capsys.readouterr().err
