"""ball.py: one spelling of ε for every script, with unit mistakes refused; the projection."""
import pytest
import torch

import ball
import eval as eval_script
import train_cifar
import train_imagenet
from conftest import make_image_folder


@pytest.mark.parametrize("text, value", [
    ("8/255", 8 / 255), ("8", 8 / 255), ("4", 4 / 255), ("16", 16 / 255), ("0.0314", 0.0314), ("0", 0.0),
    ("1", 1 / 255), ("64/255", 64 / 255), ("0.5/255", 0.5 / 255), (" 2/255 ", 2 / 255), ("8.0", 8 / 255),
])
def test_spellings(text, value):
    assert ball.parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text, message", [
    ("0.3", "as pixel units 0.3 is 76.5/255, as units of 1/255 it is 0.3/255"),  # both readings
    ("300", "more than 64/255"), ("300/255", "more than 64/255"), ("65", "more than 64/255"),
    ("0.001", "less than 0.5/255"), ("0.1/255", "less than 0.5/255"),
    ("-1/255", "must not be negative"), ("abc", "cannot read eps"), ("1/0", "cannot read eps"),
    ("8/2/3", "cannot read eps"), ("", "cannot read eps"),
])
def test_unit_mistakes_are_refused_in_one_line(text, message):
    with pytest.raises(ValueError) as e:
        ball.parse_eps(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eps")
    return (make_image_folder(str(root / "cifar"), classes=3, per_class=4, size=8),
            make_image_folder(str(root / "imagenet"), splits=("train", "val"), classes=3, per_class=4, size=40))


@pytest.mark.parametrize("text", ["4/255", "4", "0.01568627450980392"])
def test_every_script_reads_the_same_spelling_the_same_way(text, folders, tmp_path, monkeypatch):
    """train_cifar.py, train_imagenet.py and eval.py all train at or evaluate 4/255 for each
    spelling (train_imagenet.py once read 4/255 as 4/255 of 1/255)."""
    from accelerate.state import AcceleratorState

    cifar, imagenet = folders
    seen = []

    def record_eps_and_stop(self, args, accelerator, steps_per_epoch, eps, *rest, **kwargs):
        seen.append(eps)
        raise SystemExit("stop")

    monkeypatch.setattr("training.Run.__init__", record_eps_and_stop)
    for script, argv in ((train_cifar, ["--data-dir", cifar, "--arch", "wrn-10-1", "--batch-size", "4", "--val-n", "2"]),
                         (train_imagenet, ["--data-dir", imagenet, "--arch", "wrn-10-1", "--image-size", "32",
                                           "--batch-size", "4", "--per-device-batch", "4", "--val-n", "2",
                                           "--workers", "0"])):
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(SystemExit, match="stop"):
            script.main([*argv, "--eps", text, "--out", str(tmp_path / script.__name__)])
    assert seen == [pytest.approx(4 / 255)] * 2
    assert train_imagenet.get_args(["--data-dir", "x", "--eps", text]).llr_steps == 2  # 4/255: the paper's 2 steps


def test_eval_reads_the_spelling_with_ball(monkeypatch, tmp_path):
    import models

    checkpoint = str(tmp_path / "model.safetensors")
    models.save_checkpoint(models.build_model("wrn-10-1"), checkpoint)
    seen = []
    monkeypatch.setattr(ball, "parse_eps", lambda text, norm="linf": seen.append((text, norm)) or 4 / 255)
    with pytest.raises(SystemExit):  # (no data there)
        eval_script.main([checkpoint, "--eps", "4", "--data-dir", str(tmp_path / "none")])
    assert seen == [("4", "linf")]


def test_project_is_the_nearest_point_of_ball_and_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    x[0] = 0.0
    target = x + 0.5 * (2 * torch.rand(x.shape, generator=g, dtype=torch.float64) - 1)
    p = ball.project(target, x, 0.1)
    assert ball.inside(p, x, 0.1).all() and not ball.inside(target, x, 0.1).all()
    # coordinate-wise: the interval [max(x−ε, 0), min(x+ε, 1)] is convex, so clipping is the nearest point
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    torch.testing.assert_close(p, torch.minimum(torch.maximum(target, lo), hi))


def test_l2_projection_and_random_points():
    """The ℓ2 ball ∩ [0, 1]: every projected or random point is in it; away from the box's faces the
    projection is the nearest point of the ball (x + ε·(v − x)/‖v − x‖); a point inside stays put."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 4, 4, generator=g, dtype=torch.float64)
    x[:4] = 0.0
    far = x + 2 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    for points in (ball.project(far, x, 0.5, "l2"), ball.random_point(x, 0.5, g, "l2")):
        assert ball.inside(points, x, 0.5, norm="l2").all()
    middle = 0.4 + 0.2 * torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64)
    v = middle + 0.01 * torch.randn(middle.shape, generator=g, dtype=torch.float64)
    d = (v - middle).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(ball.project(v, middle, 0.005, "l2"), middle + 0.005 * (v - middle) / d)
    near = middle + 0.001 * (v - middle) / d
    torch.testing.assert_close(ball.project(near, middle, 0.005, "l2"), near)
    radii = (ball.random_point(middle.repeat(50, 1, 1, 1), 0.005, g, "l2") - middle.repeat(50, 1, 1, 1)).flatten(1)
    assert radii.norm(dim=1).min() > 0.005 * 0.8  # uniform in a 48-dimensional ball: nearly all mass near the sphere
    assert ball.parse_eps("0.5", "l2") == 0.5 and ball.parse_eps("36/255", "l2") == pytest.approx(36 / 255)
    with pytest.raises(ValueError, match="more than 4"):
        ball.parse_eps("1200/255", "l2")


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("1.0", 1.0), ("1", 1.0), ("3", 3.0), ("36/255", 36 / 255)])
def test_l2_numbers_are_pixel_units(text, value):
    """ℓ2 radii of 0.5, 1.0 (CIFAR-10) and 3.0 (ImageNet) are common: they are not divided by 255."""
    assert ball.parse_eps(text, "l2") == pytest.approx(value)


@pytest.mark.parametrize("text", ["8", "36", "1200/255"])
def test_l2_unit_mistakes_show_both_readings(text):
    with pytest.raises(ValueError, match="more than 4, almost surely a unit mistake for an ℓ2 radius") as e:
        ball.parse_eps(text, "l2")
    assert "\n" not in str(e.value) and ("/" in text or f"as units of 1/255 it is {text}/255" in str(e.value))


def test_headers_print_the_radius_used():
    assert ball.describe_eps(8 / 255) == "ℓ∞ eps 8/255 = 0.03137"
    assert ball.describe_eps(0.5, "l2") == "ℓ2 eps 127.5/255 = 0.5"
