"""attacks.py: closed-form optima on linear models, invariants, early stopping, seeds, strength."""
import pytest
import torch
from torch import nn

import attacks



def square_steps(model, x, y, eps, steps, **options):
    """The Square attack with `steps` queries, so that it runs in the tests written for steps."""
    return attacks.square(model, x, y, eps, queries=steps, **options)


ALL = [attacks.untargeted, attacks.multi_targeted, attacks.random_targeted, attacks.fgsm_k, attacks.deepfool_linf,
       square_steps]


class Linear(nn.Module):
    def __init__(self, dim, classes, seed=0, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(scale * torch.randn(classes, dim, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(classes, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.W.T + self.b


def best_margin(model, x, y, eps):
    """Closed form of max over the ball ∩ [0, 1] of max_{j≠y} f_j − f_y for a linear model:
    for each j, push every coordinate to the end of its interval that favours j."""
    xf = x.flatten(1)
    lo, hi = (xf - eps).clamp(0, 1), (xf + eps).clamp(0, 1)
    W, b = model.W.detach(), model.b.detach()
    out = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype)
    for j in range(W.shape[0]):
        c = W[j] - W[y]  # [B, D]
        value = torch.where(c > 0, c * hi, c * lo).sum(1) + b[j] - b[y]
        out = torch.where(y == j, out, torch.maximum(out, value))
    return out


def _linear_case(classes, seed=0, n=64, eps=0.05):
    model = Linear(12, classes, seed)
    x = torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    x[:4] = 0.0  # some samples on the box's corners
    x[4:8] = 1.0
    y = model(x).argmax(1)
    return model, x, y, eps


@pytest.mark.parametrize("attack, kwargs", [
    (attacks.untargeted, {}), (attacks.untargeted, {"optimizer": "adam"}),
    (attacks.fgsm_k, {}), (attacks.deepfool_linf, {}), (attacks.multi_targeted, {}),
])
def test_binary_linear_model_reaches_the_closed_form_optimum(attack, kwargs):
    """Two classes: every attack breaks exactly the samples the optimum breaks, and on the
    others reaches the optimal margin."""
    model, x, y, eps = _linear_case(2)
    optimum = best_margin(model, x, y, eps)
    assert (optimum > 0).any() and (optimum <= 0).any()  # both kinds of sample are present
    achieved = attacks.margin(model(attack(model, x, y, eps, **kwargs)), y).detach()
    assert ((achieved > 0) == (optimum > 0)).all()
    torch.testing.assert_close(achieved[optimum <= 0], optimum[optimum <= 0], rtol=0, atol=1e-9)


def test_square_breaks_exactly_what_the_optimum_breaks_on_a_linear_model():
    """Random search without gradients: on the two-class linear model it breaks the samples the
    closed form breaks, and never claims more than the optimum."""
    model, x, y, eps = _linear_case(2)
    optimum = best_margin(model, x, y, eps)
    achieved = attacks.margin(model(attacks.square(model, x, y, eps, queries=500)), y).detach()
    assert ((achieved > 0) == (optimum > 0)).all()
    assert (achieved <= optimum + 1e-9).all()


@pytest.mark.parametrize("optimizer", ["sign", "adam"])
def test_multi_targeted_reaches_the_closed_form_optimum_with_many_classes(optimizer):
    """With K classes the untargeted surface max_j (f_j − f_t) is convex, so ascent can stall at
    a worse vertex; one run per target class finds the optimum of each, hence of all."""
    model, x, y, eps = _linear_case(5, seed=3, eps=0.02)
    optimum = best_margin(model, x, y, eps)
    assert (optimum > 0).any() and (optimum <= 0).any()
    achieved = attacks.margin(model(attacks.multi_targeted(model, x, y, eps, optimizer=optimizer)), y).detach()
    assert ((achieved > 0) == (optimum > 0)).all()
    torch.testing.assert_close(achieved[optimum <= 0], optimum[optimum <= 0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("attack", ALL)
def test_adversarial_examples_stay_in_ball_and_box(attack):
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        shape = (int(torch.randint(1, 6, (1,), generator=g)), 3,
                 int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)))
        eps = float(torch.rand(1, generator=g)) * (0.5 if trial else 1.0)
        x = torch.rand(shape, generator=g)
        x[0, 0] = 0.0
        x[-1, -1] = 1.0
        model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 4), nn.Softplus(), nn.Linear(4, 4))
        y = torch.randint(0, 4, (shape[0],), generator=g)
        x_adv = attack(model, x, y, eps, steps=5, seed=trial)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


class CountingModel(nn.Module):
    """Records the batch size of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("attack", ALL)
def test_broken_samples_are_not_attacked_further(attack):
    model, x, y, eps = _linear_case(2, n=32)
    y = y.clone()
    y[:8] = 1 - y[:8]  # 8 samples misclassified from the start
    counting = CountingModel(model)
    attack(counting, x, y, eps, steps=10)
    unbroken = int((best_margin(model, x, y, eps) <= 0).sum())
    assert counting.sizes[0] == 32  # the clean pass
    attacked = counting.sizes[1:]
    assert max(attacked) <= 32 - 8
    assert attacked[-1] <= unbroken or attacked[-1] == 0


@pytest.mark.parametrize("attack", [attacks.untargeted, attacks.multi_targeted, attacks.random_targeted])
def test_seed_and_restarts(attack, trained_tiny):
    model, x, y = trained_tiny
    eps, small = 2 / 255, dict(steps=3, step_size=0.1 / 255)  # small steps: the start matters
    a = attack(model, x, y, eps, restarts=1, seed=1, **small)
    torch.testing.assert_close(a, attack(model, x, y, eps, restarts=1, seed=1, **small), rtol=0, atol=0)
    assert not torch.equal(a, attack(model, x, y, eps, restarts=1, seed=2, **small))
    more = attack(model, x, y, eps, restarts=3, seed=1, **small)
    # the first restart is the same run, so the worst case over 3 is at least as bad, per sample
    with torch.no_grad():
        if attack is attacks.random_targeted:
            t = attacks.random_targets(y, 3, seed=1)
            assert (-attacks.margin(model(more), t) >= -attacks.margin(model(a), t) - 1e-6).all()
        else:
            assert (attacks.margin(model(more), y) >= attacks.margin(model(a), y) - 1e-6).all()


# --------------------------------------------------------------------------- a trained model
@pytest.fixture(scope="module")
def trained_tiny():
    """A small undefended softplus CNN trained to fit three classes that differ by a colour
    shift of 0.06 in one channel: easy to learn, and an ε = 8/255 change of every pixel
    can move a colour mean across the midpoint between classes."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = 0.5 + 0.06 * nn.functional.one_hot(y, 3).float()[:, :, None, None] \
            + 0.1 * (torch.rand(n, 3, 8, 8, generator=g) - 0.5)
        return x.clamp(0, 1), y

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        x, y = sample(64)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = sample(64)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95
    return model, x, y


def _accuracy(model, x_adv, y):
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def test_untargeted_breaks_an_undefended_model(trained_tiny):
    model, x, y = trained_tiny
    assert _accuracy(model, attacks.untargeted(model, x, y, 8 / 255, steps=20, restarts=1), y) == 0.0


def test_strength_order_on_a_fixed_model(trained_tiny):
    """On this nearly linear model all three are about equally strong; the order must hold."""
    model, x, y = trained_tiny
    eps = 5 / 255
    weak = _accuracy(model, attacks.fgsm_k(model, x, y, eps), y)
    strong = _accuracy(model, attacks.untargeted(model, x, y, eps, steps=20, restarts=2), y)
    very_strong = _accuracy(model, attacks.multi_targeted(model, x, y, eps, steps=20), y)
    assert 0 < very_strong <= strong <= weak < 1


def test_random_targeted_success_is_measured_against_the_target(trained_tiny):
    model, x, y = trained_tiny
    target = attacks.random_targets(y, 3, seed=0)
    assert (target != y).all()
    x_adv = attacks.random_targeted(model, x, y, 8 / 255, target=target, steps=20)
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    success = pred == target
    assert success.float().mean() > 0.5
    # success means the chosen class, not any error: with 3 classes and an attack that only
    # has to leave y, many predictions would land on the third class instead
    untargeted_pred = model(attacks.untargeted(model, x, y, 8 / 255, steps=20)).argmax(1)
    elsewhere = (untargeted_pred != y) & (untargeted_pred != target)  # the untargeted break went to a third class
    assert elsewhere.any() and (success & elsewhere).any()
    # the default target is the one random_targets draws with the same seed
    torch.testing.assert_close(attacks.random_targeted(model, x, y, 8 / 255, steps=20, seed=0), x_adv)


def test_fgsm_cross_entropy_variant(trained_tiny):
    model, x, y = trained_tiny
    x_adv = attacks.fgsm_k(model, x, y, 8 / 255, loss="ce")
    assert _accuracy(model, x_adv, y) < 0.5
    with pytest.raises(ValueError, match="unknown loss"):
        attacks.fgsm_k(model, x, y, 8 / 255, loss="hinge")


class _NoisyGradient(torch.autograd.Function):
    """The identity forward; backward adds noise 30 times the gradient's mean size: a model that
    masks its gradients without being robust."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        noise = torch.randn(grad.shape, generator=torch.Generator().manual_seed(int(grad.abs().sum() * 1e6) % 2**31))
        return grad + 30 * grad.abs().mean() * noise


class _MaskedLinear(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        f = _NoisyGradient.apply(x).flatten(1) @ self.w + self.b
        return torch.stack([f, -f], 1)


def test_square_breaks_what_masked_gradients_hide():
    """A binary linear model whose margin is within ε‖w‖₁ for every sample, so its true robust
    accuracy is 0, behind noisy gradients: the gradient attacks leave most samples robust, the
    gradient-free Square attack breaks nearly all, inside the ball and the box."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, generator=g)
    x = 0.5 + 0.01 * (2 * torch.rand(40, 3, 8, 8, generator=g) - 1)
    eps = 8 / 255
    model = _MaskedLinear(w, -(0.5 * w.sum()) + 0.5 * eps * w.abs().sum())  # f ≈ ε‖w‖₁ / 2 > 0 at every x
    y = torch.zeros(40, dtype=torch.long)
    assert (model(x).argmax(1) == y).all()
    gradient = _accuracy(model, attacks.untargeted(model, x, y, eps, steps=50, restarts=1), y)
    x_square = attacks.square(model, x, y, eps, queries=300)
    assert (x_square - x).abs().max() <= eps + 1e-6 and x_square.min() >= 0 and x_square.max() <= 1
    assert gradient > 0.5 and _accuracy(model, x_square, y) < 0.1


@pytest.mark.parametrize("attack, kwargs", [
    (attacks.untargeted, {}), (attacks.fgsm_k, {"steps": 40}), (attacks.multi_targeted, {}),
])
def test_l2_attacks_reach_the_closed_form_optimum_of_a_linear_model(attack, kwargs):
    """Two classes, ℓ2 ball, images away from the box's faces: the best margin in the ball is
    m(x) + ε‖w₁ − w₀‖₂, reached at x + ε(w₁ − w₀)/‖w₁ − w₀‖₂ for class 0 (and the mirror for 1)."""
    model = Linear(12, 2, seed=5)
    c = (model.W[1] - model.W[0]).detach()
    with torch.no_grad():  # the decision boundary through the middle of the images
        model.b.copy_(torch.stack([0.5 * c.sum(), torch.zeros((), dtype=c.dtype)]))
    g = torch.Generator().manual_seed(6)
    x = 0.4 + 0.2 * torch.rand(64, 3, 2, 2, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    eps = 0.02 * c.norm().item() / c.abs().max().item()  # each coordinate moves at most 0.02: no face is hit
    optimum = attacks.margin(model(x), y).detach() + eps * c.norm()
    assert (optimum > 0).any() and (optimum <= 0).any()
    x_adv = attack(model, x, y, eps, norm="l2", **kwargs)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-9).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    achieved = attacks.margin(model(x_adv), y).detach()
    assert ((achieved > 0) == (optimum > 0)).all()
    torch.testing.assert_close(achieved[optimum <= 0], optimum[optimum <= 0], rtol=0, atol=1e-9)


def test_l2_examples_stay_in_the_ball_and_box_at_the_faces():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 4, 4, generator=g)
    x[:3] = 0.0  # on the box's corner: the box cuts the ball
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4), nn.Softplus(), nn.Linear(4, 4))
    y = torch.randint(0, 4, (8,), generator=g)
    for attack in (attacks.untargeted, attacks.multi_targeted, attacks.random_targeted, attacks.fgsm_k):
        x_adv = attack(model, x, y, 0.5, steps=5, norm="l2")
        assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with pytest.raises(ValueError, match="ℓ∞ attack"):
        attacks.untargeted(model, x, y, 0.5, optimizer="adam", norm="l2")
