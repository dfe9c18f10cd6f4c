"""Training objectives: LLR and the paper's baselines, one short function each.

Every method is called as `fn(model, x, y, eps, *, generator=None, norm="linf", **options)` on a
batch of [0, 1] images (the losses are float32 under autocast, which runs
cross-entropy, softmax and KL in float32) and returns `(loss, info)`: the scalar to minimise and a
dict of detached per-sample tensors for logging (`logits` are the clean logits
when the method computes them; `adv` for ADV is on x_adv). All randomness comes
from `generator`, so a run is reproducible and resumable step by step. A method with state across
steps (ELLE-A's λ) is a class instead; `bind` gives every method one interface, `BoundLoss`.

    plain    cross-entropy on x                                  (the reference for cost)
    llr      Eq. (8) of Qin et al. 2019                          (llr.llr_loss)
    adv      PGD adversarial training, Madry et al. 2018
    trades   TRADES, Zhang et al. 2019
    cure     CURE curvature regularisation, Moosavi-Dezfooli et al. 2019
    lfr      local flatness: the largest input-gradient norm in the ball (double backprop; ours)
    lipschitz  a LipConvNet's training for ℓ2 certificates, Singla & Feizi 2022 (soc.py)
    n-fgsm   N-FGSM: one noisy FGSM step, no projection, de Jorge et al. 2022
    gradalign  FGSM + GradAlign's gradient alignment, Andriushchenko & Flammarion 2020 (double backprop)
    elle     FGSM + ELLE's linear-approximation error, Abad Rocamora et al. 2024
    elle-a   ELLE with its adaptive λ (AdaptiveELLE, a class: λ is state)

Attack passes inside a method (ADV's and TRADES' inner maximisation, LFR's search)
run with batch norm in eval mode, on running statistics, as TRADES' `trades.py`
and the LLR authors' graph.py do (ADV's `bn="train"` keeps batch statistics, as fast
adversarial training does), so that only the training passes update the statistics; the module is
returned to train mode before the loss is computed. CURE's two gradient passes run
in eval mode too (its official code); LFR's last pass and LLR's passes on x + δ use
the clean batch's statistics (`llr.reuse_clean_batch_statistics`). N-FGSM, GradAlign, ELLE and
ELLE-A run every pass in train mode, as their authors' code. Each method's
docstring names its source and any deliberate difference from it.

The passes whose input gradient is differentiated again run their attention by the math backend
(`llr.math_attention`: the fused kernels have no double backward); every other pass keeps the
caller's kernels. They are: LLR's clean pass; GradAlign's pass on x + η (g₂); CURE's two gradient
passes; LFR's search passes and its pass on x + δ (the clean pass is differentiated once).
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attacks
import llr
from ball import project, random_point, steepest


@contextlib.contextmanager
def _eval_mode(model, bn="eval"):
    """Eval mode for an attack's passes (bn="eval": running statistics), restoring the previous mode
    on exit; bn="train" leaves the model as it is (in training: batch statistics, and the attack's
    passes update the running statistics, as fast adversarial training's train_fgsm.py does)."""
    was_training = model.training
    if bn == "eval":
        model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _default_step(eps, steps, step_size):
    """step_size, or the common rule 2.5·ε/steps when it is None (ADV and LFR; LLR's ℓ2 search)."""
    return llr._step_size(eps, steps) if step_size is None else step_size


def _input_grad(loss, x_adv, create_graph=False):
    return torch.autograd.grad(loss, x_adv, create_graph=create_graph)[0]


def _twice(model, x):
    """model(x) for a pass whose input gradient is differentiated again: attention by the math backend."""
    with llr.math_attention():
        return model(x)


def _input_grad_twice(model, x, y, method):
    """∇ₓ of the summed cross-entropy at x (which requires grad), kept differentiable for a second backward. A model
    with an op that has no double backward stops here in one line naming it and `method`, not at loss.backward()."""
    grad = _input_grad(F.cross_entropy(_twice(model, x), y, reduction="sum"), x, create_graph=True)
    llr._refuse_missing_double_backward(model, grad, method, "it cannot train this model; first-order LLR can "
                                                             "(--method llr --llr-first-order)")
    return grad


def signed_ascent(model, x, x_adv, eps, steps, step_size, objective, norm="linf", bn="eval"):
    """`steps` steepest-ascent steps of `step_size` (sign(∇) in ℓ∞, ∇/‖∇‖₂ in ℓ2) from x_adv up
    `objective(x_adv)` (a scalar, summed over the batch), each projected onto B(ε) ∩ [0, 1] around x;
    batch norm in eval mode (or as `_eval_mode`'s bn says). The inner maximisation of ADV, TRADES
    and LFR. Returns x_adv detached."""
    with _eval_mode(model, bn), torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            step = step_size * steepest(_input_grad(objective(x_adv), x_adv), norm)
            x_adv = project(x_adv.detach() + step, x, eps, norm)
    return x_adv.detach()


def adam_ascent(model, x, x_adv, eps, steps, lr, objective, bn="eval"):
    """`steps` steps of Adam in pixel units with learning rate `lr` (attacks.adam_step, the authors'
    UnrolledAdam) up `objective(x_adv)`, each projected onto the ℓ∞ ball ∩ [0, 1] around x: the
    authors' training attack (their `carlini_wagner_attack`, graph.py). Returns x_adv detached."""
    with _eval_mode(model, bn), torch.enable_grad():
        m = v = torch.zeros_like(x_adv)
        for step in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            moved, m, v = attacks.adam_step(x_adv.detach(), _input_grad(objective(x_adv), x_adv), m, v, step, lr)
            x_adv = project(moved, x, eps)
    return x_adv.detach()


CLIPPED_MARGIN = 30.0  # the authors' _margin_logit_loss clips the margin at -30 (graph.py)


def plain_loss(model, x, y, eps, *, generator=None, norm="linf"):
    """Standard training: mean cross-entropy on x (ε and the norm are unused)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="none")
    return loss.mean(), {"logits": logits.detach(), "clean_loss": loss.detach()}


def adv_loss(model, x, y, eps, *, steps=10, step_size=None, random_start=True, bn="eval", optimizer="sign",
             loss="ce", generator=None, norm="linf"):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on x_adv after `steps` signed
    steps of `step_size` on the cross-entropy, projected onto B(ε) ∩ [0, 1], from a uniform random
    point of the ball (from x itself with random_start=False). step_size defaults to 2.5·ε/steps,
    the common rule (ε/4 = 2/255 for 10 steps at 8/255); Madry et al.'s CIFAR-10 configuration is
    7 steps of 2/255, ours 10 (our choice, as the LLR paper's ADV baseline). One step is FGSM
    training: from x with step ε (Goodfellow et al. 2015), or with a random start and step 1.25·ε
    ("fast adversarial training", Wong et al. 2020). ADV-1 and ADV-2 are the cheap variants that
    the paper (Table 2, Fig. 4) shows to obfuscate gradients. In ℓ2 the steps follow ∇/‖∇‖₂ (ℓ2
    PGD, as Madry et al.'s ℓ2 models).

    The configurations of the sources the paper's contrast depends on:
    bn: batch norm during the attack's passes: "eval" (running statistics, as the LLR authors'
    graph.py and TRADES) or "train" (batch statistics, the passes updating the running
    statistics, as fast adversarial training's train_fgsm.py and GradAlign's train.py).
    optimizer: "sign" (signed steps of step_size) or "adam" (ℓ∞: Adam in pixel units with
    learning rate step_size, default 0.1, from the random start, projected after each step: the
    LLR authors' training attack, graph.py's carlini_wagner_attack with UnrolledAdam(0.1)).
    loss: the attack's objective: "ce" (cross-entropy) or "margin" (the authors'
    _margin_logit_loss: max_{j≠y} f_j − f_y, clipped at 30, i.e. their −30 on its negative).
    The training loss is the cross-entropy on x_adv either way."""
    start = random_point(x, eps, generator, norm) if random_start else x
    if loss == "margin":
        objective = lambda x_adv: attacks.margin(model(x_adv), y).clamp(max=CLIPPED_MARGIN).sum()  # noqa: E731
    else:
        objective = lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="sum")  # noqa: E731
    if optimizer == "adam":
        if norm != "linf":
            raise ValueError("--adv-optimizer adam is the authors' ℓ∞ attack; use sign steps in ℓ2")
        x_adv = adam_ascent(model, x, start, eps, steps, 0.1 if step_size is None else step_size, objective, bn)
    else:
        x_adv = signed_ascent(model, x, start, eps, steps, _default_step(eps, steps, step_size), objective, norm,
                              bn=bn)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="none")
    return loss.mean(), {"adv_logits": logits.detach(), "adv_loss": loss.detach()}


