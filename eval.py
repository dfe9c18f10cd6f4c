"""Evaluate a checkpoint under the paper's attack suite (Table 2): print a table, write JSON.

    python eval.py runs/cifar-llr/best.safetensors --eps 8/255                  # 1,000 test images
    python eval.py runs/cifar-llr/best.safetensors --eps 8/255 --n 10000 --gamma
    python eval.py CKPT --eps 4/255 --data-dir /data/imagenet --num-targets 20 --bf16   # ImageNet

Columns: Nominal, FGSM-20 (weak), Untargeted (strong), Multi-Targeted (very strong),
each as its own accuracy and as the per-sample worst case over it and every
column before it (a sample a weaker attack broke is never counted robust), plus
the Random-Targeted success rate. Every counted adversarial example is checked
first: inside the ε-ball and [0, 1], and misclassified by a fresh forward pass.
The obfuscation report lists the drop from the weak attack to the worst case
and the sanity checks of Athalye et al. (2018) and Carlini et al. (2019), each
flagged when violated.
"""
import inspect
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attacks
import ball
import cli
import data
import llr
import models

SUITE = {  # name: (table label, attack); the order is the worst-case order
    "fgsm20": ("FGSM-20 (weak)", attacks.fgsm_k),
    "untargeted": ("Untargeted (strong)", attacks.untargeted),
    "multi-targeted": ("Multi-Targeted (very strong)", attacks.multi_targeted),
    "square": ("Square (gradient-free)", attacks.square),
    "random-targeted": ("Random-Targeted success", attacks.random_targeted),
    "deepfool": ("DeepFool", attacks.deepfool_linf),
}
DEFAULT_SUITE = "fgsm20,untargeted,multi-targeted,square,random-targeted"
GRADIENT_FREE_MISS_SHARE = 0.01  # flag the model when Square breaks more than 1% of the gradient attacks' survivors
AUTOATTACK_VERSION = "0.2.0"  # the pyautoattack release this was tested with (requirements-extras.txt)
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AUTOATTACK_MISS_SHARE = 0.005  # flag the model when AutoAttack breaks more than 0.5% of images the suite did not


