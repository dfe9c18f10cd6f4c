"""The modes of `eval.py` that replace the suite: the data behind `plots.py`'s figures.

    python eval.py runs/cifar-llr/best.safetensors --eps 8/255 --surface 126          # Fig. 1, 4: surface.json
    python eval.py runs/cifar-llr/best.safetensors --eps 8/255 --strength             # Fig. 3: strength.json
    python eval.py runs/cifar-llr/best.safetensors --eps 8/255 --gamma-sweep 1,2,10,50  # γ by search length

--surface: the loss on a grid around test images, spanned by the model's own adversarial direction
and a random sign direction. --strength: Untargeted and Multi-Targeted accuracy as the attacks
grow (steps x restarts), each point verified and re-attacked as the suite's columns are (`suite.run_attack`).
--gamma-sweep: γ(ε, x) found by searches of each number of steps from the same random starts
(`suite.gamma_of_images`). The command line, the checkpoint and the images are eval.py's.
"""
import torch
import torch.nn.functional as F

import ball
import cli
import suite  # the suite's attacks and measurements (eval.py imports this module; it never imports eval.py)

MODES = {"surface": "surface", "strength": "strength", "gamma_sweep": "gamma"}  # flag (args attribute): mode


def mode_of(args):
    """"surface", "strength" or "gamma" (--gamma-sweep): the figure mode the flags ask for, or "eval" (the suite)."""
    return next((mode for flag, mode in MODES.items() if getattr(args, flag)), "eval")


def parse_strengths(text):
    """'20x1,50x1' -> [(20, 1), (50, 1)]: (steps, restarts), each at least 1."""
    try:
        strengths = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
        if all(len(s) == 2 and min(s) >= 1 for s in strengths):
            return strengths
    except ValueError:
        pass
    raise ValueError(f"cannot read --strengths {text!r}: write steps x restarts, e.g. 20x1,50x1,100x5")


