"""soc.py: SOC layers are orthogonal, the Lipschitz bounds hold, certificates are never contradicted
by an attack, and the certified models train and evaluate from the command line."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import attacks
import eval as eval_script
import models
import soc
import train_cifar
from conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride", [(4, 4, 3, 1), (3, 8, 3, 1), (4, 16, 3, 2),
                                                                       (8, 32, 1, 2)])
def test_soc_is_orthogonal_at_the_evaluation_term_count(in_channels, out_channels, kernel, stride):
    """‖f(x + v) − f(x)‖ = ‖v‖ (an isometry: channels padded with zeros, space-to-depth a permutation),
    to 1e-6 relative in float64 with 15 terms; and the bound of the layer is at least 1 and close to it."""
    torch.manual_seed(0)
    layer = soc.SOC(in_channels, out_channels, kernel, stride).double().eval()
    x, v = torch.randn(2, 3, in_channels, 8, 8, dtype=torch.float64)
    ratio = (layer(x + v) - layer(x)).flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones(3, dtype=torch.float64), rtol=1e-6)
    assert 1 <= layer.lipschitz_bound() < 1 + 1e-3


def test_soc_norm_bound_exceeds_the_operator_norm():
    """The bound s of ‖S‖ used for the series' tail is at least the operator norm of the scaled skew
    convolution found by power iteration on the operator itself."""
    torch.manual_seed(1)
    layer = soc.SOC(6, 6, 3).double().eval()
    skew = layer.scaled_skew().detach()
    u = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    for _ in range(200):
        u = F.normalize(F.conv2d(F.conv2d(u, skew, padding=1), -skew, padding=1).flatten(), dim=0).view_as(u)
    operator_norm = F.conv2d(u, skew, padding=1).norm().item()
    s = 3 * min(torch.linalg.matrix_norm(r, ord=2).item() for r in soc._reshapes(skew))
    assert operator_norm <= s + 1e-9
    tail = math.exp(s) - sum(s ** i / math.factorial(i) for i in range(layer.eval_terms))
    assert layer.lipschitz_bound() == pytest.approx(1 + tail)


def test_fast_gradient_is_exact_for_the_input_and_close_for_the_filter():
    """The paper's fast SOC gradient: the input gradient equals autograd's through the series; the
    filter gradient keeps the last convolution's term only, so it points the same way."""
    torch.manual_seed(2)
    layer = soc.SOC(4, 4, 3).double().train()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grads = {}
    for fast in (True, False):
        layer.fast_gradient = fast
        skew = layer.scaled_skew().detach().requires_grad_(True)
        out = (soc._SeriesFastGradient.apply(x, skew, 5) if fast else soc._series(x, skew, 5))
        grads[fast] = torch.autograd.grad((out * target).sum(), (x, skew))
    assert torch.allclose(grads[True][0], grads[False][0], atol=1e-12)
    assert F.cosine_similarity(grads[True][1].flatten(), grads[False][1].flatten(), dim=0) > 0.8


def test_arch_names_give_every_option():
    """A name's parts set their options and the rest are LipConvNet's defaults, so the callers need none."""
    assert soc.parse_arch("lipconvnet-5") == {"depth": 5, "channels": 32, "last": "ortho", "activation": "maxmin",
                                              "pooling": "max", "hidden": None}
    assert soc.parse_arch("lipconvnet-10-c4-crc-hh1-lippool") == {
        "depth": 10, "channels": 4, "last": "crc", "activation": "hh1", "pooling": "lippool", "hidden": None}
    assert soc.parse_arch("wrn-10-1") is None and soc.parse_arch("lipconvnet-5-relu") is None
    assert models.build_model("lipconvnet-5-c4-hh1").config["activation"] == "hh1"


@pytest.mark.parametrize("arch", ["lipconvnet-5-c4-crc", "lipconvnet-10-c4-hh1-lippool"])
def test_lipschitz_bound_holds_on_random_pairs(arch):
    """‖features(x) − features(x')‖ ≤ L·‖x − x'‖ for random pairs of [0, 1] images, L the certificate's
    bound (normalisation included); and for a third of the pairs close together."""
    torch.manual_seed(3)
    model = models.build_model(arch).double().eval()
    bound = soc.certificate_constants(model)["features_lipschitz"]
    x = torch.rand(12, 3, 32, 32, dtype=torch.float64)
    x2 = torch.cat([torch.rand(8, 3, 32, 32, dtype=torch.float64), (x[8:] + 1e-3 * torch.randn(4, 3, 32, 32)).clamp(0, 1)])
    with torch.no_grad():
        f = lambda v: model.net.features((v - model.mean) / model.std).flatten(1)  # noqa: E731
        ratio = (f(x) - f(x2)).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
    assert (ratio <= bound * (1 + 1e-9)).all(), (ratio.max().item(), bound)


def test_crc_curvature_bound_holds_at_random_points():
    """The Hessian of z_y − z_j with respect to the features never has an eigenvalue below −m[y, j]."""
    torch.manual_seed(4)
    last = soc.CRCLip(6, 3, 5).double()
    m = last.curvature_bounds()
    for _ in range(20):
        f = 3 * torch.randn(6, dtype=torch.float64)
        for y in range(3):
            for j in range(3):
                hessian = torch.autograd.functional.hessian(lambda v: last(v[None])[0, y] - last(v[None])[0, j], f)
                assert torch.linalg.eigvalsh(hessian)[0] >= -m[y, j] - 1e-12


