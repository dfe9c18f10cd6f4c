"""experiments/co_bench.py: the collapse rule (on hand-made logs and on the positive control's committed ones),
the setting rule on hand-made exploration tables, the run list (names, flags as train_cifar.py reads them,
every method, seeds, the grid), the workers' shares, and every stage end to end on generated images,
stopped and resumed, then done (no accuracy is asserted)."""
import json
import os
import subprocess
import sys

import pytest

import ball
import eval as eval_py
import methods
import train_cifar
from conftest import ROOT
from experiments import co_bench as cb, common

POSITIVE_CONTROL = os.path.join(os.path.dirname(cb.HERE), "experiments", "positive-control")


def log(*pairs):
    return [{"epoch": i + 1, "fgsm": f, "pgd": p} for i, (f, p) in enumerate(pairs)]


def test_collapse_rule():
    assert cb.collapsed(log((0.20, 0.16), (0.18, 0.10), (0.13, 0.02)))  # 0.02 <= 0.16/4 and <= 0.13/2
    assert cb.collapsed(log((0.20, 0.16), (0.08, 0.04)))  # both bounds are "at most": equality collapses
    assert not cb.collapsed(log((0.20, 0.16), (0.12, 0.05)))  # 0.05 > a quarter of the best
    assert not cb.collapsed(log((0.20, 0.16), (0.03, 0.02)))  # weak under FGSM too: 0.02 > 0.03/2
    assert not cb.collapsed(log((0.10, 0.08), (0.20, 0.16), (0.21, 0.17)))  # rising: no collapse
    assert not cb.collapsed(log((0.20, 0.01), (0.20, 0.16)))  # a collapse that recovered by the end is none


def test_collapse_rule_on_the_positive_control():
    """Its committed logs (train_cifar.py runs, 2026-12-05): ReLU seed 1 collapsed (0.0% PGD-20 at the end, from
    14.2%); ReLU seed 0 fell from 14.3% to 3.9%, above a quarter of its best (3.6%), so the rule says no; seed 2
    and the softplus runs did not. (On the earlier private loop's logs, commit e815310, seed 0 ended at 1.7%
    and the rule said yes.)"""
    verdicts = {name: cb.collapsed(common.epoch_evaluations(os.path.join(POSITIVE_CONTROL, name)))
                for name in ("relu-seed0", "relu-seed1", "relu-seed2", "softplus-seed0", "softplus-seed1",
                             "softplus-seed2")}
    assert verdicts == {"relu-seed0": False, "relu-seed1": True, "relu-seed2": False, "softplus-seed0": False,
                        "softplus-seed1": False, "softplus-seed2": False}
    last = common.epoch_evaluations(os.path.join(POSITIVE_CONTROL, "relu-seed0"))
    assert len(last) == 30 and 0.25 * max(e["pgd"] for e in last) < last[-1]["pgd"] < 0.3 * max(e["pgd"] for e in last)


def cells(model, clean, fgsm, fgsmrs, done=True):
    """Exploration cells of one model at ε 8, 12, 16: ADV-10 clean, FGSM collapses of 3, FGSM-RS collapsed."""
    return {(model, e): {"fgsm": [True] * k + [False] * (3 - k), "fgsmrs": rs, "adv10": {"clean": c, "pgd": 0.1},
                         "done": done, "seconds": [10.0]} for e, c, k, rs in zip((8, 12, 16), clean, fgsm, fgsmrs)}


def test_setting_rule():
    choose = lambda table: cb.choose_setting(table, cb.SETTING)[0]  # noqa: E731
    large = cells("cnn-1x16", (0.5, 0.45, 0.4), (1, 3, 3), (False, False, True))
    # ADV-10 under 30% at 16: the pair is (8, 12) though FGSM-RS collapses at 16
    assert choose({**cells("cnn-1x4", (0.35, 0.31, 0.25), (1, 3, 3), (False, False, True)), **large}) == {
        "model": "cnn-1x4", "eps": [8, 12]}
    # a pair with an ε where FGSM-RS collapsed comes first, then the smallest larger ε, then the smallest lower one
    assert choose({**cells("cnn-1x4", (0.4, 0.35, 0.31), (2, 3, 3), (False, False, True)), **large}) == {
        "model": "cnn-1x4", "eps": [8, 16]}
    assert choose({**cells("cnn-1x4", (0.4, 0.35, 0.31), (2, 3, 3), (False, False, False)), **large}) == {
        "model": "cnn-1x4", "eps": [8, 12]}
    # FGSM collapses 3/3 only where ADV-10 is under 30%: the larger model decides, once it is explored
    small = cells("cnn-1x4", (0.33, 0.28, 0.22), (1, 2, 3), (False, False, False))
    assert choose({**small, **cells("cnn-1x16", (0.5, 0.45, 0.4), (1, 3, 3), (False, True, True), done=False)}) is None
    assert choose({**small, **large}) == {"model": "cnn-1x16", "eps": [8, 16]}
    assert choose({**small, **cells("cnn-1x16", (0.5, 0.45, 0.4), (3, 2, 2), (False, False, False))}) is None
    # the smaller model's cells must be finished first, whatever the larger shows
    assert choose({**cells("cnn-1x4", (0.4, 0.35, 0.31), (2, 3, 3), (False, False, True), done=False), **large}) is None