def trades_loss(model, x, y, eps, *, beta=6.0, steps=10, step_size=0.007, generator=None, norm="linf"):
    """TRADES (Zhang et al. 2019, `trades.py`): CE(f(x), y) + β·KL(p(x) ‖ p(x_adv)), x_adv maximising
    the KL from x + 0.001·N(0, 1) with `steps` signed steps of `step_size`, in eval mode; the two
    loss passes in train mode, as `trades.py`. Defaults are its CIFAR-10 ones: 10 steps of 0.007
    (at its ε = 0.031, about 8/255), β = 6. In ℓ2 the steps follow ∇/‖∇‖₂ (pass a step_size suited
    to the ℓ2 radius, e.g. ε/4: 0.007 is an ℓ∞ step)."""
    with torch.no_grad(), _eval_mode(model):
        p_clean = F.softmax(model(x), 1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = signed_ascent(model, x, project(x + 0.001 * noise, x, eps, norm), eps, steps, step_size,
                          lambda x_adv: F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum"), norm)
    logits = model(x)
    natural = F.cross_entropy(logits, y, reduction="none")
    robust = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1),
                      reduction="none").sum(1)
    return (natural + beta * robust).mean(), {"logits": logits.detach(), "clean_loss": natural.detach(),
                                              "kl": robust.detach()}


