"""The threat model: the ball B(ε) around x, in the ℓ∞ norm (the paper's) or the ℓ2 norm,
intersected with the image box [0, 1], and ε as the command line writes it. Attacks, training
methods and scripts take their geometry from here; `llr.py` keeps its own copy of what it needs,
so that it can be copied alone (tests/test_llr.py checks that the copies agree).

    eps = parse_eps("8/255")                      # 0.0314 (pixel units); "8" means 8/255 too (ℓ∞ only)
    eps = parse_eps("0.5", norm="l2")             # 0.5: in ℓ2 every number is in pixel units
    x_adv = project(x_adv, x, eps)                # nearest point of B(ε) ∩ [0, 1] (ℓ∞)
    x_adv = project(x_adv, x, eps, norm="l2")     # the same for the ℓ2 ball
    x0 = random_point(x, eps, generator)          # uniform in B(ε), then into [0, 1]
"""
from fractions import Fraction

import torch

NORMS = ("linf", "l2")
# larger radii are almost surely a unit mistake (the paper's ℓ∞ radii reach 16/255; ℓ2 radii of 0.5 and 1.0 on
# CIFAR-10 and 3.0 on ImageNet are RobustBench's)
MAX_EPS = {"linf": 64 / 255, "l2": 4.0}
MIN_EPS = 0.5 / 255  # smaller non-zero radii are too


def parse_eps(text, norm="linf"):
    """ε in pixel units from the command line. ℓ∞: a fraction ("8/255") or a number below 1
    ("0.0314") is in pixel units, a number of 1 or more ("8", "4") in units of 1/255 (the paper's
    habit). ℓ2: every number is in pixel units ("0.5", "1.0", "3"), a fraction too ("36/255").
    A value that is almost surely a unit mistake (non-zero below 0.5/255, or above 64/255 in ℓ∞,
    4 in ℓ2) is refused with one line that shows both readings, as is anything unreadable."""
    check_norm(norm)
    text = str(text).strip()
    numerator, fraction, denominator = text.partition("/")
    try:
        if "/" in denominator:
            raise ValueError
        value = Fraction(numerator) / Fraction(denominator) if fraction else Fraction(numerator)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read eps {text!r}: write a fraction such as 8/255, or 8 (meaning 8/255)") from None
    if value < 0:
        raise ValueError(f"eps must not be negative, got {text}")
    eps = float(value if fraction or value < 1 or norm == "l2" else value / 255)
    if eps > MAX_EPS[norm] or 0 < eps < MIN_EPS:
        readings = "" if fraction else (f": as pixel units {text} is {255 * float(value):.4g}/255, as units of "
                                        f"1/255 it is {float(value):.4g}/255, and it is read as {255 * eps:.4g}/255")
        if eps > MAX_EPS[norm]:
            bound = (f"more than {'64/255' if norm == 'linf' else '4'}, almost surely a unit mistake for an "
                     f"{'ℓ∞' if norm == 'linf' else 'ℓ2'} radius")
        else:
            bound = "less than 0.5/255, almost surely a unit mistake"
        raise ValueError(f"eps {text} is {bound}{readings}; write the radius as a fraction, e.g. "
                         f"{'8/255' if norm == 'linf' else '36/255'}")
    return eps


def describe_eps(eps, norm="linf"):
    """The radius a script will use, as its header prints it: 'ℓ∞ eps 8/255 = 0.0314'."""
    return f"{'ℓ∞' if norm == 'linf' else 'ℓ2'} eps {255 * eps:.4g}/255 = {eps:.4g}"


def check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")


def check_eps(eps):
    """ε as a number in pixel units must lie in [0, 1]... or, in ℓ2, at least not be negative."""
    if not 0 <= float(eps) <= MAX_EPS["l2"]:
        raise ValueError(f"eps must lie in [0, {MAX_EPS['l2']:g}] in pixel units (e.g. 8/255), got {eps}")


def _per_sample(t, like):
    """A per-sample [B] tensor shaped to broadcast over `like` [B, ...]."""
    return t.view(-1, *[1] * (like.dim() - 1))


def project(x_adv, x, eps, norm="linf"):
    """A point of B(ε) ∩ [0, 1] around x for x_adv. ℓ∞: clip to the ball, then to the box, which is
    the nearest point (both are boxes). ℓ2: scale x_adv − x into the ball, then clip to the box,
    as ℓ2 PGD does (AutoAttack's APGD-L2 among others): the nearest point of the ball, moved into
    the box, which cannot leave the ball since x is in the box; it is the nearest point of the
    intersection whenever the box does not cut the ball's direction."""
    if norm == "linf":
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    check_norm(norm)
    delta = x_adv - x
    scale = (eps / distance(x_adv, x, "l2").clamp_min(1e-12)).clamp(max=1)
    return (x + delta * _per_sample(scale, delta)).clamp(0, 1)


def random_point(x, eps, generator=None, norm="linf"):
    """x + δ with δ uniform in B(ε) (ℓ∞: per coordinate; ℓ2: a Gaussian direction, radius ε·U^(1/d)),
    then projected into [0, 1]: the usual random start of PGD."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return project(x + (2 * noise - 1) * eps, x, eps)
    check_norm(norm)
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _per_sample(direction.flatten(1).norm(dim=1).clamp_min(1e-12), x)
    radius = eps * torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype) ** (1 / x[0].numel())
    return project(x + _per_sample(radius, x) * direction, x, eps, norm)


def distance(x_adv, x, norm="linf"):
    """‖x_adv − x‖ per sample, [B], in the given norm."""
    difference = (x_adv - x).flatten(1)
    return difference.abs().amax(1) if norm == "linf" else difference.norm(dim=1)


def inside(x_adv, x, eps, tolerance=1e-6, norm="linf"):
    """Per sample [B]: is x_adv in B(ε) around x (up to float rounding of x ± ε) and in [0, 1]?"""
    flat = x_adv.flatten(1)
    return (distance(x_adv, x, norm) <= eps + tolerance) & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)


def steepest(grad, norm="linf"):
    """The unit-norm direction of steepest ascent for a gradient [B, ...]: sign(∇) in ℓ∞, ∇/‖∇‖₂ in ℓ2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
