"""eval.py --autoattack: the real package end to end, verification and cross-check counts on a
constructed case, resume after an interruption, and the optional import."""
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import autoattack_check
import eval as eval_script
import models
import train_cifar
from conftest import make_image_folder

EPS = 0.1


class Threshold(nn.Module):
    """Two classes: class 0 where the mean of the first pixel row exceeds 0.5."""

    def forward(self, x):
        s = x[:, 0, 0].mean(-1) - 0.5
        return torch.stack([s, -s], 1) * 10


class FakeAutoAttack:
    """Stands in for pyautoattack.AutoAttack: returns prepared 'adversarial examples' and
    counts its calls; can be told to fail on a given call."""
    calls, fail_on_call, prepare = 0, None, None

    def __init__(self, model, **kwargs):
        self.kwargs = kwargs

    def run_standard_evaluation(self, x, y, batch_size):
        FakeAutoAttack.calls += 1
        if FakeAutoAttack.calls == FakeAutoAttack.fail_on_call:
            raise KeyboardInterrupt
        return FakeAutoAttack.prepare(x), y


def _prepare(x):
    """Sample 0: a valid break (first row pushed below 0.5 within the ball); 1: a 'break' outside
    the ball; 2: inside the ball but still correct; 3: untouched. Repeats every 4 samples."""
    x_adv = x.clone()
    for i in range(len(x)):
        kind = i % 4
        if kind == 0:
            x_adv[i, 0, 0] = x[i, 0, 0] - EPS
        elif kind == 1:
            x_adv[i, 0, 0] = 0.0  # misclassified, but 0.55 away
        elif kind == 2:
            x_adv[i, 0, 0] = x[i, 0, 0] - EPS / 100
    return x_adv


@pytest.fixture
def fake(monkeypatch):
    import pyautoattack

    FakeAutoAttack.calls, FakeAutoAttack.fail_on_call, FakeAutoAttack.prepare = 0, None, _prepare
    monkeypatch.setattr(pyautoattack, "AutoAttack", FakeAutoAttack)
    return FakeAutoAttack


def _args(**kw):
    return SimpleNamespace(checkpoint="c", seed=0, batch_size=4, bf16=False, norm="linf", aa_version="custom",
                           aa_attacks="apgd-ce", **kw)


def test_verification_and_cross_check_on_a_constructed_case(fake, tmp_path):
    images = torch.full((8, 3, 2, 2), int(0.55 * 255), dtype=torch.uint8)  # first row mean 0.549: class 0
    labels = torch.zeros(8, dtype=torch.long)
    aa = autoattack_check.run_autoattack(Threshold(), images, labels, EPS, _args(), "cpu", str(tmp_path / "s.json"))
    assert aa["robust"] == [False, True, True, True] * 2  # only the valid misclassified examples count
    assert aa["invalid_examples"] == 2 and aa["accuracy"] == 0.75
    suite = [True, True, False, False, True, False, True, False]
    counts = autoattack_check.cross_check(suite, aa["robust"])
    assert counts == {"autoattack_only": 2, "suite_only": 4, "both": 0, "autoattack_only_indices": [0, 4]}
    results = {"worst_case": {"robust": suite}}
    checks = []
    autoattack_check.add_autoattack(results, aa, checks, 8)
    assert results["worst_case_with_autoattack"]["robust"] == [a and b for a, b in zip(suite, aa["robust"])]
    assert checks[0]["ok"] is False and "broke 2 images the suite did not" in checks[0]["detail"]


