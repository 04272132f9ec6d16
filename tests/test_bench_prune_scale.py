"""The GPU scale benchmark runs end to end at tiny size on the CPU (so the H200 run does not crash)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tiny", "--device", "cpu", "--samples", "4", "--seq", "32", "--batch-size", "2", "--layers", "2"]


def run_bench(tmp_path, *extra: str) -> list[dict]:
    """Run benchmarks/bench_prune_scale.py at tiny size with `extra` arguments; its JSON's runs."""
    spec = importlib.util.spec_from_file_location(
        "bench_prune_scale", os.path.join(ROOT, "benchmarks", "bench_prune_scale.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "scale.json"
    bench.main([*TINY, *extra, "--out", str(out)])
    return json.loads(out.read_text())["runs"]


def test_bench_prune_scale_tiny_cpu(tmp_path):
    runs = run_bench(tmp_path)
    assert [(r["shape"], r["method"]) for r in runs] == [
        ("tiny", "sparsegpt"),
        ("tiny", "wanda"),
        ("tiny", "sparsegpt"),
    ]
    for r in runs:
        assert r["pipeline"] == "sequential" and r["all_24"], r
        assert r["blocks_timed"] == r["layers"] and len(r["block_s"]) == r["layers"]
        assert r["extrapolated"] and r["estimated_full_s"] >= r["capture_s"]
        assert r["host_peak_rss_gib"] > 0
        assert r["reconstruct_epochs"] == 0 and "reconstruction" not in r


def test_bench_prune_scale_tiny_cpu_with_reconstruction(tmp_path):
    (run,) = run_bench(tmp_path, "--methods", "sparsegpt", "--blocks-70b", "0", "--reconstruct-epochs", "1")
    assert run["reconstruct_epochs"] == 1 and run["all_24"]
    assert [r["block"] for r in run["reconstruction"]] == ["model.layers.0", "model.layers.1"]
    assert run["blocks_tuned"] == 2 and all(r["applied"] for r in run["reconstruction"])
    assert all(r["error_after"] < r["error_before"] for r in run["reconstruction"])


def test_offload_activations_reaches_the_pruner_and_the_json(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_prune_scale", os.path.join(ROOT, "benchmarks", "bench_prune_scale.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []
    real = bench.calibrated_prune_

    def recording(*args, **kwargs):
        seen.append(kwargs.get("offload_activations"))
        return real(*args, **kwargs)

    bench.calibrated_prune_ = recording
    for extra, expected in (([], None), (["--offload-activations"], True)):
        out = tmp_path / "scale.json"
        bench.main([*TINY, "--methods", "sparsegpt", "--blocks-70b", "0", *extra, "--out", str(out)])
        (run,) = json.loads(out.read_text())["runs"]
        assert run["offload_activations"] is expected and seen[-1] is expected and run["all_24"]
