"""eval.py end to end on a tiny checkpoint and a generated ImageFolder; its one-line errors."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import eval as eval_script
import suite
import models
from conftest import ROOT, make_image_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_image_folder(str(root / "data"), classes=10, per_class=3, size=8)
    torch.manual_seed(0)
    model = models.build_model("wrn-10-1")
    model.net.fc.bias.data = torch.linspace(-1, 1, 10)  # an untrained model that is right on some images
    models.save_checkpoint(model, str(root / "model.safetensors"), dataset="cifar10", epoch=1)
    return root


def test_eval_writes_the_table_and_json(setup, capsys):
    out = str(setup / "result.json")
    report = eval_script.main([str(setup / "model.safetensors"), "--eps", "8/255", "--data-dir", str(setup / "data"),
                               "--n", "24", "--steps", "3", "--restarts", "1", "--gamma", "--batch-size", "10",
                               "--attacks", "fgsm20,untargeted,multi-targeted,random-targeted,deepfool", "--out", out])
    printed = capsys.readouterr().out
    for label in ("Nominal", "FGSM-20 (weak)", "Untargeted (strong)", "Multi-Targeted (very strong)",
                  "Random-Targeted success", "obfuscation report", "gamma(eps, x)"):
        assert label in printed
    with open(out) as f:
        saved = json.load(f)
    assert saved["eps"] == pytest.approx(8 / 255) and saved["n_images"] == 24 and saved["seed"] == 0
    assert saved["model"]["arch"] == "wrn-10-1" and saved["training"]["epoch"] == 1
    r = saved["results"]
    for name in ("fgsm20", "untargeted", "multi-targeted", "deepfool"):
        assert {"accuracy", "worst_case_accuracy", "steps", "restarts", "time_s", "robust"} <= set(r[name])
        assert len(r[name]["robust"]) == 24
    assert r["untargeted"]["steps"] == 3 and r["fgsm20"]["steps"] == 20 and r["multi-targeted"]["restarts"] == 1
    assert 0 <= r["random-targeted"]["success_rate"] <= 1
    # the worst case never rises along the suite and never exceeds an attack's own accuracy
    worst = [r["nominal"]["accuracy"]] + [r[n]["worst_case_accuracy"] for n in ("fgsm20", "untargeted", "multi-targeted", "deepfool")]
    assert worst == sorted(worst, reverse=True) and worst[-1] == r["worst_case"]["accuracy"]
    for n in ("fgsm20", "untargeted", "multi-targeted"):
        assert r[n]["worst_case_accuracy"] <= r[n]["accuracy"] <= r["nominal"]["accuracy"]
    # per sample: robust in the worst case only if robust under every attack
    per = [r[n]["robust"] for n in ("nominal", "fgsm20", "untargeted", "multi-targeted", "deepfool")]
    assert r["worst_case"]["robust"] == [all(v) for v in zip(*per)]
    assert r["nominal"]["accuracy"] > 0
    assert len(saved["gamma"]["values"]) == 24 and saved["gamma"]["mean"] >= 0
    assert {c["name"] for c in saved["obfuscation"]["checks"]} >= {"accuracy reaches 0 as eps grows",
                                                                    "more steps never help the model"}
    assert report["results"]["worst_case"] == r["worst_case"]


def test_adversarial_examples_are_verified_before_counting():
    """An 'adversarial example' outside the ball, or one the model still classifies
    correctly, is not a break; a correct one near the boundary is doubtful."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.full((4, 3), 0.5)
    y = torch.zeros(4, dtype=torch.long)  # class 0 wins while the first pixel is above 0
    x_adv = x.clone()
    x_adv[0, 0] = 0.5 - 0.6  # misclassified, but outside the ball and the box
    x_adv[1, 0] = 0.5 - 0.05  # inside the ball, still correct by a wide margin
    x_adv[2, 0] = -1e-3 + 0.0  # outside everything
    x_adv[3, 0] = 0.005  # inside a ball of 0.5, correct by 0.005 < attacks.MARGIN
    valid, broken, doubtful = suite.verify(model, x, x_adv, 0.1, y)
    assert valid.tolist() == [False, True, False, False] and not broken.any()
    assert doubtful.tolist() == [True, False, True, True]
    valid, broken, doubtful = suite.verify(model, x[3:], x_adv[3:], 0.5, y[3:])
    assert valid.all() and not broken.any() and doubtful.all()


