"""The positive control of the paper's contrast: can this pipeline produce catastrophic
overfitting at all? GradAlign's single-layer CNN (Andriushchenko & Flammarion 2020, Fig. 11) at their
settings, with ReLU as they train it and with softplus, 3 seeds each, on a CPU, each run a
train_cifar.py run.

    python -m experiments.positive_control               # every run not done yet, then the report (resumable)
    OMP_NUM_THREADS=1 python -m experiments.positive_control --only train --activation relu &    # on 2 cores
    OMP_NUM_THREADS=1 python -m experiments.positive_control --only train --activation softplus
    python -m experiments.positive_control --only report # the table and the curves from what is done
    python -m experiments.positive_control --smoke DIR   # the whole pipeline on generated images (the tests)

The setting is their README's command for this model, read from their code
(tml-epfl/understanding-fast-adv-training: models.py, utils.py, data.py, train.py):

    python train.py --model=cnn --attack=fgsm --eps=10 --attack_init=zero --n_layers=1 --n_filters_cnn=4
                    --epochs=30 --eval_iter_freq=50 --lr_max=0.003 --gpu=0 --n_final_eval=1000

and these train_cifar.py flags say it (`train_argv`; the optimiser, schedule and crops are `common.GRADALIGN_CNN`,
which co_bench.py trains with too):
- model: --arch cnn-1x4 (models.CNN: Conv2d(3, 4, 3, padding 1), the activation, Linear(4·32·32, 10), no
  input normalisation, their `initialize_weights`);
- data: --pad-mode zeros: random 32×32 crops of the zero-padded (4 pixels) image and horizontal flips
  (torchvision's RandomCrop and RandomHorizontalFlip); batches of 128 in a new random order each
  epoch, the last incomplete batch dropped (as train_cifar.py always does);
- optimiser: --optimizer adam --weight-decay 5e-4 --weight-decay-on all (torch's Adam on every
  parameter, weight decay added to the gradient), --lr 0.003 --lr-schedule cyclic-gradalign
  --lr-peak 0.4: np.interp(t, [0, 12, 30], [0, 0.003, 0]) at t = epoch + (i + 1)/batches (their
  `get_lr_schedule('cyclic')`);
- the attack: --method adv --adv-steps 1 --adv-random-start false --adv-step-size 1.25ε --adv-bn train:
  FGSM from δ = 0 with step 1.25·ε, clipped to the ball (so every pixel moves by ε along the
  gradient's sign) and to [0, 1], the model as in training (it has no batch norm); the loss on x + δ
  is the cross-entropy; --eps 10/255 from the first step (train_cifar's default for ADV); 30 epochs.
Differences, our choices: 1,000 training images are held out (--val-n 1000, data.holdout_split: the
project's rule, never evaluate on what was trained on) and training uses the other 49,000, as the
JPEG copy's images; their epoch 0 (one step without an update, for statistics) is not run. After
every epoch train_cifar.py evaluates those 1,000 (training.evaluate): clean accuracy, FGSM (one
signed step of ε on the cross-entropy from x) and PGD-20 (the project's Untargeted attack, 20 steps ×
1 restart, margin loss); its log.jsonl's "eval" entries are this report's curves. γ is not measured
(--gamma-n 0: its 50-step search on 128 images would add about 40% to each epoch here). A run has
collapsed when, from some epoch through the last, PGD-20 accuracy is at most 5% while FGSM accuracy
is at least 30%, or FGSM exceeds PGD-20 by more than 25 points.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the project's modules, also when this file is run by its path

import cli  # noqa: E402
import models  # noqa: E402
import train_cifar  # noqa: E402
import training  # noqa: E402
from experiments import common  # noqa: E402

DATA = "data/cifar10-jpeg"  # the JPEG copy of CIFAR-10 (make data/cifar10-jpeg/train)
SETTING = {"eps": "10/255", "epochs": 30, "batch_size": 128, "fgsm_alpha": 1.25, "arch": "cnn-1x4", "holdout": 1000,
           "pgd_steps": 20}  # and common.GRADALIGN_CNN: their optimiser, schedule and crops
ACTIVATIONS = ("relu", "softplus")
RUNS = [(activation, seed) for activation in ACTIVATIONS for seed in (0, 1, 2)]


def run_dir(setting, activation, seed):
    return os.path.join(setting["out"], f"{activation}-seed{seed}")


def train_argv(setting, activation, seed):
    """The train_cifar.py flags of one run: their setting (the docstring's list), our held-out images."""
    step = setting["fgsm_alpha"] * cli.number(setting["eps"])
    return ["--data-dir", setting["data"], "--out", run_dir(setting, activation, seed), "--seed", str(seed),
            "--arch", setting["arch"], "--activation", activation,
            "--method", "adv", "--adv-steps", "1", "--adv-random-start", "false", "--adv-step-size", repr(step),
            "--adv-bn", "train", "--eps", setting["eps"], "--epochs", str(setting["epochs"]),
            "--batch-size", str(setting["batch_size"]), "--val-n", str(setting["holdout"]),
            "--eval-steps", str(setting["pgd_steps"]), *common.GRADALIGN_CNN]


def finished(setting, activation, seed):
    last = os.path.join(run_dir(setting, activation, seed), "last.safetensors")
    return os.path.exists(last) and models.read_checkpoint_metadata(last)["epoch"] == setting["epochs"]


def train_run(setting, activation, seed):
    """Train one run with train_cifar.py, or continue it from its state.pt (the resume is exact:
    every random draw is a function of the seed and the step). A directory without state.pt (an
    earlier format's log, or a run stopped before its first checkpoint) starts afresh. A run
    stopped by SIGTERM or Ctrl-C stops this script too."""
    out = run_dir(setting, activation, seed)
    if finished(setting, activation, seed):
        return
    if os.path.exists(os.path.join(out, training.STATE)):
        train_cifar.main(["--resume", out])
    else:
        train_cifar.main([*train_argv(setting, activation, seed), "--overwrite"])
    if not finished(setting, activation, seed):
        sys.exit(f"positive_control.py: {out} stopped before its last epoch; the same command continues it")


def read_log(setting, activation, seed):
    """The run's evaluations after each epoch: `common.epoch_evaluations`."""
    return common.epoch_evaluations(run_dir(setting, activation, seed))


def collapse_epoch(log):
    """The gap rule, written for PreAct ResNet-18-sized models before the collapse rule
    (`common.collapsed`): the first epoch from which every epoch through the last has PGD-20 at most 5%
    with FGSM at least 30%, or FGSM more than 25 points above PGD-20; None if there is none."""
    def collapsed(e):
        return (e["pgd"] <= 0.05 and e["fgsm"] >= 0.30) or e["fgsm"] - e["pgd"] > 0.25

    first = None
    for e in log:
        first = (first or e["epoch"]) if collapsed(e) else None
    return first


def report(setting):
    """summary.json, table.md and curves.png from the logs that exist (none written while no run
    of train_cifar.py's log format exists: the committed table stays until the runs are redone)."""
    rows, summary = [], {"setting": {**{k: v for k, v in setting.items() if k in SETTING},
                                     "protocol": " ".join(common.GRADALIGN_CNN)}, "runs": {}}
    for activation, seed in RUNS if not setting.get("runs") else setting["runs"]:
        log = read_log(setting, activation, seed)
        if not log:
            continue
        last, best_pgd = log[-1], max(e["pgd"] for e in log)
        done = last["epoch"] == setting["epochs"]
        collapsed = collapse_epoch(log) if done else None
        collapsed_28 = common.collapsed(log) if done else None
        summary["runs"][f"{activation}-seed{seed}"] = {"epochs": last["epoch"], "done": done, "last": last,
                                                       "best_pgd": best_pgd, "collapse_from_epoch": collapsed,
                                                       "collapsed_by_collapse_rule": collapsed_28}
        verdict = f"yes, from epoch {collapsed}" if collapsed else "no" if done else "running"
        verdict_28 = "running" if not done else "yes" if collapsed_28 else "no"
        rows.append(f"| {activation} | {seed} | {last['epoch']} | {100 * last['clean']:.1f} | "
                    f"{100 * last['fgsm']:.1f} | {100 * last['pgd']:.1f} | {100 * best_pgd:.1f} (epoch "
                    f"{max(log, key=lambda e: e['pgd'])['epoch']}) | {verdict} | {verdict_28} |")
    if not rows:
        print(f"no train_cifar.py run under {setting['out']} yet: nothing to report")
        return summary
    table = ("| activation | seed | epochs | clean | FGSM | PGD-20 | best PGD-20 | collapsed (the gap rule) | "
             "collapsed (the collapse rule) |\n"
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |\n" + "\n".join(rows) + "\n")
    with open(os.path.join(setting["out"], "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(setting["out"], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    curves(setting)
    print(table)
    return summary


def curves(setting):
    """Held-out clean / FGSM / PGD-20 accuracy per epoch, one panel per activation, a line per seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib (make install-extras): skipped the figure curves.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, activation in zip(axes, ACTIVATIONS):
        for seed in (0, 1, 2):
            log = read_log(setting, activation, seed)
            epochs = [e["epoch"] for e in log]
            for key, color in (("clean", "tab:green"), ("fgsm", "tab:blue"), ("pgd", "tab:red")):
                ax.plot(epochs, [100 * e[key] for e in log], color=color, alpha=0.8,
                        label={"clean": "clean", "fgsm": "FGSM", "pgd": "PGD-20"}[key] if seed == 0 else None)
        ax.set_title(f"single-layer CNN, {activation}, ε = 10/255 (3 seeds)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on 1,000 held-out training images (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(setting["out"], "curves.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("--only", choices=["train", "report"], help="this stage alone (unset: train, then report)")
    p.add_argument("--activation", choices=ACTIVATIONS,
                   help="train this activation's runs only (two processes, one per activation, share 2 cores well)")
    p.add_argument("--smoke", metavar="DIR", help="the whole pipeline on generated images under DIR (the tests)")
    args = p.parse_args(argv)
    setting = {**SETTING, "data": os.path.join(ROOT, DATA), "out": os.path.join(HERE, "positive-control")}
    if args.smoke:
        setting.update(data=common.make_image_folder(os.path.join(args.smoke, "data"), classes=10, per_class=4,
                                                     size=32),
                       out=os.path.join(args.smoke, "positive-control"), epochs=2, batch_size=8, holdout=8,
                       pgd_steps=2, runs=[("relu", 0), ("softplus", 0)])
    elif not os.path.isdir(os.path.join(setting["data"], "train")):
        sys.exit(f"positive_control.py: error: no CIFAR-10 copy at {DATA}: make data/cifar10-jpeg/train")
    os.makedirs(setting["out"], exist_ok=True)
    if args.only != "report":
        for activation, seed in setting.get("runs", RUNS):
            if args.activation in (None, activation):
                train_run(setting, activation, seed)
    return None if args.only == "train" else report(setting)


if __name__ == "__main__":
    main()
