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
import argparse
import inspect
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import attacks
import data
import llr
import models

SUITE = {  # name: (table label, attack); the order is the worst-case order
    "fgsm20": ("FGSM-20 (weak)", attacks.fgsm_k),
    "untargeted": ("Untargeted (strong)", attacks.untargeted),
    "multi-targeted": ("Multi-Targeted (very strong)", attacks.multi_targeted),
    "random-targeted": ("Random-Targeted success", attacks.random_targeted),
    "deepfool": ("DeepFool", attacks.deepfool_linf),
}
DEFAULT_SUITE = "fgsm20,untargeted,multi-targeted,random-targeted"
BALL_TOLERANCE = 1e-6  # float32 rounding of x ± ε; anything further out is not counted


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by the training scripts")
    p.add_argument("--eps", required=True, help="ℓ∞ radius in pixel units, e.g. 8/255")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["cifar10", "imagenet"], help="default: the checkpoint's")
    g.add_argument("--data-dir", help="default: data/cifar10 for CIFAR-10; required for ImageNet")
    g.add_argument("--n", type=int, default=1000, help="evaluate the first N test images (default 1000)")
    g.add_argument("--batch-size", type=int, default=256)
    g = p.add_argument_group("attacks")
    g.add_argument("--attacks", default=DEFAULT_SUITE, help=f"comma-separated, from {', '.join(SUITE)}")
    g.add_argument("--steps", type=int, help="steps of the strong attacks (default: each attack's, 100)")
    g.add_argument("--restarts", type=int, help="restarts of the strong attacks (default: untargeted and "
                   "random-targeted 5, multi-targeted 1 per target)")
    g.add_argument("--num-targets", type=int, help="multi-targeted: top-k target classes (default: all, at most 20)")
    g.add_argument("--optimizer", choices=["sign", "adam"], default="sign",
                   help="signed-gradient PGD with a cosine step, or Adam lr 0.1 (the authors')")
    g.add_argument("--fgsm-steps", type=int, default=20, help="k of the weak FGSM-k attack (paper: 20)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("extra measurements")
    g.add_argument("--gamma", action="store_true", help="γ(ε, x) with 50 Adam steps, lr 0.1 (Fig. F3)")
    g.add_argument("--no-sanity", action="store_true", help="skip the sanity checks' extra attacks")
    g = p.add_argument_group("run")
    g.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--out", help="JSON path (default: CHECKPOINT with .eval.json)")
    return p.parse_args(argv)


class Autocast(torch.nn.Module):
    """The model under autocast, returning float32 logits."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def load_test_images(dataset, data_dir, n, image_size):
    """The first n test images (uint8 [n, 3, H, W]) and labels [n]: CIFAR-10's test set, or ImageNet's
    validation set in a fixed random order, resized to 256/224 of `image_size` and center-cropped."""
    if dataset == "cifar10":
        images, labels, _ = data.load_cifar10(data_dir, "test")
        return images[:n], labels[:n]
    return data.load_folder_subset(os.path.join(data_dir, "val"), n, image_size)


def batches(images, labels, batch_size, device):
    for i in range(0, len(labels), batch_size):
        yield i, images[i:i + batch_size].to(device).float() / 255, labels[i:i + batch_size].to(device)


def parse_suite(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; choose from {', '.join(SUITE)}")
    return names


def check_adversarial(model, x, x_adv, eps):
    """Per sample: is x_adv inside the ε-ball around x and inside [0, 1] (in x's dtype), and the
    prediction of a fresh forward pass on it. Only valid examples may count as breaks."""
    x_adv = x_adv.to(x.dtype)
    dist = (x_adv - x).abs().flatten(1).amax(1)
    valid = (dist <= eps + BALL_TOLERANCE) & (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)
    with torch.no_grad():
        return valid, model(x_adv).argmax(1)


def attack_options(name, args, num_classes):
    """Keyword options of each attack from the command line (absent: the attack's default)."""
    if name == "fgsm20":
        return {"steps": args.fgsm_steps}
    if name == "deepfool":
        return {}
    options = {"optimizer": args.optimizer}
    options.update({k: v for k, v in (("steps", args.steps), ("restarts", args.restarts)) if v is not None})
    if name == "multi-targeted":
        options["num_targets"] = min(num_classes - 1, args.num_targets or 20)
    return options


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_attack(model, images, labels, eps, name, options, num_classes, batch_size, device, seed):
    """One attack over all images. Returns, per sample on the CPU, `robust` [N] (for
    random-targeted: the attack did *not* reach its target), the number of invalid
    adversarial examples (counted as robust), and the seconds taken."""
    fn = SUITE[name][1]
    robust, invalid = [], 0
    _sync(device)
    start = time.time()
    for i, x, y in tqdm(batches(images, labels, batch_size, device), total=-(-len(labels) // batch_size),
                        desc=SUITE[name][0], leave=False):
        seed_i = seed + i  # another random stream for each batch
        if name == "random-targeted":
            target = attacks.random_targets(y, num_classes, seed_i)
            valid, pred = check_adversarial(model, x, fn(model, x, y, eps, target=target, seed=seed_i, **options), eps)
            robust.append(~(valid & (pred == target)))
        else:
            valid, pred = check_adversarial(model, x, fn(model, x, y, eps, seed=seed_i, **options), eps)
            robust.append(~valid | (pred == y))
        invalid += int((~valid).sum())
    _sync(device)
    return torch.cat(robust).cpu(), invalid, time.time() - start


def clean_correct(model, images, labels, batch_size, device):
    with torch.no_grad():
        return torch.cat([(model(x).argmax(1) == y).cpu() for _, x, y in batches(images, labels, batch_size, device)])


def measure_gamma(model, images, labels, eps, batch_size, device, seed):
    """γ(ε, x) per image with `llr.local_linearity` (50 Adam steps, lr 0.1), as the paper's Fig. F3."""
    values = []
    for i, x, y in tqdm(batches(images, labels, batch_size, device), total=-(-len(labels) // batch_size),
                        desc="gamma", leave=False):
        generator = torch.Generator(device=x.device).manual_seed(seed + i)
        values.append(llr.local_linearity(model, x, y, eps, steps=50, lr=0.1, generator=generator)[0].cpu())
    values = torch.cat(values).double()
    q = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=values.dtype)
    p10, p50, p90, p99 = values.quantile(q).tolist()
    return {"steps": 50, "lr": 0.1, "mean": values.mean().item(), "median": p50, "p10": p10, "p90": p90,
            "p99": p99, "max": values.max().item(), "values": values.tolist()}


def sanity_checks(model, images, labels, eps, results, args, num_classes, device):
    """Checks a reviewer asks for (Athalye et al. 2018, Carlini et al. 2019), each with ok=False
    when violated: accuracy reaches 0 as ε grows; fewer steps do not beat more; a stronger
    attack is not weaker than a weaker one, in total or per sample."""
    checks = []
    if not args.no_sanity:
        big = 0.5
        robust, _, _ = run_attack(model, images, labels, big, "untargeted", {"steps": 20, "restarts": 1},
                                  num_classes, args.batch_size, device, args.seed)
        acc = robust.float().mean().item()
        checks.append({"name": "accuracy reaches 0 as eps grows", "ok": acc == 0,
                       "detail": f"Untargeted 20 steps at eps = {big}: {100 * acc:.1f}%"})
        if "untargeted" in results:
            full = results["untargeted"]
            steps = max(1, full["steps"] // 4)
            weak_options = {**attack_options("untargeted", args, num_classes), "steps": steps, "restarts": 1}
            robust, _, _ = run_attack(model, images, labels, eps, "untargeted", weak_options, num_classes,
                                      args.batch_size, device, args.seed + 10**6)
            weak_acc = robust.float().mean().item()
            checks.append({"name": "more steps never help the model", "ok": weak_acc >= full["accuracy"],
                           "detail": f"Untargeted {steps} steps x 1: {100 * weak_acc:.1f}% vs "
                                     f"{full['steps']} x {full['restarts']}: {100 * full['accuracy']:.1f}%"})
    order = [n for n in ("fgsm20", "untargeted", "multi-targeted") if n in results]
    for weaker, stronger in zip(order, order[1:]):
        w, s = results[weaker], results[stronger]
        only_weaker = sum(a and not b for a, b in zip(s["robust"], w["robust"]))  # broken by weaker only
        checks.append({"name": f"{stronger} is not weaker than {weaker}",
                       "ok": s["accuracy"] <= w["accuracy"],
                       "detail": f"{100 * w['accuracy']:.1f}% -> {100 * s['accuracy']:.1f}%; "
                                 f"{only_weaker} samples broken by {weaker} only"})
    return checks


def evaluate(model, images, labels, eps, args, num_classes, device):
    """The suite on (images, labels): the results dict written as JSON."""
    names = parse_suite(args.attacks)
    correct = clean_correct(model, images, labels, args.batch_size, device)
    results = {"nominal": {"accuracy": correct.float().mean().item(), "robust": correct.tolist()}}
    worst = correct.clone()
    for name in names:
        options = attack_options(name, args, num_classes)
        robust, invalid, seconds = run_attack(model, images, labels, eps, name, options, num_classes,
                                              args.batch_size, device, args.seed)
        defaults = inspect.signature(SUITE[name][1]).parameters  # the attack holds its defaults
        steps, restarts = (options.get(k, defaults[k].default) for k in ("steps", "restarts"))
        entry = {"options": options, "steps": steps, "restarts": restarts, "invalid_examples": invalid,
                 "time_s": round(seconds, 2), "robust": robust.tolist()}
        if name == "random-targeted":
            entry["success_rate"] = 1 - robust.float().mean().item()
        else:
            robust &= correct  # a misclassified clean image is not robust
            worst &= robust
            entry.update(accuracy=robust.float().mean().item(), worst_case_accuracy=worst.float().mean().item(),
                         robust=robust.tolist())
        results[name] = entry
    results["worst_case"] = {"accuracy": worst.float().mean().item(), "robust": worst.tolist()}
    return results


def print_table(report):
    r = report["results"]
    print(f"\n{report['checkpoint']}  ({report['model']['arch']} {report['model']['activation']})  "
          f"eps = {report['eps_text']}  {report['n_images']} {report['dataset']} test images  seed {report['seed']}")
    print(f"{'':32s}{'accuracy':>10s}{'worst case':>12s}{'steps x restarts':>18s}{'time':>9s}")
    print(f"{'Nominal':32s}{100 * r['nominal']['accuracy']:9.2f}%{100 * r['nominal']['accuracy']:11.2f}%")
    for name, (label, _) in SUITE.items():
        if name not in r:
            continue
        e = r[name]
        budget = f"{e['steps']} x {e['restarts']}"
        if name == "random-targeted":
            print(f"{label:32s}{100 * e['success_rate']:9.2f}%{'':12s}{budget:>18s}{e['time_s']:8.1f}s")
        else:
            print(f"{label:32s}{100 * e['accuracy']:9.2f}%{100 * e['worst_case_accuracy']:11.2f}%"
                  f"{budget:>18s}{e['time_s']:8.1f}s")
    invalid = sum(e.get("invalid_examples", 0) for e in r.values())
    print(f"{invalid} adversarial examples failed verification (counted as robust)")
    if "gamma" in report:
        g = report["gamma"]
        print(f"gamma(eps, x): mean {g['mean']:.4f}  median {g['median']:.4f}  p90 {g['p90']:.4f}  max {g['max']:.4f}")
    o = report["obfuscation"]
    if o["drop_weak_to_worst"] is not None:
        print(f"obfuscation report: FGSM-20 to worst case drops {100 * o['drop_weak_to_worst']:.2f} points")
    for check in o["checks"]:
        print(f"  [{'ok' if check['ok'] else 'FLAG'}] {check['name']}: {check['detail']}")


def main(argv=None):
    args = get_args(argv)
    try:  # set-up errors are the user's to fix: one line, non-zero exit
        eps = attacks.parse_eps(args.eps)
        parse_suite(args.attacks)
        meta = models.read_checkpoint_metadata(args.checkpoint)
        config = meta["config"]
        dataset = args.dataset or meta.get("dataset") or config["normalization"]
        data_dir = args.data_dir or ("data/cifar10" if dataset == "cifar10" else None)
        if data_dir is None:
            raise ValueError("--data-dir is required for ImageNet (a folder with val/<wnid>/*.JPEG)")
        model = models.load_checkpoint(args.checkpoint, map_location=args.device)
        images, labels = load_test_images(dataset, data_dir, args.n, meta.get("image_size", 224))
    except (ValueError, OSError, data.DataError) as e:
        sys.exit(f"eval.py: error: {e}")
    evaluated = Autocast(model, torch.bfloat16) if args.bf16 else model
    start = time.time()
    report = {"checkpoint": args.checkpoint, "model": config, "dataset": dataset, "data_dir": data_dir,
              "eps": eps, "eps_text": args.eps, "n_images": len(labels), "seed": args.seed, "bf16": args.bf16,
              "device": str(args.device), "torch": torch.__version__, "labels": labels.tolist(),
              "training": {k: v for k, v in meta.items() if k != "config"}}
    results = evaluate(evaluated, images, labels, eps, args, config["num_classes"], args.device)
    report["results"] = results
    if args.gamma:
        report["gamma"] = measure_gamma(model, images, labels, eps, args.batch_size, args.device, args.seed)
    weak = results.get("fgsm20", {}).get("accuracy")
    report["obfuscation"] = {
        "drop_weak_to_worst": None if weak is None else weak - results["worst_case"]["accuracy"],
        "checks": sanity_checks(evaluated, images, labels, eps, results, args, config["num_classes"], args.device)}
    report["time_s"] = round(time.time() - start, 2)
    print_table(report)
    out = args.out or os.path.splitext(args.checkpoint)[0] + ".eval.json"
    with open(out + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