def cure_loss(model, x, y, eps, *, weight=0.8, h=0.6, generator=None, norm="linf"):
    """CURE (Moosavi-Dezfooli et al. 2019, the official `CURE.py`): CE(x) + weight·‖∇ₓℓ(x + z) − ∇ₓℓ(x)‖₂
    with z = h·sign(∇ₓℓ(x)) / ‖sign(∇ₓℓ(x))‖₂, so that ‖z‖₂ = h: the norm (not squared) of the
    finite difference of the input gradient, differentiated through both gradients (double
    backprop). As the official code, both gradients are taken in eval mode (running batch-norm
    statistics, the same normalisation for x and x + z, so no batch-statistic shift enters the
    difference); CE(x) is a train-mode pass; x + z is not clipped to [0, 1]; ε is unused.

    Units: CURE works on inputs normalised by std ≈ 0.2 (its `read_vision_dataset`), where its
    h = 3 and λ = 4; on [0, 1] pixels the same step is h = 3 × 0.2 = 0.6 (ℓ2) and the same
    penalty weight = 4 × 0.2 = 0.8, since input gradients scale with the std. Deliberate
    difference: h is constant; the official example ramps it from 0.1 to 3 over the first 5
    epochs while fine-tuning a pre-trained network, and here every method trains from scratch
    on one schedule."""
    logits = model(x)  # train mode: the clean loss, and the running statistics' update
    loss = F.cross_entropy(logits, y, reduction="none")
    with _eval_mode(model), torch.enable_grad():
        x0 = x.detach().requires_grad_(True)
        grad = _input_grad_twice(model, x0, y, "CURE")
        x_z = (x0 + _cure_step(grad, h)).detach().requires_grad_(True)
        grad_z = _input_grad_twice(model, x_z, y, "CURE")
        curvature = (grad_z - grad).flatten(1).norm(dim=1)
    return (loss + weight * curvature).mean(), {"logits": logits.detach(), "clean_loss": loss.detach(),
                                                "curvature": curvature.detach()}


def _cure_step(grad, h):
    """CURE's z = h·sign(∇ₓℓ) / ‖sign(∇ₓℓ)‖₂ (‖z‖₂ = h), no gradient through it."""
    sign = grad.detach().sign()
    return h * sign / sign.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))


def _dual_norm(grad, norm):
    """‖∇‖₁ for the ℓ∞ ball, ‖∇‖₂ for the ℓ2 ball, per sample [B]."""
    return grad.flatten(1).abs().sum(1) if norm == "linf" else grad.flatten(1).norm(dim=1)


def _input_grad_dual_norm(model, x_adv, y, norm):
    """The dual norm of ∇ₓℓ(x_adv) per sample [B] (‖·‖₁ for the ℓ∞ ball, ‖·‖₂ for the ℓ2 ball),
    differentiable with respect to the weights (double backprop) and, when x_adv requires grad,
    with respect to x_adv (the search's objective)."""
    if not x_adv.requires_grad:
        x_adv = x_adv.detach().requires_grad_(True)
    return _dual_norm(_input_grad_twice(model, x_adv, y, "LFR"), norm)


def lfr_loss(model, x, y, eps, *, weight=1.0, steps=2, step_size=None, generator=None, norm="linf"):
    """Local flatness regularisation (our choice of a gradient-norm baseline; not one of the
    paper's): CE(x) + weight·ε·‖∇ₓℓ(x + δ)‖₁ at the δ in B(ε) where the input gradient is largest,
    found by `steps` signed ascent steps on ‖∇ₓℓ‖₁ from a random start (each a double backward,
    in eval mode as the other methods' searches). The scale: ε‖∇ₓℓ(x')‖₁ = max over δ in B(ε) of
    δᵀ∇ₓℓ(x'), the largest first-order loss increase the ball allows at x' (the |δᵀ∇ₓℓ| term of
    Eq. 7), so weight 1 penalises the worst first-order increase found; in ℓ2 it is ε‖∇ₓℓ(x')‖₂. The final pass on x + δ
    is normalised with the clean batch's statistics (`llr.reuse_clean_batch_statistics`, as LLR),
    so it sees the normalisation of x, and SyncBatchNorm stays twice differentiable.
    step_size defaults to 2.5·ε/steps."""
    x_adv = signed_ascent(model, x, random_point(x, eps, generator, norm), eps, steps,
                          _default_step(eps, steps, step_size),
                          lambda x_adv: _input_grad_dual_norm(model, x_adv, y, norm).sum(), norm)
    with llr.reuse_clean_batch_statistics(model, update_running_stats=True):
        logits = model(x)  # the clean pass: its statistics normalise the pass on x_adv
        loss = F.cross_entropy(logits, y, reduction="none")
        flatness = eps * _input_grad_dual_norm(model, x_adv, y, norm)
    return (loss + weight * flatness).mean(), {"logits": logits.detach(), "clean_loss": loss.detach(),
                                               "flatness": flatness.detach()}