def get_args(argv=None):
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by the training scripts, or a run "
                   "directory (its best.safetensors, else its last.safetensors)")
    p.add_argument("--eps", help="the radius (ball.parse_eps): 8/255, or 8 meaning 8/255 in ℓ∞; in ℓ2 every number "
                                  "is in pixel units (0.5, or 36/255) (unset: the ε the checkpoint was trained at)")
    p.add_argument("--norm", choices=["linf", "l2"],
                   help="the threat model (unset: the checkpoint's, else linf, the paper's); in l2 the gradient "
                        "attacks take normalised steps, and Square, DeepFool and --surface, which are ℓ∞ here, "
                        "are refused")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["cifar10", "imagenet"], help="unset: the checkpoint's")
    g.add_argument("--data-dir", help="unset: the directory the checkpoint was trained from, as recorded in it, "
                                      "else data/cifar10 (ImageNet: required)")
    g.add_argument("--split", choices=["test", "holdout"], default="test",
                   help="test: CIFAR-10's test set or ImageNet's val/ (default); holdout: the training images that "
                        "the training scripts hold out to choose best.safetensors (--val-n there)")
    g.add_argument("--allow-selection-images", action="store_true",
                   help="evaluate even on images that chose this checkpoint (its numbers are then biased upwards)")
    g.add_argument("--n", type=int, default=1000, help="evaluate the first N images of the split")
    g.add_argument("--batch-size", type=int, default=256, help="images per attack batch")
    g = p.add_argument_group("attacks")
    g.add_argument("--attacks", default=DEFAULT_SUITE, help=f"comma-separated, from {', '.join(SUITE)}")
    g.add_argument("--steps", type=int, help="steps of the strong attacks (unset: each attack's, 100)")
    g.add_argument("--restarts", type=int, help="restarts of the strong attacks (unset: untargeted and "
                   "random-targeted 5, multi-targeted 1 per target)")
    g.add_argument("--num-targets", type=int, help="multi-targeted: top-k target classes (unset: all, at most 20)")
    g.add_argument("--optimizer", choices=["sign", "adam"], default="sign",
                   help="signed-gradient PGD with a cosine step, or Adam lr 0.1 (the authors')")
    g.add_argument("--fgsm-steps", type=int, default=20, help="k of the weak FGSM-k attack (paper: 20)")
    g.add_argument("--square-queries", type=int, default=1000,
                   help="queries (forward passes) of the Square attack per restart (about a third of "
                        "the cost of Multi-Targeted's 9 x 100 steps on CIFAR-10)")
    g.add_argument("--seed", type=int, default=0, help="seeds every attack's own random generator")
    g = p.add_argument_group("AutoAttack cross-check (pyautoattack, Croce & Hein 2020; make install-extras)")
    g.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack on the same images; resumable (state in OUT.autoattack-state.json)")
    g.add_argument("--aa-version", default="standard", choices=["standard", "plus", "rand", "custom"],
                   help="AutoAttack's attack set")
    g.add_argument("--aa-attacks", help="with --aa-version custom: comma-separated, from " + ", ".join(AA_ATTACKS))
    g = p.add_argument_group("extra measurements")
    g.add_argument("--gamma", action="store_true", help="γ(ε, x) with 50 Adam steps, lr 0.1 (Fig. F3)")
    g.add_argument("--no-sanity", action="store_true", help="skip the sanity checks' extra attacks")
    g.add_argument("--certify", action="store_true",
                   help="a lipconvnet model (soc.py), --norm l2: certified accuracy at radii 36/255, 72/255, 108/255 "
                        "and at --eps, and a check that no image certified at --eps was broken by an attack")
    g = p.add_argument_group("instead of the suite: figures (plots.py draws them)")
    g.add_argument("--surface", type=int, nargs="+", metavar="INDEX",
                   help="loss surfaces around these test images (Fig. 1, 4; the paper's panel: 126)")
    g.add_argument("--surface-grid", type=int, default=41, help="grid points per axis")
    g.add_argument("--surface-radius", help="half-width of the grid (unset: eps)")
    g.add_argument("--strength", action="store_true",
                   help="Untargeted and Multi-Targeted accuracy against attack strength (Fig. 3)")
    g.add_argument("--strengths", default="20x1,50x1,100x5,200x10", help="steps x restarts, weakest first")
    g.add_argument("--gamma-sweep", metavar="STEPS",
                   help="γ(ε, x) found by searches of each number of steps, e.g. 1,2,10,50: how much of the gap "
                        "the few steps of LLR's training search find (same random starts for every count)")
    g = p.add_argument_group("run")
    g.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run the model")
    g.add_argument("--out", help="JSON path, or a directory to write eval.json (surface.json, ...) in (unset: "
                                 "CHECKPOINT with .eval.json, .surface.json or .strength.json); "
                                 "each finished attack column is kept in OUT.partial.json until the end, and a run "
                                 "with the same settings continues from it")
    return p.parse_args(argv)


def check_writable(path):
    """Before any attack: `path` (and its .tmp) can be written; a one-line error otherwise."""
    try:
        with open(path + ".tmp", "w"):
            pass
        os.remove(path + ".tmp")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from None


