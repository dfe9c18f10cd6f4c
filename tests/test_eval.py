"""eval.py end to end on a tiny checkpoint and a generated ImageFolder; its one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_script
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
    valid, broken, doubtful = eval_script.verify(model, x, x_adv, 0.1, y)
    assert valid.tolist() == [False, True, False, False] and not broken.any()
    assert doubtful.tolist() == [True, False, True, True]
    valid, broken, doubtful = eval_script.verify(model, x[3:], x_adv[3:], 0.5, y[3:])
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
    result, counts, _ = eval_script.run_attack(_RoundingFlip(), images, labels, eps, "fgsm20",
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
