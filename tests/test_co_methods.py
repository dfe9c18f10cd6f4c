"""The methods against catastrophic overfitting (N-FGSM, GradAlign, ELLE, ELLE-A) on cases with a
known answer, ELLE-A's state through a stop and resume and across two processes, and their cost in
bench.py. Tiny float64 models; no accuracy is asserted."""
import copy
import json
import os
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bench
import methods
import train_cifar
from conftest import Recording, TinyConvNet, hooked, make_image_folder, read_log, signal_at, spawn_gloo

EPS = 0.1


def _data(n=6, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _seeded(seed=1):
    return torch.Generator().manual_seed(seed)


def _input_grad(model, x, y, create_graph=False):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=create_graph)[0]


def _assert_same_loss_and_gradients(loss, model, reference, reference_model):
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())),
                    torch.autograd.grad(reference, list(reference_model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- N-FGSM
def test_nfgsm_leaves_the_ball_but_not_three_eps_nor_the_box():
    """One signed step of ε from x + U(−2ε, 2ε) (clipped to [0, 1]), not projected onto the ball:
    the training point lies beyond ε somewhere, within 3ε everywhere, in [0, 1]; and it is the
    point of the authors' formula on the same draws."""
    torch.manual_seed(0)
    model = Recording(TinyConvNet().double())
    reference_model = copy.deepcopy(model.net)
    x, y = _data()
    loss, _ = methods.nfgsm_loss(model, x, y, EPS, generator=_seeded())
    x_adv = model.inputs[1]
    distance = (x_adv - x).abs()
    assert distance.max() > EPS + 1e-3 and distance.max() <= 3 * EPS + 1e-12
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv == 0).any()  # [0, 1] did clip
    x_noisy = (x + 2 * EPS * (2 * torch.rand(x.shape, generator=_seeded(), dtype=x.dtype) - 1)).clamp(0, 1)
    expected = (x_noisy + EPS * _input_grad(reference_model, x_noisy, y).sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-15)
    _assert_same_loss_and_gradients(loss, model.net, F.cross_entropy(reference_model(expected), y), reference_model)


# --------------------------------------------------------------------------- GradAlign
def test_gradalign_weight_is_the_authors_rule():
    """0.02·10^(ε·255/8): the values of their sh/exps_diff_eps_cifar10.sh, written there to 3 decimals."""
    script = {1: 0.027, 2: 0.036, 3: 0.047, 4: 0.063, 5: 0.084, 6: 0.112, 7: 0.150, 8: 0.200, 9: 0.267, 10: 0.356,
              11: 0.474, 12: 0.632, 13: 0.843, 14: 1.124, 15: 1.500, 16: 2.000}
    for pixels, weight in script.items():
        assert methods.gradalign_weight(pixels / 255) == pytest.approx(weight, abs=1e-3)


def test_gradalign_is_zero_for_parallel_gradients():
    """A linear model with two classes: ∇ₓCE = (p₁ − y₁)(w₁ − w₀) is parallel to w₁ − w₀ with the
    same sign at every point, so the cosine is 1 and the regulariser 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).double()
    x, y = _data()
    y = y % 2
    loss, info = methods.gradalign_loss(model, x, y, EPS, weight=5.0, generator=_seeded())
    assert len(info["grad_cos"]) == len(y)
    torch.testing.assert_close(info["grad_cos"], torch.ones(len(y), dtype=x.dtype), rtol=0, atol=1e-12)
    assert abs(loss.item() - info["adv_loss"].mean().item()) < 1e-12


class _ShiftedReLULinear(nn.Module):
    """W·relu(x − 0.5) + b: an image below 0.5 − ε everywhere has a zero input gradient in the whole
    ball. Large weights, so that the softmax, hence the gradient's direction, changes within the ball."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 3).double()
        with torch.no_grad():
            self.fc.weight.mul_(30)

    def forward(self, x):
        return self.fc(F.relu(x - 0.5).flatten(1))


def test_gradalign_regulariser_is_lambda_one_minus_cos_with_zero_gradients_dropped():
    """Two images with a zero input gradient (dropped) and four without: the regulariser is
    λ(1 − mean cosine) over those four, between ∇ₓℓ(x) and ∇ₓℓ(x + η) (η ~ U(−ε, ε), same draw),
    computed by hand; the loss and its weight gradients (through ∇ₓℓ(x + η): double backprop) agree."""
    torch.manual_seed(0)
    model = _ShiftedReLULinear()
    reference_model = copy.deepcopy(model)
    dark, _ = _data(2, seed=1, high=0.3)
    bright, _ = _data(4, seed=2, low=0.7)
    x, y = torch.cat([dark, bright]), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, info = methods.gradalign_loss(model, x, y, EPS, weight=0.7, generator=_seeded())

    g1 = _input_grad(reference_model, x, y).flatten(1)
    x_adv = (x + EPS * g1.sign().view_as(x)).clamp(0, 1)
    x_probe = x + EPS * (2 * torch.rand(x.shape, generator=_seeded(), dtype=x.dtype) - 1)
    g2 = _input_grad(reference_model, x_probe, y, create_graph=True).flatten(1)
    assert g1[:2].abs().max() == 0 and g2[:2].abs().max() == 0 and (g1[2:].norm(dim=1) > 0).all()
    cos = torch.stack([g1[i] @ g2[i] / (g1[i].norm() * g2[i].norm()) for i in range(2, 6)])
    assert cos.min() < 0.999  # not parallel: the regulariser is not trivially 0
    torch.testing.assert_close(info["grad_cos"], cos.detach(), rtol=0, atol=1e-12)
    reference = F.cross_entropy(reference_model(x_adv), y) + 0.7 * (1 - cos.mean())
    _assert_same_loss_and_gradients(loss, model, reference, reference_model)

    loss, info = methods.gradalign_loss(model, dark, y[:2], EPS, weight=0.7, generator=_seeded())
    assert len(info["grad_cos"]) == 0 and loss.item() == info["adv_loss"].mean().item()  # all dropped: 0, not NaN


# --------------------------------------------------------------------------- ELLE and ELLE-A
def test_elle_weight_is_the_authors_table():
    """scripts/run_elle_cifar10.sh: 1000 for 2–8/255, 5000 for 10–20/255, 10000 for 22–26/255."""
    for pixels in range(2, 27, 2):
        expected = 1000 if pixels <= 8 else 5000 if pixels <= 20 else 10000
        assert methods.elle_weight(pixels / 255) == expected


def _bn_model():
    """TinyConvNet in train mode, its weights scaled up so that its loss curves visibly within the ball."""
    torch.manual_seed(0)
    model = TinyConvNet().double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model, copy.deepcopy(model)


def test_elle_lin_err_is_the_formula_on_the_same_draws():
    """FGSM from x with step ε (clipped to [0, 1]), plus λ·mean((ℓ(x_c) − (1 − α)ℓ(x_a) − αℓ(x_b))²)
    with x_a, x_b = x + ε·U(−1, 1) (one draw of [2B, ...]), α ~ U(0, 1) per example (the next
    draw), x_c = (1 − α)x_a + αx_b, the three in one train-mode pass (shared batch statistics)."""
    model, reference_model = _bn_model()
    x, y = _data()
    before = model.bn.num_batches_tracked.item()
    loss, info = methods.elle_loss(model, x, y, EPS, weight=30.0, generator=_seeded())
    assert model.bn.num_batches_tracked.item() - before == 3  # attack, x_adv, the triplet: every pass in train mode

    x_adv = (x + EPS * _input_grad(reference_model, x, y).sign()).clamp(0, 1)
    adversarial = F.cross_entropy(reference_model(x_adv), y)
    g = _seeded()
    u = torch.rand((12, 3, 4, 4), generator=g, dtype=x.dtype)
    alpha = torch.rand(6, generator=g, dtype=x.dtype)
    x_a, x_b = x + EPS * (2 * u[:6] - 1), x + EPS * (2 * u[6:] - 1)
    x_c = (1 - alpha[:, None, None, None]) * x_a + alpha[:, None, None, None] * x_b
    losses = F.cross_entropy(reference_model(torch.cat([x_a, x_b, x_c])), torch.cat([y, y, y]), reduction="none")
    lin_err = torch.stack([(losses[12 + i] - (1 - alpha[i]) * losses[i] - alpha[i] * losses[6 + i]) ** 2
                           for i in range(6)]).mean()
    torch.testing.assert_close(info["lin_err"].mean(), lin_err.detach(), rtol=1e-12, atol=0)
    assert lin_err > 1e-8  # the loss is not linear there: the term can be wrong
    _assert_same_loss_and_gradients(loss, model, adversarial + 30.0 * lin_err, reference_model)


def _rule_by_hand(errors, lambda_max=4000.0, decay=0.99, sensitivity=2.0):
    """λ after each step of ELLE-A's rule (core/utils/train.py:216-227), with Python's statistics."""
    weight, history, weights = 0.0, [], []
    for error in errors:
        spike = len(history) > 2 and error > statistics.fmean(history) + sensitivity * statistics.pstdev(history)
        weight = lambda_max if spike else decay * weight
        history.append(error)
        weights.append(weight)
    return weights


def test_elle_a_lambda_follows_the_rule():
    """λ stays 0 while the history holds fewer than 3 values (however large the error), jumps to
    λ_max when an error exceeds mean + 2·std of the earlier ones, decays by 0.99 otherwise."""
    errors = [1.0, 50.0, 900.0, 1.0, 1.2, 0.9, 1.1, 2000.0, 1.0, 1.0, 1.05, 3000.0, 2.0]
    adaptive = methods.AdaptiveELLE(nn.Identity())
    weights = []
    for error in errors:
        adaptive.update(error)
        weights.append(adaptive.weight)
    assert weights == _rule_by_hand(errors)
    assert weights[:3] == [0.0, 0.0, 0.0] and weights[7] == 4000.0 and weights[8] == 4000.0 * 0.99
    assert weights[11] == 4000.0 and weights.count(4000.0) == 2
    assert adaptive.history.tolist() == errors


def test_elle_a_updates_once_per_optimizer_step_and_applies_lambda_from_the_next():
    """Two micro-batches, then one update with the mean of their E_lin; the next call's loss is
    ELLE's at the new λ."""
    model, _ = _bn_model()
    adaptive = methods.AdaptiveELLE(model, sensitivity=0.0)
    adaptive.load_state_dict({"weight": 0.0, "history": torch.zeros(3, dtype=torch.float64)})  # any E_lin > 0 spikes
    x, y = _data()
    _, first = adaptive(x[:3], y[:3], EPS, _seeded(1))
    _, second = adaptive(x[3:], y[3:], EPS, _seeded(2))
    assert first["elle_lambda"] == 0 and len(adaptive.history) == 3  # nothing happens before the step's end
    adaptive.after_optimizer_step()
    step_error = (first["lin_err"].mean() + second["lin_err"].mean()) / 2
    assert adaptive.history[-1].item() == step_error.item()
    assert adaptive.weight == 4000.0
    loss, info = adaptive(x, y, EPS, _seeded(3))
    reference, _ = methods.elle_loss(model, x, y, EPS, weight=4000.0, generator=_seeded(3))
    assert info["elle_lambda"] == 4000.0 and loss.item() == reference.item()


# --------------------------------------------------------------------------- ELLE-A in training
_fresh_accelerate = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("cifar")), classes=3, per_class=4, size=8)  # 3 steps of 4


