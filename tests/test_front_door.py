"""The frictions a new user hit, each fixed and kept fixed: resuming with repeated flags and
a finished run, eval.py's --out directory, unwritable outputs and default ε, llr.py's input checks,
what the evaluation table and progress bars say they count."""
import json
import os
import warnings

import pytest
import torch

import eval as eval_script
import llr
import models
import train_cifar
from conftest import TinyConvNet, make_image_folder, read_log

TINY = ["--arch", "wrn-10-1", "--batch-size", "8", "--log-every", "1", "--val-n", "6", "--eval-steps", "2",
        "--gamma-n", "4", "--method", "plain"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("cifar")), classes=3, per_class=10, size=16)


# --------------------------------------------------------------------------- resume
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_accepts_the_run_flags_repeated_and_says_when_the_run_is_finished(data_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """`make cifar ARGS="--epochs 2"` again after an interruption: the run's own flags repeated with their
    values are accepted (only a change is refused); resuming a finished run says so in one line."""
    import methods
    from conftest import hooked, signal_at

    run = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], signal_at(4)))
        train_cifar.main(["--data-dir", data_dir, "--epochs", "2", "--eps", "8/255", *TINY, "--out", run])
    capsys.readouterr()
    train_cifar.main(["--resume", run, "--epochs", "2", "--eps", "8", "--arch", "wrn-10-1"])  # the same values
    assert "resuming at step 4" in capsys.readouterr().out
    assert [e["step"] for e in read_log(run) if e["kind"] == "train"] == list(range(1, 7))
    train_cifar.main(["--resume", run, "--epochs", "2"])
    printed = capsys.readouterr().out
    assert "is finished (2 of 2 epochs): nothing to resume" in printed and "start a new run" in printed
    with pytest.raises(SystemExit, match="--epochs cannot change when a run is resumed \\(it is 2 .*train longer"):
        train_cifar.main(["--resume", run, "--epochs", "3"])


def test_a_repeated_radius_is_read_in_the_runs_norm():
    """On --resume, ε repeated in another spelling is the same setting only if it is the same radius in
    the run's norm: "3" equals "3/255" in ℓ∞, but is 3 (not 3/255) in ℓ2."""
    import training

    assert training._same_setting("eps", "3", "3/255", "linf")
    assert not training._same_setting("eps", "3", "3/255", "l2")
    assert training._same_setting("eps", "0.5", "1/2", "l2")
    assert not training._same_setting("epochs", 3, 2, "linf")


# --------------------------------------------------------------------------- eval.py
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    make_image_folder(str(root / "data"), classes=10, per_class=2, size=8)
    torch.manual_seed(0)
    path = str(root / "model.safetensors")
    models.save_checkpoint(models.build_model("wrn-10-1"), path, dataset="cifar10", eps=4 / 255, norm="linf")
    return path, str(root / "data")


QUICK = ["--steps", "2", "--restarts", "1", "--attacks", "fgsm20,untargeted,random-targeted", "--no-sanity"]


def test_eval_out_may_be_a_directory_and_eps_defaults_to_the_checkpoints(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    report = eval_script.main([ckpt, "--data-dir", data, "--n", "4", *QUICK, "--out", str(tmp_path)])
    named = f"{os.path.basename(os.path.dirname(ckpt))}.model.eval.json"  # RUN.CHECKPOINT.eval.json
    assert os.path.exists(tmp_path / named) and report["eps"] == pytest.approx(4 / 255)
    printed = capsys.readouterr()
    assert "ℓ∞ eps 4/255 = 0.01569, as the checkpoint was trained" in printed.out
    assert "target reached, over all 4 images" in printed.out  # what Random-Targeted success is measured over
    assert "(correctly classified images)" in printed.err and "(all images)" in printed.err  # the progress bars


def test_eval_refuses_an_unwritable_out_before_any_attack(checkpoint, tmp_path, monkeypatch):
    ckpt, data = checkpoint
    monkeypatch.setattr(eval_script, "run_suite", lambda *a, **k: pytest.fail("an attack ran"))
    with pytest.raises(SystemExit) as e:
        eval_script.main([ckpt, "--data-dir", data, "--n", "4", *QUICK, "--out", "/proc/x.json"])
    assert str(e.value.code).startswith("eval.py: error: cannot write /proc/x.json") and "\n" not in str(e.value.code)


def test_eval_says_when_n_is_capped(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    report = eval_script.main([ckpt, "--data-dir", data, "--n", "500", *QUICK, "--attacks", "fgsm20",
                               "--out", str(tmp_path / "r.json")])
    assert report["n_images"] == 20 and "--n 500: the test split has 20 images; evaluating all 20" in \
        capsys.readouterr().out


def test_eval_needs_eps_when_the_checkpoint_has_none(checkpoint, tmp_path):
    _, data = checkpoint
    bare = str(tmp_path / "bare.safetensors")
    models.save_checkpoint(models.build_model("wrn-10-1"), bare)
    with pytest.raises(SystemExit, match="does not record the ε it was trained at: give --eps"):
        eval_script.main([bare, "--data-dir", data])


# --------------------------------------------------------------------------- llr.py
def test_llr_refuses_images_outside_the_box_and_string_eps_and_works_under_no_grad():
    model = TinyConvNet()
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 3, (4,))
    normalised = (x - 0.5) / 0.25
    for fn in (llr.llr_loss, llr.local_linearity):
        with pytest.raises(ValueError, match="images must lie in \\[0, 1\\] \\(normalise inside the model\\)"):
            fn(model, normalised, y, 8 / 255)
        with pytest.raises(ValueError, match="not the string '8/255'"):
            fn(model, x, y, "8/255")
    with pytest.raises(ValueError, match="images must lie in"):
        llr.linearity_gap(model, normalised, y, torch.zeros_like(x))
    # under no_grad the loss is measured (the search still differentiates g in x + δ), not trained on
    loss, info = llr.llr_loss(model, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        measured, measured_info = llr.llr_loss(model, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(0))
    assert not measured.requires_grad and torch.allclose(measured, loss.detach())
    assert torch.equal(measured_info["delta"], info["delta"])


def test_llr_on_a_relu_model_warns_once():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 3, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            llr.llr_loss(model, x, y, 8 / 255, steps=1)
    relu = [w for w in caught if "ReLU" in str(w.message)]
    assert len(relu) == 1 and "zero curvature almost everywhere" in str(relu[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        llr.llr_loss(TinyConvNet(), x, y, 8 / 255, steps=1)
    assert not [w for w in caught if "ReLU" in str(w.message)]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_n_is_checked_before_the_data_is_read(data_dir, tmp_path, monkeypatch):
    import data

    monkeypatch.setattr(data, "load_cifar10", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(SystemExit, match="--train-n 7 must be a multiple of the 3 classes"):
        train_cifar.main(["--data-dir", data_dir, "--train-n", "7", "--out", str(tmp_path / "r"), *TINY])
