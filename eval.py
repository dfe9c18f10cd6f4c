"""Evaluate a checkpoint under the paper's attack suite (Table 2): print a table, write JSON.

    python eval.py runs/cifar-llr/best.safetensors --eps 8/255                  # 1,000 test images
    python eval.py runs/cifar-llr/best.safetensors --eps 8/255 --n 10000 --gamma
    python eval.py CKPT --eps 4/255 --data-dir /data/imagenet --num-targets 20 --bf16   # ImageNet

Columns: Nominal, FGSM (one step of ε, the attack a model that masks its gradients from single
steps resists), FGSM-20 (weak), Untargeted (strong), Multi-Targeted (very strong), Square
(gradient-free), each as its own accuracy and as the per-sample worst case over it and every
column before it (a sample an earlier column broke is never counted robust), plus the Random-Targeted
success rate. Every counted adversarial example is checked first: inside the ε-ball and [0, 1],
and misclassified by a fresh forward pass. The obfuscation report lists the drops from the weak
attacks to the worst case and the sanity checks of Athalye et al. (2018) and Carlini et al.
(2019), each flagged when violated.

Beside the suite: `--autoattack` cross-checks it (autoattack_check.py); `--surface`, `--strength`
and `--gamma-sweep` replace it with the data behind plots.py's figures (probe.py). What the three
share, running one attack with every break verified, lives below them in suite.py.
"""
import inspect
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import autoattack_check
import ball
import cli
import data
import models
import probe
import suite

GRADIENT_FREE_MISS_SHARE = 0.01  # flag the model when Square breaks more than 1% of the gradient attacks' survivors
# Flag single-step masking (catastrophic overfitting) when the worst case of the other attacks is at most
# SINGLE_STEP_RATIO of one FGSM step's accuracy (as the collapse rule, experiments/common.collapsed) and at
# least SINGLE_STEP_GAP_POINTS percentage points below it (a few images of difference are noise, not masking).
SINGLE_STEP_RATIO = 0.5
SINGLE_STEP_GAP_POINTS = 5


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
    g.add_argument("--attacks", default=suite.DEFAULT_SUITE, help=f"comma-separated, from {', '.join(suite.SUITE)}")
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
    g.add_argument("--aa-attacks", help="with --aa-version custom: comma-separated, from "
                                        + ", ".join(autoattack_check.AA_ATTACKS))
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
    g.add_argument("--out", help="a .json path, or a directory (existing, or a path ending in /, then created) "
                                 "to hold one report per checkpoint, named after it: runs/x/best.safetensors -> "
                                 "DIR/x.best.eval.json (in the checkpoint's own directory best.eval.json); any other "
                                 "path is refused (unset: beside the checkpoint, CHECKPOINT.eval.json, .surface.json, "
                                 ".strength.json or .gamma.json). A report with other settings (images, attacks, "
                                 "steps, seed, ε, ...) is never replaced: choose another --out. Each finished attack "
                                 "column is kept in OUT.partial.json until the end, and a run with the same settings "
                                 "continues from it")
    return p.parse_args(argv)


