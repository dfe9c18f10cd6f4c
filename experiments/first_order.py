"""What the first-order form of LLR changes (llr.llr_loss(first_order=True)), measured: the numbers its docstring
and experiments/first-order/README.md quote. On a CPU, in minutes; writes experiments/first-order/measurements.json.

    python -m experiments.first_order            # all three measurements
    python -m experiments.first_order --smoke    # the same code on a tiny model, in seconds (the tests)

1. The step h (batch norm in eval mode, where both forms define the same quantity): the first-order loss and
   weight gradient against the exact ones for the same δ_LLR (same generator), over h, in float64 (the truncation
   error, ∝ h²) and float32 (rounding takes over below some h): what chose the default h.
2. Batch norm in train mode (float64, h small enough that truncation is negligible): the exact ∇ₓℓ(x) is the
   gradient of the batch's summed loss through the clean batch's statistics, so δᵢᵀ∇ₓℓ also holds sample i's
   effect on the other samples' losses through the statistics; the difference, taken at the statistics held
   fixed, does not. The gap against the batch size B (expected ∝ 1/B).
3. bf16 autocast: at one δ, the difference D_h and γ_h from bf16 logits and from float32 ones against the exact
   float32 terms, over h: how far bf16 logits resolve a difference of nearly equal losses.
Each on wrn-10-1 (softplus; 32x32 random images in [0, 1], 10 classes, 2 search steps at ε = 8/255; our choice:
the smallest model of the trainers' families, with batch norm).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import llr  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402

STEPS_H = (1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01)
BATCHES = (16, 32, 64, 128, 256)  # train_cifar.py's default 64 per step, co-bench's 128
BF16_H = (1.0, 0.5, 0.25, 0.1)


def setting(arch, batch, size, dtype, seed=1):
    torch.manual_seed(0)
    model = models.build_model(arch, num_classes=10, activation="softplus").to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g).to(dtype)
    return model, x, torch.randint(0, 10, (batch,), generator=g)


def loss_and_grad(model, x, y, **options):
    """llr_loss's loss, info and the flat weight gradient, from the same random start (generator seeded 0)."""
    model.zero_grad()
    loss, info = llr.llr_loss(model, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(0), **options)
    loss.backward()
    return loss.detach(), info, torch.cat([p.grad.flatten() for p in model.parameters()])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def step_h(arch, batch, size):
    rows = []
    for dtype in (torch.float64, torch.float32):
        model, x, y = setting(arch, batch, size, dtype)
        model.eval()  # batch norm on running statistics: both forms define the same quantity
        loss, info, grad = loss_and_grad(model, x, y)
        for h in STEPS_H:
            fo_loss, fo_info, fo_grad = loss_and_grad(model, x, y, first_order=True, h=h)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "h": h, "loss_error": abs(fo_loss - loss).item(),
                         "weight_grad_relative_error": relative(fo_grad, grad),
                         "grad_term_max_error": (fo_info["grad_term"] - info["grad_term"]).abs().max().item()})
    return rows


def batch_norm_gap(arch, batches, size, h=0.01):
    rows = []
    for batch in batches:
        model, x, y = setting(arch, batch, size, torch.float64)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        loss, info, grad = loss_and_grad(model.train(), x, y)
        model.load_state_dict(state)  # the running statistics as before the exact step
        fo_loss, fo_info, fo_grad = loss_and_grad(model.train(), x, y, first_order=True, h=h)
        rows.append({"batch": batch, "h": h, "loss_relative_error": (abs(fo_loss - loss) / loss).item(),
                     "weight_grad_relative_error": relative(fo_grad, grad),
                     "grad_term_relative_error": relative(fo_info["grad_term"], info["grad_term"]),
                     "gamma_relative_error": relative(fo_info["gamma"], info["gamma"])})
    return rows


def bf16(arch, batch, size):
    """At one δ (the float32 search's), D_h and γ_h computed from bf16-autocast logits and from float32 ones, against
    the exact float32 δᵀ∇ₓℓ(x) and γ: the error of the difference that bf16 logits leave, per h; and the exact form's
    δᵀ∇ₓℓ(x) with ∇ₓℓ(x) taken under bf16 autocast, for comparison (batch norm in eval mode)."""
    model, x, y = setting(arch, batch, size, torch.float32)
    model.eval()
    _, info, _ = loss_and_grad(model, x, y)
    delta = info["delta"]
    xr = x.clone().requires_grad_(True)
    clean = torch.nn.functional.cross_entropy(model(xr), y, reduction="none")
    (grad,) = torch.autograd.grad(clean.sum(), xr)
    exact_term = (delta * grad).flatten(1).sum(1)
    with torch.no_grad():
        exact_gamma = torch.nn.functional.cross_entropy(model(x + delta), y, reduction="none") - clean - exact_term
    rows = []
    for precision in ("float32", "bf16"):
        for h in BF16_H:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(torch.cat([x, x + delta, x + h * delta, x - h * delta]))
            losses = torch.nn.functional.cross_entropy(logits.float(), y.repeat(4), reduction="none").view(4, -1)
            term = (losses[2] - losses[3]) / (2 * h)
            gamma = losses[1] - losses[0] - term
            rows.append({"precision": precision, "h": h, "grad_term_relative_error": relative(term, exact_term),
                         "gamma_relative_error": relative(gamma, exact_gamma)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xr).float(), y, reduction="sum"), xr)
    rows.append({"precision": "bf16", "h": None, "form": "exact: ∇ₓℓ(x) under autocast",
                 "grad_term_relative_error": relative((delta * grad.float()).flatten(1).sum(1), exact_term)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny model and batch, in seconds (the tests)")
    p.add_argument("--out", default=os.path.join(HERE, "first-order", "measurements.json"))
    args = p.parse_args(argv)
    arch, batch, size, batches = ("wrn-10-1", 4, 8, (4, 8)) if args.smoke else ("wrn-10-1", 16, 32, BATCHES)
    result = {"command": "python -m experiments.first_order" + (" --smoke" if args.smoke else ""),
              "model": f"{arch}, softplus, {size}x{size} random images, 10 classes, ε = 8/255, 2 search steps",
              "torch": torch.__version__, "step_h": step_h(arch, batch, size),
              "batch_norm_train": batch_norm_gap(arch, batches, size), "bf16": bf16(arch, batch, size)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    training.write_json(args.out, result)
    for key in ("step_h", "batch_norm_train", "bf16"):
        for row in result[key]:
            print(key, {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()})
    return result


if __name__ == "__main__":
    main()
