"""Each training objective in methods.py against an independent reference on a tiny float64
model: the formula of its paper or official code, written out here without methods.py's helpers."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ball
import methods
from conftest import TinyConvNet

EPS = 0.1


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _weight_grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


def _assert_same_loss_and_gradients(loss, model, reference, reference_model):
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(_weight_grads(loss, model), _weight_grads(reference, reference_model)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _pair():
    """Two identical tiny models with batch norm, in train mode, whose running statistics are not
    the initial ones (so that eval and train modes normalise differently)."""
    torch.manual_seed(0)
    model = TinyConvNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.train(), copy.deepcopy(model).train()


def test_plain_is_mean_cross_entropy():
    model, reference_model = _pair()
    x, y = _data()
    loss, _ = methods.plain_loss(model, x, y, EPS)
    _assert_same_loss_and_gradients(loss, model, F.cross_entropy(reference_model(x), y), reference_model)


@pytest.mark.parametrize("steps, step_size, random_start", [(3, 0.04, True), (1, EPS, False), (1, 1.25 * EPS, True)])
def test_adv_is_pgd_then_cross_entropy(steps, step_size, random_start):
    """Madry et al.: signed steps on the cross-entropy from a random point of the ball (or from x),
    each clipped to the ball and [0, 1], with batch norm on running statistics; then CE on x_adv."""
    model, reference_model = _pair()
    x, y = _data()
    loss, _ = methods.adv_loss(model, x, y, EPS, steps=steps, step_size=step_size, random_start=random_start,
                               generator=_seeded(1))
    noise = torch.rand(x.shape, generator=_seeded(1), dtype=x.dtype)
    x_adv = (x + (2 * noise - 1) * EPS).clamp(0, 1) if random_start else x.clone()
    reference_model.eval()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(reference_model(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    reference_model.train()
    _assert_same_loss_and_gradients(loss, model, F.cross_entropy(reference_model(x_adv), y), reference_model)
    assert model.bn.num_batches_tracked == 1  # only the training pass updates the running statistics


def test_trades_follows_trades_py():
    """TRADES' `trades.py`: x_adv from x + 0.001·N(0, 1) by signed steps on KL(p(x) ‖ p(x_adv)) in
    eval mode; loss = CE(f(x), y) + β/B·KL summed, in train mode."""
    model, reference_model = _pair()
    x, y = _data()
    loss, _ = methods.trades_loss(model, x, y, EPS, beta=6.0, steps=3, step_size=0.03, generator=_seeded(2))
    reference_model.eval()
    with torch.no_grad():
        p_natural = F.softmax(reference_model(x), 1)
    x_adv = x + 0.001 * torch.randn(x.shape, generator=_seeded(2), dtype=x.dtype)
    for _ in range(3):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(reference_model(x_adv), 1), p_natural, reduction="sum")
        (g,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + 0.03 * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    reference_model.train()
    logits = reference_model(x)
    robust = F.kl_div(F.log_softmax(reference_model(x_adv), 1), F.softmax(logits, 1), reduction="sum") / len(y)
    _assert_same_loss_and_gradients(loss, model, F.cross_entropy(logits, y) + 6.0 * robust, reference_model)


def test_cure_follows_the_official_code():
    """`CURE.py`: z = h·(sign(∇) + 1e-7)/(‖sign(∇)‖₂ + 1e-7) from an eval-mode gradient; the
    regulariser λ·‖∇ₓ(ℓ(x + z) − ℓ(x))‖₂ (one gradient of the difference, eval mode, not squared),
    averaged over the batch; CE on x in train mode, computed first (its running-statistics update is
    seen by the eval-mode passes). The loss and its weight gradients agree."""
    model, reference_model = _pair()
    x, y = _data()
    loss, info = methods.cure_loss(model, x, y, EPS, weight=0.8, h=0.6)
    natural = F.cross_entropy(reference_model.train()(x), y)
    inputs = x.clone().requires_grad_(True)
    reference_model.eval()
    (g,) = torch.autograd.grad(F.cross_entropy(reference_model(inputs), y, reduction="sum"), inputs)
    z = torch.sign(g)
    z = 0.6 * (z + 1e-7) / (z.reshape(len(y), -1).norm(dim=1)[:, None, None, None] + 1e-7)
    loss_pos = F.cross_entropy(reference_model(inputs + z), y, reduction="none")
    loss_orig = F.cross_entropy(reference_model(inputs), y, reduction="none")
    (grad_diff,) = torch.autograd.grad(loss_pos - loss_orig, inputs, grad_outputs=torch.ones(len(y), dtype=x.dtype),
                                       create_graph=True)
    regulariser = 0.8 * grad_diff.reshape(len(y), -1).norm(dim=1)
    reference_model.train()
    reference = natural + regulariser.mean()
    torch.testing.assert_close(info["curvature"], regulariser.detach() / 0.8, rtol=1e-6, atol=1e-10)  # the 1e-7s
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-10)
    for a, b in zip(_weight_grads(loss, model), _weight_grads(reference, reference_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def _forward_with_statistics(model, x, mean, var):
    """TinyConvNet's forward with its batch norm using the given per-channel statistics."""
    h = model.conv1(x)
    h = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + model.bn.eps)
    h = F.softplus(h * model.bn.weight[None, :, None, None] + model.bn.bias[None, :, None, None])
    h = F.softplus(model.conv2(h))
    return model.fc(h.mean((2, 3)))