def test_a_setting_by_hand_only_when_the_finished_exploration_meets_none(tmp_path, monkeypatch):
    """--choose MODEL:LO,HI --reason TEXT writes setting.json as the rule would, its rule "by hand: TEXT";
    refused while the rule could still choose, when it chooses, without a reason, for what was not explored,
    and once the setting is fixed."""
    monkeypatch.setattr(cb, "HERE", str(tmp_path))  # the setting's folder: HERE/co-bench
    os.makedirs(tmp_path / "train")  # --data: a CIFAR-10 copy as far as the command line looks
    none = {**cells("cnn-1x4", (0.34, 0.27, 0.25), (0, 3, 3), (False,) * 3),
            **cells("cnn-1x16", (0.39, 0.28, 0.24), (1, 3, 3), (True,) * 3)}  # ADV-10 under 30% at 12 and 16
    table = dict(none)
    monkeypatch.setattr(cb, "explore_table", lambda setting: table)
    reason = "ADV-10 under 30% at 12/255 on both models; FGSM-RS collapses on cnn-1x16"
    for argv, message in ((["--choose", "cnn-1x16:8,12"], "needs --reason"),
                          (["--choose", "cnn-1x16:8,10", "--reason", reason], "two explored ε"),
                          (["--choose", "cnn-1x16:12,8", "--reason", reason], "the lower first"),
                          (["--choose", "cnn-2x16:8,12", "--reason", reason], "a model of"),
                          (["--choose", "cnn-1x16", "--reason", reason], "write MODEL:LO,HI")):
        with pytest.raises(SystemExit, match=message):
            cb.main([*argv, "--data", str(tmp_path)])
    table.update(cells("cnn-1x16", (0.39, 0.28, 0.24), (1, 3, 3), (True,) * 3, done=False))
    with pytest.raises(SystemExit, match="not finished"):
        cb.main(["--choose", "cnn-1x16:8,12", "--reason", reason, "--data", str(tmp_path)])
    table.update(cells("cnn-1x4", (0.34, 0.31, 0.25), (0, 3, 3), (False,) * 3))
    table.update({k: {**v, "done": True} for k, v in table.items()})
    with pytest.raises(SystemExit, match="the rule chooses"):  # cnn-1x4 at 8 and 12 meets it now
        cb.main(["--choose", "cnn-1x16:8,12", "--reason", reason, "--data", str(tmp_path)])
    table.clear()
    table.update(none)
    chosen = cb.main(["--choose", "cnn-1x16:8,12", "--reason", reason, "--data", str(tmp_path)])
    written = cb.read_setting({"out": str(tmp_path / "co-bench")})
    assert written["model"] == chosen["model"] == "cnn-1x16" and written["eps"] == [8, 12]
    assert written["rule"] == f"by hand: {reason}" and written["grid_eps"] == 12 and "budget" in written
    with pytest.raises(SystemExit, match="setting.json exists"):
        cb.main(["--choose", "cnn-1x16:8,16", "--reason", reason, "--data", str(tmp_path)])
    monkeypatch.setattr(cb, "train_run", lambda setting, run: None)  # the explore stage again: nothing to train
    again = cb.explore({**cb.SETTING, "data": str(tmp_path), "out": str(tmp_path / "co-bench")}, (0, 1))
    assert again == written and "chosen by hand (no setting met the rule): cnn-1x16 at ε = 8/255 and 12/255" in (
        tmp_path / "co-bench" / "explore.md").read_text()


def grid_point(runs, lam, mu):
    return [r for r in runs if (r["lam"], r["mu"]) == (lam, mu)]


@pytest.fixture
def setting(tmp_path):
    return {**cb.SETTING, "data": str(tmp_path / "data"), "out": str(tmp_path / "out")}