def lipschitz_loss(model, x, y, eps, *, gamma=0.0, beta=0.0, fast_gradient=True, generator=None, norm="l2"):
    """Training of a 1-Lipschitz LipConvNet (soc.py) for certified ℓ2 robustness, as the authors'
    train_robust.py (Singla & Feizi 2022): cross-entropy, minus gamma times the mean certificate
    of the correctly classified images (the certificate regulariser of their `--gamma`, for the
    ortho and lln last layers: the margin over √2, or over ‖w_y − w_j‖, divided by the
    normalisation's Lipschitz constant), plus beta times the mean curvature bound of CRC-Lip's
    last layer (their `--beta`: ¼‖√|min(w2_y − w2_j, 0)| ⊙ W1·u‖² for the top right singular
    vector u of W1, kept by one power iteration per step, averaged over j ≠ y). fast_gradient:
    the SOC layers' fast training gradient (the paper's contribution (b), their `--fast-train`),
    or autograd's exact one through the series. ε is not used: the certificate is computed at
    evaluation (eval.py --certify)."""
    import soc

    classifier = getattr(model, "module", model)  # under DistributedDataParallel, the model itself
    net = classifier.net
    if not isinstance(net, soc.LipConvNet):
        raise ValueError("--method lipschitz trains a lipconvnet model (soc.py), e.g. --arch lipconvnet-5-lln")
    check_lipschitz_options(net.last_name, gamma, beta)
    layers = [m for m in net.modules() if isinstance(m, soc.SOC)]
    before = [m.fast_gradient for m in layers]
    for m in layers:
        m.fast_gradient = fast_gradient
    try:
        logits = model(x)
    finally:
        for m, fast in zip(layers, before):
            m.fast_gradient = fast
    loss = F.cross_entropy(logits, y, reduction="none")
    info = {"logits": logits.detach(), "clean_loss": loss.detach()}
    if gamma:
        certificate = soc.linear_margin_radii(net, logits, y).min(1).values
        certificate = F.relu(certificate * (logits.argmax(1) == y)) * classifier.std.min()
        loss = loss - gamma * certificate
        info["certificate"] = certificate.detach()
    if beta:
        curvature = net.last.curvature_estimate(y)
        loss = loss + beta * curvature
        info["curvature"] = curvature.detach()
    return loss.mean(), info


def check_lipschitz_options(last_layer, gamma, beta):
    """--method lipschitz's regularisers each belong to some last layers (ValueError otherwise)."""
    if gamma and last_layer == "crc" or beta and last_layer != "crc":
        raise ValueError("--lipschitz-gamma needs the ortho or lln last layer, --lipschitz-beta the crc one")


# --------------------------------------------------------------------------- single-step methods against CO
# N-FGSM, GradAlign, ELLE and ELLE-A: the methods that claim to prevent catastrophic overfitting (CO) of
# single-step adversarial training more cheaply than LLR. Each follows its authors' code, with
# every pass in train mode (batch statistics, running statistics updated), as theirs; all are ℓ∞ methods.
# FGSM and FGSM-RS are ADV's configurations (`adv_loss` with steps=1; docs/training.md).

def _uniform(x, radius, generator, copies=1):
    """radius·U(−1, 1) of the shape of `copies` stacked copies of x [copies·B, ...]."""
    shape = (copies * x.shape[0], *x.shape[1:])
    return radius * (2 * torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) - 1)


def _ce_input_grad(model, x, y):
    """∇ₓ of the summed cross-entropy at x [B, ...], in the model's current mode (detached: not differentiated again)."""
    x = x.detach().requires_grad_(True)
    return _input_grad(F.cross_entropy(model(x), y, reduction="sum"), x)


def _fgsm_from_x(model, x, y, eps):
    """FGSM from x: (x + ε·sign(∇ₓℓ(x))) clipped to [0, 1], and that gradient [B, ...] (detached)."""
    grad = _ce_input_grad(model, x, y)
    return (x + eps * grad.sign()).clamp(0, 1), grad


def _require_linf(norm, method):
    if norm != "linf":
        raise ValueError(f"--method {method} is an ℓ∞ method (its authors' code): use --norm linf")