class _RoundingFlip(torch.nn.Module):
    """A linear two-class model whose passes without gradient (eval.py's verification) give the
    true class 0.005 more logit than the attack's passes: a stand-in for kernels whose rounding
    differs between forward passes (bf16 with other batch shapes)."""

    def forward(self, x):
        f0 = 0.05 - (x.flatten(1) - 128 / 255).sum(1)  # the margin f1 − f0 starts at −0.05
        f0 = f0 + (0.0 if torch.is_grad_enabled() else 0.005)
        return torch.stack([f0, torch.zeros_like(f0)], 1)


@pytest.mark.parametrize("reachable, robust, reattacked", [(0.02, False, 0), (0.004, True, 1)])
def test_no_sample_is_counted_robust_by_a_rounding_flip(reachable, robust, reattacked):
    """FGSM-k with tiny steps raises the margin by 0.001 a step up to `reachable`. Stopping at the
    first positive margin would leave a break of ≤ 0.001 that the verification's pass (0.005 less)
    undoes; the attack goes on to attacks.MARGIN, so a break of 0.02 verifies. A break of 0.004
    cannot verify: the sample is attacked again, then counted robust, and the report says so."""
    images, labels = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
    eps = (0.05 + reachable) / 12
    result, counts, _ = suite.run_attack(_RoundingFlip(), images, labels, eps, "fgsm20",
                                               {"steps": 200, "step_size": 0.001 / 12}, 2, 8, "cpu", 0)
    assert result.tolist() == [robust]
    assert counts == {"invalid": 0, "reattacked": reattacked, "unverified": reattacked}


def _error(argv):
    with pytest.raises(SystemExit) as e:
        eval_script.main(argv)
    message = str(e.value.code)
    assert message.startswith("eval.py: error:") and "\n" not in message
    return message


