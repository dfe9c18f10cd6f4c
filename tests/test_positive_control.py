"""experiments/positive_control.py: GradAlign's setting as their code has it (the learning rate against
their np.interp, the zero-init FGSM step, zero padding, the initialisation), the collapse rule, and
the pipeline end to end on generated images, resumed (no accuracy is asserted)."""
import json
import os

import numpy as np
import pytest
import torch

import data
from experiments import positive_control as pc


def test_learning_rate_is_their_cyclic_interpolation():
    setting = pc.SETTING
    batches = 382
    for epoch in (0, 5, 11, 12, 20, 29):
        for i in (0, 100, batches - 1):
            t = epoch + (i + 1) / batches
            expected = np.interp([t], [0, 30 * 2 // 5, 30], [0, 0.003, 0])[0]  # their utils.get_lr_schedule
            assert pc.learning_rate(setting, epoch, i, batches) == pytest.approx(expected, abs=1e-12)


def test_zero_init_fgsm_moves_every_pixel_by_eps_along_the_gradient_sign():
    torch.manual_seed(0)
    model = pc.SingleLayerCNN("relu", 4, 8).double()
    x = 0.1 + 0.8 * torch.rand(6, 3, 8, 8, dtype=torch.float64)  # away from the box: no clipping
    y = torch.randint(0, 10, (6,))
    x_adv = pc.fgsm_zero_init(model, x, y, 10 / 255, 1.25)
    x0 = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x0), y), x0)
    torch.testing.assert_close(x_adv, x + 10 / 255 * grad.sign())
    assert (grad != 0).float().mean() > 0.5


def test_their_initialisation_and_zero_padding():
    torch.manual_seed(0)
    model = pc.SingleLayerCNN("softplus")
    assert model.fc.in_features == 4 * 32 * 32 and model.conv.out_channels == 4
    assert model.conv.weight.std().item() == pytest.approx((2 / 36) ** 0.5, rel=0.25)
    assert model.fc.weight.std().item() == pytest.approx((2 / 4096) ** 0.5, rel=0.05)
    assert model.conv.bias.abs().max() == 0 and model.fc.bias.abs().max() == 0
    ones = torch.ones(64, 3, 8, 8)
    reflect = data.crop_and_flip(ones, generator=torch.Generator().manual_seed(0))
    constant = data.crop_and_flip(ones, generator=torch.Generator().manual_seed(0), mode="constant")
    assert reflect.min() == 1 and constant.min() == 0  # torchvision's RandomCrop(padding=4) pads with zeros


def test_collapse_rule():
    def log(pairs):
        return [{"epoch": e + 1, "fgsm": f, "pgd": p} for e, (f, p) in enumerate(pairs)]

    assert pc.collapse_epoch(log([(0.4, 0.3), (0.5, 0.04), (0.6, 0.02)])) == 2
    assert pc.collapse_epoch(log([(0.4, 0.3), (0.5, 0.04), (0.4, 0.3)])) is None  # not through the end
    assert pc.collapse_epoch(log([(0.2, 0.01), (0.2, 0.01)])) is None  # weak under both: not obfuscation
    assert pc.collapse_epoch(log([(0.6, 0.3), (0.6, 0.3)])) == 1  # a gap of 30 points


def test_pipeline_end_to_end_and_resume(tmp_path):
    summary = pc.main(["--smoke", str(tmp_path)])
    assert set(summary["runs"]) == {"relu-seed0", "softplus-seed0"}
    assert all(r["done"] and r["epochs"] == 2 for r in summary["runs"].values())
    out = tmp_path / "positive-control"
    log = [json.loads(line) for line in open(out / "relu-seed0" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [1, 2] and {"clean", "fgsm", "pgd", "seconds"} <= set(log[0])
    assert "| relu | 0 | 2 |" in (out / "table.md").read_text() and os.path.exists(out / "curves.png")
    before = (out / "relu-seed0" / "log.jsonl").read_text()
    pc.main(["--smoke", str(tmp_path)])  # done: nothing is trained again
    assert (out / "relu-seed0" / "log.jsonl").read_text() == before