def test_lfr_final_pass_uses_the_clean_batch_statistics():
    """LFR with no search steps: CE(x) + w·ε·‖∇ₓℓ(x + δ)‖₁ at the random start, the pass on x + δ
    normalised with the statistics of the clean batch (a reference forward written out here)."""
    model, reference_model = _pair()
    x, y = _data()
    loss, _ = methods.lfr_loss(model, x, y, EPS, weight=2.0, steps=0, generator=_seeded(3))
    x_adv = ball.random_point(x, EPS, _seeded(3)).requires_grad_(True)
    h = reference_model.conv1(x)
    var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    clean = F.cross_entropy(_forward_with_statistics(reference_model, x, mean, var), y, reduction="none")
    (g,) = torch.autograd.grad(F.cross_entropy(_forward_with_statistics(reference_model, x_adv, mean, var), y,
                                               reduction="sum"), x_adv, create_graph=True)
    reference = (clean + 2.0 * EPS * g.flatten(1).abs().sum(1)).mean()
    _assert_same_loss_and_gradients(loss, model, reference, reference_model)


def test_lfr_search_climbs_the_gradient_norm():
    """The search's objective must reach x_adv: more steps find a larger ‖∇ₓℓ‖₁ than the start."""
    model, _ = _pair()
    x, y = _data()
    flatness = [methods.lfr_loss(model, x, y, EPS, steps=k, generator=_seeded(4))[1]["flatness"].sum()
                for k in (0, 3)]
    assert flatness[1] > flatness[0]


@pytest.mark.parametrize("method", ["adv", "trades", "lfr"])
def test_l2_attacks_inside_the_methods_stay_in_the_l2_ball(method, monkeypatch):
    """With norm="l2" the inner maximisation of ADV, TRADES and LFR steps along ∇/‖∇‖₂ and stays in
    the ℓ2 ball ∩ [0, 1]: every point the model sees there is checked."""
    model, _ = _pair()
    x, y = _data()
    seen = []
    original = methods.signed_ascent

    def recording(model, x, x_adv, eps, steps, step_size, objective, norm="linf", **kwargs):
        result = original(model, x, x_adv, eps, steps, step_size, objective, norm, **kwargs)
        seen.append((x, result, norm))
        return result

    monkeypatch.setattr(methods, "signed_ascent", recording)
    options = {"adv": {"steps": 3}, "trades": {"steps": 3, "step_size": 0.1}, "lfr": {"steps": 2}}[method]
    methods.METHODS[method](model, x, y, 0.3, generator=_seeded(), norm="l2", **options)
    (clean, x_adv, norm), = seen
    assert norm == "l2" and ball.inside(x_adv, clean, 0.3, norm="l2").all()
    assert not ball.inside(x_adv, clean, 0.3 / 10, norm="l2").all()  # it did move