def test_the_runs(setting):
    chosen = {"model": "cnn-1x4", "eps": [8, 16], "grid_eps": 16}
    explore, runs = cb.explore_runs(setting), cb.train_runs(setting, chosen)
    assert len({r["dir"] for r in explore}) == len(explore) == 2 * 3 * 5
    assert len(runs) == 2 * (8 * 3 + 1) + 5 + 2 * 3 * 3 == len({r["dir"] for r in runs}) + 1  # a twin is a grid run
    assert {r["method"] for r in runs} == set(cb.METHODS) == set(cb.COMPARED) | {"adv10"} | set(cb.TWINS)
    for twin in cb.TWINS:  # the first-order runs and their exact twins: both ε, 3 seeds, the same flags but the form
        assert sorted((r["eps"], r["seed"]) for r in runs if r["method"] == twin) == [
            (e, s) for e in (8, 16) for s in (0, 1, 2)]
    for first_order, exact in cb.EXACT_TWIN.items():
        a, b = ([r for r in runs if r["method"] == m and r["eps"] == 8 and r["seed"] == 1][0] for m in (first_order, exact))
        assert train_cifar.get_args(a["argv"]).llr_first_order and not train_cifar.get_args(b["argv"]).llr_first_order
        assert vars(train_cifar.get_args(a["argv"])) == {**vars(train_cifar.get_args(b["argv"])), "llr_first_order": True,
                                                           "out": a["dir"]}
    assert [r["dir"] for r in runs if r["name"] == "llr1-83-e16-s0"] == [r["dir"] for r in grid_point(runs, 8, 3)]
    for method in cb.COMPARED:
        assert sorted((r["eps"], r["seed"]) for r in runs if r["method"] == method and r["lam"] is None) == [
            (e, s) for e in (8, 16) for s in (0, 1, 2)]
    assert [(r["eps"], r["seed"]) for r in runs if r["method"] == "adv10"] == [(8, 0), (16, 0)]
    grid = [r for r in runs if r["lam"] is not None]
    assert len(grid) <= 6 and {(r["lam"], r["mu"]) for r in grid} >= {(2, 0.6), (2, 3), (8, 0.6), (8, 3)}
    assert all(r["eps"] == 16 and r["seed"] == 0 for r in grid)
    by_dir = {r["dir"]: r for r in runs}  # the exploration's runs of the chosen model are the comparison's
    shared = [r for r in explore if r["dir"] in by_dir]
    assert len(shared) == 2 * 5 and all(by_dir[r["dir"]]["argv"] == r["argv"] for r in shared)
    for run in explore + runs:
        args = train_cifar.get_args(run["argv"])
        eps = ball.parse_eps(args.eps, args.norm)
        assert eps == pytest.approx(run["eps"] / 255) and (args.seed, args.arch) == (run["seed"], run["model"])
        assert (args.activation, args.pad_mode, args.optimizer, args.lr, args.lr_schedule, args.lr_peak,
                args.weight_decay, args.weight_decay_on, args.batch_size, args.epochs, args.val_n, args.eval_steps,
                args.gamma_n) == ("relu", "zeros", "adam", 0.003, "cyclic-gradalign", 0.4, 5e-4, "all", 128, 15,
                                  1000, 20, 0)
        options = {"fgsm": ("adv", {"steps": 1, "random_start": False, "step_size": pytest.approx(1.25 * eps),
                                    "bn": "train"}),
                   "fgsmrs": ("adv", {"steps": 1, "random_start": True, "step_size": pytest.approx(1.25 * eps),
                                      "bn": "train"}),
                   "adv10": ("adv", {"steps": 10, "random_start": True, "step_size": None, "bn": "train"}),
                   "nfgsm": ("n-fgsm", {"noise": 2.0, "step_size": None}), "gradalign": ("gradalign", {"weight": None}),
                   "elle": ("elle", {"weight": None}), "ellea": ("elle-a", {"lambda_max": 4000.0}),
                   "llr1-mu0": ("llr", {"steps": 1, "lam": run["lam"] or 2.0, "mu": 0.0 if run["lam"] is None
                                        else run["mu"]}),
                   "llr2": ("llr", {"steps": 2, "lam": 2.0, "mu": 0.6, "first_order": False}),
                   "llr1-83": ("llr", {"steps": 1, "lam": 8.0, "mu": 3.0, "first_order": False}),
                   "llr1fo-83": ("llr", {"steps": 1, "lam": 8.0, "mu": 3.0, "first_order": True, "h": 0.1}),
                   "llr2fo": ("llr", {"steps": 2, "lam": 2.0, "mu": 0.6, "first_order": True, "h": 0.1})}[run["method"]]
        assert args.method == options[0]
        given = {k: v for k, v in vars(args).items() if k.startswith(options[0].replace("-", "_") + "_")}
        assert {k: given[f"{options[0].replace('-', '_')}_{k}"] for k in options[1]} == options[1]
    assert methods.gradalign_weight(16 / 255) == pytest.approx(2.0) and methods.elle_weight(16 / 255) == 5000


