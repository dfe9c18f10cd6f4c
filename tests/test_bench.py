"""bench.py runs in seconds on a tiny model and writes valid JSON with every method (no timing assertions)."""
import json

import bench


def test_bench_writes_every_method(tmp_path):
    out = str(tmp_path / "bench.json")
    bench.run(bench.get_args(["--arch", "wrn-10-1", "--batch-size", "4", "--image-size", "8", "--rounds", "2",
                              "--warmup", "1", "--device", "cpu", "--out", out]))
    with open(out) as f:
        report = json.load(f)
    assert set(report["results"]) == {n for n in bench.VARIANTS if not n.startswith("lipschitz")}
    for name, r in report["results"].items():
        assert len(r["ms_all"]) == 2 and r["ms_median"] > 0 and r["images_per_s"] > 0
        assert r["ms_q1"] <= r["ms_median"] <= r["ms_q3"]
        assert r["peak_memory_gib"] is None  # measured on CUDA only
    assert report["results"]["plain"]["ratio_to_plain"] == 1.0
    assert report["device"] == "cpu" and report["arch"] == "wrn-10-1"


def test_bench_builds_the_activation_asked_for(tmp_path, monkeypatch):
    """co-bench's runs are ReLU: its step costs must be timed on ReLU models, not the softplus default."""
    import models

    built, build = [], models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    out = str(tmp_path / "bench.json")
    bench.run(bench.get_args(["--arch", "cnn-1x4", "--batch-size", "2", "--rounds", "1", "--warmup", "1",
                              "--methods", "adv-1", "--device", "cpu", "--activation", "relu", "--out", out]))
    assert [m.config["activation"] for m in built] == ["relu"] and json.load(open(out))["activation"] == "relu"


def test_bench_profile_names_where_each_method_spends_its_time(tmp_path):
    out = str(tmp_path / "bench.json")
    bench.run(bench.get_args(["--arch", "wrn-10-1", "--batch-size", "2", "--image-size", "8", "--rounds", "1",
                              "--warmup", "1", "--methods", "llr-1", "--device", "cpu", "--profile", "--out", out]))
    with open(out) as f:
        report = json.load(f)
    assert report["profile"] == str(tmp_path / "bench.profile.txt")
    sections = open(report["profile"]).read().split("== ")[1:]
    assert [s.split(":")[0] for s in sections] == ["plain", "llr-1"]
    assert all("aten::convolution" in s and "wrn-10-1, batch 2, 8px, cpu" in s for s in sections)


def test_bench_times_the_fast_soc_gradient_against_the_exact_one(tmp_path):
    """On a lipconvnet the default variants are those that can train it: the SOC gradients, not LLR."""
    out = str(tmp_path / "bench.json")
    bench.run(bench.get_args(["--arch", "lipconvnet-5-c4", "--batch-size", "2", "--image-size", "32", "--rounds", "1",
                              "--warmup", "1", "--device", "cpu", "--out", out]))
    with open(out) as f:
        results = json.load(f)["results"]
    assert {"plain", "lipschitz", "lipschitz-exact", "adv-10"} <= set(results) and "llr-2" not in results


def test_bench_refuses_a_method_that_cannot_train_the_model():
    import pytest

    with pytest.raises(SystemExit, match="llr-2 cannot train lipconvnet-5-c4"):
        bench.run(bench.get_args(["--arch", "lipconvnet-5-c4", "--methods", "llr-2", "--device", "cpu"]))


def test_bench_refuses_untimed_first_calls_and_unknown_names():
    """--warmup 0 would time a method's first call (allocation, kernel choice, lazy imports) as a step."""
    import pytest

    with pytest.raises(SystemExit, match="--warmup must be at least 1"):
        bench.run(bench.get_args(["--warmup", "0", "--methods", "plain", "--device", "cpu"]))
    for name in ("llr-0", "llr-x", "cure-2", "llr2"):
        with pytest.raises(SystemExit, match=f"unknown method '{name}'; choose from plain, .* llr-<k>"):
            bench.run(bench.get_args(["--methods", name, "--device", "cpu"]))


def test_bench_takes_any_step_count_and_prints_only_the_columns_it_measured(tmp_path, capsys):
    """llr-<k> for any k (llr-10: the authors' search length); no compiled columns without --compile."""
    out = str(tmp_path / "bench.json")
    bench.run(bench.get_args(["--arch", "wrn-10-1", "--batch-size", "2", "--image-size", "8", "--rounds", "1",
                              "--methods", "llr-3,adv-4,llr-fo-3", "--device", "cpu", "--out", out]))
    assert (bench.variant("llr-10"), bench.variant("trades-3")) == (("llr", {"steps": 10}), ("trades", {"steps": 3}))
    assert bench.variant("llr-fo-10") == ("llr", {"steps": 10, "first_order": True})  # first-order LLR
    with open(out) as f:
        assert set(json.load(f)["results"]) == {"plain", "llr-3", "adv-4", "llr-fo-3"}
    header = capsys.readouterr().out.splitlines()[1]
    assert "peak GiB" in header and "x eager" not in header and "compile s" not in header


def test_bench_times_each_method_eager_and_compiled_in_one_run(tmp_path, capsys):
    """--compile: every method's compiled twin in the same rounds, its ratio to plain in the same
    mode and to its eager self, and its first (compiling) call's time."""
    import torch

    out = str(tmp_path / "bench.json")
    torch._dynamo.reset()
    bench.run(bench.get_args(["--arch", "wrn-10-1", "--batch-size", "2", "--image-size", "8", "--rounds", "1",
                              "--warmup", "1", "--methods", "llr-1,cure", "--compile",
                              "--compile-backend", "aot_eager", "--device", "cpu", "--out", out]))
    torch._dynamo.reset()
    assert "x eager" in capsys.readouterr().out.splitlines()[1]
    with open(out) as f:
        results = json.load(f)["results"]
    names = ["plain", "llr-1", "cure"]
    assert set(results) == set(names) | {n + "+compiled" for n in names}
    assert results["plain+compiled"]["ratio_to_plain"] == 1.0
    for name in names:
        twin = results[name + "+compiled"]
        assert twin["ratio_to_eager"] == twin["ms_median"] / results[name]["ms_median"]
        assert twin["first_call_s"] > 0 and "ratio_to_eager" not in results[name]