# ------------------------------------------------------------------- the configurations behind the paper's contrast
def test_adv_with_train_mode_batch_norm_attacks_on_batch_statistics():
    """--adv-bn train: the attack's passes normalise with the batch's statistics (a different
    perturbation from the running statistics' on a model with batch norm) and update the running
    statistics, as train_fgsm.py; eval (the default) leaves them to the training pass."""
    x, y = _data()
    results = {}
    for bn in ("eval", "train"):
        model, _ = _pair()
        before = model.bn.num_batches_tracked.item()
        _, info = methods.adv_loss(model, x, y, EPS, steps=3, bn=bn, generator=_seeded())
        results[bn] = (info["adv_logits"], model.bn.num_batches_tracked.item() - before)
    assert results["eval"][1] == 1 and results["train"][1] == 4  # 3 attack passes + the training pass
    assert not torch.allclose(results["eval"][0], results["train"][0])


def test_adam_adv_first_step_is_the_clipped_sign_step():
    """The authors' attack (Adam, lr 0.1 in pixel units): its first bias-corrected step is lr·g/|g|,
    which at lr 0.1 > 2ε lands, after the projection, where a sign step of 0.1 does; the second differs."""
    model, _ = _pair()
    x, y = _data()
    start = ball.random_point(x, EPS / 4, _seeded(1))

    def objective(x_adv):
        return F.cross_entropy(model(x_adv), y, reduction="sum")

    eps = EPS / 4
    adam = methods.adam_ascent(model, x, start, eps, 1, 0.1, objective)
    sign = methods.signed_ascent(model, x, start, eps, 1, 0.1, objective)
    torch.testing.assert_close(adam, sign, rtol=0, atol=1e-12)
    assert ((adam - x).abs() > eps - 1e-9).float().mean() > 0.5  # at the ball's corners: the step was clipped
    adam2 = methods.adam_ascent(model, x, start, eps, 2, 0.01, objective)
    sign2 = methods.signed_ascent(model, x, start, eps, 2, 0.01, objective)
    assert not torch.allclose(adam2, sign2)
    _, info = methods.adv_loss(model, x, y, eps, steps=2, optimizer="adam", generator=_seeded())
    assert torch.isfinite(info["adv_loss"]).all()
    with pytest.raises(ValueError, match="authors' ℓ∞ attack"):
        methods.adv_loss(model, x, y, eps, steps=2, optimizer="adam", norm="l2")


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(48, 3).double()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_adv_margin_loss_steps_toward_the_best_other_class():
    """--adv-loss margin on a linear model: one sign step of ε from x moves every pixel along
    sign(w_j − w_y), j the best other class at x, the closed-form optimum of the margin in the ball
    (box permitting), where the cross-entropy's step mixes every class."""
    torch.manual_seed(0)
    model = _Linear()
    x, y = _data()
    x = 0.25 + 0.5 * x  # inside the box by more than ε: the box does not clip
    recorded = []
    original = methods.signed_ascent

    def record(*args, **kwargs):
        recorded.append(original(*args, **kwargs))
        return recorded[-1]

    import unittest.mock
    with unittest.mock.patch.object(methods, "signed_ascent", record):
        methods.adv_loss(model, x, y, EPS, steps=1, step_size=EPS, random_start=False, loss="margin")
    logits = model(x).detach()
    j = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    w = model.fc.weight.detach()
    expected = x + EPS * (w[j] - w[y]).sign().view_as(x)
    torch.testing.assert_close(recorded[0], expected)
    with unittest.mock.patch.object(methods, "signed_ascent", record):
        methods.adv_loss(model, x, y, EPS, steps=1, step_size=EPS, random_start=False, loss="ce")
    assert not torch.allclose(recorded[1], expected)  # the cross-entropy's step is another one here
