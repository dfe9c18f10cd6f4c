"""The attack suite's mechanics, shared by eval.py and the modules it builds on (probe.py,
autoattack_check.py), which therefore never import eval.py: the attacks by name and their options
from the command line, verifying adversarial examples with a fresh forward pass, running one
attack over images with every break verified and doubtful samples attacked again, the clean
accuracy, and γ(ε, x) on images.

    correct = suite.clean_correct(model, images, labels, batch_size=256, device="cpu")
    robust, counts, seconds = suite.run_attack(model, images, labels, 8 / 255, "untargeted", {"steps": 100},
                                               num_classes=10, batch_size=256, device="cpu", seed=0, only=correct)

Images are uint8 [N, C, H, W] on the CPU, moved to `device` a batch at a time as [0, 1] floats.
"""
import json
import os
import time

import torch
from tqdm import tqdm

import attacks
import ball
import llr

SUITE = {  # name: (table label, attack); the order is the worst-case order
    "fgsm": ("FGSM (one step)", attacks.fgsm_k),  # options in attack_options: one step of ε on the cross-entropy
    "fgsm20": ("FGSM-20 (weak)", attacks.fgsm_k),
    "untargeted": ("Untargeted (strong)", attacks.untargeted),
    "multi-targeted": ("Multi-Targeted (very strong)", attacks.multi_targeted),
    "square": ("Square (gradient-free)", attacks.square),
    "random-targeted": ("Random-Targeted success", attacks.random_targeted),
    "deepfool": ("DeepFool", attacks.deepfool_linf),
}
DEFAULT_SUITE = "fgsm,fgsm20,untargeted,multi-targeted,square,random-targeted"


def batches(images, labels, batch_size, device):
    """(first index, x [B, C, H, W] in [0, 1] on `device`, y [B]) for each batch of the uint8 images."""
    for i in range(0, len(labels), batch_size):
        yield i, images[i:i + batch_size].to(device).float() / 255, labels[i:i + batch_size].to(device)


LINF_ONLY = ("square", "deepfool")


def parse_suite(text, norm="linf"):
    """The attack names of --attacks. In ℓ2 the default suite leaves out the ℓ∞-only attacks; naming
    one explicitly is an error."""
    if norm == "l2" and text == DEFAULT_SUITE:
        text = ",".join(n for n in text.split(",") if n not in LINF_ONLY)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; choose from {', '.join(SUITE)}")
    if norm == "l2" and set(names) & set(LINF_ONLY):
        raise ValueError(f"{sorted(set(names) & set(LINF_ONLY))[0]} is an ℓ∞ attack here; with --norm l2 choose "
                         f"from {', '.join(n for n in SUITE if n not in LINF_ONLY)}")
    return names


def verify(model, x, x_adv, eps, y, target=None, norm="linf"):
    """Check adversarial examples with a fresh forward pass (eval mode). Per sample [B]: `valid`
    (x_adv inside the ε-ball around x and [0, 1], in x's dtype), `broken` (valid, and misclassified;
    for random-targeted, classified as `target`), and `doubtful` (not broken, but invalid or within
    attacks.MARGIN of a break: where another pass's rounding could decide; run_attack attacks these again)."""
    x_adv = x_adv.to(x.dtype)
    valid = ball.inside(x_adv, x, eps, norm=norm)  # up to float32 rounding; anything further out is not counted
    with torch.no_grad():
        logits = model(x_adv)
    score = attacks.margin(logits, y) if target is None else -attacks.margin(logits, target)
    broken = valid & (score > 0)
    return valid, broken, ~broken & (~valid | (score > -attacks.MARGIN))


def attack_options(name, args, num_classes, eps):
    """Keyword options of each attack from the command line (absent: the attack's default)."""
    if name == "fgsm":  # one signed step of ε from x on the cross-entropy, as training.evaluate's FGSM
        return {"steps": 1, "step_size": eps, "loss": "ce", "norm": args.norm}
    if name == "fgsm20":
        return {"steps": args.fgsm_steps, "norm": args.norm}
    if name == "deepfool":
        return {}
    if name == "square":
        return {"queries": args.square_queries}
    options = {"optimizer": args.optimizer, "norm": args.norm}
    options.update({k: v for k, v in (("steps", args.steps), ("restarts", args.restarts)) if v is not None})
    if name == "multi-targeted":
        options["num_targets"] = min(num_classes - 1, args.num_targets or 20)
    return options


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