def nfgsm_loss(model, x, y, eps, *, noise=2.0, step_size=None, generator=None, norm="linf"):
    """N-FGSM (de Jorge et al. 2022, pdejorge/N-FGSM `train.py:216-243`): η ~ U(−kε, kε) with
    k = `noise` (their --unif 2), x + η clipped to [0, 1]; one signed step of `step_size` (their
    --alpha, unset: ε, as every run of their experiments.sh) on the cross-entropy at x + η; x + δ
    clipped to [0, 1] and NOT projected onto the ε-ball (their --clip -1, the default: ‖δ‖∞ ≤ (k + 1)ε);
    loss CE(f(x + δ)). Both passes in train mode, as theirs. No deliberate difference."""
    _require_linf(norm, "n-fgsm")
    x_noisy = (x + _uniform(x, noise * eps, generator)).clamp(0, 1)
    grad = _ce_input_grad(model, x_noisy, y)
    x_adv = (x_noisy + (eps if step_size is None else step_size) * grad.sign()).clamp(0, 1)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="none")
    return loss.mean(), {"adv_logits": logits.detach(), "adv_loss": loss.detach()}


def gradalign_weight(eps):
    """GradAlign's λ at ε: 0.02·10^(ε·255/8), the rule of their sh/exps_diff_eps_cifar10.sh (0.2 at
    8/255, 2.0 at 16/255; the script writes it to 3 decimals)."""
    return 0.02 * 10 ** (eps * 255 / 8)


def gradalign_loss(model, x, y, eps, *, weight=None, generator=None, norm="linf"):
    """FGSM + GradAlign (Andriushchenko & Flammarion 2020, tml-epfl/understanding-fast-adv-training
    `train.py:141-207`, `utils.py:70-91`): zero-init FGSM (their clamp(1.25ε·sign(∇), −ε, ε) = ε·sign(∇)),
    x + δ clipped to [0, 1]; plus λ(1 − mean cosine) between g₁ = ∇ₓℓ(x), the FGSM gradient reused
    and detached, and g₂ = ∇ₓℓ(x + η), η ~ U(−ε, ε), differentiated through (double backprop; x + η
    is NOT clipped to [0, 1], as their code: it probes the loss surface, it is not trained on).
    Examples where g₁ or g₂ has zero norm are dropped from the mean, as theirs. λ = `weight`, unset:
    `gradalign_weight(ε)`. Passes in their order (FGSM, CE on x + δ, g₂), all in train mode.
    Deliberate difference (ours): when every example is dropped the regulariser is 0, where theirs
    is the NaN of an empty mean."""
    _require_linf(norm, "gradalign")
    x_adv, grad1 = _fgsm_from_x(model, x, y, eps)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="none")
    grad2 = _input_grad_twice(model, (x + _uniform(x, eps, generator)).detach().requires_grad_(True), y,
                              "GradAlign")
    g1, g2 = grad1.flatten(1), grad2.flatten(1)
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    kept = (n1 != 0) & (n2 != 0)
    cos = ((g1[kept] / n1[kept, None]) * (g2[kept] / n2[kept, None])).sum(1)  # [kept]
    weight = gradalign_weight(eps) if weight is None else weight
    regulariser = weight * (1 - cos.mean()) if kept.any() else loss.new_zeros(())
    return loss.mean() + regulariser, {"adv_logits": logits.detach(), "adv_loss": loss.detach(),
                                       "grad_cos": cos.detach()}


def elle_weight(eps):
    """ELLE's λ at ε, as their scripts/run_elle_cifar10.sh: 1000 for ε ≤ 8/255, 5000 up to 20/255,
    10000 above (their runs: 22–26/255; beyond 26/255 and between their even ε: ours)."""
    pixels = eps * 255
    return 1000.0 if pixels <= 8 + 1e-6 else 5000.0 if pixels <= 20 + 1e-6 else 10000.0


