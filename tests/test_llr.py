"""llr.py against mathematics: closed forms in float64, finite differences, invariants."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import ball
import llr
from conftest import TinyConvNet

EPS = 0.1


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _data(n=6, seed=1, dtype=torch.float64, shape=(3, 4, 4), classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# --------------------------------------------------------------------------- Eq. (5)
def test_gap_matches_independent_float64_computation():
    """g(δ; x) of a softplus MLP against the closed-form loss and input gradient in numpy."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Softplus(), nn.Linear(7, 3)).double()
    x, y = _data(5, shape=(3, 2, 2))
    delta = (torch.rand_like(x) * 2 - 1) * EPS

    W1, b1 = mlp[1].weight.detach().numpy(), mlp[1].bias.detach().numpy()
    W2, b2 = mlp[3].weight.detach().numpy(), mlp[3].bias.detach().numpy()
    onehot = np.eye(3)[y.numpy()]

    def loss_and_grad(v):  # v: [B, 12]
        h = v @ W1.T + b1
        z = np.log1p(np.exp(h)) @ W2.T + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log((p * onehot).sum(1))
        grad = ((p - onehot) @ W2) / (1 + np.exp(-h)) @ W1
        return loss, grad

    xv, dv = x.flatten(1).numpy(), delta.flatten(1).numpy()
    loss_x, grad_x = loss_and_grad(xv)
    loss_xd, _ = loss_and_grad(xv + dv)
    expected = np.abs(loss_xd - loss_x - (dv * grad_x).sum(1))

    got = llr.linearity_gap(mlp, x, y, delta).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    assert (expected > 1e-6).all()  # a non-trivial gap: the comparison can fail