def test_interrupted_autoattack_continues_where_it_stopped(fake, tmp_path):
    images = torch.full((12, 3, 2, 2), int(0.55 * 255), dtype=torch.uint8)
    labels = torch.zeros(12, dtype=torch.long)
    state = str(tmp_path / "state.json")
    fake.fail_on_call = 2  # interrupted during the second of three chunks
    with pytest.raises(KeyboardInterrupt):
        autoattack_check.run_autoattack(Threshold(), images, labels, EPS, _args(), "cpu", state)
    assert list(json.load(open(state))["chunks"]) == ["0"]
    fake.calls, fake.fail_on_call = 0, None
    aa = autoattack_check.run_autoattack(Threshold(), images, labels, EPS, _args(), "cpu", state)
    assert fake.calls == 2  # only the two chunks left
    assert aa["robust"] == [False, True, True, True] * 3
    with pytest.raises(ValueError, match="belongs to another evaluation"):
        autoattack_check.run_autoattack(Threshold(), images, labels, 2 * EPS, _args(), "cpu", state)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small model trained for a few steps on a generated 10-class folder."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("aa")
    data_dir = make_image_folder(str(root / "data"), classes=10, per_class=4, size=16)
    AcceleratorState._reset_state(reset_partial_state=True)
    train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--arch", "wrn-10-1", "--epochs", "3",
                      "--batch-size", "8", "--val-n", "8", "--eval-steps", "2", "--out", str(root / "run")])
    AcceleratorState._reset_state(reset_partial_state=True)
    return str(root / "run" / "last.safetensors"), data_dir


def test_autoattack_end_to_end(checkpoint, tmp_path, capsys):
    ckpt, data_dir = checkpoint
    out = str(tmp_path / "aa.json")
    eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--n", "12", "--batch-size", "8", "--steps", "3",
                      "--restarts", "1", "--attacks", "fgsm20,untargeted", "--no-sanity", "--autoattack",
                      "--aa-version", "custom", "--aa-attacks", "apgd-ce,apgd-t", "--out", out])
    printed = capsys.readouterr().out
    assert "AutoAttack (apgd-ce,apgd-t)" in printed and "cross-check:" in printed
    report = json.load(open(out))
    r = report["results"]
    assert r["autoattack"]["attacks"] == ["apgd-ce", "apgd-t"] and len(r["autoattack"]["robust"]) == 12
    assert r["autoattack"]["package_version"] == autoattack_check.AUTOATTACK_VERSION
    both = r["worst_case_with_autoattack"]["accuracy"]
    assert both <= r["worst_case"]["accuracy"] and both <= r["autoattack"]["accuracy"]
    assert r["autoattack"]["accuracy"] <= r["nominal"]["accuracy"]
    assert {"autoattack_only", "suite_only", "both"} <= set(report["cross_check"])
    assert any(c["name"].startswith("AutoAttack's own checks") for c in report["obfuscation"]["checks"])
    assert not os.path.exists(out + ".autoattack-state.json")  # removed once the report is written


def test_load_checkpoint_serves_autoattack_directly(checkpoint):
    """The README's snippet: a checkpoint straight into AutoAttack."""
    from pyautoattack import AutoAttack

    model = models.load_checkpoint(checkpoint[0])
    assert not model.training and isinstance(model, nn.Module)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="custom", attacks=["apgd-ce"], device="cpu")
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=4)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_without_the_package(checkpoint, monkeypatch, tmp_path):
    ckpt, data_dir = checkpoint
    monkeypatch.delitem(sys.modules, "pyautoattack", raising=False)
    eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--n", "4", "--steps", "1", "--restarts", "1",
                      "--attacks", "untargeted", "--no-sanity", "--out", str(tmp_path / "a.json")])
    assert "pyautoattack" not in sys.modules  # eval.py without the flag does not import it
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # as if it were not installed
    with pytest.raises(SystemExit) as e:
        eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--autoattack"])
    message = str(e.value.code)
    assert message.startswith("eval.py: error:") and "make install-extras" in message and "\n" not in message


def test_bad_autoattack_options(checkpoint):
    ckpt, data_dir = checkpoint
    with pytest.raises(SystemExit, match="needs --aa-attacks"):
        eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--autoattack", "--aa-version", "custom"])
    with pytest.raises(SystemExit, match="goes with --aa-version custom"):
        eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--autoattack", "--aa-attacks", "fab"])
