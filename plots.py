"""The paper's figures, from the JSON that eval.py writes and the training logs.

    python plots.py surface runs/adv-1/best.surface.json runs/llr-1/best.surface.json --out fig4.png  # Fig. 1, 4
    python plots.py gamma runs/adv-1/log.jsonl runs/adv-2/log.jsonl runs/llr-2/log.jsonl --out fig2.png # Fig. 2
    python plots.py gamma-hist runs/adv-2/best.eval.json runs/llr-2/best.eval.json --out figF3.png     # Fig. F3
    python plots.py strength runs/adv-2/best.strength.json runs/llr-2/best.strength.json --out fig3.png # Fig. 3
    python plots.py curves runs/adv-2/log.jsonl runs/llr-2/log.jsonl --out curves.png
    python plots.py validation runs/adv-1/log.jsonl runs/llr-1/log.jsonl --out validation.png    # collapse

Runs are labelled as in the paper (ADV-1, LLR-2, ...) from their method and inner steps.
Each command writes a PNG (and a PDF with --pdf). matplotlib is needed here only.
"""
import json
import os
import sys

import cli


class InputError(Exception):
    """A missing or malformed input file; the message says which and why."""


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None


def read_log(path):
    """A training log.jsonl as a list of dicts, and the run's config.json next to it if present."""
    try:
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not a JSON-lines log ({e})") from None
    if not entries or not all(isinstance(e, dict) and "kind" in e and "step" in e for e in entries):
        raise InputError(f"{path} is not a training log (log.jsonl of a run directory)"
                         + (": it is empty" if not entries else ""))
    config_path = os.path.join(os.path.dirname(path), "config.json")
    config = read_json(config_path)["args"] if os.path.exists(config_path) else {}
    return entries, config


def label(method, options):
    """The paper's name for a run: ADV-2 (2 PGD steps), LLR-2 (2 inner steps), TRADES, ..."""
    if method in ("adv", "llr", "lfr") and "steps" in options:
        return f"{method.upper()}-{options['steps']}" + (" (μ=0)" if method == "llr" and options.get("mu") == 0 else "")
    return (method or "model").upper() if method != "plain" else "plain"


def run_label(config):
    options = {k[len(config.get("method", "")) + 1:]: v for k, v in config.items()
               if k.startswith(f"{config.get('method')}_")}
    return label(config.get("method"), options)


def distinct(labels, paths):
    """The labels, each followed by its run directory's name where two would read the same."""
    return [f"{name} ({os.path.basename(os.path.dirname(os.path.abspath(path)))})" if labels.count(name) > 1 else name
            for name, path in zip(labels, paths)]


def report_label(report):
    training = report.get("training", {})
    return label(training.get("method"), training.get("options", {})) if training.get("method") else \
        os.path.basename(report["checkpoint"])


def figure(rows, cols, size=(4.5, 3.5), **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False, **kwargs)