def elle_loss(model, x, y, eps, *, weight=None, generator=None, norm="linf"):
    """FGSM + ELLE (Abad Rocamora et al. 2024, LIONS-EPFL/ELLE `core/utils/train.py:288-339`, --reg ELLE
    --lambda_schedule constant): FGSM from x with step ε (their --attack-step ε, --input_noise_rate 0),
    loss CE(f(x_adv)) + λ·E_lin with, from ONE train-mode pass on the 3B batch cat(x_a, x_b, x_c)
    (the three share batch statistics), x_a, x_b = x + ε·U(−1, 1) drawn independently (one draw of
    [2B, ...]), α ~ U(0, 1) per example, x_c = (1 − α)x_a + αx_b:

        E_lin = mean over the batch of (ℓ(x_c) − (1 − α)ℓ(x_a) − αℓ(x_b))²   (per-example CE ℓ)

    differentiated by one ordinary backward (no double backprop). λ = `weight`, unset: `elle_weight(ε)`.
    Deliberate differences (ours): x_adv is clipped to [0, 1] (theirs clips nothing), so ELLE's
    adversarial term is exactly the FGSM baseline's (`adv_loss` zero init, step ε) and its examples
    lie in the threat model B(ε) ∩ [0, 1] that every method here trains and is evaluated on; the
    triplet is not clipped, as theirs (it probes the loss's linearity in the ball, it is not trained
    on). Their extra train-mode pass on clean x (`:362`, for logging) is left out."""
    _require_linf(norm, "elle")
    x_adv, _ = _fgsm_from_x(model, x, y, eps)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="none")
    b = len(x)
    x_ab = x.repeat(2, *[1] * (x.dim() - 1)) + _uniform(x, eps, generator, copies=2)  # [2B, ...]: x_a, x_b
    alpha = torch.rand(b, generator=generator, device=x.device, dtype=x.dtype)
    a = alpha.view(-1, *[1] * (x.dim() - 1))
    x_c = (1 - a) * x_ab[:b] + a * x_ab[b:]
    loss_a, loss_b, loss_c = F.cross_entropy(model(torch.cat([x_ab, x_c])), y.repeat(3), reduction="none").split(b)
    lin_err = (loss_c - (1 - alpha) * loss_a - alpha * loss_b) ** 2  # [B]
    weight = elle_weight(eps) if weight is None else weight
    return loss.mean() + weight * lin_err.mean(), {"adv_logits": logits.detach(), "adv_loss": loss.detach(),
                                                   "lin_err": lin_err.detach()}


# --------------------------------------------------------------------------- the bound loss
class BoundLoss:
    """A training objective bound to its model: the one interface the training loops and bench.py
    call (built by `bind`). `loss_fn(x, y, eps, generator)` -> (loss, info) on a (micro-)batch;
    `after_optimizer_step()` once after each optimiser step, however many micro-batches it had;
    `state_dict()` / `load_state_dict()`, kept in state.pt so that --resume continues bit for bit.
    This class wraps a stateless method `fn(x, y, eps, generator)`: no state, nothing after a step."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, y, eps, generator=None):
        return self.fn(x, y, eps, generator)

    def after_optimizer_step(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"a method without state was given a saved state ({', '.join(state)})")


class AdaptiveELLE(BoundLoss):
    """ELLE-A (Abad Rocamora et al. 2024, LIONS-EPFL/ELLE `core/utils/train.py:216-227`, `train.py:122-127`,
    `parser.py:75-77`, scripts/run_elle-a_cifar10.sh): `elle_loss` bound to its model with an adaptive
    λ. λ starts at 0; after each optimiser step, with e_t that step's E_lin and H the earlier values
    (population std): if |H| > 2 and e_t > mean(H) + sensitivity·std(H), λ ← lambda_max (their 4000
    at every ε), else λ ← decay·λ; then e_t joins H. The new λ applies from the next step; E_lin is
    computed at every step, λ = 0 included. e_t is the mean E_lin of the step's micro-batches and,
    when torch.distributed is initialised, of every process (an all-reduce before the rule), so all
    processes hold the same λ and H; both are the state (`state_dict`).
    Deliberate differences (ours): one update and one optimiser step per batch, where their trainer
    calls `optimizer.step()` twice on the same gradients (`core/utils/train.py:229-237`, a defect
    that doubles the effective learning rate; not copied); H survives a resume (theirs starts
    empty); x_adv clipped to [0, 1], as `elle_loss`."""

    def __init__(self, model, *, lambda_max=4000.0, decay=0.99, sensitivity=2.0, norm="linf"):
        _require_linf(norm, "elle-a")
        self.model, self.lambda_max, self.decay, self.sensitivity = model, lambda_max, decay, sensitivity
        self.weight, self.history, self._step_errors = 0.0, torch.zeros(0, dtype=torch.float64), []

    def __call__(self, x, y, eps, generator=None):
        loss, info = elle_loss(self.model, x, y, eps, weight=self.weight, generator=generator)
        self._step_errors.append(info["lin_err"].mean())  # on the device: no synchronisation per micro-batch
        return loss, {**info, "elle_lambda": x.new_tensor(self.weight)}

    def after_optimizer_step(self):
        error = torch.stack(self._step_errors).double().mean()
        self._step_errors = []
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(error)
            error /= dist.get_world_size()
        self.update(error.item())

    def update(self, error):
        """ELLE-A's rule, given this step's E_lin (a float)."""
        spike = False
        if len(self.history) > 2:
            std, mean = torch.std_mean(self.history, correction=0)
            spike = error > (mean + self.sensitivity * std).item()
        self.weight = self.lambda_max if spike else self.decay * self.weight
        self.history = torch.cat([self.history, self.history.new_tensor([error])])

    def state_dict(self):
        return {"weight": self.weight, "history": self.history.clone()}

    def load_state_dict(self, state):
        self.weight, self.history = float(state["weight"]), state["history"].to("cpu", torch.float64)


# --------------------------------------------------------------------------- compiled
def compile_fullgraph(fn, backend="inductor", mode=None, options=None):
    """torch.compile as the compiled paths use it (llr.CompiledLLR too): one graph (fullgraph), static shapes (a
    new batch size compiles once more instead of switching to dynamic shapes, which Inductor fails on here)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode, options=options)


