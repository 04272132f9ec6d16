import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "benchmarks", "results")


def load_probe():
    path = os.path.join(HERE, "..", "benchmarks", "probes", "probe_segment_k_cache.py")
    spec = importlib.util.spec_from_file_location("probe_segment_k_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recorded_cache_loses_its_17_decode_segment_k_decisions_and_nothing_else():
    """The A/B in docs/guides/generation.md: the H200 cache of 2026-12-03 had 17 Segment-K decisions at decode
    sizes; the copy runs the plain kernel of the same id there and keeps every other decision as it was."""
    with open(
        os.path.join(RESULTS, "h200_tuning_cache_prefill_threads_2026-12-03.json"), encoding="utf-8"
    ) as f:
        cache = json.load(f)
    plain, changed = load_probe().without_segment_k(cache)
    assert changed == 17
    for key, entry in cache["entries"].items():
        new = plain["entries"][key]
        decode_segment_k = int(key.rsplit("xM", 1)[1]) <= 256 and entry["alg"]["split_k"] == -1
        if decode_segment_k:
            assert new["alg"] == {
                "alg_id": entry["alg"]["alg_id"],
                "split_k": 1,
                "split_k_mode": 1,
                "split_k_buffers": 1,
            }
            assert {k: v for k, v in new.items() if k != "alg"} == {
                k: v for k, v in entry.items() if k != "alg"
            }
        else:
            assert new == entry
    assert plain["version"] == cache["version"]