def finish(fig, ax, xlabel, ylabel, title, out, pdf):
    """Name the axes, title and legend of a one-panel figure, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save(fig, out, pdf)


def save(fig, out, pdf):
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    if pdf:
        fig.savefig(os.path.splitext(out)[0] + ".pdf")
    print(f"wrote {out}" + (" and its PDF" if pdf else ""))


# --------------------------------------------------------------------------- the figures
def plot_surface(files, out, pdf, index=None):
    """Fig. 1/4: the loss over the grid around one test image, coloured by predicted class."""
    import matplotlib.pyplot as plt
    import numpy as np

    reports = [read_json(f) for f in files]
    names = distinct([report_label(r) for r in reports], [r.get("checkpoint", f) for r, f in zip(reports, files)])
    fig = plt.figure(figsize=(5 * len(reports), 4.6))
    colours = plt.get_cmap("tab10")
    for k, (path, report) in enumerate(zip(files, reports)):
        surfaces = report.get("surface")
        if not surfaces:
            raise InputError(f"{path} has no loss surface (run eval.py CHECKPOINT --surface INDEX)")
        chosen = [s for s in surfaces if index is None or s["index"] == index]
        if not chosen:
            raise InputError(f"{path} has no surface for test image {index} (it has {[s['index'] for s in surfaces]})")
        s = chosen[0]
        a, b = np.meshgrid(np.array(s["a"]) * 255, np.array(s["b"]) * 255, indexing="ij")
        loss, pred = np.array(s["loss"]), np.array(s["pred"])
        ax = fig.add_subplot(1, len(reports), k + 1, projection="3d")
        ax.plot_surface(a, b, loss, facecolors=colours(pred % 10), linewidth=0, antialiased=False, shade=False)
        ax.set_xlabel("adversarial direction a (1/255)")
        ax.set_ylabel("random direction b (1/255)")
        ax.set_zlabel("cross-entropy loss")
        wrong = 100 * (pred != s["label"]).mean()
        ax.set_title(f"{names[k]}: test image {s['index']}, eps = {report['eps_text']}\n"
                     f"colour = predicted class (true: {s['label']}); {wrong:.0f}% of the grid misclassified",
                     fontsize=9)
    save(fig, out, pdf)


def plot_gamma(files, out, pdf):
    """Fig. 2: γ(ε, x) on a fixed set of training images during training, one line per run."""
    fig, axes = figure(1, 1, size=(6, 4))
    ax = axes[0, 0]
    for path in files:
        entries, config = read_log(path)
        points = [e for e in entries if e.get("kind") == "gamma"]
        if not points:
            raise InputError(f"{path} has no γ measurements (train with --log-gamma-every N)")
        ax.plot([e["step"] for e in points], [e["gamma_mean"] for e in points], marker="o", markersize=3,
                label=f"{run_label(config)} ({os.path.basename(os.path.dirname(path))})")
    n, eps = points[-1]["gamma_n"], points[-1]["eps"]
    ax.set_yscale("log")
    finish(fig, ax, "training step", f"γ(ε, x), mean over {n} training images",
           f"local linearity during training, eps = {255 * eps:.3g}/255 (50 Adam steps)", out, pdf)


def plot_gamma_hist(files, out, pdf):
    """Fig. F3: the distribution of γ(ε, x) over test images, one histogram per checkpoint."""
    import numpy as np

    fig, axes = figure(1, 1, size=(6, 4))
    ax = axes[0, 0]
    reports = [read_json(f) for f in files]
    values = []
    for path, report in zip(files, reports):
        if "gamma" not in report:
            raise InputError(f"{path} has no γ values (run eval.py CHECKPOINT --gamma)")
        values.append(np.array(report["gamma"]["values"]))
    bins = np.linspace(0, max(v.max() for v in values), 40)
    names = distinct([report_label(r) for r in reports], [r["checkpoint"] for r in reports])
    for name, v in zip(names, values):
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name}: mean {v.mean():.3g} ({len(v)} images)")
    finish(fig, ax, "γ(ε, x)", "test images",
           f"local linearity on the test set, eps = {reports[0]['eps_text']} (50 Adam steps)", out, pdf)


def plot_strength(files, out, pdf):
    """Fig. 3: accuracy against attack strength; Untargeted light, Multi-Targeted dark, one hue per checkpoint."""
    import matplotlib.pyplot as plt

    fig, axes = figure(1, 1, size=(6.5, 4.2))
    ax = axes[0, 0]
    hues = plt.get_cmap("tab10")
    reports = [read_json(path) for path in files]
    names = distinct([report_label(r) for r in reports], [r.get("checkpoint", f) for r, f in zip(reports, files)])
    for k, (path, report) in enumerate(zip(files, reports)):
        if "strength" not in report:
            raise InputError(f"{path} has no strength sweep (run eval.py CHECKPOINT --strength)")
        for name, alpha, style in (("untargeted", 0.45, "--"), ("multi-targeted", 1.0, "-")):
            points = report["strength"]["curves"][name]
            ax.plot(range(len(points)), [100 * p["accuracy"] for p in points], style, marker="o", color=hues(k),
                    alpha=alpha, label=f"{names[k]}: {name} ({report['n_images']} images)")
        ticks = [f"{p['steps']}x{p['restarts']}" for p in points]
    ax.set_xticks(range(len(ticks)), ticks)
    finish(fig, ax, "attack strength: steps x restarts (per target for Multi-Targeted)",
           "accuracy (%), worst case so far", f"accuracy against attack strength, eps = {report['eps_text']}", out, pdf)


def plot_curves(files, out, pdf):
    """Training curves: loss, accuracies, the method's own terms, lr and ε against epoch."""
    panels = [("loss", ["loss"]), ("training accuracy", ["train_acc", "adv_acc"]),
              ("validation accuracy (held-out training images)", ["val_clean_acc", "val_fgsm_acc", "val_pgd_acc"]),
              ("method terms; γ on validation images", ["gamma", "grad_term", "kl", "curvature", "flatness",
                                                       "val_gamma_mean"]),
              ("learning rate", ["lr"]), ("eps (pixels)", ["eps"])]
    fig, axes = figure(2, 3)
    logs = [read_log(path) for path in files]
    for path, (entries, config), name in zip(files, logs, distinct([run_label(c) for _, c in logs], files)):
        for ax, (title, keys) in zip(axes.flat, panels):
            for key in keys:
                kind = "eval" if key.startswith("val_") else "train"
                points = [e for e in entries if e.get("kind") == kind and key in e]
                if points:
                    ax.plot([e["epoch"] for e in points], [e[key] for e in points],
                            marker="o" if kind == "eval" else None, markersize=3, label=f"{name}: {key}")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=6)
    save(fig, out, pdf)