REATTACKS = 2  # fresh attempts on a sample whose break does not verify, or nearly does


def run_attack(model, images, labels, eps, name, options, num_classes, batch_size, device, seed, only=None,
               desc=None):
    """One attack over the images (those where the mask `only` is true; the others count as not
    robust, e.g. the misclassified clean images), every break verified (`verify`). A sample whose verification is
    doubtful is attacked again with a new seed, up to REATTACKS times, and is counted robust only if
    it is then still not broken. Returns, per sample on the CPU, `robust` [N] (for random-targeted:
    the attack did *not* reach its target), the counts {"invalid": examples outside the ball or box
    at the first check, "reattacked": samples attacked again, "unverified": samples still doubtful
    after that, counted robust}, and the seconds taken."""
    if only is not None:
        robust = torch.zeros(len(labels), dtype=torch.bool)
        rows = only.nonzero().squeeze(1)
        robust[rows], counts, seconds = run_attack(model, images[rows], labels[rows], eps, name, options,
                                                   num_classes, batch_size, device, seed, desc=desc)
        return robust, counts, seconds
    fn = SUITE[name][1]
    robust, counts = [], {"invalid": 0, "reattacked": 0, "unverified": 0}
    _sync(device)
    start = time.time()
    bar = tqdm(total=len(labels), desc=desc or SUITE[name][0], unit="img", leave=False)  # the images it attacks
    for i, x, y in batches(images, labels, batch_size, device):
        seed_i = seed + i  # another random stream for each batch
        target = attacks.random_targets(y, num_classes, seed_i) if name == "random-targeted" else None
        targeted = (lambda rows: {"target": target[rows]}) if target is not None else (lambda rows: {})  # noqa: E731
        every = torch.arange(len(y), device=y.device)
        x_adv = fn(model, x, y, eps, seed=seed_i, **targeted(every), **options)
        valid, broken, doubtful = verify(model, x, x_adv, eps, y, target, options.get("norm", "linf"))
        counts["invalid"] += int((~valid).sum())
        counts["reattacked"] += int(doubtful.sum())
        for attempt in range(1, REATTACKS + 1):
            rows = doubtful.nonzero().squeeze(1)
            if len(rows) == 0:
                break
            x_adv[rows] = fn(model, x[rows], y[rows], eps, seed=seed_i + attempt * 1_000_003, **targeted(rows), **options)
            _, broken, doubtful = verify(model, x, x_adv, eps, y, target, options.get("norm", "linf"))
        counts["unverified"] += int(doubtful.sum())
        robust.append(~broken)
        bar.update(len(y))
    bar.close()
    _sync(device)
    # no image to attack (a model that classifies none correctly): an empty column, not a torch.cat error
    return (torch.cat(robust).cpu() if robust else torch.zeros(0, dtype=torch.bool)), counts, time.time() - start


def clean_correct(model, images, labels, batch_size, device):
    with torch.no_grad():
        return torch.cat([(model(x).argmax(1) == y).cpu() for _, x, y in batches(images, labels, batch_size, device)])


def gamma_of_images(model, images, labels, eps, batch_size, device, seed, norm="linf", steps=50):
    """γ(ε, x) per image with `llr.local_linearity` (`steps` Adam steps, lr 0.1; 50 as the paper's
    Fig. F3). The random starts depend on `seed` and the batch alone, so calls with more steps
    continue the same searches and never find less (`--gamma-sweep`)."""
    values = []
    bar = tqdm(total=len(labels), desc=f"γ(ε, x), {steps} steps", unit="img", leave=False)
    for i, x, y in batches(images, labels, batch_size, device):
        generator = torch.Generator(device=x.device).manual_seed(seed + i)
        values.append(llr.local_linearity(model, x, y, eps, steps=steps, lr=0.1, generator=generator,
                                          norm=norm)[0].cpu())
        bar.update(len(y))
    bar.close()
    values = torch.cat(values).double()
    q = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=values.dtype)
    p10, p50, p90, p99 = values.quantile(q).tolist()
    return {"steps": steps, "lr": 0.1, "mean": values.mean().item(), "median": p50, "p10": p10, "p90": p90,
            "p99": p99, "max": values.max().item(), "values": values.tolist()}


def write_compact_json(path, obj):
    """`obj` as JSON at `path`, atomically (a temporary file, then a rename), without indentation:
    reports carry per-image lists (training.write_json indents its small files)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)