def check_args(args):
    """The range of every numeric flag, and the device (ValueError)."""
    for flag, least in (("n", 1), ("batch_size", 1), ("steps", 1), ("restarts", 1), ("num_targets", 1),
                        ("fgsm_steps", 1), ("square_queries", 1), ("surface_grid", 2)):
        value = getattr(args, flag)
        cli.require(value is None or value >= least, f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    cli.require(not args.surface or min(args.surface) >= 0, f"--surface indices must not be negative: {args.surface}")
    cli.require(not str(args.device).startswith("cuda") or torch.cuda.is_available(),
                f"--device {args.device}: no CUDA GPU is available here (use --device cpu)")


class Autocast(torch.nn.Module):
    """The model under autocast, returning float32 logits."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def load_images(dataset, data_dir, split, n, image_size, holdout_n):
    """The first n images (uint8 [n, 3, H, W]), labels [n] and the class names of `split`: "test" is
    CIFAR-10's test set, or ImageNet's val/ in a fixed random order; "holdout" the `holdout_n`
    training images the training scripts hold out (`data.holdout_split`). ImageNet images are
    resized to 256/224 of `image_size` and center-cropped."""
    if dataset == "cifar10":
        images, labels, classes = data.load_cifar10(data_dir, "test" if split == "test" else "train")
        rows = torch.arange(min(n, len(labels))) if split == "test" else data.holdout_split(len(labels), holdout_n)[1][:n]
        return images[rows], labels[rows], classes
    folder = os.path.join(data_dir, "val" if split == "test" else "train")
    listing = data.ImageFolderDataset(folder, None)
    if split == "test":
        return (*data.load_folder_subset(folder, n, image_size), listing.classes)
    _, holdout = data.holdout_split(len(listing), holdout_n)
    return (*data.load_folder_images(folder, holdout[:n], image_size), listing.classes)


def selection_conflict(meta, split, n):
    """Why evaluating the first n images of `split` would score the checkpoint on images that chose
    it (a biased number), or None. Checkpoints record their selection (training.selection_record);
    best.safetensors of older versions were chosen on the first test images, and say so only by
    their `eval_n`. Hold-out sets are prefixes of one fixed permutation, so any two overlap."""
    selection = meta.get("selection")
    if selection is not None and split == "holdout" and selection["holdout_n"] > 0 and n > 0:
        return (f"this checkpoint was chosen on the {selection['holdout_n']} held-out training images "
                f"({selection['metric']}), which --split holdout evaluates")
    if selection is None and "eval_robust_acc" in meta and split == "test" and n > 0:
        return f"this checkpoint was chosen on the first {meta.get('eval_n')} test images by an older llr version"
    return None


def resolve_checkpoint(path):
    """A checkpoint path, or a run directory's best.safetensors (else last.safetensors), saying which."""
    if not os.path.isdir(path):
        return path
    for name in ("best.safetensors", "last.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            tqdm.write(f"evaluating {os.path.join(path, name)}")
            return os.path.join(path, name)
    raise ValueError(f"{path} is a directory without best.safetensors or last.safetensors")


def batches(images, labels, batch_size, device):
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
    attacks.MARGIN of a break: where another pass's rounding could decide; eval.py attacks these again)."""
    x_adv = x_adv.to(x.dtype)
    valid = ball.inside(x_adv, x, eps, norm=norm)  # up to float32 rounding; anything further out is not counted
    with torch.no_grad():
        logits = model(x_adv)
    score = attacks.margin(logits, y) if target is None else -attacks.margin(logits, target)
    broken = valid & (score > 0)
    return valid, broken, ~broken & (~valid | (score > -attacks.MARGIN))


def attack_options(name, args, num_classes):
    """Keyword options of each attack from the command line (absent: the attack's default)."""
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


def device_name(device):
    """The accelerator's name ("NVIDIA H200"), or "cpu": a report says which machine measured it."""
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


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
    return torch.cat(robust).cpu(), counts, time.time() - start


def clean_correct(model, images, labels, batch_size, device):
    with torch.no_grad():
        return torch.cat([(model(x).argmax(1) == y).cpu() for _, x, y in batches(images, labels, batch_size, device)])


def measure_gamma(model, images, labels, eps, batch_size, device, seed, norm="linf", steps=50):
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


def sanity_checks(model, images, labels, eps, results, args, num_classes, device):
    """Checks a reviewer asks for (Athalye et al. 2018, Carlini et al. 2019), each with ok=False
    when violated: accuracy reaches 0 as ε grows; fewer steps do not beat more; a stronger
    attack is not weaker than a weaker one, in total or per sample."""
    checks = []
    correct = torch.tensor(results["nominal"]["robust"])
    if not args.no_sanity:
        big = 0.5
        robust, _, _ = run_attack(model, images, labels, big, "untargeted", {"steps": 20, "restarts": 1},
                                  num_classes, args.batch_size, device, args.seed, only=correct,
                                  desc=f"sanity check: Untargeted at eps = {big}")
        acc = robust.float().mean().item()
        checks.append({"name": "accuracy reaches 0 as eps grows", "ok": acc == 0,
                       "detail": f"Untargeted 20 steps at eps = {big}: {100 * acc:.1f}%"})
        if "untargeted" in results:
            full = results["untargeted"]
            steps = max(1, full["steps"] // 4)
            weak_options = {**attack_options("untargeted", args, num_classes), "steps": steps, "restarts": 1}
            robust, _, _ = run_attack(model, images, labels, eps, "untargeted", weak_options, num_classes,
                                      args.batch_size, device, args.seed + 10**6, only=correct,
                                      desc=f"sanity check: Untargeted, {steps} steps")
            weak_acc = robust.float().mean().item()
            checks.append({"name": "more steps never help the model", "ok": weak_acc >= full["accuracy"],
                           "detail": f"Untargeted {steps} steps x 1: {100 * weak_acc:.1f}% vs "
                                     f"{full['steps']} x {full['restarts']}: {100 * full['accuracy']:.1f}%"})
    gradient = [n for n in ("fgsm20", "untargeted", "multi-targeted", "deepfool") if n in results]
    if "square" in results and gradient:
        survivors = [all(results[n]["robust"][i] for n in gradient) for i in range(len(correct))]
        square_only = sum(s and not q for s, q in zip(survivors, results["square"]["robust"]))
        checks.append({"name": "the gradient-free attack finds little that the gradient attacks missed",
                       "ok": square_only <= GRADIENT_FREE_MISS_SHARE * sum(survivors),
                       "detail": f"Square broke {square_only} of the {sum(survivors)} images that survived "
                                 f"{', '.join(gradient)} (flag above {100 * GRADIENT_FREE_MISS_SHARE:g}%): "
                                 f"{'consistent with masked or noisy gradients' if square_only else 'none'}"})
    order = [n for n in ("fgsm20", "untargeted", "multi-targeted") if n in results]
    for weaker, stronger in zip(order, order[1:]):
        w, s = results[weaker], results[stronger]
        only_weaker = sum(a and not b for a, b in zip(s["robust"], w["robust"]))  # broken by weaker only
        checks.append({"name": f"{stronger} is not weaker than {weaker}",
                       "ok": s["accuracy"] <= w["accuracy"],
                       "detail": f"{100 * w['accuracy']:.1f}% -> {100 * s['accuracy']:.1f}%; "
                                 f"{only_weaker} samples broken by {weaker} only"})
    return checks


def evaluate(model, images, labels, eps, args, num_classes, device, partial=None):
    """The suite on (images, labels): the results dict written as JSON. With `partial` = (path,
    settings), each finished column is saved at once in `path`, and the columns a previous call
    with the same settings finished are taken from there instead of being attacked again."""
    names = parse_suite(args.attacks, args.norm)
    correct = clean_correct(model, images, labels, args.batch_size, device)
    results = {"nominal": {"accuracy": correct.float().mean().item(), "robust": correct.tolist()}}
    finished = read_partial(*partial) if partial else {}
    worst = correct.clone()
    for name in names:
        if name not in finished:
            options = attack_options(name, args, num_classes)
            every = name == "random-targeted"  # its success rate is over all images; the others attack the correct
            robust, counts, seconds = run_attack(model, images, labels, eps, name, options, num_classes,
                                                 args.batch_size, device, args.seed, only=None if every else correct,
                                                 desc=f"{SUITE[name][0]} ({'all' if every else 'correctly classified'} "
                                                      f"images)")
            defaults = inspect.signature(SUITE[name][1]).parameters  # the attack holds its defaults
            steps, restarts = (options.get(k, defaults[k].default)
                               for k in ("queries" if name == "square" else "steps", "restarts"))  # Square: queries
            finished[name] = {"options": options, "steps": steps, "restarts": restarts,
                              "invalid_examples": counts["invalid"], "reattacked": counts["reattacked"],
                              "unverified": counts["unverified"], "time_s": round(seconds, 2), "robust": robust.tolist()}
            if partial:
                write_json(partial[0], {"settings": partial[1], "columns": finished})
        entry = dict(finished[name])
        robust = torch.tensor(entry["robust"], dtype=torch.bool)
        if name == "random-targeted":
            entry["success_rate"] = 1 - robust.float().mean().item()
        else:  # a misclassified clean image is not robust (and is not attacked)
            worst &= robust
            entry.update(accuracy=robust.float().mean().item(), worst_case_accuracy=worst.float().mean().item())
        results[name] = entry
    results["worst_case"] = {"accuracy": worst.float().mean().item(), "robust": worst.tolist()}
    return results


def read_partial(path, settings):
    """The columns an interrupted evaluation with the same settings finished (empty if none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    if saved.get("settings") != settings:
        tqdm.write(f"{path} belongs to an evaluation with other settings: starting afresh")
        return {}
    tqdm.write(f"continuing the evaluation saved in {path}: {', '.join(saved['columns'])} done")
    return saved["columns"]


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


def strength_sweep(model, images, labels, eps, args, num_classes, device):
    """Untargeted and Multi-Targeted accuracy at growing strengths (steps x restarts; the paper's
    Fig. 3). Each point attacks only the samples still robust after the weaker points, with a new
    seed, so the per-sample worst case carries over and a curve never rises."""
    correct = clean_correct(model, images, labels, args.batch_size, device)
    curves = {}
    for name in ("untargeted", "multi-targeted"):
        robust, points = correct.clone(), []
        for k, (steps, restarts) in enumerate(parse_strengths(args.strengths)):
            options = {**attack_options(name, args, num_classes), "steps": steps, "restarts": restarts}
            rows = robust.nonzero().squeeze(1)
            seconds = 0.0
            if len(rows):
                still, _, seconds = run_attack(model, images[rows], labels[rows], eps, name, options, num_classes,
                                               args.batch_size, device, args.seed + 1000 * k,
                                               desc=f"strength {steps}x{restarts}: {name}")
                robust[rows] = still
            targets = options.get("num_targets", 1)
            points.append({"steps": steps, "restarts": restarts, "gradient_evaluations": steps * restarts * targets,
                           "accuracy": robust.float().mean().item(), "time_s": round(seconds, 2),
                           "robust": robust.tolist()})
        curves[name] = points
    return {"nominal": correct.float().mean().item(), "curves": curves}


def import_autoattack():
    """pyautoattack's AutoAttack, or a one-line error saying how to install it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ValueError(f"--autoattack needs the optional package pyautoattack: run `make install-extras` "
                         f"(or pip install pyautoattack=={AUTOATTACK_VERSION})") from None
    return AutoAttack


def autoattack_options(args):
    if args.aa_version == "custom":
        attacks = [a.strip() for a in (args.aa_attacks or "").split(",") if a.strip()]
        if not attacks or any(a not in AA_ATTACKS for a in attacks):
            raise ValueError(f"--aa-version custom needs --aa-attacks from {', '.join(AA_ATTACKS)}")
        return {"version": "custom", "attacks": attacks}
    if args.aa_attacks:
        raise ValueError("--aa-attacks goes with --aa-version custom")
    return {"version": args.aa_version}


class _Warnings(logging.Handler):
    """Collects AutoAttack's own warnings (its checks for randomised defences, probabilities as
    outputs, dynamic models...)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if record.getMessage() not in self.messages:
            self.messages.append(record.getMessage())


def run_autoattack(model, images, labels, eps, args, device, state_path):
    """AutoAttack on the same images, chunk by chunk. Each chunk's adversarial examples are
    verified as the suite's are (ball, box, a fresh forward pass) and its verified per-sample
    result is saved in `state_path` at once, so an interrupted run continues with the next chunk.
    (pyautoattack's own state file cannot serve: after a resume it returns only the examples of
    the current run, which could then not be verified.)"""
    AutoAttack = import_autoattack()
    options = autoattack_options(args)
    config = {"checkpoint": args.checkpoint, "norm": args.norm, "eps": eps, "n": len(labels), "seed": args.seed,
              "chunk": args.batch_size, "bf16": args.bf16, **options}
    state = {"config": config, "chunks": {}}
    if os.path.exists(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        if saved["config"] != config:
            raise ValueError(f"{state_path} belongs to another evaluation ({saved['config']}); delete it or use --out")
        state = saved
        tqdm.write(f"AutoAttack: continuing from {state_path} ({len(state['chunks'])} chunks done)")
    log = _Warnings()
    logging.getLogger("auto-attack").addHandler(log)
    try:
        for start in tqdm(range(0, len(labels), args.batch_size), desc=f"AutoAttack ({options['version']})", leave=False):
            if str(start) in state["chunks"]:
                continue
            begin = time.time()
            x = images[start:start + args.batch_size].to(device).float() / 255
            y = labels[start:start + args.batch_size].to(device)
            adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[args.norm], eps=eps, seed=args.seed + start,
                                   device=device, **options)
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=args.batch_size)
            valid, broken, _ = verify(model, x, x_adv, eps, y, norm=args.norm)
            state["chunks"][str(start)] = {"robust": (~broken).tolist(), "invalid": int((~valid).sum()),
                                           "time_s": time.time() - begin, "warnings": list(log.messages)}
            write_json(state_path, state)
    finally:
        logging.getLogger("auto-attack").removeHandler(log)
    chunks = [state["chunks"][str(start)] for start in range(0, len(labels), args.batch_size)]
    robust = [r for c in chunks for r in c["robust"]]
    warnings = sorted({w for c in chunks for w in c["warnings"]})
    return {**options, "package_version": AUTOATTACK_VERSION, "accuracy": sum(robust) / len(robust),
            "robust": robust, "invalid_examples": sum(c["invalid"] for c in chunks),
            "time_s": round(sum(c["time_s"] for c in chunks), 2), "warnings": warnings}


def cross_check(suite_robust, autoattack_robust):
    """Per-sample agreement of the suite's worst case and AutoAttack's result."""
    pairs = list(zip(suite_robust, autoattack_robust))
    return {"autoattack_only": sum(s and not a for s, a in pairs),  # broken by AutoAttack, not by the suite
            "suite_only": sum(a and not s for s, a in pairs),
            "both": sum(not s and not a for s, a in pairs),
            "autoattack_only_indices": [i for i, (s, a) in enumerate(pairs) if s and not a]}


def add_autoattack(results, autoattack, checks, n):
    """Worst case over the suite and AutoAttack, the cross-check, and its two report lines."""
    worst = [s and a for s, a in zip(results["worst_case"]["robust"], autoattack["robust"])]
    results["autoattack"] = autoattack
    results["worst_case_with_autoattack"] = {"accuracy": sum(worst) / n, "robust": worst}
    counts = cross_check(results["worst_case"]["robust"], autoattack["robust"])
    checks.append({"name": "AutoAttack finds little that the suite missed",
                   "ok": counts["autoattack_only"] <= AUTOATTACK_MISS_SHARE * n,
                   "detail": f"AutoAttack broke {counts['autoattack_only']} images the suite did not (flag above "
                             f"{100 * AUTOATTACK_MISS_SHARE:g}% of {n}); the suite broke {counts['suite_only']} "
                             f"that AutoAttack did not"})
    checks.append({"name": "AutoAttack's own checks (randomised defence, output range, dynamic model, classes)",
                   "ok": not autoattack["warnings"], "detail": "; ".join(autoattack["warnings"]) or "no warnings"})
    return counts


CERTIFY_RADII = {"36/255": 36 / 255, "72/255": 72 / 255, "108/255": 108 / 255}


def certify(model, images, labels, eps, worst_robust, batch_size, device):
    """Per image, the certified ℓ2 radius (soc.certified_radius); the certified accuracy at the
    papers' radii and at ε; and the images certified at ε that an attack broke (a contradiction:
    a bug in the certificate or in the attack)."""
    import soc

    constants = soc.certificate_constants(model)
    radius = torch.cat([soc.certified_radius(model, x, y, constants).cpu()
                        for _, x, y in batches(images, labels, batch_size, device)])
    at = {name: (radius > r).float().mean().item() for name, r in {**CERTIFY_RADII, "eps": eps}.items()}
    contradictions = [i for i, (r, robust) in enumerate(zip(radius.tolist(), worst_robust)) if r > eps and not robust]
    return {"radius": radius.tolist(), "certified_accuracy": at, "contradictions": contradictions,
            "features_lipschitz": constants["features_lipschitz"]}


def write_json(path, obj):
    """`obj` as JSON at `path`, atomically (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def print_table(report):
    r = report["results"]
    print(f"\n{report['checkpoint']}  ({report['model']['arch']} {report['model']['activation']})  "
          f"{report['norm']} eps = {report['eps_text']}  {report['n_images']} {report['dataset']} {report['split']} images"
          f"  seed {report['seed']}")
    print(f"{'':32s}{'accuracy':>10s}{'worst case':>12s}{'steps x restarts':>18s}{'time':>9s}")
    print(f"{'Nominal':32s}{100 * r['nominal']['accuracy']:9.2f}%{100 * r['nominal']['accuracy']:11.2f}%")
    for name, (label, _) in SUITE.items():
        if name not in r:
            continue
        e = r[name]
        budget = f"{e['steps']} x {e['restarts']}"
        if name == "random-targeted":  # not an accuracy: how often it reached its target, over all images
            print(f"{label:32s}{100 * e['success_rate']:9.2f}%{'':12s}{budget:>18s}{e['time_s']:8.1f}s"
                  f"  (target reached, over all {report['n_images']} images)")
        else:
            print(f"{label:32s}{100 * e['accuracy']:9.2f}%{100 * e['worst_case_accuracy']:11.2f}%"
                  f"{budget:>18s}{e['time_s']:8.1f}s")
    if "autoattack" in r:
        aa, both = r["autoattack"], r["worst_case_with_autoattack"]["accuracy"]
        attacks_run = ",".join(aa.get("attacks", [])) or aa["version"]
        print(f"{'AutoAttack (' + attacks_run + ')':32s}{100 * aa['accuracy']:9.2f}%{100 * both:11.2f}%"
              f"{'':18s}{aa['time_s']:8.1f}s")
        c = report["cross_check"]
        print(f"cross-check: AutoAttack broke {c['autoattack_only']} images the suite did not, "
              f"the suite broke {c['suite_only']} that AutoAttack did not, both broke {c['both']}")
    invalid = sum(e.get("invalid_examples", 0) for e in r.values())
    reattacked = sum(e.get("reattacked", 0) for e in r.values())
    unverified = sum(e.get("unverified", 0) for e in r.values())
    print(f"verification: {invalid} adversarial examples outside the ball or box; {reattacked} samples attacked "
          f"again (a break that did not verify, or nearly broken); {unverified} still doubtful, counted robust")
    if "gamma" in report:
        g = report["gamma"]
        print(f"gamma(eps, x): mean {g['mean']:.4f}  median {g['median']:.4f}  p90 {g['p90']:.4f}  max {g['max']:.4f}")
    o = report["obfuscation"]
    if o["drop_weak_to_worst"] is not None:
        print(f"obfuscation report: FGSM-20 to worst case drops {100 * o['drop_weak_to_worst']:.2f} points")
    for check in o["checks"]:
        print(f"  [{'ok' if check['ok'] else 'FLAG'}] {check['name']}: {check['detail']}")
    if "certificates" in report:
        c = report["certificates"]
        radii = {("ε = " + report["eps_text"] if name == "eps" else name): a
                 for name, a in c["certified_accuracy"].items()}
        print("certified ℓ2 accuracy at radius " + "  ".join(f"{name}: {100 * a:.2f}%" for name, a in radii.items())
              + f"  (empirical at {report['eps_text']}: {100 * r['worst_case']['accuracy']:.2f}%)")
        if c["contradictions"]:
            print(f"CONTRADICTION: {len(c['contradictions'])} images certified at {report['eps_text']} were broken "
                  f"by an attack (e.g. image {c['contradictions'][0]}): the certificate or the attack is wrong",
                  file=sys.stderr)


def main(argv=None):
    args = get_args(argv)
    mode = "surface" if args.surface else "strength" if args.strength else "gamma" if args.gamma_sweep else "eval"
    try:  # set-up errors are the user's to fix: one line, non-zero exit
        check_args(args)
        args.checkpoint = resolve_checkpoint(args.checkpoint)
        meta = models.read_checkpoint_metadata(args.checkpoint)
        config = meta["config"]
        args.norm = args.norm or meta.get("norm", "linf")
        if args.eps is None:
            cli.require(isinstance(meta.get("eps"), (int, float)),
                        f"{args.checkpoint} does not record the ε it was trained at: give --eps (e.g. 8/255)")
            eps = float(meta["eps"])
            args.eps = f"{255 * eps:.4g}/255"
            print(f"{ball.describe_eps(eps, args.norm)}, as the checkpoint was trained (--eps to change it)")
        else:
            eps = ball.parse_eps(args.eps, args.norm)
        radius = ball.parse_eps(args.surface_radius) if args.surface_radius else eps
        parse_suite(args.attacks, args.norm)
        parse_strengths(args.strengths)
        gamma_steps = parse_gamma_sweep(args.gamma_sweep) if args.gamma_sweep else []
        cli.require(sum(map(bool, (args.surface, args.strength, args.gamma_sweep))) <= 1,
                    "--surface, --strength and --gamma-sweep each replace the suite: choose one")
        cli.require(not (args.surface and args.norm == "l2"), "--surface draws the ℓ∞ ball (sign directions); "
                                                               "it has no --norm l2")
        cli.require(not args.certify or (args.norm == "l2" and config["arch"].startswith("lipconvnet")),
                    "--certify gives ℓ2 certificates of a lipconvnet model: it needs one, and --norm l2")
        if args.autoattack:
            import_autoattack()
            autoattack_options(args)
        dataset = args.dataset or meta.get("dataset") or config["normalization"]
        recorded = meta.get("data_dir") if meta.get("data_dir") and os.path.isdir(meta["data_dir"]) else None
        data_dir = args.data_dir or recorded or ("data/cifar10" if dataset == "cifar10" else None)
        cli.require(data_dir is not None, "--data-dir is required for ImageNet (a folder with val/<wnid>/*.JPEG)")
        model = models.load_checkpoint(args.checkpoint, map_location=args.device)
        n = max(args.surface) + 1 if args.surface else args.n
        conflict = selection_conflict(meta, args.split, n)
        cli.require(not conflict or args.allow_selection_images,
                    f"{conflict}: its numbers there are biased upwards; evaluate on --split test, or pass "
                    f"--allow-selection-images to do it anyway")
        holdout_n = meta.get("selection", {}).get("holdout_n") or {"cifar10": 1000, "imagenet": 10000}[dataset]
        images, labels, classes = load_images(dataset, data_dir, args.split, n, meta.get("image_size", 224), holdout_n)
        cli.require(meta.get("classes") in (None, classes),
                    f"the classes in {data_dir} ({', '.join(classes[:4])}, ...) are not those the checkpoint was "
                    f"trained on ({', '.join(meta.get('classes', [])[:4])}, ...): labels would not match")
        cli.require(not args.surface or max(args.surface) < len(labels),
                    f"--surface index {max(args.surface or [0])} is beyond the {len(labels)} images")
        out = args.out or os.path.splitext(args.checkpoint)[0] + f".{mode}.json"
        out = os.path.join(out, f"{mode}.json") if os.path.isdir(out) else out
        check_writable(out)
        if args.n > len(labels):
            print(f"--n {args.n}: the {args.split} split has {len(labels)} images; evaluating all {len(labels)}")
    except (ValueError, OSError, data.DataError) as e:
        sys.exit(f"eval.py: error: {e}")
    evaluated = Autocast(model, torch.bfloat16) if args.bf16 else model
    start = time.time()
    report = {"mode": mode, "checkpoint": args.checkpoint, "model": config, "dataset": dataset, "data_dir": data_dir,
              "eps": eps, "eps_text": args.eps, "norm": args.norm, "split": args.split, "selection_conflict": conflict,
              "n_images": len(labels), "seed": args.seed, "bf16": args.bf16,
              "device": str(args.device), "device_name": device_name(args.device), "torch": torch.__version__,
              "training": {k: v for k, v in meta.items() if k != "config"}}
    if mode == "surface":
        report["surface"] = [{"index": i, **loss_surface(evaluated, images[i:i + 1].to(args.device).float() / 255,
                                                         labels[i:i + 1].to(args.device), eps, radius,
                                                         args.surface_grid, args.seed, args.batch_size)}
                             for i in args.surface]
        print(f"loss surfaces of {args.checkpoint} around test images {args.surface}: "
              f"{args.surface_grid}x{args.surface_grid} grid, radius {radius:.5f}, eps {args.eps}")
    elif mode == "gamma":
        report["gamma_sweep"] = [measure_gamma(model, images, labels, eps, args.batch_size, args.device, args.seed,
                                               args.norm, steps) for steps in gamma_steps]
        print(f"{args.checkpoint}  eps = {args.eps}  {len(labels)} images; γ(ε, x) found by k steps of the search:")
        for g in report["gamma_sweep"]:
            print(f"  {g['steps']:4d} steps: mean {g['mean']:.4f}  median {g['median']:.4f}  p90 {g['p90']:.4f}")
    elif mode == "strength":
        report["strength"] = strength_sweep(evaluated, images, labels, eps, args, config["num_classes"], args.device)
        print(f"{args.checkpoint}  eps = {args.eps}  {len(labels)} images; accuracy (worst case so far):")
        for name, points in report["strength"]["curves"].items():
            print(f"  {name:15s}" + "  ".join(f"{p['steps']}x{p['restarts']}: {100 * p['accuracy']:.2f}%"
                                                for p in points))
    else:
        report["labels"] = labels.tolist()
        settings = {k: report[k] for k in ("checkpoint", "eps", "norm", "split", "n_images", "seed", "bf16", "device")}
        settings.update(checkpoint_mtime=os.path.getmtime(args.checkpoint), batch_size=args.batch_size,
                        options={name: attack_options(name, args, config["num_classes"])
                                 for name in parse_suite(args.attacks, args.norm)})
        results = evaluate(evaluated, images, labels, eps, args, config["num_classes"], args.device,
                           partial=(out + ".partial.json", settings))
        report["results"] = results
        if args.gamma:
            report["gamma"] = measure_gamma(model, images, labels, eps, args.batch_size, args.device, args.seed,
                                            args.norm)
        weak = results.get("fgsm20", {}).get("accuracy")
        report["obfuscation"] = {
            "drop_weak_to_worst": None if weak is None else weak - results["worst_case"]["accuracy"],
            "checks": sanity_checks(evaluated, images, labels, eps, results, args, config["num_classes"], args.device)}
        if args.autoattack:
            state_path = out + ".autoattack-state.json"
            try:
                autoattack = run_autoattack(evaluated, images, labels, eps, args, args.device, state_path)
            except ValueError as e:
                sys.exit(f"eval.py: error: {e}")
            report["cross_check"] = add_autoattack(results, autoattack, report["obfuscation"]["checks"], len(labels))
        if args.certify:
            worst = results.get("worst_case_with_autoattack", results["worst_case"])["robust"]
            report["certificates"] = certify(model, images, labels, eps, worst, args.batch_size, args.device)
        print_table(report)
    report["time_s"] = round(time.time() - start, 2)
    write_json(out, report)
    for leftover in (out + ".autoattack-state.json", out + ".partial.json"):  # their results are in the report now
        if os.path.exists(leftover):
            os.remove(leftover)
    print(f"wrote {out}")
    if report.get("certificates", {}).get("contradictions"):
        sys.exit(f"eval.py: error: certificates contradicted by attacks on {len(report['certificates']['contradictions'])}"
                 f" images (see {out})")
    return report


if __name__ == "__main__":
    main()