def plot_validation(files, out, pdf):
    """The evaluation after each epoch on held-out training images, one line per run: clean
    accuracy, accuracy under FGSM (weak) and under the Untargeted attack (strong), and γ. A run that
    learns to hide its gradients shows FGSM accuracy rising while Untargeted accuracy falls, and γ
    jumping (the paper's Fig. 2 and 4)."""
    import matplotlib.pyplot as plt

    panels = [("val_clean_acc", "clean accuracy (%)"), ("val_fgsm_acc", "FGSM accuracy (%): weak attack"),
              ("val_pgd_acc", "Untargeted accuracy (%): strong attack"), ("val_gamma_mean", "γ(ε, x), mean")]
    fig, axes = figure(1, 4, size=(4.2, 3.4))
    logs = [read_log(path) for path in files]
    hues = plt.get_cmap("tab10")
    for k, (path, (entries, config), name) in enumerate(zip(files, logs, distinct([run_label(c) for _, c in logs],
                                                                                  files))):
        points = [e for e in entries if e.get("kind") == "eval"]
        if not points:
            raise InputError(f"{path} has no evaluations (train with --val-n above 0)")
        for ax, (key, title) in zip(axes.flat, panels):
            scale = 1 if key == "val_gamma_mean" else 100
            ax.plot([e["epoch"] for e in points], [scale * e[key] for e in points], marker="o", markersize=2,
                    color=hues(k % 10), label=name)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch")
    axes[0, 3].set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    n = points[-1].get("val_n")
    fig.suptitle(f"evaluation after each epoch on {n} held-out training images", fontsize=10)
    save(fig, out, pdf)


COMMANDS = {"surface": plot_surface, "gamma": plot_gamma, "gamma-hist": plot_gamma_hist,
            "strength": plot_strength, "curves": plot_curves, "validation": plot_validation}


def main(argv=None):
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("command", choices=list(COMMANDS), help="the figure to draw")
    p.add_argument("files", nargs="+",
                   help="eval.py JSON (surface, gamma-hist, strength) or log.jsonl (gamma, curves, validation)")
    p.add_argument("--out", help="PNG path (unset: <command>.png); its directory must exist")
    p.add_argument("--pdf", action="store_true", help="also write a PDF next to the PNG")
    p.add_argument("--index", type=int, help="surface: the test image to draw (unset: the first in each file)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("plots.py: error: matplotlib is not installed; install it with `make install-extras` "
                 "(or pip install matplotlib)")
    out = args.out or f"{args.command}.png"
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        sys.exit(f"plots.py: error: cannot write {out}: its directory {os.path.dirname(os.path.abspath(out))} "
                 f"does not exist")
    try:
        if args.command == "surface":
            plot_surface(args.files, out, args.pdf, args.index)
        else:
            COMMANDS[args.command](args.files, out, args.pdf)
    except InputError as e:
        sys.exit(f"plots.py: error: {e}")


if __name__ == "__main__":
    main()