def test_a_larger_model_is_explored_only_while_no_smaller_one_meets_the_rule(setting, monkeypatch):
    trained = []
    os.makedirs(setting["out"])
    monkeypatch.setattr(cb, "train_run", lambda setting, run: trained.append(run["model"]))
    monkeypatch.setattr(cb, "write_explore_table", lambda *args: None)
    for small_meets_it in (False, True):
        trained.clear()
        table = {**cells("cnn-1x4", (0.4, 0.35, 0.31), (2, 3, 3) if small_meets_it else (2, 2, 2), (False,) * 3),
                 **cells("cnn-1x16", (0.5, 0.45, 0.4), (1, 3, 3), (False, False, True), done=False)}
        monkeypatch.setattr(cb, "explore_table", lambda setting: {k: v for k, v in table.items()
                                                                  if k[0] in setting["models"]})
        chosen = cb.explore(setting, (0, 1))  # without the smaller model, cnn-1x16 must finish first (it does not)
        assert (chosen and chosen["model"]) == ("cnn-1x4" if small_meets_it else None)
        assert trained == ["cnn-1x4"] * 15 + ([] if small_meets_it else ["cnn-1x16"] * 15)


def test_shares_split_the_runs(setting):
    runs = cb.explore_runs(setting)
    shares = [cb.share(runs, (i, 2)) for i in range(2)]
    assert sorted(r["name"] + r["model"] for s in shares for r in s) == sorted(r["name"] + r["model"] for r in runs)
    for model in setting["models"]:  # each model's work about halved
        load = [sum(r["cost"] for r in s if r["model"] == model) for s in shares]
        assert max(load) <= 1.3 * min(load)
    assert [r["model"] for r in shares[1]] == sorted((r["model"] for r in shares[1]), key=setting["models"].index)


def test_step_costs_are_over_plains_eager_step(tmp_path):
    """The table's step cost divides every variant's median, compiled ones too, by plain's eager median of the
    same bench.py run: compiled plain may be the slower one (it is on the CNN on this CPU)."""
    medians = {"plain": 10.0, "llr-1": 50.0, "plain+compiled": 20.0, "llr-1+compiled": 40.0}
    (tmp_path / "bench-cnn-1x4.json").write_text(json.dumps(
        {"results": {k: {"ms_median": v, "ratio_to_plain": 0.0} for k, v in medians.items()}}))
    assert cb.step_costs({"out": str(tmp_path)}, "cnn-1x4") == {
        "plain": 1.0, "llr-1": 5.0, "plain+compiled": 2.0, "llr-1+compiled": 4.0}
    assert cb.step_costs({"out": str(tmp_path)}, "preact-resnet18") == {}


