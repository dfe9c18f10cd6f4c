"""The figures' measurements and plots: loss surfaces, strength sweeps, plots.py commands."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ball
import eval as eval_script
import llr
import models
import plots
import probe
import suite
from conftest import ROOT, Recording
from test_llr import LinearLossModel


# --------------------------------------------------------------------------- loss surfaces
def test_surface_of_a_linear_loss_is_a_plane():
    torch.manual_seed(0)
    model = LinearLossModel(3 * 4 * 4)
    x, y = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    eps = 0.1
    s = probe.loss_surface(model, x, y, eps, radius=eps / 2, grid=9, seed=3, batch_size=16)  # no clipping
    loss = torch.tensor(s["loss"], dtype=torch.float64)
    assert loss.shape == (9, 9)
    for second_difference in (loss[2:] - 2 * loss[1:-1] + loss[:-2], loss[:, 2:] - 2 * loss[:, 1:-1] + loss[:, :-2],
                              loss[1:, 1:] - loss[1:, :-1] - loss[:-1, 1:] + loss[:-1, :-1]):
        assert second_difference.abs().max() < 1e-10
    assert (loss[-1, 4] - loss[0, 4]).abs() > 1e-3  # not flat: the adversarial direction raises the loss
    assert loss[-1, 4] > loss[0, 4]


def test_surface_values_equal_the_loss_at_the_grid_points(tiny_net):
    tiny_net.eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64), torch.tensor([1])
    eps = 0.2
    s = probe.loss_surface(tiny_net, x, y, eps, radius=eps, grid=7, seed=5, batch_size=10)
    xr = x.clone().requires_grad_(True)
    u = torch.autograd.grad(F.cross_entropy(tiny_net(xr), y), xr)[0].sign()
    v = (torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1).double()
    for i, j in [(0, 0), (3, 3), (6, 1), (2, 5)]:
        point = ball.project(x + s["a"][i] * u + s["b"][j] * v, x, eps)
        with torch.no_grad():
            logits = tiny_net(point)
        assert s["loss"][i][j] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-9)
        assert s["pred"][i][j] == logits.argmax(1).item()
    assert s["loss"][3][3] == pytest.approx(F.cross_entropy(tiny_net(x), y).item(), rel=1e-9)  # the centre is x


def test_every_grid_point_is_in_the_ball_and_the_box(tiny_net):
    tiny_net.eval()
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    x[0, 0] = 0.0
    x[0, 1] = 1.0
    eps = 0.3
    recording = Recording(tiny_net)
    probe.loss_surface(recording, x, torch.tensor([0]), eps, radius=eps, grid=11, seed=0, batch_size=50)
    points = torch.cat(recording.inputs[1:])  # the first call is the gradient at x
    assert points.shape[0] == 121
    assert (points - x).abs().max() <= eps + 1e-12 and points.min() >= 0 and points.max() <= 1


# --------------------------------------------------------------------------- eval.py modes and plots
@pytest.fixture(scope="module")
def outputs(tmp_path_factory, trained_run):
    """A short training run (log with γ: conftest's shared run) and eval.py's three kinds of JSON on its
    checkpoint."""
    root = tmp_path_factory.mktemp("figures")
    data_dir, ckpt = trained_run["data_dir"], trained_run["checkpoint"]
    common = [ckpt, "--eps", "8/255", "--data-dir", data_dir]
    files = {"log": os.path.join(trained_run["run"], "log.jsonl")}
    files["surface"] = str(root / "surface.json")
    eval_script.main([*common, "--surface", "2", "5", "--surface-grid", "5", "--out", files["surface"]])
    files["strength"] = str(root / "strength.json")
    eval_script.main([*common, "--strength", "--strengths", "1x1,3x1,5x2", "--n", "12", "--out", files["strength"]])
    files["gamma"] = str(root / "gamma.json")
    eval_script.main([*common, "--gamma-sweep", "1,3,8", "--n", "10", "--batch-size", "4", "--out", files["gamma"]])
    files["eval"] = str(root / "eval.json")
    eval_script.main([*common, "--gamma", "--n", "6", "--steps", "2", "--restarts", "1", "--attacks", "untargeted",
                      "--no-sanity", "--out", files["eval"]])
    return files


def test_surface_json(outputs):
    with open(outputs["surface"]) as f:
        report = json.load(f)
    assert [s["index"] for s in report["surface"]] == [2, 5]
    s = report["surface"][0]
    assert len(s["loss"]) == 5 and len(s["pred"][0]) == 5 and s["radius"] == pytest.approx(8 / 255)
    assert report["training"]["method"] == "adv" and report["training"]["options"]["steps"] == 1


def test_gamma_sweep_continues_the_same_searches(outputs):
    """More steps of the γ search from the same random starts never find a smaller gap, image by image,
    and the longest search is exactly what the suite's --gamma measures with that many steps."""
    with open(outputs["gamma"]) as f:
        report = json.load(f)
    sweep = report["gamma_sweep"]
    assert report["mode"] == "gamma" and [g["steps"] for g in sweep] == [1, 3, 8]
    for fewer, more in zip(sweep, sweep[1:]):
        assert len(fewer["values"]) == 10 and all(a <= b for a, b in zip(fewer["values"], more["values"]))
    model = models.load_checkpoint(report["checkpoint"]).eval()
    images, labels, _ = eval_script.load_images("cifar10", report["data_dir"], "test", 10, 32, 0)
    again = suite.gamma_of_images(model, images, labels, 8 / 255, 4, "cpu", 0, steps=8)
    assert again["values"] == pytest.approx(sweep[-1]["values"], rel=1e-5)


def test_strength_never_rises(outputs):
    with open(outputs["strength"]) as f:
        report = json.load(f)["strength"]
    for name in ("untargeted", "multi-targeted"):
        points = report["curves"][name]
        assert [(p["steps"], p["restarts"]) for p in points] == [(1, 1), (3, 1), (5, 2)]
        accuracy = [report["nominal"]] + [p["accuracy"] for p in points]
        assert accuracy == sorted(accuracy, reverse=True)
        for weaker, stronger in zip(points, points[1:]):  # per sample: a broken sample stays broken
            assert all(w or not s for w, s in zip(weaker["robust"], stronger["robust"]))
    assert report["curves"]["multi-targeted"][0]["gradient_evaluations"] == 1 * 1 * 2  # 2 targets of 3 classes


@pytest.mark.parametrize("command, key", [("surface", "surface"), ("gamma", "log"), ("gamma-hist", "eval"),
                                          ("strength", "strength"), ("curves", "log")])
def test_plot_commands_write_png(command, key, outputs, tmp_path):
    out = str(tmp_path / f"{command}.png")
    plots.main([command, outputs[key], outputs[key], "--out", out, "--pdf"])
    assert os.path.getsize(out) > 5000 and os.path.getsize(out[:-4] + ".pdf") > 1000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_labels_follow_the_paper():
    assert plots.label("adv", {"steps": 2}) == "ADV-2"
    assert plots.label("llr", {"steps": 1, "mu": 0}) == "LLR-1 (μ=0)"
    assert plots.run_label({"method": "llr", "llr_steps": 2, "llr_mu": 3.0}) == "LLR-2"
    assert plots.label("trades", {"steps": 10}) == "TRADES"


def test_plot_input_errors(outputs, tmp_path):
    with pytest.raises(SystemExit, match="has no loss surface"):
        plots.main(["surface", outputs["strength"], "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="has no γ measurements"):
        (tmp_path / "log.jsonl").write_text('{"kind": "train", "step": 1}\n')
        plots.main(["gamma", str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "x.png")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        plots.main(["strength", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png")])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "plots.py"), "strength", str(tmp_path / "none.json")],
                            capture_output=True, text=True, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "cannot read" in lines[0], result.stderr


def test_eval_figure_options_are_checked(outputs, tmp_path):
    with open(outputs["surface"]) as f:
        ckpt = json.load(f)["checkpoint"]
    data_dir = os.path.join(os.path.dirname(os.path.dirname(ckpt)), "data")
    with pytest.raises(SystemExit, match="beyond the"):
        eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--surface", "9999"])
    with pytest.raises(SystemExit, match="cannot read --strengths"):
        eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--strength", "--strengths", "20,x"])
    for sweep in ("2,1", "0,5", "a", "1,1"):
        with pytest.raises(SystemExit, match="cannot read --gamma-sweep"):
            eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--gamma-sweep", sweep])
    with pytest.raises(SystemExit, match="choose one"):
        eval_script.main([ckpt, "--eps", "8/255", "--data-dir", data_dir, "--strength", "--gamma-sweep", "1,2"])
