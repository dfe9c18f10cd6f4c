"""bench.py runs in seconds on a tiny model and writes valid JSON with every method (no timing assertions)."""
import json

import bench


def test_bench_writes_every_method(tmp_path):
    out = str(tmp_path / "bench.json")
    bench.run(bench.get_args(["--arch", "wrn-10-1", "--batch-size", "4", "--image-size", "8", "--rounds", "2",
                              "--warmup", "1", "--device", "cpu", "--out", out]))
    with open(out) as f:
        report = json.load(f)
    assert set(report["results"]) == set(bench.VARIANTS)
    for name, r in report["results"].items():
        assert len(r["ms_all"]) == 2 and r["ms_median"] > 0 and r["images_per_s"] > 0
        assert r["ms_q1"] <= r["ms_median"] <= r["ms_q3"]
        assert r["peak_memory_gib"] is None  # measured on CUDA only
    assert report["results"]["plain"]["ratio_to_plain"] == 1.0
    assert report["device"] == "cpu" and report["arch"] == "wrn-10-1"
