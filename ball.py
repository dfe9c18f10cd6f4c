"""The threat model: the ℓ∞ ball B(ε) around x intersected with the image box [0, 1], and ε as
the command line writes it. Attacks, training methods and scripts take their geometry from here;
`llr.py` keeps its own copy of the two functions it needs, so that it can be copied alone
(tests/test_llr.py checks that the copies agree).

    eps = parse_eps("8/255")                 # 0.0314 (pixel units); "8" means 8/255 too
    x_adv = project(x_adv, x, eps)           # nearest point of B(ε) ∩ [0, 1]
    x0 = random_point(x, eps, generator)     # uniform in B(ε), then into [0, 1]
"""
from fractions import Fraction

import torch

MAX_EPS = 64 / 255  # larger radii are almost surely a unit mistake (the paper's largest is 16/255)
MIN_EPS = 0.5 / 255  # smaller non-zero radii are too


def parse_eps(text):
    """ε in pixel units from the command line, with one meaning in every script: a fraction
    ("8/255") or a number below 1 ("0.0314") is in pixel units; a number of 1 or more ("8", "4")
    is in units of 1/255. A value that is almost surely a unit mistake (non-zero below 0.5/255,
    or above 64/255) is refused with one line that shows both readings, as is anything unreadable."""
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
    eps = float(value if fraction or value < 1 else value / 255)
    if eps > MAX_EPS or 0 < eps < MIN_EPS:
        readings = "" if fraction else (f": as pixel units {text} is {255 * float(value):.4g}/255, as units of "
                                        f"1/255 it is {float(value):.4g}/255, and it is read as {255 * eps:.4g}/255")
        bound = "more than 64/255" if eps > MAX_EPS else "less than 0.5/255"
        raise ValueError(f"eps {text} is {bound}, almost surely a unit mistake{readings}; "
                         f"write the radius as a fraction, e.g. 8/255")
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
