"""Attacks for evaluating robustness: the paper's suite (its Tables 1-3), in ℓ∞ and, for the
gradient attacks, in ℓ2 (`norm="l2"`: steps along ∇/‖∇‖₂, projection onto the ℓ2 ball ∩ [0, 1]).

Every attack is called as `fn(model, x, y, eps, **options)` on a batch and returns
`x_adv`, shaped like x, with |x_adv − x| ≤ ε and x_adv in [0, 1]. `model` maps [0, 1]
images to logits; pass it in eval mode (attacks never change its mode and only
take gradients with respect to the input). Each attack keeps, per sample, the worst
case over its steps and random restarts, and stops spending compute on a sample once
its margin exceeds MARGIN = 0.01, not merely 0: a break by a hair could be undone by
the rounding of another forward pass (bf16 kernels differ with the batch's shape),
and eval.py re-checks every break with a fresh pass. `seed` seeds the attack's own
generator (the global RNG is not touched).

    untargeted        max f_s − f_t, s the best other class, re-chosen each step  (strong)
    multi_targeted    one run per target class i ≠ t on f_i − f_t (Gowal et al. 2019)  (very strong)
    random_targeted   a random target r ≠ t; success means the prediction becomes r
    fgsm_k            k signed-gradient steps from x, no restarts (FGSM-20: the weak attack)
    square            Square Attack (Andriushchenko et al. 2020): random search, no gradients
    deepfool_linf     ℓ∞ DeepFool (Moosavi-Dezfooli et al. 2016), projected onto the ball

f are the logits and t the true class; losses are logit margins (Carlini & Wagner),
as the paper's evaluation. Two projected optimisers: `"sign"`, signed-gradient
PGD whose step decays from `step_size` to 0 on a cosine, and `"adam"`, Adam on the
image in pixel units with lr 0.1 (the authors' `carlini_wagner_attack`).
"""
import math

import torch
import torch.nn.functional as F

import llr
from ball import check_eps, check_norm, project, random_point, steepest

__all__ = ["untargeted", "multi_targeted", "random_targeted", "fgsm_k", "square", "deepfool_linf",
           "margin", "random_targets"]


MARGIN = 0.01  # a sample is attacked until its margin (in logits) exceeds this, not merely 0 (see above)


