"""The threat model: the ℓ∞ ball B(ε) around x intersected with the image box [0, 1], and ε as
the command line writes it. Attacks, training methods and scripts take their geometry from here;
`llr.py` keeps its own copy of the two functions it needs, so that it can be copied alone
(tests/test_llr.py checks that the copies agree).

    eps = parse_eps("8/255")                 # 0.0314 (pixel units)
    x_adv = project(x_adv, x, eps)           # nearest point of B(ε) ∩ [0, 1]
    x0 = random_point(x, eps, generator)     # uniform in B(ε), then into [0, 1]
"""
from fractions import Fraction

import torch


def parse_eps(text):
    """ε from the command line, a number or a fraction ("8/255", "0.0314"), in [0, 1] (pixel units)."""
    try:
        eps = float(Fraction(str(text)))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read eps {text!r}: write a number or a fraction such as 8/255") from None
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must lie in [0, 1] in pixel units (e.g. 8/255), got {text}")
    return eps


def check_eps(eps):
    """ε as a number in pixel units must lie in [0, 1]."""
    if not 0 <= float(eps) <= 1:
        raise ValueError(f"eps must lie in [0, 1] in pixel units (e.g. 8/255), got {eps}")


def project(x_adv, x, eps):
    """The nearest point to x_adv in {x' : |x' − x|∞ ≤ ε, x' ∈ [0, 1]} (clip to the ball, then the box)."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def random_point(x, eps, generator=None):
    """x + δ with δ uniform in B(ε), projected into [0, 1] (the usual random start of PGD)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return project(x + (2 * noise - 1) * eps, x, eps)


def distance(x_adv, x):
    """‖x_adv − x‖∞ per sample, [B]."""
    return (x_adv - x).abs().flatten(1).amax(1)


def inside(x_adv, x, eps, tolerance=1e-6):
    """Per sample [B]: is x_adv in B(ε) around x (up to float rounding of x ± ε) and in [0, 1]?"""
    flat = x_adv.flatten(1)
    return (distance(x_adv, x) <= eps + tolerance) & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)