@_fresh_accelerate
def test_elle_a_run_stopped_and_resumed_ends_as_an_uninterrupted_one(data_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 5 of 6, resume: the same weights, λ and E_lin history as a run that was
    not stopped, bit for bit. E_lin is scaled up at step 4 in both runs, so that λ jumps to λ_max
    there (on these images it only decays) and is not 0 at the stop: resumed without its state, the
    run ends elsewhere."""
    import shutil

    from safetensors.torch import load_file

    def spike_at_4(n, loss, info):
        if n == 4:
            return loss, {**info, "lin_err": info["lin_err"] * 1e6}

    common = ["--method", "elle-a", "--data-dir", data_dir, "--epochs", "2", "--arch", "wrn-10-1", "--batch-size", "4",
              "--log-every", "1", "--val-n", "0"]
    whole, parts, lost = str(tmp_path / "whole"), str(tmp_path / "parts"), str(tmp_path / "lost")
    with monkeypatch.context() as m:
        m.setattr(methods, "elle_loss", hooked(methods.elle_loss, spike_at_4))
        train_cifar.main([*common, "--out", whole])
    with monkeypatch.context() as m:
        m.setattr(methods, "elle_loss", hooked(methods.elle_loss, lambda *a: signal_at(5)(*a) or spike_at_4(*a)))
        train_cifar.main([*common, "--out", parts])
    assert "stopped at step 5" in capsys.readouterr().out
    stopped = torch.load(os.path.join(parts, "state.pt"), weights_only=True)
    assert stopped["step"] == 5 and len(stopped["method"]["history"]) == 5
    assert stopped["method"]["weight"] == 4000 * 0.99  # the spike's λ_max, decayed once
    shutil.copytree(parts, lost)
    train_cifar.main(["--resume", parts])
    a, b = load_file(os.path.join(whole, "last.safetensors")), load_file(os.path.join(parts, "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(os.path.join(run, "state.pt"), weights_only=True)["method"] for run in (whole, parts)]
    assert states[0]["weight"] == states[1]["weight"] and torch.equal(states[0]["history"], states[1]["history"])
    assert len(states[0]["history"]) == 6
    logged = [e["elle_lambda"] for e in read_log(whole) if e["kind"] == "train"]
    assert logged == [e["elle_lambda"] for e in read_log(parts) if e["kind"] == "train"] and logged[4] == 4000

    torch.save({**stopped, "method": {"weight": 0.0, "history": torch.zeros(0, dtype=torch.float64)}},
               os.path.join(lost, "state.pt"))
    train_cifar.main(["--resume", lost])
    c = load_file(os.path.join(lost, "last.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


@_fresh_accelerate
@pytest.mark.parametrize("flags, message", [
    (["--method", "gradalign", "--compile"], "--method gradalign differentiates twice and has no compiled version"),
    (["--method", "n-fgsm", "--norm", "l2", "--eps", "0.5"], "--method n-fgsm is an ℓ∞ method"),
])
def test_refused_in_one_line_before_any_work(flags, message, data_dir, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_cifar.main(["--data-dir", data_dir, "--out", out, "--arch", "wrn-10-1", *flags])
    text = str(e.value.code)
    assert text.startswith("train_cifar.py: error:") and message in text and "\n" not in text
    assert not os.path.exists(out)


# --------------------------------------------------------------------------- ELLE-A across processes
def _elle_a_worker(rank, world):
    """Each process its own images and draws: after every step both hold the λ and history of the
    rule applied to the mean of the processes' E_lin."""
    torch.manual_seed(0)
    model = TinyConvNet().double()
    adaptive = methods.AdaptiveELLE(model, sensitivity=0.0)
    by_hand, errors, g = [], [], torch.Generator().manual_seed(10 + rank)
    for _ in range(6):
        x = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64)
        _, info = adaptive(x, torch.randint(0, 3, (4,), generator=g), EPS, g)
        local = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(local, info["lin_err"].mean().double())
        assert local[0] != local[1]  # the processes' errors differ: agreeing is not trivial
        adaptive.after_optimizer_step()
        errors.append(((local[0] + local[1]) / 2).item())
        by_hand.append(adaptive.weight)
    assert by_hand == _rule_by_hand(errors, sensitivity=0.0) and max(by_hand) == 4000.0
    assert adaptive.history.tolist() == errors
    states = [None] * world
    dist.all_gather_object(states, adaptive.state_dict())
    assert states[0]["weight"] == states[1]["weight"] and torch.equal(states[0]["history"], states[1]["history"])