class LinearLossModel(nn.Module):
    """Two classes with log-probabilities log p0 = w·x − c and log(1 − p0): the
    cross-entropy of class 0 is c − w·x, exactly linear in x (c keeps p0 < 1 on [0, 1])."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def forward(self, x):
        s = x.flatten(1) @ self.w - (self.w.abs().sum() + 1)
        return torch.stack([s, torch.log(-torch.expm1(s))], 1)


def test_gap_and_gamma_vanish_when_loss_is_linear():
    torch.manual_seed(0)
    model = LinearLossModel(48)
    x, _ = _data(4)
    y = torch.zeros(4, dtype=torch.long)
    delta = (torch.rand_like(x) * 2 - 1) * EPS
    assert llr.linearity_gap(model, x, y, delta).abs().max() < 1e-12
    gamma, _ = llr.local_linearity(model, x, y, EPS, steps=5, generator=_seeded())
    assert gamma.abs().max() < 1e-12
    # ... while the first-order term is not zero, and llr_loss = ℓ + μ|δᵀ∇ℓ|
    loss, info = llr.llr_loss(model, x, y, EPS, lam=4.0, mu=3.0, steps=2, generator=_seeded())
    assert (info["grad_term"] > 1e-3).all()
    torch.testing.assert_close(loss, (info["clean_loss"] + 3.0 * info["grad_term"]).mean(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- Eq. (6)
@pytest.mark.parametrize("train_mode", [False, True])
def test_gamma_bounds_gap_at_random_points(tiny_net, train_mode):
    tiny_net.train(train_mode)
    x, y = _data(8)
    gamma, delta = llr.local_linearity(tiny_net, x, y, EPS, steps=20, generator=_seeded())
    assert (gamma >= 0).all()
    torch.testing.assert_close(gamma, llr.linearity_gap(tiny_net, x, y, delta).detach())  # γ is g at the δ it returns
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        random_delta = ball.random_point(x, EPS, g) - x
        assert (gamma >= llr.linearity_gap(tiny_net, x, y, random_delta).detach()).all()


def test_gamma_never_decreases_with_more_steps(tiny_net):
    """The best iterate is kept: on this model and seed the last iterate of the
    ascent does fall at some step, yet γ never does."""
    x, y = _data(8)
    gammas = torch.stack([llr.local_linearity(tiny_net, x, y, EPS, steps=k, generator=_seeded(3))[0]
                          for k in range(12)])
    assert (gammas[1:] >= gammas[:-1]).all()
    assert (gammas[-1] > gammas[0]).any()
    # g at the last iterate of the same search (llr_loss's γ)
    last = torch.stack([llr.llr_loss(tiny_net, x, y, EPS, steps=k, generator=_seeded(3))[1]["gamma"] for k in range(12)])
    assert (last[1:] < last[:-1]).any()  # so the first assertion has something to catch


@pytest.mark.parametrize("eps", [0.0, 1 / 255, 0.3, 1.0])
def test_perturbations_stay_in_ball_and_box(tiny_net, eps):
    x, y = _data(8)
    x[0], x[1, :, :2] = 0.0, 1.0  # pixels on the box boundary
    _, info = llr.llr_loss(tiny_net, x, y, eps, steps=3, generator=_seeded())
    _, delta = llr.local_linearity(tiny_net, x, y, eps, steps=3, generator=_seeded())
    for d in (info["delta"], delta):
        assert d.abs().max() <= eps + 1e-12
        assert (x + d).min() >= 0 and (x + d).max() <= 1


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_eps_is_rejected(tiny_net, bad):
    x, y = _data(2)
    with pytest.raises(ValueError, match="eps"):
        llr.llr_loss(tiny_net, x, y, bad)
    with pytest.raises(ValueError, match="eps"):
        llr.local_linearity(tiny_net, x, y, bad)


# --------------------------------------------------------------------------- Eq. (8)
@pytest.mark.parametrize("train_mode", [True, False])
def test_weight_gradient_matches_finite_differences(tiny_net, train_mode):
    """The double backprop: d/dθ of ℓ + λ|ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ| + μ|δᵀ∇ₓℓ| for a fixed δ
    (steps=0 and a fixed generator: δ is the same random start at every θ), against
    central differences in float64. In train mode this includes the batch-norm
    statistics of the clean pass, which the pass on x + δ reuses."""
    tiny_net.train(train_mode)
    x, y = _data(5)
    params = [p for p in tiny_net.parameters()]

    def objective():
        return llr.llr_loss(tiny_net, x, y, EPS, lam=4.0, mu=3.0, steps=0, generator=_seeded(7))[0]

    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(objective(), params)])
    numeric, h = [], 1e-6
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                plus = objective()
                flat[i] = old - h
                minus = objective()
                flat[i] = old
                numeric.append((plus - minus) / (2 * h))
    numeric = torch.stack(numeric)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
    # the second-order part matters: with ∇ₓℓ detached (first-order terms only) the gradient is
    # far from the finite differences, so the agreement above is the double backprop's
    delta = llr.llr_loss(tiny_net, x, y, EPS, steps=0, generator=_seeded(7))[1]["delta"]
    with llr.reuse_clean_batch_statistics(tiny_net):
        xr = x.clone().requires_grad_(True)
        clean_loss = nn.functional.cross_entropy(tiny_net(xr), y, reduction="none")
        (grad,) = torch.autograd.grad(clean_loss.sum(), xr, retain_graph=True)  # not differentiable: first order
        gamma = llr._gap(tiny_net, x, y, x + delta, clean_loss, grad)
    first_order_only = (clean_loss + 4.0 * gamma + 3.0 * llr._directional(delta, grad).abs()).mean()
    partial = torch.cat([g.flatten() for g in torch.autograd.grad(first_order_only, params)])
    assert (partial - numeric).abs().max() > 1e3 * (analytic - numeric).abs().max()


@pytest.mark.parametrize("batchnorm", [False, True])
def test_objective_is_per_sample(batchnorm):
    """Without batch statistics (no BN, or BN in eval mode) a sample's δ, γ and terms
    do not depend on the rest of the batch, and the loss is the mean of its terms."""
    torch.manual_seed(0)
    model = TinyConvNet(batchnorm=batchnorm).double().train(not batchnorm)
    x, y = _data(6)
    x_other, y_other = _data(6, seed=9)
    x_other[0], y_other[0] = x[0], y[0]
    loss, info = llr.llr_loss(model, x, y, EPS, lam=4.0, mu=3.0, steps=3, generator=_seeded())
    _, info_other = llr.llr_loss(model, x_other, y_other, EPS, lam=4.0, mu=3.0, steps=3, generator=_seeded())
    for key in ("delta", "gamma", "grad_term", "clean_loss", "logits"):
        torch.testing.assert_close(info[key][0], info_other[key][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, (info["clean_loss"] + 4.0 * info["gamma"] + 3.0 * info["grad_term"]).mean())
    for i in range(6):  # each sample alone gives the same γ at the same δ
        alone = llr.linearity_gap(model, x[i:i + 1], y[i:i + 1], info["delta"][i:i + 1])
        torch.testing.assert_close(alone.detach()[0], info["gamma"][i], rtol=1e-10, atol=1e-14)


def test_authors_weighting_is_twice_lam2_mu06(tiny_net):
    """The docstring's mapping: 2·CE + 4·(γ + 0.3·|δᵀ∇ℓ|) = 2 × llr_loss(lam=2, mu=0.6)."""
    x, y = _data(5)
    loss, info = llr.llr_loss(tiny_net, x, y, EPS, lam=2.0, mu=0.6, steps=2, generator=_seeded())
    authors = (2 * info["clean_loss"] + 4 * (info["gamma"] + 0.3 * info["grad_term"])).mean()
    torch.testing.assert_close(2 * loss.detach(), authors)