def parse_gamma_sweep(text):
    """'1,2,10,50' -> [1, 2, 10, 50]: step counts, each at least 1, in increasing order."""
    try:
        steps = [int(v) for v in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or steps != sorted(set(steps)):
        raise ValueError(f"cannot read --gamma-sweep {text!r}: write increasing step counts, e.g. 1,2,10,50")
    return steps


def check_args(args):
    """The figure flags, before any work (ValueError): at most one mode, readable values, and
    --surface (a sign-direction grid: the ℓ∞ ball) not in ℓ2."""
    cli.require(sum(bool(getattr(args, flag)) for flag in MODES) <= 1,
                "--surface, --strength and --gamma-sweep each replace the suite: choose one")
    cli.require(not args.surface or min(args.surface) >= 0, f"--surface indices must not be negative: {args.surface}")
    cli.require(not (args.surface and args.norm == "l2"), "--surface draws the ℓ∞ ball (sign directions); "
                                                           "it has no --norm l2")
    if args.surface_radius:
        ball.parse_eps(args.surface_radius)
    parse_strengths(args.strengths)
    if args.gamma_sweep:
        parse_gamma_sweep(args.gamma_sweep)


def loss_surface(model, x, y, eps, radius, grid, seed, batch_size):
    """The loss ℓ(x + a·u + b·v) and predicted class on a grid × grid lattice of a, b in
    [−radius, radius] (the paper's Fig. 1 and 4): u = sign(∇ₓℓ(x)), the model's own adversarial
    direction, and v a random sign vector drawn from `seed` (the same for every model). Each
    point is projected onto the ε-ball around x and [0, 1]: x + a·u + b·v moves |a| + |b| where
    u and v agree, so with radius = ε the grid's corners lie on the ball's boundary.
    x: one image [1, C, H, W]; returns a dict of JSON-able lists."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    u = grad.sign()
    v = (torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(x)
    a = torch.linspace(-radius, radius, grid, dtype=torch.float64)
    coefficients = torch.cartesian_prod(a, a).to(x.device, x.dtype)  # [grid², 2]: (a, b), a major
    losses, preds = [], []
    with torch.no_grad():
        for chunk in coefficients.split(batch_size):
            points = x.detach() + chunk[:, 0, None, None, None] * u + chunk[:, 1, None, None, None] * v
            points = ball.project(points, x.detach(), eps)
            logits = model(points)
            losses.append(F.cross_entropy(logits, y.expand(len(chunk)), reduction="none").cpu())
            preds.append(logits.argmax(1).cpu())
    shape = (grid, grid)
    return {"a": a.tolist(), "b": a.tolist(), "loss": torch.cat(losses).view(shape).tolist(),
            "pred": torch.cat(preds).view(shape).tolist(), "label": int(y.item()), "radius": radius, "eps": eps,
            "v_seed": seed}


def strength_sweep(model, images, labels, eps, args, num_classes, device):
    """Untargeted and Multi-Targeted accuracy at growing strengths (steps x restarts; the paper's
    Fig. 3). Each point attacks only the samples still robust after the weaker points, with a new
    seed, so the per-sample worst case carries over and a curve never rises."""
    correct = suite.clean_correct(model, images, labels, args.batch_size, device)
    curves = {}
    for name in ("untargeted", "multi-targeted"):
        robust, points = correct.clone(), []
        for k, (steps, restarts) in enumerate(parse_strengths(args.strengths)):
            options = {**suite.attack_options(name, args, num_classes, eps), "steps": steps, "restarts": restarts}
            rows = robust.nonzero().squeeze(1)
            seconds = 0.0
            if len(rows):
                still, _, seconds = suite.run_attack(model, images[rows], labels[rows], eps, name, options,
                                                     num_classes, args.batch_size, device, args.seed + 1000 * k,
                                                     desc=f"strength {steps}x{restarts}: {name}")
                robust[rows] = still
            targets = options.get("num_targets", 1)
            points.append({"steps": steps, "restarts": restarts, "gradient_evaluations": steps * restarts * targets,
                           "accuracy": robust.float().mean().item(), "time_s": round(seconds, 2),
                           "robust": robust.tolist()})
        curves[name] = points
    return {"nominal": correct.float().mean().item(), "curves": curves}


def measure(mode, model, evaluated, images, labels, eps, args, num_classes):
    """The report entries of `mode` ("surface", "strength" or "gamma"), with a short summary printed.
    `evaluated` is the model as attacked (under --bf16 autocast); γ is measured on `model`, as the suite's --gamma."""
    device = args.device
    if mode == "surface":
        radius = ball.parse_eps(args.surface_radius) if args.surface_radius else eps
        surfaces = [{"index": i, **loss_surface(evaluated, images[i:i + 1].to(device).float() / 255,
                                                labels[i:i + 1].to(device), eps, radius, args.surface_grid,
                                                args.seed, args.batch_size)}
                    for i in args.surface]
        print(f"loss surfaces of {args.checkpoint} around test images {args.surface}: "
              f"{args.surface_grid}x{args.surface_grid} grid, radius {radius:.5f}, eps {args.eps}")
        return {"surface": surfaces}
    if mode == "gamma":
        sweep = [suite.gamma_of_images(model, images, labels, eps, args.batch_size, device, args.seed, args.norm, steps)
                 for steps in parse_gamma_sweep(args.gamma_sweep)]
        print(f"{args.checkpoint}  eps = {args.eps}  {len(labels)} images; γ(ε, x) found by k steps of the search:")
        for g in sweep:
            print(f"  {g['steps']:4d} steps: mean {g['mean']:.4f}  median {g['median']:.4f}  p90 {g['p90']:.4f}")
        return {"gamma_sweep": sweep}
    strength = strength_sweep(evaluated, images, labels, eps, args, num_classes, device)
    print(f"{args.checkpoint}  eps = {args.eps}  {len(labels)} images; accuracy (worst case so far):")
    for name, points in strength["curves"].items():
        print(f"  {name:15s}" + "  ".join(f"{p['steps']}x{p['restarts']}: {100 * p['accuracy']:.2f}%" for p in points))
    return {"strength": strength}