def test_lln_certificate_is_tight_for_the_last_layer():
    """For LLN, moving the features by the radius along w_j − w_y closes the margin exactly."""
    torch.manual_seed(5)
    model = models.build_model("lipconvnet-5-c4-lln").double().eval()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    features = model.net.features((x - model.mean) / model.std)
    logits = model.net.last(features)
    y = logits.argmax(1)
    radii = soc._margin_radii(model.net, features, y, soc.certificate_constants(model))
    j = int(radii.scatter(1, y[:, None], math.inf).argmin())
    w = model.net.last.unit_weight()
    direction = (w[j] - w[y[0]]) / (w[j] - w[y[0]]).norm()
    moved = model.net.last(features.flatten(1) + radii[0, j] * direction)
    assert moved[0, y[0]].item() == pytest.approx(moved[0, j].item(), abs=1e-9)


def _trained(arch, tmp_path, steps=40):
    """A tiny lipconvnet trained on two separable classes of [0, 1] images (bright vs dark), and them."""
    torch.manual_seed(6)
    model = models.build_model(arch, num_classes=2)
    x = torch.cat([0.25 + 0.2 * torch.rand(16, 3, 32, 32), 0.55 + 0.2 * torch.rand(16, 3, 32, 32)])
    y = torch.arange(2).repeat_interleave(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), x, y


@pytest.mark.parametrize("arch", ["lipconvnet-5-c4", "lipconvnet-5-c4-lln", "lipconvnet-5-c4-crc"])
def test_no_certified_image_is_broken_by_the_l2_attack(arch, tmp_path):
    """Per image, at two radii ε (just below the smallest certified radius, and the median one),
    the ℓ2 untargeted attack never changes the prediction of an image certified beyond ε; the
    certificates are not all zero, so the check has something to check."""
    model, x, y = _trained(arch, tmp_path)
    radius = soc.certified_radius(model, x, y)
    certified = radius > 0
    assert certified.sum() >= 8, radius
    for eps in (0.999 * radius[certified].min().item(), radius[certified].median().item()):
        eps = min(eps, 2.0)  # the attacks' largest ℓ2 radius
        x_adv = attacks.untargeted(model, x, y, eps, steps=30, restarts=1, norm="l2")
        assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()
        broken = model(x_adv).argmax(1) != y
        assert not (broken & (radius > eps)).any(), (eps, radius[broken & (radius > eps)])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("cifar")), classes=2, per_class=8, size=32)


@pytest.mark.parametrize("last, clipped", [("crc", True), ("lln", False)])
def test_only_crc_training_clips_the_gradient_norm_to_one(last, clipped):
    """The authors' train_robust.py clips the gradient norm to 1 for crc last layers alone."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    import training

    arch = f"lipconvnet-5-c4-{last}"
    model = models.build_model(arch)
    (1000 * model(torch.rand(4, 3, 32, 32)).square().sum()).backward()
    norm = lambda: torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))  # noqa: E731
    before = norm().item()
    assert before > 10 * training.CRC_CLIP_NORM
    training.clip_gradients(SimpleNamespace(method="lipschitz", arch=arch), Accelerator(cpu=True), model)
    assert norm().item() == pytest.approx(training.CRC_CLIP_NORM if clipped else before, rel=1e-4)



def test_certified_training_and_evaluation_from_the_command_line(data_dir, tmp_path):
    """train_cifar.py --method lipschitz on a lipconvnet, then eval.py --norm l2 --certify: the
    certified accuracy at the papers' radii and at ε, no contradiction, and ℓ∞-only flags refused."""
    run = str(tmp_path / "run")
    train_cifar.main(["--arch", "lipconvnet-5-c4-lln", "--method", "lipschitz", "--lipschitz-gamma", "0.1",
                      "--norm", "l2", "--eps", "36/255", "--data-dir", data_dir, "--epochs", "1", "--batch-size", "8",
                      "--val-n", "4", "--eval-steps", "2", "--gamma-n", "2", "--log-every", "1", "--out", run])
    report = eval_script.main([run, "--eps", "36/255", "--data-dir", data_dir, "--n", "6", "--steps", "3",
                               "--restarts", "1", "--fgsm-steps", "2", "--no-sanity", "--certify",
                               "--out", str(tmp_path / "e.json")])
    c = report["certificates"]
    assert set(c["certified_accuracy"]) == {"36/255", "72/255", "108/255", "eps"} and not c["contradictions"]
    assert len(c["radius"]) == 6 and all(r >= 0 for r in c["radius"])
    assert c["certified_accuracy"]["eps"] <= report["results"]["worst_case"]["accuracy"]


@pytest.mark.parametrize("argv, message", [
    (["--arch", "lipconvnet-5-c4", "--method", "llr"], "differentiates twice"),
    (["--arch", "wrn-10-1", "--method", "lipschitz"], "trains a lipconvnet"),
    (["--arch", "lipconvnet-5-c4", "--method", "lipschitz", "--lipschitz-beta", "1"], "the crc one"),
])
def test_certified_training_refuses_what_cannot_work(argv, message, data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_cifar.main([*argv, "--data-dir", data_dir, "--epochs", "1", "--out", str(tmp_path / "r")])
    assert str(e.value.code).startswith("train_cifar.py: error:") and message in str(e.value.code)


def test_certify_needs_a_lipconvnet_and_l2(data_dir, tmp_path):
    model = models.build_model("wrn-10-1", num_classes=2)
    path = str(tmp_path / "w.safetensors")
    models.save_checkpoint(model, path, norm="l2")
    with pytest.raises(SystemExit) as e:
        eval_script.main([path, "--eps", "36/255", "--norm", "l2", "--data-dir", data_dir, "--certify"])
    assert "--certify gives ℓ2 certificates of a lipconvnet model" in str(e.value.code)
    assert os.path.exists(path)