# --------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_see_the_clean_batch_once(tiny_net, momentum):
    tiny_net.bn.momentum = momentum
    x, y = _data(8)
    reference = copy.deepcopy(tiny_net)
    reference(x)  # one ordinary train-mode forward of the clean batch
    llr.llr_loss(tiny_net, x, y, EPS, steps=3, generator=_seeded())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(tiny_net.bn, name), getattr(reference.bn, name), rtol=1e-12, atol=1e-14)
    # measurements never touch them
    before = copy.deepcopy(tiny_net.state_dict())
    llr.local_linearity(tiny_net, x, y, EPS, steps=3, generator=_seeded())
    llr.linearity_gap(tiny_net, x, y, torch.full_like(x, EPS) * 0.5)
    for name, value in tiny_net.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert tiny_net.training and "forward" not in vars(tiny_net.bn)  # the module is restored


def test_perturbed_pass_uses_clean_batch_statistics(tiny_net):
    """g in train mode equals an independent computation: ℓ(x) and ∇ₓℓ(x) from an
    ordinary train-mode pass, ℓ(x + δ) from an eval-mode copy whose running
    statistics are set to the clean batch's mean and biased variance."""
    x, y = _data(8)
    delta = (torch.rand_like(x) * 2 - 1) * EPS
    xr = x.clone().requires_grad_(True)
    clean_loss = nn.functional.cross_entropy(copy.deepcopy(tiny_net)(xr), y, reduction="none")
    (grad,) = torch.autograd.grad(clean_loss.sum(), xr)
    frozen = copy.deepcopy(tiny_net).eval()
    pre_bn = tiny_net.conv1(x).detach()
    frozen.bn.running_mean.copy_(pre_bn.mean((0, 2, 3)))
    frozen.bn.running_var.copy_(pre_bn.var((0, 2, 3), unbiased=False))
    perturbed_loss = nn.functional.cross_entropy(frozen(x + delta), y, reduction="none")
    expected = (perturbed_loss - clean_loss - (delta * grad).flatten(1).sum(1)).abs()
    torch.testing.assert_close(llr.linearity_gap(tiny_net, x, y, delta).detach(), expected.detach())


# --------------------------------------------------------------------------- precision
def test_bf16_autocast_agrees_with_float32():
    """Under bf16 autocast the loss, γ and |δᵀ∇ℓ| are float32 and close to a float32 run on the same
    model, data and random start: the loss within 1%; the batch means of γ and |δᵀ∇ℓ| within 10%
    (γ is a difference of nearly equal losses, and bf16 keeps 8 bits: about 0.4% of a loss of
    2.3, a third of a typical γ, per sample); the weight gradients are finite."""
    import models

    torch.manual_seed(0)
    model = models.build_model("wrn-10-1")
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    results = {}
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, info = llr.llr_loss(model, x, y, 8 / 255, steps=2, generator=_seeded())
            gamma, _ = llr.local_linearity(model, x, y, 8 / 255, steps=5, generator=_seeded())
        model.zero_grad()
        loss.backward()
        assert loss.dtype == torch.float32 and info["gamma"].dtype == torch.float32
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        results[bf16] = torch.stack([loss, info["gamma"].mean(), info["grad_term"].mean(), gamma.mean()]).detach()
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-2, atol=0)
    torch.testing.assert_close(results[True][1:], results[False][1:], rtol=0.1, atol=0)