def output_path(out, checkpoint, mode):
    """The JSON path of --out `out`, checked writable before any attack (ValueError, one line).
    None: beside the checkpoint, CHECKPOINT.MODE.json. A directory (existing, or named with a
    trailing separator and then created): a file named after the checkpoint, RUN.CHECKPOINT.MODE.json
    (runs/x/best.safetensors -> x.best.eval.json), so that the reports of several checkpoints sit
    side by side; in the checkpoint's own directory CHECKPOINT.MODE.json, as beside it. Else a path
    ending in .json; anything else (`--out results2`) is refused rather than written as a file of
    that name. A file path in a missing directory stays an error: more likely a typo than a wish."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    path = out or os.path.join(os.path.dirname(checkpoint), f"{stem}.{mode}.json")
    try:
        if path.endswith(("/", os.sep)):
            os.makedirs(path, exist_ok=True)
        if os.path.isdir(path):
            folder = os.path.dirname(os.path.abspath(checkpoint))
            own = os.path.samefile(path, folder)
            named = f"{stem}.{mode}.json" if own else f"{os.path.basename(folder)}.{stem}.{mode}.json"
            path = os.path.join(path, named)
        elif not path.endswith(".json"):
            raise ValueError(f"--out {out}: neither a directory nor a .json file; write {out}/ for a directory "
                             f"(created if missing) or {out}.json for a file")
        with open(path + ".tmp", "w"):
            pass
        os.remove(path + ".tmp")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from None
    return path


def evaluation_settings(args, mode, eps, n_images, num_classes):
    """What an evaluation measures, recorded in its report ("settings") and compared with the
    report already at its path before any work: the mode, the checkpoint, ε, the norm, the images,
    the seed, bf16 and, for the suite, each attack's options, --gamma and AutoAttack's options;
    for the figure modes, their flags. The batch size and the device are not settings: they do not
    change what is measured."""
    settings = {"mode": mode, "checkpoint": cli.record_path(args.checkpoint), "eps": eps, "norm": args.norm,
                "split": args.split, "n_images": n_images, "seed": args.seed, "bf16": args.bf16}
    if mode == "eval":
        settings["attacks"] = {name: suite.attack_options(name, args, num_classes, eps)
                               for name in suite.parse_suite(args.attacks, args.norm)}
        settings.update(gamma=args.gamma, autoattack=autoattack_check.autoattack_options(args) if args.autoattack
                        else None, certify=args.certify)
    else:
        settings[mode] = {"surface": [args.surface, args.surface_grid, args.surface_radius],
                          "strength": args.strengths, "gamma": args.gamma_sweep}[mode]
    return json.loads(json.dumps(settings))  # as it reads back from the report


def recorded_settings(report):
    """The settings of a report eval.py wrote (`evaluation_settings`); reports older than the record
    give what they hold of them: the mode, checkpoint, ε, norm, images, seed, bf16 and the attacks."""
    if "settings" in report:
        return report["settings"]
    settings = {k: report[k] for k in ("mode", "checkpoint", "eps", "norm", "split", "n_images", "seed", "bf16")
                if k in report}
    if report.get("mode") == "eval" and "results" in report:
        settings["attacks"] = {name: column["options"] for name, column in report["results"].items()
                               if name in suite.SUITE}
    return settings


def check_existing_report(path, settings):
    """Refuse (ValueError, one line) to replace the file at `path` unless it is a report of an
    evaluation with the same `settings` (which may be resumed or replaced): another evaluation's
    numbers, or a file eval.py did not write, are never lost."""
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            report = json.load(f)
        old = recorded_settings(report) if isinstance(report, dict) and "checkpoint" in report else None
    except (OSError, ValueError, UnicodeDecodeError):
        old = None
    if old is None:
        raise ValueError(f"{path} exists and is not an evaluation written by eval.py: choose another --out")
    same_checkpoint = os.path.realpath(cli.recorded_path(old["checkpoint"])) == os.path.realpath(
        cli.recorded_path(settings["checkpoint"]))
    differing = [k for k in settings if k in old and k != "checkpoint" and old[k] != settings[k]]
    differing = ([] if same_checkpoint else ["checkpoint"]) + differing
    if differing:
        what = "; ".join(f"{k} {_short(old[k])} there, {_short(settings[k])} here" for k in differing[:3])
        raise ValueError(f"{path} holds an evaluation with other settings ({what}): it is kept; write this one "
                         f"elsewhere with --out (e.g. --out {os.path.splitext(path)[0]}-2.json)")


def _short(value):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_args(args):
    """The range of every numeric flag, and the device (ValueError)."""
    for flag, least in (("n", 1), ("batch_size", 1), ("steps", 1), ("restarts", 1), ("num_targets", 1),
                        ("fgsm_steps", 1), ("square_queries", 1), ("surface_grid", 2)):
        value = getattr(args, flag)
        cli.require(value is None or value >= least, f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
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


def device_name(device):
    """The accelerator's name ("NVIDIA H200"), or "cpu": a report says which machine measured it."""
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def sanity_checks(model, images, labels, eps, results, args, num_classes, device):
    """Checks a reviewer asks for (Athalye et al. 2018, Carlini et al. 2019), each with ok=False
    when violated: accuracy reaches 0 as ε grows; fewer steps do not beat more; a stronger
    attack is not weaker than a weaker one, in total or per sample; the gradient-free attack
    finds little the gradient attacks missed; and one FGSM step is not far weaker than the other
    attacks (a model that resists single steps only: catastrophic overfitting)."""
    checks = []
    correct = torch.tensor(results["nominal"]["robust"])
    if not args.no_sanity:
        big = 0.5
        robust, _, _ = suite.run_attack(model, images, labels, big, "untargeted", {"steps": 20, "restarts": 1},
                                        num_classes, args.batch_size, device, args.seed, only=correct,
                                        desc=f"sanity check: Untargeted at eps = {big}")
        acc = robust.float().mean().item()
        checks.append({"name": "accuracy reaches 0 as eps grows", "ok": acc == 0,
                       "detail": f"Untargeted 20 steps at eps = {big}: {100 * acc:.1f}%"})
        if "untargeted" in results:
            full = results["untargeted"]
            steps = max(1, full["steps"] // 4)
            weak_options = {**suite.attack_options("untargeted", args, num_classes, eps), "steps": steps,
                            "restarts": 1}
            robust, _, _ = suite.run_attack(model, images, labels, eps, "untargeted", weak_options, num_classes,
                                            args.batch_size, device, args.seed + 10**6, only=correct,
                                            desc=f"sanity check: Untargeted, {steps} steps")
            weak_acc = robust.float().mean().item()
            checks.append({"name": "more steps never help the model", "ok": weak_acc >= full["accuracy"],
                           "detail": f"Untargeted {steps} steps x 1: {100 * weak_acc:.1f}% vs "
                                     f"{full['steps']} x {full['restarts']}: {100 * full['accuracy']:.1f}%"})
    gradient = [n for n in ("fgsm", "fgsm20", "untargeted", "multi-targeted", "deepfool") if n in results]
    if "square" in results and gradient:
        survivors = [all(results[n]["robust"][i] for n in gradient) for i in range(len(correct))]
        square_only = sum(s and not q for s, q in zip(survivors, results["square"]["robust"]))
        checks.append({"name": "the gradient-free attack finds little that the gradient attacks missed",
                       "ok": square_only <= GRADIENT_FREE_MISS_SHARE * sum(survivors),
                       "detail": f"Square broke {square_only} of the {sum(survivors)} images that survived "
                                 f"{', '.join(gradient)} (flag above {100 * GRADIENT_FREE_MISS_SHARE:g}%): "
                                 f"{'consistent with masked or noisy gradients' if square_only else 'none'}"})
    # not fgsm: FGSM-20 need not break every image one step breaks; the last check compares with it
    order = [n for n in ("fgsm20", "untargeted", "multi-targeted") if n in results]
    for weaker, stronger in zip(order, order[1:]):
        w, s = results[weaker], results[stronger]
        only_weaker = sum(a and not b for a, b in zip(s["robust"], w["robust"]))  # broken by weaker only
        checks.append({"name": f"{stronger} is not weaker than {weaker}",
                       "ok": s["accuracy"] <= w["accuracy"],
                       "detail": f"{100 * w['accuracy']:.1f}% -> {100 * s['accuracy']:.1f}%; "
                                 f"{only_weaker} samples broken by {weaker} only"})
    others = [n for n in suite.SUITE if n in results and n not in ("fgsm", "random-targeted")]
    if "fgsm" in results and others:
        n = len(correct)  # the rule on image counts: exact, no rounding at its edges
        single = sum(results["fgsm"]["robust"])
        strong = sum(all(robust) for robust in zip(*(results[name]["robust"] for name in others)))  # per image
        masked = strong <= SINGLE_STEP_RATIO * single and 100 * (single - strong) >= SINGLE_STEP_GAP_POINTS * n
        checks.append({"name": "the other attacks are not far stronger than one FGSM step", "ok": not masked,
                       "detail": f"one FGSM step {100 * single / n:.1f}% -> worst case of {', '.join(others)} "
                                 f"{100 * strong / n:.1f}% (flagged at or below {SINGLE_STEP_RATIO:g} x the first and "
                                 f"{SINGLE_STEP_GAP_POINTS} or more points below it): "
                                 + ("gradients masked from single steps (catastrophic overfitting)" if masked
                                    else "no sign of single-step masking")})
    return checks


def run_suite(model, images, labels, eps, args, num_classes, device, partial=None):
    """The suite on (images, labels): the results dict written as JSON. With `partial` = (path,
    settings), each finished column is saved at once in `path`, and the columns a previous call
    with the same settings finished are taken from there instead of being attacked again."""
    names = suite.parse_suite(args.attacks, args.norm)
    correct = suite.clean_correct(model, images, labels, args.batch_size, device)
    results = {"nominal": {"accuracy": correct.float().mean().item(), "robust": correct.tolist()}}
    finished = read_partial(*partial) if partial else {}
    worst = correct.clone()
    for name in names:
        if name not in finished:
            options = suite.attack_options(name, args, num_classes, eps)
            every = name == "random-targeted"  # its success rate is over all images; the others attack the correct
            robust, counts, seconds = suite.run_attack(
                model, images, labels, eps, name, options, num_classes, args.batch_size, device, args.seed,
                only=None if every else correct,
                desc=f"{suite.SUITE[name][0]} ({'all' if every else 'correctly classified'} images)")
            defaults = inspect.signature(suite.SUITE[name][1]).parameters  # the attack holds its defaults
            steps, restarts = (options.get(k, defaults[k].default)
                               for k in ("queries" if name == "square" else "steps", "restarts"))  # Square: queries
            finished[name] = {"options": options, "steps": steps, "restarts": restarts,
                              "invalid_examples": counts["invalid"], "reattacked": counts["reattacked"],
                              "unverified": counts["unverified"], "time_s": round(seconds, 2), "robust": robust.tolist()}
            if partial:
                suite.write_compact_json(partial[0], {"written_by": "eval.py", "settings": partial[1],
                                                     "columns": finished})
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


CERTIFY_RADII = {"36/255": 36 / 255, "72/255": 72 / 255, "108/255": 108 / 255}


def certify(model, images, labels, eps, worst_robust, batch_size, device):
    """Per image, the certified ℓ2 radius (soc.certified_radius); the certified accuracy at the
    papers' radii and at ε; and the images certified at ε that an attack broke (a contradiction:
    a bug in the certificate or in the attack)."""
    import soc

    constants = soc.certificate_constants(model)
    radius = torch.cat([soc.certified_radius(model, x, y, constants).cpu()
                        for _, x, y in suite.batches(images, labels, batch_size, device)])
    at = {name: (radius > r).float().mean().item() for name, r in {**CERTIFY_RADII, "eps": eps}.items()}
    contradictions = [i for i, (r, robust) in enumerate(zip(radius.tolist(), worst_robust)) if r > eps and not robust]
    return {"radius": radius.tolist(), "certified_accuracy": at, "contradictions": contradictions,
            "features_lipschitz": constants["features_lipschitz"]}


def print_table(report):
    r = report["results"]
    print(f"\n{report['checkpoint']}  ({report['model']['arch']} {report['model']['activation']})  "
          f"{report['norm']} eps = {report['eps_text']}  {report['n_images']} {report['dataset']} {report['split']} images"
          f"  seed {report['seed']}")
    print(f"{'':32s}{'accuracy':>10s}{'worst case':>12s}{'steps x restarts':>18s}{'time':>9s}")
    print(f"{'Nominal':32s}{100 * r['nominal']['accuracy']:9.2f}%{100 * r['nominal']['accuracy']:11.2f}%")
    for name, (label, _) in suite.SUITE.items():
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
    drops = [f"{label} to worst case drops {100 * o[key]:.2f} points" for key, label in
             (("drop_fgsm_to_worst", "one FGSM step"), ("drop_weak_to_worst", "FGSM-20")) if o.get(key) is not None]
    if drops:
        print("obfuscation report: " + "; ".join(drops))
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
    mode = probe.mode_of(args)
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
        suite.parse_suite(args.attacks, args.norm)
        probe.check_args(args)
        cli.require(not args.certify or (args.norm == "l2" and config["arch"].startswith("lipconvnet")),
                    "--certify gives ℓ2 certificates of a lipconvnet model: it needs one, and --norm l2")
        if args.autoattack:
            autoattack_check.import_autoattack()
            autoattack_check.autoattack_options(args)
        dataset = args.dataset or meta.get("dataset") or config["normalization"]
        recorded = cli.recorded_path(meta.get("data_dir"))  # where it was trained from (relative: in this repository)
        found = recorded if recorded and os.path.isdir(recorded) else None
        data_dir = args.data_dir or found or ("data/cifar10" if dataset == "cifar10" else None)
        cli.require(data_dir is not None, "--data-dir is required for ImageNet (a folder with val/<wnid>/*.JPEG)")
        model = models.load_checkpoint(args.checkpoint, map_location=args.device)
        n = max(args.surface) + 1 if args.surface else args.n
        conflict = selection_conflict(meta, args.split, n)
        cli.require(not conflict or args.allow_selection_images,
                    f"{conflict}: its numbers there are biased upwards; evaluate on --split test, or pass "
                    f"--allow-selection-images to do it anyway")
        holdout_n = meta.get("selection", {}).get("holdout_n") or {"cifar10": 1000, "imagenet": 10000}[dataset]
        try:
            images, labels, classes = load_images(dataset, data_dir, args.split, n, meta.get("image_size", 224),
                                                  holdout_n)
        except data.DataError as e:
            missing = recorded and not found and not args.data_dir
            raise data.DataError(f"{e}; the checkpoint records its data at {meta['data_dir']!r}, which is not here: "
                                 f"give --data-dir" if missing else str(e)) from None
        cli.require(meta.get("classes") in (None, classes),
                    f"the classes in {data_dir} ({', '.join(classes[:4])}, ...) are not those the checkpoint was "
                    f"trained on ({', '.join(meta.get('classes', [])[:4])}, ...): labels would not match")
        cli.require(not args.surface or max(args.surface) < len(labels),
                    f"--surface index {max(args.surface or [0])} is beyond the {len(labels)} images")
        out = output_path(args.out, args.checkpoint, mode)
        settings = evaluation_settings(args, mode, eps, len(labels), config["num_classes"])
        check_existing_report(out, settings)
        if args.n > len(labels):
            print(f"--n {args.n}: the {args.split} split has {len(labels)} images; evaluating all {len(labels)}")
    except (ValueError, OSError, data.DataError) as e:
        sys.exit(f"eval.py: error: {e}")
    evaluated = Autocast(model, torch.bfloat16) if args.bf16 else model
    start = time.time()
    report = {"written_by": "eval.py", "settings": settings, "mode": mode,
              "checkpoint": cli.record_path(args.checkpoint), "model": config, "dataset": dataset,
              "data_dir": cli.record_path(data_dir),
              "eps": eps, "eps_text": args.eps, "norm": args.norm, "split": args.split, "selection_conflict": conflict,
              "n_images": len(labels), "seed": args.seed, "bf16": args.bf16,
              "device": str(args.device), "device_name": device_name(args.device), "torch": torch.__version__,
              "training": {k: v for k, v in meta.items() if k != "config"}}
    if mode != "eval":
        report.update(probe.measure(mode, model, evaluated, images, labels, eps, args, config["num_classes"]))
    else:
        report["labels"] = labels.tolist()
        resume = {k: report[k] for k in ("checkpoint", "eps", "norm", "split", "n_images", "seed", "bf16", "device")}
        resume.update(checkpoint_mtime=os.path.getmtime(args.checkpoint), batch_size=args.batch_size,
                      options=settings["attacks"])
        results = run_suite(evaluated, images, labels, eps, args, config["num_classes"], args.device,
                            partial=(out + ".partial.json", resume))
        report["results"] = results
        if args.gamma:
            report["gamma"] = suite.gamma_of_images(model, images, labels, eps, args.batch_size, args.device, args.seed,
                                              args.norm)
        drops = {key: results[name]["accuracy"] - results["worst_case"]["accuracy"] if name in results else None
                 for key, name in (("drop_weak_to_worst", "fgsm20"), ("drop_fgsm_to_worst", "fgsm"))}
        report["obfuscation"] = {
            **drops,
            "checks": sanity_checks(evaluated, images, labels, eps, results, args, config["num_classes"], args.device)}
        if args.autoattack:
            try:
                autoattack = autoattack_check.run_autoattack(evaluated, images, labels, eps, args, args.device,
                                                             out + autoattack_check.STATE_SUFFIX)
            except ValueError as e:
                sys.exit(f"eval.py: error: {e}")
            checks = report["obfuscation"]["checks"]
            report["cross_check"] = autoattack_check.add_autoattack(results, autoattack, checks, len(labels))
        if args.certify:
            worst = results.get("worst_case_with_autoattack", results["worst_case"])["robust"]
            report["certificates"] = certify(model, images, labels, eps, worst, args.batch_size, args.device)
        print_table(report)
    report["time_s"] = round(time.time() - start, 2)
    suite.write_compact_json(out, report)
    for leftover in (out + autoattack_check.STATE_SUFFIX, out + ".partial.json"):  # their results are in the report now
        if os.path.exists(leftover):
            os.remove(leftover)
    print(f"wrote {out}")
    if report.get("certificates", {}).get("contradictions"):
        sys.exit(f"eval.py: error: certificates contradicted by attacks on {len(report['certificates']['contradictions'])}"
                 f" images (see {out})")
    return report


if __name__ == "__main__":
    main()