def inductor_options(model, backend="inductor", mode=None):
    """For a model on the CPU, Inductor keeps the convolutions' memory layout: its channels-last
    choice made mkldnn's convolutions slower (measured with bench.py on a 2-core CPU; our choice)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return {"layout_optimization": False} if on_cpu and backend == "inductor" and mode is None else None


def refuse_sync_batch_norm(model, what):
    """Compiled code here does not all-reduce SyncBatchNorm's statistics: refuse a multi-process run."""
    if any(llr._sync_group(m) is not None for m in model.modules()):
        raise RuntimeError(f"{what} does not all-reduce SyncBatchNorm's statistics across processes: use the "
                           f"eager path in a multi-process run")


class CompiledLFR:
    """`lfr_loss` by compiled code (`llr.CompiledLLR`'s route: torch.func.grad traced by
    torch.compile, batch norm through `llr.CleanBatchStatistics`), with the same semantics: the
    search's steps in eval mode from the same random start, then the clean pass (its statistics
    normalise the pass on x_adv; the running statistics updated once, eagerly) and the flatness
    term, double-differentiated. Two compiled pieces: one search step, and the loss."""

    def __init__(self, model, weight=1.0, steps=2, step_size=None, norm="linf", backend="inductor", mode=None,
                 options=None):
        self.model, self.weight, self.steps, self.step_size, self.norm = model, weight, steps, step_size, norm
        self.clean = llr.CleanBatchStatistics(model)
        self._ascend = compile_fullgraph(self._search_step, backend, mode, options)
        self._objective = compile_fullgraph(self._loss, backend, mode, options)

    def _dual_norm_of_input_grad(self, x_adv, y):
        grad = torch.func.grad(lambda x_adv: F.cross_entropy(_twice(self.model, x_adv), y, reduction="sum"))(x_adv)
        return _dual_norm(grad, self.norm)

    def _search_step(self, x, y, x_adv, eps, step_size):
        ascent = torch.func.grad(lambda x_adv: self._dual_norm_of_input_grad(x_adv, y).sum())(x_adv)
        return project(x_adv + step_size * steepest(ascent, self.norm), x, eps, self.norm)

    def _loss(self, x, y, x_adv, eps, weight):
        self.clean.record()
        logits = self.model(x)
        statistics = self.clean.recorded()
        loss = F.cross_entropy(logits, y, reduction="none")
        self.clean.reuse(statistics)
        flatness = eps * self._dual_norm_of_input_grad(x_adv, y)
        return (loss + weight * flatness).mean(), logits, loss, flatness, statistics

    def __call__(self, x, y, eps, generator=None):
        refuse_sync_batch_norm(self.model, "CompiledLFR")
        eps_t, step_t = (torch.as_tensor(v, dtype=x.dtype, device=x.device)
                         for v in (eps, _default_step(eps, self.steps, self.step_size)))
        x_adv = random_point(x, eps_t, generator, self.norm)
        with torch.no_grad(), _eval_mode(self.model):
            for _ in range(self.steps):
                x_adv = self._ascend(x, y, x_adv, eps_t, step_t)
        with self.clean.installed():
            total, logits, loss, flatness, statistics = self._objective(x, y, x_adv, eps_t,
                                                                        x.new_tensor(self.weight))
            self.clean.update_running_stats(statistics)
        return total, {"logits": logits.detach(), "clean_loss": loss.detach(), "flatness": flatness.detach()}


