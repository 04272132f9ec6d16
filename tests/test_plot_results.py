"""benchmarks/plot_results.py: the performance page's figures are drawn from the committed JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
plot_results = importlib.util.module_from_spec(spec)
sys.modules["plot_results"] = plot_results  # its dataclasses look their module up there
spec.loader.exec_module(plot_results)

ENV = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "driver": "1",
    "torch": "2.11.0",
    "cusparselt": 800,
    "transformers": "5.23.0",
}


def result(model: str, times: dict[int, tuple[float, float]], env=ENV) -> dict:
    rows = [
        {"model": model, "batch": b, "seq": 384, "dense": {"median_ms": d}, "ours": {"median_ms": o}}
        for b, (d, o) in times.items()
    ]
    return {"env": env, "args": {}, "models": rows}


def test_every_figure_of_the_page_has_its_json_and_is_referenced():
    page = (ROOT / "docs" / "performance.md").read_text()
    for figure in plot_results.FIGURES:
        for name in figure.inputs:
            assert (ROOT / "benchmarks" / "results" / name).is_file(), name
        assert f"img/{figure.output}" in page
        assert (ROOT / "docs" / "img" / figure.output).is_file()


def test_plot_draws_a_png_and_refuses_mixed_machines(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result("bert-base", {4: (5.0, 4.0), 64: (12.0, 10.0)})))
    b.write_text(json.dumps(result("bert-large", {4: (9.0, 8.5)}, env={**ENV, "gpu": "A100"})))
    out = plot_results.plot([str(a)], str(tmp_path / "fig" / "a.png"), "2026-11-24", "python x.py")
    assert Path(out).read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path / "fig") == ["a.png"]  # no temporary file left
    with pytest.raises(ValueError, match="plot them apart"):
        plot_results.plot([str(a), str(b)], str(tmp_path / "ab.png"))
    (tmp_path / "c.json").write_text(json.dumps({"gemms": []}))
    with pytest.raises(ValueError, match="not a bench_inference.py result"):
        plot_results.plot([str(tmp_path / "c.json")], str(tmp_path / "c.png"))


def test_generate_figure_draws_a_png_and_refuses_other_results(tmp_path):
    run = {
        "dtype": "fp16",
        "decode": [
            {"batch": 1, "compiled_dense_tokens_per_s": 140.0, "compiled_ours_tokens_per_s": 145.0},
            {"batch": 8, "compiled_dense_tokens_per_s": 930.0, "compiled_ours_tokens_per_s": 935.0},
        ],
    }
    path = tmp_path / "gen.json"
    path.write_text(json.dumps({"env": ENV, "layers": 32, "prompt": 512, "new_tokens": 128, "runs": [run]}))
    out = plot_results.plot_generate(str(path), str(tmp_path / "g" / "gen.png"), "2026-12-01", "python x.py")
    assert Path(out).read_bytes()[:4] == b"\x89PNG" and os.listdir(tmp_path / "g") == ["gen.png"]
    (tmp_path / "inf.json").write_text(json.dumps(result("bert-base", {4: (5.0, 4.0)})))
    with pytest.raises(ValueError, match="not a bench_generate.py result"):
        plot_results.plot_generate(str(tmp_path / "inf.json"), str(tmp_path / "x.png"))
