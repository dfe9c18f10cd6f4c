"""make gpu-report, make cpu-repro and make l2-compare (experiments/) run end to end on tiny settings (no numbers
are asserted), and each experiment's script runs by `python -m experiments.NAME` and by its path."""
import json
import os

import pytest
import torch

from experiments import common, cpu_repro, gpu_report, l2_compare


def test_gpu_report_smoke(tmp_path):
    gpu_report.main(["--smoke", str(tmp_path)])
    out = tmp_path / "gpu-report"
    steps = list(gpu_report.all_steps(gpu_report.smoke_setting(str(tmp_path))))
    for name in steps:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["step"] == name and {"device", "torch", "cuda", "git_commit"} <= set(record["environment"])
    projections = json.loads((out / "projections.json").read_text())["result"]
    assert projections["make_cifar_hours_one_gpu"] > 0 and projections["imagenet_epoch_hours_per_gpu"]["llr-2"] > 0
    summary = (out / "summary.md").read_text()
    assert all(f"## {name}" in summary for name in steps)
    assert set(json.loads((out / "fast-path.json").read_text())["result"]["variants"]) == {
        name for name, _ in gpu_report.FAST_PATH}
    profile = (out / "profile.txt").read_text()
    assert "== plain:" in profile and "== llr-2:" in profile and "[profile.txt](profile.txt)" in summary
    compiled = json.loads((out / "compiled-cifar.json").read_text())["result"]["results"]
    assert {"llr-2+compiled", "plain+compiled"} <= set(compiled)
    assert compiled["llr-2+compiled"]["ratio_to_eager"] > 0 and "| llr-2+compiled |" in summary
    assert "== llr-2+compiled:" in (out / "compiled-profile.txt").read_text()
    first_order = json.loads((out / "first-order.json").read_text())["result"]["results"]
    assert {f"{m}{c}" for m in ("plain", "llr-1", "llr-fo-1", "llr-2", "llr-fo-2") for c in ("", "+compiled")} == set(
        first_order) and "| llr-fo-1+compiled |" in summary