class CompiledCURE:
    """`cure_loss` by compiled code, with the same semantics: the clean pass in train mode (its
    statistics measured by `llr.CleanBatchStatistics`, the running statistics updated eagerly
    before the next pass reads them), then both input gradients in eval mode on those running
    statistics, differentiated through (torch.func.grad traced by torch.compile). Two pieces, so
    that no running statistic is updated inside a graph that then reads it."""

    def __init__(self, model, weight=0.8, h=0.6, norm="linf", backend="inductor", mode=None, options=None):
        self.model, self.weight, self.h = model, weight, h
        self.clean = llr.CleanBatchStatistics(model)
        self._clean_c = compile_fullgraph(self._clean_pass, backend, mode, options)
        self._curvature_c = compile_fullgraph(self._curvature, backend, mode, options)

    def _clean_pass(self, x, y):
        self.clean.record()
        logits = self.model(x)
        return logits, F.cross_entropy(logits, y, reduction="none"), self.clean.recorded()

    def _curvature(self, x, y, h):
        def input_grad(x):
            return torch.func.grad(lambda x: F.cross_entropy(_twice(self.model, x), y, reduction="sum"))(x)
        grad = input_grad(x)
        return (input_grad(x + _cure_step(grad, h)) - grad).flatten(1).norm(dim=1)

    def __call__(self, x, y, eps, generator=None):
        refuse_sync_batch_norm(self.model, "CompiledCURE")
        with self.clean.installed():
            logits, loss, statistics = self._clean_c(x, y)
            self.clean.update_running_stats(statistics)
        with _eval_mode(self.model):
            curvature = self._curvature_c(x, y, x.new_tensor(self.h))
        return (loss + self.weight * curvature).mean(), {"logits": logits.detach(), "clean_loss": loss.detach(),
                                                         "curvature": curvature.detach()}


COMPILED = {"llr": llr.CompiledLLR, "lfr": CompiledLFR, "cure": CompiledCURE}  # one per double-backprop method


def compiled(method, model, options, norm="linf", backend="inductor", mode=None):
    """The training objective `method` with `options` as compiled code, called `fn(x, y, eps,
    generator=None)` -> (loss, info) like `METHODS[method](model, x, y, eps, ...)`. LLR, LFR and
    CURE go through torch.func.grad, traced by torch.compile (their classes above); plain, ADV,
    TRADES and LIPSCHITZ run their own code on `torch.compile(model)` (no double backward). Build it
    once, after the model is on its device (and prepared by Accelerate): the first call compiles."""
    inductor = inductor_options(model, backend, mode)
    if method in COMPILED:
        return COMPILED[method](model, **options, norm=norm, backend=backend, mode=mode, options=inductor)
    net = torch.compile(model, backend=backend, mode=mode, options=inductor)
    return lambda x, y, eps, generator=None: METHODS[method](net, x, y, eps, generator=generator, norm=norm,
                                                              **options)


# the methods whose loss holds an input gradient and is differentiated again (double backprop, through
# softplus: not through a lipconvnet's MaxMin and fast SOC); those without a class in COMPILED cannot compile
TWICE_DIFFERENTIATED = frozenset({"llr", "lfr", "cure", "gradalign"})


def trains(method, arch):
    """Whether `method` can train the model called `arch`: lipschitz trains lipconvnets alone, and a
    lipconvnet takes no method that differentiates twice."""
    if arch.startswith("lipconvnet"):
        return method not in TWICE_DIFFERENTIATED
    return method != "lipschitz"


CHOICES = {"bn": ("eval", "train"), "optimizer": ("sign", "adam"), "loss": ("ce", "margin")}  # text options

# a function fn(model, x, y, eps, *, generator, norm, **options) for a method without state across steps, a
# BoundLoss class built as cls(model, *, norm, **options) for one with state (the flags come from either signature)
METHODS = {"plain": plain_loss, "llr": llr.llr_loss, "adv": adv_loss, "trades": trades_loss,
           "cure": cure_loss, "lfr": lfr_loss, "lipschitz": lipschitz_loss,
           "n-fgsm": nfgsm_loss, "gradalign": gradalign_loss, "elle": elle_loss, "elle-a": AdaptiveELLE}

LINF_ONLY = frozenset({"n-fgsm", "gradalign", "elle", "elle-a"})  # their authors' code is ℓ∞ only


def compilable(method):
    """Whether `method` can run compiled: one differentiated twice needs its torch.func class in COMPILED
    (torch.compile cannot trace autograd.grad(create_graph=True)); GradAlign has none."""
    return method in COMPILED or method not in TWICE_DIFFERENTIATED


def bind(method, model, options, norm="linf", compile=False, backend="inductor", mode=None):
    """The training objective `method` with `options`, bound to `model` as a `BoundLoss`: the one
    interface of the training loops and bench.py. A stateless method is its function wrapped (with
    compile: `compiled`'s code); a method with state is its class, built on the model (with
    compile: on torch.compile(model)). Build it once, after the model is on its device and prepared
    by Accelerate. ValueError for a method that cannot run compiled."""
    if compile and not compilable(method):
        raise ValueError(f"--method {method} differentiates twice and has no compiled version (torch.compile "
                         f"cannot trace its autograd.grad(create_graph=True)): train it without --compile")
    fn = METHODS[method]
    if isinstance(fn, type):
        return fn(torch.compile(model, backend=backend, mode=mode) if compile else model, norm=norm, **options)
    if compile:
        return BoundLoss(compiled(method, model, options, norm, backend, mode))
    return BoundLoss(lambda x, y, eps, generator=None: fn(model, x, y, eps, generator=generator, norm=norm, **options))