def test_one_line_errors(setup, tmp_path):
    ckpt, data_dir = str(setup / "model.safetensors"), str(setup / "data")
    assert "more than 64/255" in _error([ckpt, "--eps", "300/255", "--data-dir", data_dir])
    assert "cannot read eps" in _error([ckpt, "--eps", "eight", "--data-dir", data_dir])
    assert "checkpoint not found" in _error([str(tmp_path / "none.safetensors"), "--eps", "8/255"])
    assert "unknown attack" in _error([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--attacks", "cw"])
    mixed = str(tmp_path / "mixed.safetensors")
    other = models.build_model("preact-resnet18")
    other.config = models.build_model("wrn-10-1").config  # weights of one architecture, config of another
    models.save_checkpoint(other, mixed)
    assert "does not match wrn-10-1" in _error([mixed, "--eps", "8/255", "--data-dir", data_dir])


def test_missing_data_gives_one_line_and_nonzero_exit(setup, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), str(setup / "model.safetensors"),
                             "--eps", "8/255", "--data-dir", str(tmp_path / "no-cifar")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CIFAR-10" in lines[0] and "--data-dir" in lines[0], result.stderr


# --------------------------------------------------------------------------- the single-step FGSM column
def _suite_args(attacks, **kw):
    """The flags run_suite and sanity_checks read, as eval.py's defaults, with --no-sanity."""
    defaults = dict(attacks=attacks, norm="linf", batch_size=16, seed=0, fgsm_steps=20, steps=None, restarts=None,
                    optimizer="sign", num_targets=None, square_queries=10, no_sanity=True)
    return SimpleNamespace(**{**defaults, **kw})


def _margin_after_one_step(x, W, labels, direction, eps):
    """max_{j≠y} f_j − f_y of the linear model f = W x at clip(x + ε·sign(direction), 0, 1), by hand."""
    f = (x + eps * direction.view_as(x).sign()).clamp(0, 1).flatten(1) @ W.T
    return f.scatter(1, labels[:, None], float("-inf")).amax(1) - f.gather(1, labels[:, None]).squeeze(1)


def test_the_fgsm_column_is_one_signed_step_of_eps_on_the_cross_entropy():
    """On a linear model f = W x the column's robust images are, exactly, those correctly classified
    whose margin stays ≤ 0 at clip(x + ε·sign(∇ₓ CE), 0, 1), with ∇ₓ CE = Wᵀ(softmax(f) − e_y). The
    same step on the margin's gradient, or a step of ε/4, gives another column here."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 2, 2), dtype=torch.uint8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10, bias=False))
    with torch.no_grad():
        model[1].weight.mul_(0).add_(3 * torch.randn(10, 12))
    x, W = images.double() / 255, model[1].weight.detach().double()
    f = x.flatten(1) @ W.T
    labels = f.argmax(1)
    labels[::8] = (labels[::8] + 1) % 10  # misclassified: never robust, never attacked
    eps = 8 / 255
    ce_gradient = (f.softmax(1) - torch.nn.functional.one_hot(labels, 10).double()) @ W
    margin = _margin_after_one_step(x, W, labels, ce_gradient, eps)
    assert margin.abs().min() > 1e-3  # no image so near the boundary that float32 could decide it
    expected = (f.argmax(1) == labels) & (margin <= 0)
    results = eval_script.run_suite(model, images, labels, eps, _suite_args("fgsm"), 10, "cpu")
    assert results["fgsm"]["robust"] == expected.tolist()
    assert results["fgsm"]["options"] == {"steps": 1, "step_size": eps, "loss": "ce", "norm": "linf"}
    assert results["fgsm"]["steps"] == 1 and results["fgsm"]["restarts"] == 1
    best_other = f.scatter(1, labels[:, None], float("-inf")).argmax(1)
    margin_gradient = W[best_other] - W[labels]
    on_the_margin = (f.argmax(1) == labels) & (_margin_after_one_step(x, W, labels, margin_gradient, eps) <= 0)
    quarter_step = (f.argmax(1) == labels) & (_margin_after_one_step(x, W, labels, ce_gradient, eps / 4) <= 0)
    assert on_the_margin.tolist() != expected.tolist() and quarter_step.tolist() != expected.tolist()


class SingleStepMasking(torch.nn.Module):
    """Two classes; class 1 leads class 0 by m(u) = −1 + 2·exp(−(u − ε/2)² / (2 (ε/4)²)), u the mean of
    x − 128/255. The images are 128/255 (u = 0, m = −1 + 2e⁻² < 0: correct). ∇ₓ points to larger u,
    so one signed step of ε lands at u = ε, where m = −1 + 2e⁻² again: FGSM fails. FGSM-20's first
    step of ε/4 lands at u = ε/4, m = −1 + 2e^(−1/2) = 0.21: broken. A toy of catastrophic overfitting."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        u = (x - 128 / 255).flatten(1).mean(1)
        m = -1 + 2 * torch.exp(-0.5 * ((u - self.eps / 2) / (self.eps / 4)) ** 2)
        return torch.stack([torch.zeros_like(m), m], 1)


def _single_step_check(results):
    checks = eval_script.sanity_checks(None, None, None, None, results, _suite_args(""), 2, "cpu")
    (check,) = [c for c in checks if "one FGSM step" in c["name"]]
    return check


def test_a_model_that_resists_only_single_steps_is_flagged():
    eps = 8 / 255
    images, labels = torch.full((4, 3, 2, 2), 128, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    results = eval_script.run_suite(SingleStepMasking(eps), images, labels, eps,
                                    _suite_args("fgsm,fgsm20,untargeted", steps=20, restarts=1), 2, "cpu")
    assert results["nominal"]["accuracy"] == 1 and results["fgsm"]["accuracy"] == 1
    assert results["fgsm20"]["accuracy"] == 0 and results["worst_case"]["accuracy"] == 0
    assert results["fgsm"]["worst_case_accuracy"] == 1  # the worst case is the minimum over the columns so far
    check = _single_step_check(results)
    assert check["ok"] is False and "one FGSM step 100.0% -> worst case of fgsm20, untargeted 0.0%" in check["detail"]


def test_a_linear_model_is_not_flagged():
    """For f = w·x the corner clip(x + ε·sign(w), 0, 1) maximises the margin over the ball and the box, and one
    FGSM step, FGSM-20 and PGD all reach it: the same images survive each, so nothing is flagged."""
    torch.manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 2, 2), dtype=torch.uint8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.copy_(-model[1].weight.sum(1) / 2)  # the boundary through the middle of the box
        labels = model(images.float() / 255).argmax(1)
    results = eval_script.run_suite(model, images, labels, 8 / 255,
                                    _suite_args("fgsm,fgsm20,untargeted", steps=5, restarts=1), 2, "cpu")
    assert results["fgsm"]["robust"] == results["fgsm20"]["robust"] == results["untargeted"]["robust"]
    assert 0 < results["fgsm"]["accuracy"] < 1
    assert _single_step_check(results)["ok"] is True


def test_the_threshold_rule():
    """Flag when the others' worst case is at most half of one step's accuracy and 5 or more points below it."""
    def results(single, others):
        n = 100
        return {"nominal": {"robust": [True] * n},
                "fgsm": {"accuracy": single / n, "robust": [i < single for i in range(n)]},
                "untargeted": {"accuracy": others / n, "robust": [i < others for i in range(n)]}}
    assert _single_step_check(results(20, 10))["ok"] is False  # half, 10 points below
    assert _single_step_check(results(20, 11))["ok"] is True  # more than half
    assert _single_step_check(results(8, 3))["ok"] is False  # under half, 5 points below
    assert _single_step_check(results(8, 4))["ok"] is True and _single_step_check(results(6, 2))["ok"] is True  # < 5


def test_the_default_suite_reports_the_fgsm_column(setup, capsys):
    out = str(setup / "default.json")
    report = eval_script.main([str(setup / "model.safetensors"), "--eps", "8/255", "--data-dir", str(setup / "data"),
                               "--n", "10", "--steps", "2", "--restarts", "1", "--num-targets", "2",
                               "--square-queries", "5", "--no-sanity", "--out", out])
    printed = capsys.readouterr().out
    assert "FGSM (one step)" in printed and "one FGSM step to worst case drops" in printed
    with open(out) as f:
        saved = json.load(f)
    r = saved["results"]
    columns = ["fgsm", "fgsm20", "untargeted", "multi-targeted", "square"]
    assert [k for k in r if k not in ("nominal", "worst_case")] == columns + ["random-targeted"]
    assert r["fgsm"]["steps"] == 1 and r["fgsm"]["options"]["step_size"] == pytest.approx(8 / 255)
    assert r["worst_case"]["robust"] == [all(v) for v in zip(*(r[n]["robust"] for n in ["nominal"] + columns))]
    assert r["fgsm"]["worst_case_accuracy"] == pytest.approx(r["fgsm"]["accuracy"])  # the first column
    o = saved["obfuscation"]
    assert o["drop_fgsm_to_worst"] == pytest.approx(r["fgsm"]["accuracy"] - r["worst_case"]["accuracy"])
    assert "the other attacks are not far stronger than one FGSM step" in {c["name"] for c in o["checks"]}
    assert report["results"]["fgsm"]["robust"] == r["fgsm"]["robust"]


# --------------------------------------------------------------------------- --out
QUICK = ["--eps", "8/255", "--n", "4", "--attacks", "fgsm20", "--fgsm-steps", "1", "--no-sanity"]


@pytest.mark.parametrize("out", ["results/", "new/dir/"])
def test_a_missing_output_directory_is_created(setup, tmp_path, out):
    """The README's `--out results/` on a fresh clone (a file in a missing directory stays an error:
    test_reliability): the report is named after the checkpoint, RUN.CHECKPOINT.eval.json."""
    eval_script.main([str(setup / "model.safetensors"), "--data-dir", str(setup / "data"), *QUICK,
                      "--out", os.path.join(tmp_path, out)])
    with open(tmp_path / out / f"{setup.name}.model.eval.json") as f:
        assert json.load(f)["n_images"] == 4


def _two_checkpoints(setup, tmp_path):
    paths = []
    for run in ("x", "y"):
        os.makedirs(tmp_path / run)
        paths.append(str(tmp_path / run / "best.safetensors"))
        shutil.copyfile(setup / "model.safetensors", paths[-1])
    return paths


def test_out_directory_holds_one_report_per_checkpoint(setup, tmp_path):
    """`--out results/` for runs/x then runs/y: two reports, each naming its own checkpoint; in the
    checkpoint's own directory the report is the one written beside it by default."""
    x, y = _two_checkpoints(setup, tmp_path)
    for checkpoint in (x, y):
        eval_script.main([checkpoint, "--data-dir", str(setup / "data"), *QUICK, "--out", str(tmp_path / "results")
                          + os.sep])
    assert sorted(os.listdir(tmp_path / "results")) == ["x.best.eval.json", "y.best.eval.json"]
    for run in ("x", "y"):
        with open(tmp_path / "results" / f"{run}.best.eval.json") as f:
            assert json.load(f)["checkpoint"] == str(tmp_path / run / "best.safetensors")
    eval_script.main([x, "--data-dir", str(setup / "data"), *QUICK, "--out", str(tmp_path / "x")])
    assert os.path.exists(tmp_path / "x" / "best.eval.json")


def test_an_evaluation_with_other_settings_is_never_replaced(setup, tmp_path):
    """A report beside the checkpoint (or at --out) is replaced only by an evaluation with the same
    settings; other images, attacks, steps, seed or ε, or another checkpoint, are refused in one line
    naming --out before any work, and the report is kept as it was."""
    x, y = _two_checkpoints(setup, tmp_path)
    data = ["--data-dir", str(setup / "data")]
    eval_script.main([x, *data, *QUICK])
    report = tmp_path / "x" / "best.eval.json"
    kept = report.read_bytes()
    for change in (["--n", "3"], ["--seed", "1"], ["--eps", "4/255"], ["--fgsm-steps", "2"],
                   ["--attacks", "fgsm20,fgsm"]):
        message = _error([x, *data, *QUICK, *change])
        assert "holds an evaluation with other settings" in message and "--out" in message, message
        assert report.read_bytes() == kept
    assert "n_images 4 there, 3 here" in _error([x, *data, *QUICK, "--n", "3"])
    assert "checkpoint" in _error([y, *data, *QUICK, "--out", str(report)])
    eval_script.main([x, *data, *QUICK])  # the same settings: replaced, as before
    eval_script.main([x, *data, *QUICK, "--n", "3", "--out", str(tmp_path / "x" / "best.n3.eval.json")])
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert "not an evaluation written by eval.py" in _error([x, *data, *QUICK, "--out", str(notes)])
    assert notes.read_text() == '{"mine": 1}'


def test_an_older_report_without_settings_is_compared_by_what_it_holds(setup, tmp_path):
    """The committed reports predate the "settings" record: their images, seed, ε and attack options
    still decide whether an evaluation may replace them."""
    x, _ = _two_checkpoints(setup, tmp_path)
    data = ["--data-dir", str(setup / "data")]
    eval_script.main([x, *data, *QUICK])
    report = tmp_path / "x" / "best.eval.json"
    old = json.loads(report.read_text())
    del old["settings"], old["written_by"]
    report.write_text(json.dumps(old))
    assert "n_images 4 there, 3 here" in _error([x, *data, *QUICK, "--n", "3"])
    eval_script.main([x, *data, *QUICK])


def test_out_that_is_neither_a_directory_nor_json_is_refused(setup, tmp_path):
    message = _error([str(setup / "model.safetensors"), "--data-dir", str(setup / "data"), *QUICK,
                      "--out", str(tmp_path / "results2")])
    assert "neither a directory nor a .json file" in message and "results2/" in message
    assert not os.path.exists(tmp_path / "results2")


def test_a_missing_recorded_data_directory_is_named_with_the_default(setup, tmp_path, monkeypatch):
    """A checkpoint trained elsewhere records a data path that does not exist here: the error names
    it and the default eval.py looked in instead."""
    model = models.load_checkpoint(str(setup / "model.safetensors"))
    models.save_checkpoint(model, str(tmp_path / "moved.safetensors"), dataset="cifar10",
                           data_dir="/elsewhere/cifar10-jpeg")
    monkeypatch.chdir(tmp_path)
    message = _error([str(tmp_path / "moved.safetensors"), *QUICK])
    assert "'data/cifar10'" in message and "'/elsewhere/cifar10-jpeg'" in message and "--data-dir" in message


# --------------------------------------------------------------------------- a model nobody can attack
def test_a_model_with_no_correct_image_gets_zero_in_every_column(tmp_path, capsys):
    """Every image misclassified (the model always says class 9, and no test image is of class 9):
    every attack of the suite, AutoAttack's APGD-T, the sanity checks and --gamma run on nothing or
    everything without error, and every column reports 0%."""
    data_dir = make_image_folder(str(tmp_path / "data"), classes=10, per_class=2, size=8)
    for name in os.listdir(tmp_path / "data" / "test" / "class9"):
        os.remove(tmp_path / "data" / "test" / "class9" / name)
    model = models.build_model("wrn-10-1")
    with torch.no_grad():
        model.net.fc.weight.zero_()
        model.net.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(9), 10) * 10.0)
    models.save_checkpoint(model, str(tmp_path / "model.safetensors"), dataset="cifar10", epoch=1)
    out = str(tmp_path / "eval.json")
    eval_script.main([str(tmp_path / "model.safetensors"), "--eps", "8/255", "--data-dir", data_dir, "--n", "5",
                      "--attacks", ",".join(suite.SUITE), "--steps", "2", "--restarts", "1", "--num-targets", "2",
                      "--square-queries", "5", "--gamma", "--autoattack", "--aa-version", "custom",
                      "--aa-attacks", "apgd-t", "--out", out])
    printed = capsys.readouterr().out
    with open(out) as f:
        r = json.load(f)["results"]
    assert set(suite.SUITE) <= set(r)
    for name in ["nominal", "worst_case", "autoattack", "worst_case_with_autoattack", *suite.SUITE]:
        if name != "random-targeted":
            assert r[name]["accuracy"] == 0 and not any(r[name]["robust"]) and len(r[name]["robust"]) == 5, name
    assert "gamma(eps, x)" in printed and "0.00%" in printed