def test_gpu_report_runs_the_performance_row_first_and_only_what_fits_the_budget(tmp_path, capsys):
    """The order: compiled-cifar (the performance row: plain, LLR-2, ADV-10 eager and compiled), then the
    first-order form against the exact one, then the contrast, then the rest; --budget runs the steps in order while the next one's estimate fits, and
    the end says what is left and how long it should take."""
    steps = list(gpu_report.ordered(gpu_report.all_steps(gpu_report.smoke_setting(str(tmp_path)))))
    contrast = [n for n in steps if n.startswith("contrast-")]
    assert steps[:2] == ["compiled-cifar", "first-order"] and steps[2:2 + len(contrast)] == contrast and contrast
    assert steps.index("contrast-train-p3-adv2-authors") < steps.index("contrast-eval-p3-adv2-authors")
    assert all(gpu_report.estimate_minutes(n) <= 8 for n in steps if n != "compiled-cifar-all")
    budget = gpu_report.estimate_minutes("compiled-cifar") + 1  # the first step fits, the second does not
    gpu_report.main(["--smoke", str(tmp_path), "--budget", str(budget)])
    printed = capsys.readouterr().out
    done = sorted(p.name for p in (tmp_path / "gpu-report").glob("*.json"))
    assert done == ["compiled-cifar.json"]
    compiled = json.loads((tmp_path / "gpu-report" / "compiled-cifar.json").read_text())["result"]["results"]
    assert {f"{m}{c}" for m in ("plain", "llr-2", "adv-10") for c in ("", "+compiled")} <= set(compiled)
    assert f"more than the" in printed and "stopping before it" in printed
    total = sum(gpu_report.estimate_minutes(n) for n in steps[1:])
    assert f"left: {len(steps) - 1} steps, about {total:g} min" in printed
    gpu_report.main(["--smoke", str(tmp_path), "--list"])
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[0] == "done" and listed[0].endswith("compiled-cifar") and "min" in listed[1]
    with pytest.raises(SystemExit, match="--budget must be a positive number"):
        gpu_report.main(["--smoke", str(tmp_path), "--budget", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_report_needs_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA GPU here"):
        gpu_report.main(["--data-dir", str(tmp_path)])


def test_cpu_repro_smoke(tmp_path):
    cpu_repro.main(["--smoke", str(tmp_path), "--only", "train"])
    cpu_repro.main(["--smoke", str(tmp_path), "--only", "report"])  # a report while the evaluations are pending
    out = tmp_path / "docs"
    partial = json.loads((out / "summary.json").read_text())
    assert {row["pending"] for row in partial["runs"].values()} == {"evaluation"} and partial["surface_images"] == []
    assert all(row["validation"]["epoch"] == 2 for row in partial["runs"].values())
    assert (out / "table.md").read_text().count("evaluation pending") == 3 and (out / "validation.png").exists()
    cpu_repro.main(["--smoke", str(tmp_path)])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"plain", cpu_repro.COLLAPSING, cpu_repro.LINEAR}
    for name, row in summary["runs"].items():
        for published in ("safetensors", "eval.json", "log.jsonl", "config.json", "gamma.json"):
            assert os.path.exists(out / f"{name}.{published}"), published
        assert list(row["gamma_by_steps"]) == ["1", "2"] and row["gamma_by_steps"]["1"] <= row["gamma_by_steps"]["2"]
        assert row["pending"] is None and 0 <= row["worst_case"] <= row["nominal"] <= 1 and row["epoch_time_x_plain"] > 0
        assert row["evaluated_on"] == f"cpu, torch {torch.__version__}" and "robust" not in row
        assert (f"paired_vs_{cpu_repro.COLLAPSING}" in row) == (name != cpu_repro.COLLAPSING)
    assert "Evaluated on" not in (out / "table.md").read_text()  # one machine: nothing to say
    assert summary["runs"]["plain"]["epoch_time_x_plain"] == 1
    for figure in ("validation.png", "gamma-test.png", f"surface-{summary['surface_images'][0]}.png"):
        assert (out / figure).stat().st_size > 0
    assert "| run | Nominal |" in (out / "table.md").read_text()
    readme = (tmp_path / "README.md").read_text()  # the results land between the markers, the rest stays
    table_begin, table_end = cpu_repro.marked("table")
    assert readme.startswith("before\n" + table_begin + "\n| run | Nominal |") and "between" in readme
    assert f"(docs/surface-{summary['surface_images'][0]}.png)" in readme and "(docs/validation.png)" in readme
    assert readme.endswith("after\n")
    cpu_repro.main(["--smoke", str(tmp_path)])  # everything is done: nothing is trained or evaluated again


def test_paired_test_is_the_exact_mcnemar_test():
    ours, reference = [True] * 3 + [False] * 7, [False] * 3 + [True] * 2 + [False] * 5
    # 3 images only ours, 2 only the reference: p = 2 * P(Binomial(5, 1/2) <= 2) = 2 * 16/32 = 1
    assert cpu_repro.paired_test(ours, reference) == {"only_this": 3, "only_reference": 2, "p_mcnemar": 1.0}
    # 0 against 6: p = 2 / 2**6; images that both keep or both lose do not count
    assert cpu_repro.paired_test([True] * 8, [True, True] + [False] * 6)["p_mcnemar"] == 2 / 64
    assert cpu_repro.paired_test([True] * 8, [True] * 8)["p_mcnemar"] == 1.0


def test_cpu_repro_table_names_the_machines_when_rows_were_evaluated_on_several():
    row = {"pending": None, "nominal": 0.5, "fgsm20": 0.3, "worst_case": 0.2, "drop_fgsm20_to_worst": 0.1,
           "gamma_mean": 0.05, "epoch_time_x_plain": 1.0, "flags_raised": []}
    summary = {"runs": {"a": {**row, "label": "A", "evaluated_on": "cpu, torch 2"},
                        "b": {**row, "label": "B", "evaluated_on": "NVIDIA H200, torch 2"},
                        "c": {**row, "label": "C", "evaluated_on": "cpu, torch 2"},
                        "d": {"label": "D", "pending": "evaluation"}}}
    text = cpu_repro.table(summary)
    assert text.endswith("\nEvaluated on cpu, torch 2: A; C.\n\nEvaluated on NVIDIA H200, torch 2: B.\n")
    assert "| A | 50.0 | 30.0 |" in text and "| D |" in text


def test_l2_compare_smoke(tmp_path):
    l2_compare.main(["--smoke", str(tmp_path)])
    out = tmp_path / "docs"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"soc-lln", "llr"}
    soc, llr = summary["runs"]["soc-lln"], summary["runs"]["llr"]
    assert set(soc["certified"]) == set(l2_compare.RADII) and soc["contradictions"] == 0 and llr["certified"] == {}
    for name, row in summary["runs"].items():
        report = json.loads((out / f"{name}.eval.json").read_text())
        assert report["norm"] == "l2" and ("certificates" in report) == (name == "soc-lln")
        assert 0 <= row["empirical"] <= row["nominal"] <= 1 and row["epoch_seconds"] > 0
    assert all(0 <= a <= soc["empirical"] for a in soc["certified"].values())  # a certificate never beats an attack
    readme = (tmp_path / "README.md").read_text()
    begin, end = cpu_repro.marked("table", "l2-compare", "l2_compare.py")
    assert readme.startswith("before\n" + begin + "\n| model, training | clean |") and readme.endswith(end + "\nafter\n")
    l2_compare.main(["--smoke", str(tmp_path)])  # everything is done: nothing is trained or evaluated again


@pytest.mark.parametrize("script", [cpu_repro, l2_compare])
def test_experiments_without_the_cifar_copy_fail_in_one_line(script, monkeypatch):
    monkeypatch.setattr(common, "DATA", "data/no-such-copy")
    with pytest.raises(SystemExit, match="no CIFAR-10 copy at data/no-such-copy: unpack it with"):
        script.main([])


@pytest.mark.parametrize("invocation", [["-m", "experiments.gpu_report"], ["experiments/l2_compare.py"]])
def test_experiments_run_as_modules_and_by_path(invocation):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, *invocation, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--smoke" in result.stdout, result.stderr[-2000:]


def test_experiment_folders_hold_their_write_ups():
    from conftest import ROOT

    for name in ("cpu-repro", "l2-compare", "gpu-report"):
        readme = os.path.join(ROOT, "experiments", name, "README.md")
        assert os.path.isfile(readme) and "# " in open(readme).read(200)
    readme = open(os.path.join(ROOT, "experiments", "cpu-repro", "README.md")).read()
    for begin, end in (cpu_repro.marked("table"), cpu_repro.marked("figures")):  # where cpu_repro.py writes
        assert begin in readme and end in readme
    assert all(l2 in open(os.path.join(ROOT, "experiments", "l2-compare", "README.md")).read()
               for l2 in cpu_repro.marked("table", "l2-compare", "l2_compare.py"))