def float32_or_wider(t):
    """t in float32 at least: bf16/fp16 logits from autocast are promoted, float64 kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def margin(logits, y):
    """max_{j≠y} f_j − f_y per sample [B], in float32: positive when the sample is misclassified."""
    f = float32_or_wider(logits)
    true = f.gather(1, y[:, None]).squeeze(1)
    return f.scatter(1, y[:, None], float("-inf")).amax(1) - true


def _targeted_margin(logits, target, y):
    """f_target − f_y per sample [B] (objective of a targeted run; positive ⇒ misclassified)."""
    f = float32_or_wider(logits)
    return f.gather(1, target[:, None]).squeeze(1) - f.gather(1, y[:, None]).squeeze(1)


def _other_classes_by_logit(logits, y):
    """[B, K−1] class indices other than y, highest clean logit first (the true class sorts last)."""
    return float32_or_wider(logits).scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :-1]


def random_targets(y, num_classes, seed=0):
    """A uniformly random class r ≠ y for each label, reproducible from `seed`."""
    g = torch.Generator(device=y.device).manual_seed(seed)
    offset = torch.randint(1, num_classes, y.shape, generator=g, device=y.device)
    return (y + offset) % num_classes


def _cosine(step_size, steps):
    """Signed-gradient step size decaying from `step_size` to 0 on a cosine."""
    return lambda t: step_size * 0.5 * (1 + math.cos(math.pi * t / steps))


def _keep_best(best_x, best_score, rows, x_adv, score):
    """Where `score` [b] beats best_score at `rows`, record it and x_adv [b, ...] (in place). Returns
    the mask [b] of the samples still to attack: best score not above MARGIN."""
    better = score > best_score[rows]
    best_score[rows[better]] = score[better]
    best_x[rows[better]] = x_adv.detach()[better]
    return best_score[rows] <= MARGIN


def _ascent(model, x, y, eps, objective, score, best_x, best_score, *, steps, restarts, optimizer,
            step_sizes, lr, random_start, generator, norm):
    """Projected ascent on `objective(logits, rows)` [b] from `restarts` starts.

    `rows` index the batch; `score(logits, rows)` [b] > 0 means the sample is broken, and a
    sample is attacked until its score exceeds MARGIN.
    Updates best_x [B, ...] and best_score [B] in place wherever the score improves,
    and drops a sample from the batch once its best score is positive. optimizer
    "sign" steps by `step_sizes(t)` along the steepest direction of the norm (sign(∇) in ℓ∞,
    ∇/‖∇‖₂ in ℓ2); "adam" (ℓ∞) is Adam in pixel units with learning rate `lr`. Costs at most
    restarts × (steps forward and backward passes + 1 forward) on the samples still unbroken.
    """
    for _ in range(restarts):
        rows = (best_score <= MARGIN).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        x0 = x[rows]
        x_adv = random_point(x0, eps, generator, norm) if random_start else x0.clone()
        m = v = torch.zeros_like(x0) if optimizer == "adam" else None
        for step in range(steps + 1):
            x_adv.requires_grad_(True)
            with torch.set_grad_enabled(step < steps):
                logits = model(x_adv)
                obj = objective(logits, rows)
            keep = _keep_best(best_x, best_score, rows, x_adv, score(logits.detach(), rows))
            if step == steps:
                break
            (grad,) = torch.autograd.grad(obj.sum(), x_adv)
            rows, x0, x_adv, grad = rows[keep], x0[keep], x_adv.detach()[keep], grad[keep]
            if rows.numel() == 0:
                break
            if optimizer == "sign":
                x_adv = x_adv + step_sizes(step) * steepest(grad, norm)
            else:
                x_adv, m, v = adam_step(x_adv, grad, m[keep], v[keep], step, lr)
            x_adv = project(x_adv, x0, eps, norm)


def adam_step(x_adv, grad, m, v, step, lr):
    """One ascent step of Adam in pixel units (β = (0.9, 0.999), bias-corrected, eps 1e-9, as the
    authors' UnrolledAdam) at step `step` (from 0): (x_adv, m, v) after it, not projected. LLR's
    search step (llr._adam_step, torch.optim.Adam's arithmetic)."""
    return llr._adam_step(x_adv, grad, m, v, *llr._adam_scalars(step + 1, lr))


def _setup(model, x, y, eps, optimizer, seed, norm="linf"):
    """Checks, the clean logits (the clean point is every attack's first candidate), the attack's generator."""
    check_eps(eps)
    check_norm(norm)
    if optimizer not in ("sign", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose sign or adam")
    if optimizer == "adam" and norm != "linf":
        raise ValueError("the adam optimizer is the authors' ℓ∞ attack; use optimizer='sign' (normalised steps) in ℓ2")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    with torch.no_grad():
        logits = model(x)
    return logits, torch.Generator(device=x.device).manual_seed(seed)


def untargeted(model, x, y, eps, *, steps=100, restarts=5, optimizer="sign", step_size=None, lr=0.1, seed=0,
               norm="linf"):
    """Untargeted margin attack (Table 1's strong attack): maximise f_s(x') − f_t(x') with s the
    highest logit other than the true class t, re-chosen at every step.

    Defaults: 5 random restarts of 100 signed-gradient steps, the step decaying from
    step_size = 2ε to 0 on a cosine; optimizer="adam" uses Adam with lr instead.
    """
    logits, generator = _setup(model, x, y, eps, optimizer, seed, norm)
    best_x, best_score = x.clone(), margin(logits, y)
    objective = lambda logits, rows: margin(logits, y[rows])  # noqa: E731
    _ascent(model, x, y, eps, objective, objective, best_x, best_score, steps=steps, restarts=restarts,
            optimizer=optimizer, step_sizes=_cosine(2 * eps if step_size is None else step_size, steps),
            lr=lr, random_start=True, generator=generator, norm=norm)
    return best_x


def multi_targeted(model, x, y, eps, *, steps=100, restarts=1, num_targets=None, optimizer="sign",
                   step_size=None, lr=0.1, seed=0, norm="linf"):
    """Multi-Targeted attack (Gowal et al. 2019; Table 2's very strong attack): for each target
    class i ≠ t, maximise f_i − f_t; a sample is broken if any run misclassifies it.

    num_targets: attack only the top-k classes other than t by clean logit (all K−1 by
    default; e.g. 20 for ImageNet). Targets are taken in order of clean logit, each with
    `restarts` random starts of `steps` steps (optimiser as `untargeted`), skipping the
    samples already broken.
    """
    logits, generator = _setup(model, x, y, eps, optimizer, seed, norm)
    best_x, best_score = x.clone(), margin(logits, y)
    ranked = _other_classes_by_logit(logits, y)
    num_targets = ranked.shape[1] if num_targets is None else min(num_targets, ranked.shape[1])
    score = lambda logits, rows: margin(logits, y[rows])  # noqa: E731
    for k in range(num_targets):
        target = ranked[:, k]
        objective = lambda logits, rows, target=target: _targeted_margin(logits, target[rows], y[rows])  # noqa: E731
        _ascent(model, x, y, eps, objective, score, best_x, best_score, steps=steps, restarts=restarts,
                optimizer=optimizer, step_sizes=_cosine(2 * eps if step_size is None else step_size, steps),
                lr=lr, random_start=True, generator=generator, norm=norm)
    return best_x


def random_targeted(model, x, y, eps, *, target=None, steps=100, restarts=5, optimizer="sign",
                    step_size=None, lr=0.1, seed=0, norm="linf"):
    """Random-Targeted attack (Table 3): make the prediction a random class r ≠ t, maximising
    f_r − max_{j≠r} f_j (positive exactly when the prediction is r). Its metric is the
    success rate P(prediction = r). target: r per sample; `random_targets(y, K, seed)` if None.
    Optimiser and defaults as `untargeted`.

    A deliberate difference from the paper, whose loss is f_r − f_t: that objective can be
    maximised while a third class wins, so it is weaker for the success it is scored on; this
    one is that success's own margin, and so at least as strong.
    """
    logits, generator = _setup(model, x, y, eps, optimizer, seed, norm)
    target = random_targets(y, logits.shape[1], seed) if target is None else target
    best_x, best_score = x.clone(), -margin(logits, target)
    objective = lambda logits, rows: -margin(logits, target[rows])  # noqa: E731
    _ascent(model, x, target, eps, objective, objective, best_x, best_score, steps=steps, restarts=restarts,
            optimizer=optimizer, step_sizes=_cosine(2 * eps if step_size is None else step_size, steps),
            lr=lr, random_start=True, generator=generator, norm=norm)
    return best_x


def fgsm_k(model, x, y, eps, *, steps=20, step_size=None, loss="margin", restarts=1, random_start=False, seed=0,
           norm="linf"):
    """FGSM-k (Table 2's weak attack; FGSM-20 is k = 20): k signed-gradient steps of a fixed size
    (default ε/4) on the margin, or on the cross-entropy with loss="ce", starting from x
    (from a random point of the ball with random_start=True, as for restarts > 1). In ℓ2 the steps
    follow ∇/‖∇‖₂ (the fast gradient method, k times)."""
    if loss not in ("margin", "ce"):
        raise ValueError(f"unknown loss {loss!r}; choose margin or ce")
    logits, generator = _setup(model, x, y, eps, "sign", seed, norm)
    best_x, best_score = x.clone(), margin(logits, y)
    score = lambda logits, rows: margin(logits, y[rows])  # noqa: E731
    objective = score if loss == "margin" else (
        lambda logits, rows: F.cross_entropy(float32_or_wider(logits), y[rows], reduction="none"))
    step_size = eps / 4 if step_size is None else step_size
    _ascent(model, x, y, eps, objective, score, best_x, best_score, steps=steps, restarts=restarts,
            optimizer="sign", step_sizes=lambda t: step_size, lr=None,
            random_start=random_start or restarts > 1, generator=generator, norm=norm)
    return best_x


def _square_size(p_init, query, queries, height, width):
    """Side of the square at `query`: a share p of the pixels that halves at fixed points of the
    budget (Square Attack's schedule, rescaled to `queries` as AutoAttack does), at least 1."""
    t = int(query / queries * 10000)
    halvings = sum(t > point for point in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    p = p_init / 2 ** halvings
    return max(1, min(round(math.sqrt(p * height * width)), height, width))


@torch.no_grad()
def square(model, x, y, eps, *, queries=1000, p_init=0.8, restarts=1, seed=0):
    """Square Attack, ℓ∞ (Andriushchenko et al. 2020): a random search that uses no gradients, so
    it is not fooled by masked or noisy ones (Carlini et al. 2019 ask for such an attack). Start
    at x + ε·(random ±1 per channel and column), clipped to [0, 1]; then, per query and sample,
    move one random square window (its side shrinking on the paper's schedule from a share p_init
    of the image) to ±ε around x (one random sign per channel), and keep it if the margin
    max_{j≠t} f_j − f_t grows. One forward pass per query on the samples still unbroken; restarts
    start again from a new random point. x: [B, C, H, W]."""
    logits, generator = _setup(model, x, y, eps, "sign", seed)
    best_x, best_score = x.clone(), margin(logits, y)
    b, c, h, w = x.shape
    for _ in range(restarts):
        rows = (best_score <= MARGIN).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        x0 = x[rows]
        stripes = torch.randint(0, 2, (len(rows), c, 1, w), generator=generator, device=x.device) * 2 - 1
        x_cur = (x0 + eps * stripes).clamp(0, 1)
        score = margin(model(x_cur), y[rows])
        keep = _keep_best(best_x, best_score, rows, x_cur, score)
        for query in range(queries):
            rows, x0, x_cur, score = rows[keep], x0[keep], x_cur[keep], score[keep]
            if rows.numel() == 0:
                break
            side = _square_size(p_init, query, queries, h, w)
            top = torch.randint(0, h - side + 1, (len(rows), 1, 1, 1), generator=generator, device=x.device)
            left = torch.randint(0, w - side + 1, (len(rows), 1, 1, 1), generator=generator, device=x.device)
            i, j = torch.arange(h, device=x.device).view(1, 1, h, 1), torch.arange(w, device=x.device).view(1, 1, 1, w)
            window = (i >= top) & (i < top + side) & (j >= left) & (j < left + side)  # [b, 1, H, W]
            signs = torch.randint(0, 2, (len(rows), c, 1, 1), generator=generator, device=x.device) * 2 - 1
            x_new = project(torch.where(window, x0 + eps * signs, x_cur), x0, eps)
            new_score = margin(model(x_new), y[rows])
            better = (new_score > score).view(-1, 1, 1, 1)
            x_cur, score = torch.where(better, x_new, x_cur), torch.maximum(new_score, score)
            keep = _keep_best(best_x, best_score, rows, x_cur, score)
    return best_x


def deepfool_linf(model, x, y, eps, *, steps=50, overshoot=0.02, candidates=10, restarts=1, seed=0):
    """ℓ∞ DeepFool (Moosavi-Dezfooli et al. 2016), as in the paper's footnote, kept in the ball:
    at each step, linearise f_k − f_t for the `candidates` classes with the highest clean
    logits, step to the nearest linearised boundary in ℓ∞ (distance |f_k − f_t| / ‖∇(f_k − f_t)‖₁,
    direction sign(∇)), scale the total perturbation by 1 + overshoot (as Foolbox), project.
    The first start is x itself, later restarts start at random points of the ball.
    """
    logits, generator = _setup(model, x, y, eps, "sign", seed)
    best_x, best_score = x.clone(), margin(logits, y)
    ranked = _other_classes_by_logit(logits, y)[:, :candidates]
    for restart in range(restarts):
        rows = (best_score <= MARGIN).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        x0 = x[rows]
        x_adv = random_point(x0, eps, generator) if restart > 0 else x0.clone()
        total = (x_adv - x0) / (1 + overshoot)
        for step in range(steps + 1):
            x_adv.requires_grad_(True)
            with torch.set_grad_enabled(step < steps):
                f = float32_or_wider(model(x_adv))
            keep = _keep_best(best_x, best_score, rows, x_adv, margin(f.detach(), y[rows]))
            if step == steps or not keep.any():
                break
            cand = ranked[rows]  # [b, c]
            diffs = f.gather(1, cand) - f.gather(1, y[rows, None])  # f_k − f_t < 0 while unbroken
            grads = torch.stack([torch.autograd.grad(diffs[:, k].sum(), x_adv, retain_graph=k + 1 < cand.shape[1])[0]
                                 for k in range(cand.shape[1])], 1)  # [b, c, ...]
            distance = diffs.detach().abs() / (grads.flatten(2).abs().sum(2) + 1e-12)  # [b, c]
            nearest = distance.argmin(1)
            b = torch.arange(len(rows), device=x.device)
            step_to_boundary = (distance[b, nearest] + 1e-4).view(-1, *[1] * (x.dim() - 1)) * grads[b, nearest].sign()
            rows, x0, total = rows[keep], x0[keep], (total + step_to_boundary)[keep]
            x_adv = project(x0 + (1 + overshoot) * total, x0, eps)
            total = (x_adv - x0) / (1 + overshoot)
    return best_x