def test_under_autocast_every_pass_of_the_search_sees_its_iterate():
    """γ is g at the δ it returns under bf16 autocast too, on a model whose first layer autocast casts x + δ
    for: the search once updated its leaf x + δ in place, and autocast's cast cache fed the model the bf16
    copy of the random start at every step."""
    torch.manual_seed(0)
    model = TinyConvNet()
    x, y = _data(8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gamma, delta = llr.local_linearity(model, x, y, EPS, steps=5, generator=_seeded())
        torch.testing.assert_close(gamma, llr.linearity_gap(model, x, y, delta).detach(), rtol=1e-6, atol=0)


def test_batch_norm_of_perturbed_passes_is_computed_in_float32():
    """Under autocast a batch-norm layer gets bf16 activations: the clean batch's statistics are
    applied in float32 and the result is cast to bf16 once."""
    layer = nn.BatchNorm2d(4).train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    clean = (3 + 5 * torch.randn(8, 4, 5, 5, generator=g)).bfloat16()
    perturbed = clean + (0.05 * torch.randn(8, 4, 5, 5, generator=g)).bfloat16()
    with llr.reuse_clean_batch_statistics(layer):
        layer(clean)
        out = layer(perturbed)
    var, mean = torch.var_mean(clean.float(), dim=(0, 2, 3), correction=0)
    scale = layer.weight / torch.sqrt(var + layer.eps)
    expected = (perturbed.float() * scale.view(1, -1, 1, 1) + (layer.bias - mean * scale).view(1, -1, 1, 1)).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_llr_keeps_its_own_copy_of_the_ball_geometry():
    """llr.py imports torch alone, so that it can be copied into another project; its private
    projection and random start must equal ball.py's, which the attacks and methods use."""
    import ast

    tree = ast.parse(open(llr.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"torch", "contextlib", "functools", "warnings", "weakref"}, imported  # the standard library and torch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64)
    x[0], x[1, :, :2] = 0.0, 1.0  # pixels on the box boundary
    x_adv = x + 0.3 * (2 * torch.rand(x.shape, generator=g, dtype=torch.float64) - 1)
    assert not torch.equal(ball.project(x_adv, x, 0.1), x_adv)  # the projection has work to do
    assert torch.equal(llr._project(x_adv, x, 0.1), ball.project(x_adv, x, 0.1))
    assert torch.equal(llr._random_start(x, 0.1, _seeded(5)), ball.random_point(x, 0.1, _seeded(5)))


def test_adam_step_is_torch_optim_adams_bit_for_bit():
    """The search's Adam step (shared by llr_loss, CompiledLLR and attacks.adam_step) is
    torch.optim.Adam(maximize=True)'s, written out: the same numbers to the bit, float32 and float64, so
    that the eager results did not change when the search stopped calling torch.optim."""
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        x_adv = torch.rand(4, 3, 5, 5, generator=g, dtype=dtype)
        reference = x_adv.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([reference], lr=0.1, eps=1e-9, maximize=True)
        m, v = torch.zeros_like(x_adv), torch.zeros_like(x_adv)
        for t in range(1, 6):
            grad = torch.randn(x_adv.shape, generator=g, dtype=dtype) * 10.0 ** -t
            reference.grad = grad.clone()
            optimizer.step()
            x_adv, m, v = llr._adam_step(x_adv, grad, m, v, *llr._adam_scalars(t, 0.1))
            assert torch.equal(x_adv, reference.detach()), (dtype, t)


def _bad_model(kind):
    """A TinyConvNet that returns a tuple, an object, or logits of the wrong shape."""
    class Bad(TinyConvNet):
        def forward(self, x):
            logits = super().forward(x)
            return {"tuple": (logits, x), "object": {"logits": logits}, "shape": logits[:, :, None]}[kind]
    return Bad().double()


@pytest.mark.parametrize("kind", ["tuple", "object", "shape"])
def test_a_model_that_does_not_return_logits_is_refused_in_one_line(kind):
    x, y = _data(4)
    for call in (lambda m: llr.llr_loss(m, x, y, EPS, steps=1), lambda m: llr.local_linearity(m, x, y, EPS, steps=1),
                 lambda m: llr.linearity_gap(m, x, y, torch.zeros_like(x))):
        with pytest.raises(ValueError, match=r"the model must return logits \[B, K\] for B = 4 images") as caught:
            call(_bad_model(kind))
        assert "\n" not in str(caught.value)


def test_bad_labels_and_images_that_require_grad_are_refused_in_one_line(tiny_net):
    x, y = _data(4)
    for bad in (y[:3], y[:, None], torch.zeros(4, 3)):
        with pytest.raises(ValueError, match=r"labels y must be \[B\] = \[4\] for images x \[4, 3, 4, 4\]"):
            llr.llr_loss(tiny_net, x, bad, EPS, steps=1)
    for fn in (llr.llr_loss, llr.local_linearity):
        with pytest.raises(ValueError, match="images x must not require grad .* pass x.detach()"):
            fn(tiny_net, x.clone().requires_grad_(True), y, EPS, steps=1)
        with pytest.raises(ValueError, match="images x must not require grad"):
            fn(tiny_net, x.clone().requires_grad_(True) * 1.0, y, EPS, steps=1)


def test_l2_ball():
    """norm="l2": δ stays in the ℓ2 ball and the box, γ never decreases with more steps and is
    at least the gap at random points of the ball (where it is the max over the ball)."""
    torch.manual_seed(0)
    model = TinyConvNet().double().eval()
    x, y = _data(8)
    x[0] = 0.0
    eps = 0.3
    _, info = llr.llr_loss(model, x, y, eps, steps=3, generator=_seeded(), norm="l2")
    gammas = [llr.local_linearity(model, x, y, eps, steps=k, generator=_seeded(1), norm="l2") for k in (0, 5, 20)]
    for delta in (info["delta"], gammas[-1][1]):
        assert (delta.flatten(1).norm(dim=1) <= eps + 1e-9).all()
        assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert (gammas[1][0] >= gammas[0][0]).all() and (gammas[2][0] >= gammas[1][0]).all()
    assert (gammas[2][0] > gammas[0][0]).any()
    for seed in range(5):
        random_delta = ball.random_point(x, eps, _seeded(seed + 10), "l2") - x
        gap = llr.linearity_gap(model, x, y, random_delta).detach()
        assert (gammas[2][0] >= gap - 1e-12).mean(dtype=torch.float64) > 0.8
    with pytest.raises(ValueError, match="unknown norm"):
        llr.llr_loss(model, x, y, eps, norm="l1")


# --------------------------------------------------------------------------- the first-order form
def _loss_and_gradient(model, x, y, **options):
    model.zero_grad()
    loss, info = llr.llr_loss(model, x, y, EPS, lam=4.0, mu=3.0, steps=2, generator=_seeded(), **options)
    loss.backward()
    return loss.detach(), info, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("batchnorm", [False, True])
def test_first_order_form_approaches_the_exact_one_as_h_squared(batchnorm):
    """Where both forms define the same quantity (no batch statistics: no BN, or BN in eval mode), the first-order
    loss, γ and weight gradient approach llr_loss's for the same δ_LLR (same generator) as h shrinks, the error
    quartering with each halving of h (the central difference's truncation, ∝ h², in float64)."""
    torch.manual_seed(0)
    model = TinyConvNet(batchnorm=batchnorm).double().train(not batchnorm)
    x, y = _data(6)
    loss, info, grad = _loss_and_gradient(model, x, y)
    assert info["gamma"].mean() > 1e-6 and info["grad_term"].mean() > 1e-3  # a step where the terms are not zero
    errors = []
    for h in (0.4, 0.2, 0.1, 0.05):
        fo_loss, fo_info, fo_grad = _loss_and_gradient(model, x, y, first_order=True, h=h)
        torch.testing.assert_close(fo_info["delta"], info["delta"], rtol=0, atol=0)  # the same search
        errors.append(((fo_loss - loss).abs().item(), (fo_grad - grad).norm().item() / grad.norm().item(),
                       (fo_info["gamma"] - info["gamma"]).abs().max().item()))
    for coarse, fine in zip(errors, errors[1:]):
        for a, b in zip(coarse, fine):
            assert 3.5 < a / b < 4.5, errors
    assert errors[-1][1] < 1e-6


def test_first_order_form_in_float32_at_the_default_h():
    """In float32 at the default h the relative error of the weight gradient against the exact form's (float32, the
    same δ_LLR) is below the docstring's bound, 1e-3 (wrn-10-1: 1.9e-5, experiments/first-order)."""
    torch.manual_seed(0)
    model = TinyConvNet().float().eval()
    x, y = _data(8, dtype=torch.float32)
    _, exact_info, exact = _loss_and_gradient(model, x, y)
    _, info, first_order = _loss_and_gradient(model, x, y, first_order=True)
    torch.testing.assert_close(info["delta"], exact_info["delta"], rtol=0, atol=0)
    assert info["grad_term"].dtype == torch.float32 and llr.FIRST_ORDER_H == 0.1
    assert 0 < (first_order - exact).norm() / exact.norm() < 1e-3


@pytest.mark.parametrize("momentum", [0.1, None])
def test_first_order_running_statistics_see_the_clean_batch_once(tiny_net, momentum):
    """The first-order pass stacks [x, x + δ, x ± hδ]: batch norm measures the first B rows (the clean x), and the
    running statistics are updated once, from them, as by one ordinary forward of the clean batch."""
    tiny_net.bn.momentum = momentum
    x, y = _data(8)
    reference = copy.deepcopy(tiny_net)
    reference(x)
    _, info = llr.llr_loss(tiny_net, x, y, EPS, steps=2, generator=_seeded(), first_order=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(tiny_net.bn, name), getattr(reference.bn, name), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(info["logits"], reference(x).detach())  # the clean rows: the clean batch's output
    assert "forward" not in vars(tiny_net.bn)


def test_first_order_form_with_batch_statistics_differs_only_by_the_statistics_term():
    """BN in train mode: the first-order form's δᵀ∇ₓℓ is the derivative of each sample's own loss with the
    clean batch's statistics held fixed (what ℓ(x + δ) is computed with); the exact one also carries each
    sample's effect on the others' losses through the statistics. Measured against an independent computation:
    |D_h| against δᵀ∇ₓℓ at statistics frozen in an eval-mode copy (float64, small h)."""
    torch.manual_seed(0)
    model = TinyConvNet().double()
    x, y = _data(8)
    _, info = llr.llr_loss(model, x, y, EPS, steps=2, generator=_seeded(), first_order=True, h=0.01)
    frozen = copy.deepcopy(model).eval()
    pre_bn = model.conv1(x).detach()
    frozen.bn.running_mean.copy_(pre_bn.mean((0, 2, 3)))
    frozen.bn.running_var.copy_(pre_bn.var((0, 2, 3), unbiased=False))
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(frozen(xr), y, reduction="sum"), xr)
    fixed = (info["delta"] * grad).flatten(1).sum(1).abs()
    torch.testing.assert_close(info["grad_term"], fixed, rtol=1e-4, atol=1e-9)
    _, exact = llr.llr_loss(model, x, y, EPS, steps=2, generator=_seeded())
    assert (exact["grad_term"] - fixed).abs().max() > 100 * (info["grad_term"] - fixed).abs().max()


class _OnceDifferentiableSoftplus(torch.autograd.Function):
    """softplus whose backward cannot be differentiated (a custom kernel's usual state)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return nn.functional.softplus(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class _FusedAttentionNet(nn.Module):
    """conv, then one head of F.scaled_dot_product_attention over the pixels (the CPU's fused flash kernel, which
    has no double backward, when `fused`), then a linear layer; or the once-differentiable softplus."""

    def __init__(self, op):
        super().__init__()
        self.op, self.conv, self.fc = op, nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        h = self.conv(x)
        if self.op == "once_differentiable":
            return self.fc(_OnceDifferentiableSoftplus.apply(h).mean((2, 3)))
        tokens = nn.functional.softplus(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # [B, 1, T, 8]
        backend = SDPBackend.FLASH_ATTENTION if self.op == "flash" else SDPBackend.MATH
        with sdpa_kernel(backend):
            return self.fc(nn.functional.scaled_dot_product_attention(tokens, tokens, tokens).mean((1, 2)))


@pytest.mark.parametrize("op", ["flash", "once_differentiable"])
def test_first_order_form_trains_where_double_backward_does_not(op):
    """A model with an op that has no double backward: exact LLR stops before the backward with one line naming
    the op and the first-order option; the first-order form trains, and its weight gradient is the exact form's
    on the same model with the op made twice differentiable (math attention; torch's softplus), to h² (float32)."""
    torch.manual_seed(0)
    model = _FusedAttentionNet(op)
    x, y = _data(4, dtype=torch.float32, shape=(3, 6, 6))
    with pytest.raises(RuntimeError) as error:
        llr.llr_loss(model, x, y, 8 / 255, steps=1)
    message = str(error.value)
    assert "\n" not in message and "first_order=True" in message and "--llr-first-order" in message
    assert ("_scaled_dot_product_flash_attention_for_cpu_backward" if op == "flash" else "once_differentiable") \
        in message
    twice = copy.deepcopy(model)
    twice.op = "math" if op == "flash" else "softplus"
    if op == "once_differentiable":
        twice.forward = lambda x: twice.fc(nn.functional.softplus(twice.conv(x)).mean((2, 3)))
    before = [p.detach().clone() for p in model.parameters()]
    loss, info = llr.llr_loss(model, x, y, 8 / 255, steps=1, generator=_seeded(), first_order=True)
    loss.backward()
    first_order = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss) and all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    exact_loss, _ = llr.llr_loss(twice, x, y, 8 / 255, steps=1, generator=_seeded())
    exact_loss.backward()
    exact = torch.cat([p.grad.flatten() for p in twice.parameters()])
    assert (first_order - exact).norm() / exact.norm() < 1e-3


@pytest.mark.parametrize("method, name", [("gradalign", "GradAlign"), ("cure", "CURE"), ("lfr", "LFR")])
def test_other_double_backprop_methods_refuse_a_model_without_double_backward(method, name):
    """GradAlign, CURE and LFR differentiate an input gradient again too: on a model whose op has none they stop
    before the backward, in one line naming themselves, the op and first-order LLR; on the same model with the op
    made twice differentiable they train."""
    import methods

    torch.manual_seed(0)
    model = _FusedAttentionNet("once_differentiable")
    x, y = _data(4, dtype=torch.float32, shape=(3, 6, 6))
    with pytest.raises(RuntimeError) as error:
        methods.METHODS[method](model, x, y, 8 / 255)
    message = str(error.value)
    assert "\n" not in message and message.startswith(name) and "once_differentiable" in message
    assert "--llr-first-order" in message
    model.forward = lambda x: model.fc(nn.functional.softplus(model.conv(x)).mean((2, 3)))
    loss, _ = methods.METHODS[method](model, x, y, 8 / 255)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_first_order_step_h_is_checked(tiny_net):
    x, y = _data(4)
    for bad in (0.0, -0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="h, the first-order difference's step"):
            llr.llr_loss(tiny_net, x, y, EPS, first_order=True, h=bad)


def test_first_order_differences_are_taken_in_float32_under_autocast():
    """Under bf16 autocast the first-order pass runs in float32 (bf16 logits leave D_h at h = 0.1 about 100% off,
    experiments/first-order): at the same δ_LLR its loss, γ and |D_h| are a float32 run's to rounding, though
    the search ran in bf16."""
    import models

    torch.manual_seed(0)
    model = models.build_model("wrn-10-1").eval()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, info = llr.llr_loss(model, x, y, 8 / 255, steps=1, generator=_seeded(), first_order=True)
    assert info["logits"].dtype == torch.float32
    plain = llr._LLR(model, first_order=True)  # Eq. 8's first-order pass alone, in float32, at the same δ
    with plain.clean.installed():
        reference = plain.eq8_first_order(x, y, x + info["delta"], llr.FIRST_ORDER_H, 2.0, 0.6)
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(info["gamma"], reference[1].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(info["grad_term"], reference[2].detach(), rtol=1e-5, atol=1e-7)


def test_the_first_order_measurements_run(tmp_path):
    """experiments/first_order.py (the numbers llr.py's docstring quotes) on a tiny model: every measurement is
    written, and in float64 with batch norm in eval mode the error falls as h² (a quarter per halving)."""
    from experiments import first_order

    result = first_order.main(["--smoke", "--out", str(tmp_path / "m.json")])
    assert set(result) >= {"step_h", "batch_norm_train", "bf16", "command", "torch"} and (tmp_path / "m.json").exists()
    float64 = {r["h"]: r["weight_grad_relative_error"] for r in result["step_h"] if r["dtype"] == "float64"}
    assert 3.5 < float64[0.05] / float64[0.025] < 4.5
    assert {r["precision"] for r in result["bf16"]} == {"float32", "bf16"}