def test_smoke_end_to_end_stopped_resumed_and_done(tmp_path, monkeypatch, fresh_accelerate_state):
    """Every stage on generated images: the first run is stopped by SIGTERM in its step 3 (the script stops
    too); run again, it resumes it and goes through explore, train, eval, bench and report; a third call
    trains, evaluates and benches nothing."""
    from conftest import hooked, signal_at

    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "adv", hooked(methods.METHODS["adv"], signal_at(3)))
        with pytest.raises(SystemExit, match="fgsm-e8-s0 stopped before its last epoch"):
            cb.main(["--smoke", str(tmp_path)])
    summary = cb.main(["--smoke", str(tmp_path)])
    out = tmp_path / "co-bench"
    setting = json.loads((out / "setting.json").read_text())
    assert (setting["model"], setting["eps"], setting["grid_eps"]) == ("cnn-1x4", [8, 16], 16)
    assert setting["rule"].startswith("smoke") and "explore_hours" in setting["budget"]
    # the smoke's reason agrees with explore.md: FGSM collapsed in its one seed (generated images, PGD-20 at 0),
    # and ADV-10 stays under the rule's clean-accuracy floor
    assert "| cnn-1x4 | 8/255 | 1/1 |" in (out / "explore.md").read_text() and "not collapse" not in setting["rule"]
    assert "ADV-10's final clean accuracy under 30% at 8/255, 16/255" in setting["rule"], setting["rule"]
    runs = cb.train_runs({**cb.SETTING, **cb.smoke_setting(str(tmp_path))}, setting)
    assert len(summary["runs"]) == len(runs) == 2 * (8 + 1) + 2 + 2 * 3  # one seed, two grid points, the twins
    for run in runs:
        files = set(os.listdir(run["dir"]))
        assert {"config.json", "log.jsonl", "last.safetensors", "last.eval.json"} <= files and "state.pt" not in files
        report = json.loads(open(os.path.join(run["dir"], "last.eval.json")).read())
        assert report["checkpoint"].endswith("last.safetensors") and "fgsm" in report["results"]
    table = (out / "table.md").read_text()
    assert all(f"| {cb.METHODS[m][0]} | {e}/255 |" in table for m in (*cb.COMPARED, "adv10") for e in (8, 16))
    assert "pending" not in table and "| 2 | 0.6 |" in (out / "grid.md").read_text()
    twins = (out / "first-order.md").read_text()
    assert all(f"| {cb.METHODS[m][0]} " in twins for m in cb.TWINS) and "pending" not in twins
    assert len(summary["first_order"]) == 4 and all(t["reading"]["verdict"] in ("matches", "better", "worse")
                                                    for t in summary["first_order"])
    assert summary["grid"]["chosen"] is not None and (out / "bench-cnn-1x4.json").exists()
    assert set(json.loads((out / "bench-first-order-cnn-1x4.json").read_text())["results"]) >= set(cb.FIRST_ORDER_BENCH)
    assert "| cnn-1x4 | 16/255 | " in (out / "explore.md").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "robust.png").exists() and (out / "curves.png").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage did work again")

    monkeypatch.setattr(train_cifar, "main", refuse)
    monkeypatch.setattr(eval_py, "main", refuse)
    monkeypatch.setattr(cb.bench, "run", refuse)
    assert cb.main(["--smoke", str(tmp_path)])["runs"] == summary["runs"]


def test_gpu_report_trains_the_methods_at_preact_resnet18_scale():
    """gpu_report.py's contrast-p5-* steps: every method of the benchmark at 8/255 and 16/255, with the flags that
    co_bench.py gives it, on PreAct ResNet-18 with ReLU as the CO literature trains it."""
    from experiments import common, gpu_report

    p5 = {name: flags for name, (_, flags) in gpu_report.CONTRAST.items() if name.startswith("p5-")}
    assert set(p5) == {f"p5-{m}-e{e}" for m in common.CO_METHODS for e in (8, 16)}  # not the first-order twins
    for name, flags in p5.items():
        method, eps = name[3:].rsplit("-e", 1)
        args = train_cifar.get_args([*gpu_report.CONTRAST_COMMON, *flags, "--out", "unused"])
        assert (args.arch, args.activation, args.pad_mode, args.weight_decay_on, args.eps) == (
            "preact-resnet18", "relu", "zeros", "all", f"{eps}/255")
        assert flags[-len(common.co_flags(method, int(eps))):] == common.co_flags(method, int(eps))


def test_gpu_report_p5_runs_train_on_the_cpu(tmp_path, fresh_accelerate_state):
    """Two P5 runs (GradAlign: double backprop through batch norm; ELLE-A: state across steps) train with their
    gpu_report.py flags after its smoke-sized common flags (a batch-norm WRN in place of PreAct ResNet-18)."""
    from conftest import make_image_folder
    from experiments import gpu_report

    data = make_image_folder(str(tmp_path / "data"), classes=3, per_class=10, size=16)
    common_flags = gpu_report.smoke_setting(str(tmp_path))["contrast_common"]
    for name in ("p5-gradalign-e16", "p5-ellea-e8"):
        out = tmp_path / name
        flags = [*common_flags, *gpu_report.CONTRAST[name][1], "--gamma-n", "0"]  # γ's 50-step search: not needed
        assert train_cifar.main([*flags, "--data-dir", data, "--out", str(out)]) == 0
        assert (out / "last.safetensors").exists()


def test_the_report_says_when_it_skips_the_figures(monkeypatch, capsys):
    """Without matplotlib (not in requirements.txt) `--only report` writes the tables and says that it
    skipped the figures, rather than leaving them out silently."""
    from experiments import positive_control

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    cb.figures({}, None, None, None)
    positive_control.curves({})
    printed = capsys.readouterr().out
    assert "skipped the figures robust.png and curves.png" in printed and "skipped the figure curves.png" in printed


def test_the_smoke_data_needs_no_test_runner(tmp_path):
    """`python -m experiments.co_bench --smoke DIR` generates its images without pytest (which make
    install does not bring)."""
    code = ("import sys; sys.modules['pytest'] = None; from experiments import co_bench; "
            f"co_bench.smoke_setting({str(tmp_path)!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert os.path.isdir(tmp_path / "data" / "train" / "class9")
