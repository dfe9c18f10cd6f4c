"""Training objectives: LLR and the paper's baselines, one short function each.

Every method is called as `fn(model, x, y, eps, *, generator=None, **options)` on a
batch of [0, 1] images (the losses are float32 under autocast, which runs
cross-entropy, softmax and KL in float32) and returns `(loss, info)`: the scalar to minimise and a
dict of detached per-sample tensors for logging (`logits` are the clean logits
when the method computes them; `adv` for ADV is on x_adv). All randomness comes
from `generator`, so a run is reproducible and resumable step by step.

    plain    cross-entropy on x                                  (the reference for cost)
    llr      Eq. (8) of Qin et al. 2019                          (llr.llr_loss)
    adv      PGD adversarial training, Madry et al. 2018
    trades   TRADES, Zhang et al. 2019
    cure     CURE curvature regularisation, Moosavi-Dezfooli et al. 2019
    lfr      local flatness: the largest input-gradient norm in the ball (double backprop)

Attack passes inside a method (ADV's and TRADES' inner maximisation, LFR's search)
run with batch norm in eval mode, on running statistics, as TRADES' `trades.py`
does, so that only the training passes update the statistics; the module is
returned to train mode before the loss is computed.
"""
import contextlib

import torch
import torch.nn.functional as F

import llr
from ball import project, random_point


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for an attack's passes, restoring the previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _input_grad(loss, x_adv, create_graph=False):
    return torch.autograd.grad(loss, x_adv, create_graph=create_graph)[0]


def signed_ascent(model, x, x_adv, eps, steps, step_size, objective):
    """`steps` signed-gradient steps of `step_size` from x_adv up `objective(x_adv)` (a scalar, summed
    over the batch), each projected onto B(ε) ∩ [0, 1] around x; batch norm in eval mode. The inner
    maximisation of ADV, TRADES and LFR. Returns x_adv detached."""
    with _eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            x_adv = project(x_adv.detach() + step_size * _input_grad(objective(x_adv), x_adv).sign(), x, eps)
    return x_adv.detach()


def plain_loss(model, x, y, eps, *, generator=None):
    """Standard training: mean cross-entropy on x (ε is unused)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="none")
    return loss.mean(), {"logits": logits.detach(), "clean_loss": loss.detach()}


def pgd(model, x, y, eps, steps, step_size, generator=None):
    """Madry et al.'s PGD on the cross-entropy: a uniform random start in the ball, then
    `steps` signed-gradient steps of `step_size`, projected onto the ball ∩ [0, 1]."""
    return signed_ascent(model, x, random_point(x, eps, generator), eps, steps, step_size,
                         lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="sum"))


def adv_loss(model, x, y, eps, *, steps=10, step_size=None, generator=None):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on x_adv from `steps` PGD steps
    with a random start; step_size defaults to 2.5·ε/steps (Madry et al.). ADV-1 and ADV-2 are
    the cheap, obfuscating variants of the paper's Table 2 and Fig. 4."""
    x_adv = pgd(model, x, y, eps, steps, 2.5 * eps / max(steps, 1) if step_size is None else step_size, generator)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="none")
    return loss.mean(), {"adv_logits": logits.detach(), "adv_loss": loss.detach()}


def trades_loss(model, x, y, eps, *, beta=6.0, steps=10, step_size=2 / 255, generator=None):
    """TRADES (Zhang et al. 2019, `trades.py`): CE(f(x), y) + β·KL(p(x) ‖ p(x_adv)), x_adv maximising
    the KL from x + 0.001·N(0, 1) with `steps` signed steps of `step_size` (TRADES: 10 steps of
    0.007 at ε = 0.031; β = 6)."""
    with torch.no_grad(), _eval_mode(model):
        p_clean = F.softmax(model(x), 1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = signed_ascent(model, x, project(x + 0.001 * noise, x, eps), eps, steps, step_size,
                          lambda x_adv: F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum"))
    logits = model(x)
    natural = F.cross_entropy(logits, y, reduction="none")
    robust = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1),
                      reduction="none").sum(1)
    return (natural + beta * robust).mean(), {"logits": logits.detach(), "clean_loss": natural.detach(),
                                              "kl": robust.detach()}


def cure_loss(model, x, y, eps, *, weight=4.0, h=None, generator=None):
    """CURE (Moosavi-Dezfooli et al. 2019): CE(x) + weight·‖∇ₓℓ(x + h·z) − ∇ₓℓ(x)‖₂², the finite
    difference of the input gradient along z = sign(∇ₓℓ(x)), differentiated through both
    gradients (double backprop). h is the step's ℓ∞ size in pixels, ε by default (CURE's own
    h = 1.5 is an ℓ2 size in normalised units); weight 4 is CURE's λ."""
    h = eps if h is None else h
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="none")
    grad = _input_grad(loss.sum(), x, create_graph=True)
    x_h = (x + h * grad.detach().sign()).clamp(0, 1).detach().requires_grad_(True)
    grad_h = _input_grad(F.cross_entropy(model(x_h), y, reduction="sum"), x_h, create_graph=True)
    curvature = (grad_h - grad).flatten(1).pow(2).sum(1)
    return (loss + weight * curvature).mean(), {"logits": logits.detach(), "clean_loss": loss.detach(),
                                                "curvature": curvature.detach()}


def lfr_loss(model, x, y, eps, *, weight=1.0, steps=2, step_size=None, generator=None):
    """Local flatness: CE(x) + weight·ε·‖∇ₓℓ(x + δ)‖₁ at the δ in B(ε) where the input gradient
    is largest, found by `steps` signed ascent steps on ‖∇ₓℓ‖₁ from a random start (each step
    is itself a double backward). ε‖∇ₓℓ‖₁ is the first-order loss increase the ℓ∞ ball allows,
    so weight 1 penalises the worst first-order loss in the ball; the weight-gradient runs
    through ∇ₓℓ (double backprop). step_size defaults to 2.5·ε/steps."""
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size

    def grad_norm(x_adv):  # ‖∇ₓℓ(x_adv)‖₁ per sample, differentiable (double backprop)
        g = _input_grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv, create_graph=True)
        return g.flatten(1).abs().sum(1)

    x_adv = signed_ascent(model, x, random_point(x, eps, generator), eps, steps, step_size,
                          lambda x_adv: grad_norm(x_adv).sum())
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="none")
    flatness = eps * grad_norm(x_adv.requires_grad_(True))
    return (loss + weight * flatness).mean(), {"logits": logits.detach(), "clean_loss": loss.detach(),
                                               "flatness": flatness.detach()}


METHODS = {"plain": plain_loss, "llr": llr.llr_loss, "adv": adv_loss, "trades": trades_loss,
           "cure": cure_loss, "lfr": lfr_loss}