def test_elle_a_state_agrees_across_two_processes():
    spawn_gloo(_elle_a_worker)


# --------------------------------------------------------------------------- cost
def test_bench_times_the_new_methods(tmp_path):
    """Eager, each with its ratio to plain measured in the same run."""
    out = str(tmp_path / "bench.json")
    bench.run(bench.get_args(["--arch", "wrn-10-1", "--batch-size", "2", "--image-size", "8", "--rounds", "1",
                              "--warmup", "1", "--methods", "n-fgsm,gradalign,elle,elle-a", "--device", "cpu",
                              "--out", out]))
    with open(out) as f:
        results = json.load(f)["results"]
    assert set(results) == {"plain", "n-fgsm", "gradalign", "elle", "elle-a"}
    for name, r in results.items():
        assert r["ratio_to_plain"] == r["ms_median"] / results["plain"]["ms_median"] > 0


def test_elle_a_compiles_and_gradalign_is_refused():
    """--compile: ELLE-A runs its own code on torch.compile(model) (the same loss as eager here, with
    the "eager" backend, and the same update); GradAlign, differentiated twice with no compiled
    version, is refused."""
    model, _ = _bn_model()
    x, y = _data()
    torch._dynamo.reset()
    compiled = methods.bind("elle-a", model, {}, compile=True, backend="eager")
    eager = methods.bind("elle-a", model, {})
    for _ in range(2):
        loss, info = compiled(x, y, EPS, _seeded())
        reference, reference_info = eager(x, y, EPS, _seeded())
        torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
        compiled.after_optimizer_step()
        eager.after_optimizer_step()
    torch._dynamo.reset()
    assert torch.equal(compiled.history, eager.history) and len(compiled.history) == 2
    assert not methods.compilable("gradalign") and methods.compilable("elle-a") and methods.compilable("llr")
    with pytest.raises(ValueError, match="--method gradalign differentiates twice and has no compiled version"):
        methods.bind("gradalign", model, {}, compile=True)
