"""The positive control of the paper's contrast (issue 24): can this pipeline produce catastrophic
overfitting at all? GradAlign's single-layer CNN (Andriushchenko & Flammarion 2020, Fig. 11) at their
settings, with ReLU as they train it and with softplus, 3 seeds each, on a CPU.

    python -m experiments.positive_control               # every run not done yet, then the report (resumable)
    OMP_NUM_THREADS=1 python -m experiments.positive_control --activation relu &    # the same, on 2 cores
    OMP_NUM_THREADS=1 python -m experiments.positive_control --activation softplus
    python -m experiments.positive_control --only report # the table and the curves from what is done
    python -m experiments.positive_control --smoke DIR   # the whole pipeline on generated images (the tests)

The setting is their README's command for this model, read from their code
(tml-epfl/understanding-fast-adv-training: models.py, utils.py, data.py, train.py):

    python train.py --model=cnn --attack=fgsm --eps=10 --attack_init=zero --n_layers=1 --n_filters_cnn=4
                    --epochs=30 --eval_iter_freq=50 --lr_max=0.003 --gpu=0 --n_final_eval=1000

- model: Conv2d(3, 4, 3, padding 1), the activation, Linear(4·32·32, 10); no input normalisation;
  their `initialize_weights`: conv weights N(0, 2/(3·3·4)), linear weights N(0, 2/4096), biases 0;
- data: CIFAR-10 training images, random 32×32 crops of the zero-padded (4 pixels) image and
  horizontal flips (torchvision's RandomCrop and RandomHorizontalFlip), batches of 128 in a new
  random order each epoch, the last incomplete batch dropped;
- optimiser: Adam, weight decay 5e-4 (added to the gradient, torch's Adam), the learning rate
  interpolated linearly per batch from 0 to 0.003 at epoch 12 (2/5 of training) and back to 0 at
  epoch 30 (their `get_lr_schedule('cyclic')`);
- the attack: FGSM from δ = 0 with step 1.25·ε, clipped to the ball (so every pixel moves by ε
  along the gradient's sign) and to [0, 1], at ε = 10/255, the model as in training (it has no
  batch norm); the loss on x + δ is the cross-entropy.
Differences, our choices: 1,000 training images are held out (the project's rule: never evaluate
on what was trained on) and training uses the other 49,000, as the JPEG copy's images; their epoch
0 (one step without an update, for statistics) is not run. After every epoch the 1,000 held-out
images are evaluated: clean accuracy, FGSM (one signed step of ε on the cross-entropy from x) and
PGD-20 (the project's Untargeted attack, 20 steps × 1 restart, margin loss): the curves of
training.evaluate. A run has collapsed when, from some epoch through the last, PGD-20 accuracy is at
most 5% while FGSM accuracy is at least 30%, or FGSM exceeds PGD-20 by more than 25 points.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the project's modules, also when this file is run by its path

import attacks  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402

DATA = "data/cifar10-jpeg"  # the JPEG copy of CIFAR-10 (make data/cifar10-jpeg/train)
SETTING = {"eps": 10 / 255, "epochs": 30, "batch_size": 128, "lr_max": 0.003, "peak_epoch": 12, "weight_decay": 5e-4,
           "fgsm_alpha": 1.25, "filters": 4, "holdout": 1000, "pgd_steps": 20}
RUNS = [(activation, seed) for activation in ("relu", "softplus") for seed in (0, 1, 2)]
ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus}


class SingleLayerCNN(nn.Module):
    """GradAlign's `CNN(n_conv=1)`: conv 3x3 (padding 1) → activation → linear, on [0, 1] images."""

    def __init__(self, activation, filters=4, size=32, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, filters, 3, padding=1)
        self.act = ACTIVATIONS[activation]()
        self.fc = nn.Linear(filters * size * size, classes)
        nn.init.normal_(self.conv.weight, 0, math.sqrt(2.0 / (3 * 3 * filters)))  # their initialize_weights
        nn.init.normal_(self.fc.weight, 0, math.sqrt(2.0 / self.fc.in_features))
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def learning_rate(setting, epoch, i, batches):
    """np.interp(t, [0, peak, epochs], [0, lr_max, 0]) at t = epoch + (i + 1) / batches (their train.py)."""
    t, peak, end = epoch + (i + 1) / batches, setting["peak_epoch"], setting["epochs"]
    return setting["lr_max"] * (t / peak if t <= peak else max(0.0, (end - t) / (end - peak)))


def fgsm_zero_init(model, x, y, eps, alpha):
    """Their FGSM from δ = 0: δ = clip(α·ε·sign(∇), −ε, ε), then x + δ clipped to [0, 1]."""
    delta = torch.zeros_like(x, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
    delta = (alpha * eps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def evaluate(model, images, labels, eps, steps, seed):
    """Clean, FGSM (one step of ε from x) and PGD-20 (Untargeted, margin) accuracy on the held-out images."""
    correct = torch.zeros(3)
    for chunk in torch.arange(len(labels)).split(500):
        x, y = images[chunk].float() / 255, labels[chunk]
        x_fgsm = attacks.fgsm_k(model, x, y, eps, steps=1, step_size=eps, loss="ce")
        x_pgd = attacks.untargeted(model, x, y, eps, steps=steps, restarts=1, seed=seed)
        with torch.no_grad():
            correct += torch.tensor([(model(v).argmax(1) == y).sum().item() for v in (x, x_fgsm, x_pgd)])
    return dict(zip(("clean", "fgsm", "pgd"), (correct / len(labels)).tolist()))


def train_run(setting, activation, seed, images, labels):
    """Train one run epoch by epoch from its last checkpoint (state.pt, written atomically after each
    epoch with the log line), every random draw a function of (seed, epoch): resuming is exact.
    `images`, `labels`: the training set (uint8 [N, 3, 32, 32], [N])."""
    out = os.path.join(setting["out"], f"{activation}-seed{seed}")
    os.makedirs(out, exist_ok=True)
    log_path, state_path = os.path.join(out, "log.jsonl"), os.path.join(out, "state.pt")
    train_idx, held_idx = data.holdout_split(len(labels), setting["holdout"])
    torch.manual_seed(seed)
    model = SingleLayerCNN(activation, setting["filters"], images.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, weight_decay=setting["weight_decay"])
    epoch = 0
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch = state["epoch"]
    batches = len(train_idx) // setting["batch_size"]
    while epoch < setting["epochs"]:
        start = time.time()
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        model.train()
        for i in range(batches):
            rows = order[i * setting["batch_size"]:(i + 1) * setting["batch_size"]]
            x = data.crop_and_flip(images[rows].float() / 255, generator=g, mode="constant")
            y = labels[rows]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(setting, epoch, i, batches)
            x_adv = fgsm_zero_init(model, x, y, setting["eps"], setting["fgsm_alpha"])
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch += 1
        seconds = time.time() - start
        model.eval()
        result = evaluate(model, images[held_idx], labels[held_idx], setting["eps"], setting["pgd_steps"], seed)
        entry = {"epoch": epoch, "train_loss_last_batch": loss.item(), "seconds": round(seconds, 2), **result}
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                   state_path + ".tmp")
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        os.replace(state_path + ".tmp", state_path)
        print(f"{activation} seed {seed} epoch {epoch}: clean {100 * result['clean']:.1f}%, FGSM "
              f"{100 * result['fgsm']:.1f}%, PGD-20 {100 * result['pgd']:.1f}% ({seconds:.0f} s)", flush=True)


def read_log(setting, activation, seed):
    path = os.path.join(setting["out"], f"{activation}-seed{seed}", "log.jsonl")
    if not os.path.exists(path):
        return []
    entries = {}
    for line in open(path):  # a line written before a crash may repeat after the resume: keep the last
        entry = json.loads(line)
        entries[entry["epoch"]] = entry
    return [entries[k] for k in sorted(entries)]


def collapse_epoch(log):
    """The first epoch from which every epoch through the last meets the collapse criterion, or None."""
    def collapsed(e):
        return (e["pgd"] <= 0.05 and e["fgsm"] >= 0.30) or e["fgsm"] - e["pgd"] > 0.25

    first = None
    for e in log:
        first = (first or e["epoch"]) if collapsed(e) else None
    return first


def report(setting):
    """summary.json, table.md and curves.png from the logs that exist."""
    rows, summary = [], {"setting": {k: v for k, v in setting.items() if k in SETTING}, "runs": {}}
    for activation, seed in RUNS if not setting.get("runs") else setting["runs"]:
        log = read_log(setting, activation, seed)
        if not log:
            continue
        last, best_pgd = log[-1], max(e["pgd"] for e in log)
        done = last["epoch"] == setting["epochs"]
        collapsed = collapse_epoch(log) if done else None
        summary["runs"][f"{activation}-seed{seed}"] = {"epochs": last["epoch"], "done": done, "last": last,
                                                       "best_pgd": best_pgd, "collapse_from_epoch": collapsed}
        verdict = f"yes, from epoch {collapsed}" if collapsed else "no" if done else "running"
        rows.append(f"| {activation} | {seed} | {last['epoch']} | {100 * last['clean']:.1f} | "
                    f"{100 * last['fgsm']:.1f} | {100 * last['pgd']:.1f} | {100 * best_pgd:.1f} (epoch "
                    f"{max(log, key=lambda e: e['pgd'])['epoch']}) | {verdict} |")
    table = ("| activation | seed | epochs | clean | FGSM | PGD-20 | best PGD-20 | collapsed (the issue's rule) |\n"
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n" + "\n".join(rows) + "\n")
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
    p.add_argument("--activation", choices=list(ACTIVATIONS),
                   help="train this activation's runs only (two processes, one per activation, share 2 cores well)")
    p.add_argument("--smoke", metavar="DIR", help="the whole pipeline on generated images under DIR (the tests)")
    args = p.parse_args(argv)
    setting = {**SETTING, "data": os.path.join(ROOT, DATA), "out": os.path.join(HERE, "positive-control")}
    if args.smoke:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_image_folder

        setting.update(data=make_image_folder(os.path.join(args.smoke, "data"), classes=10, per_class=4, size=32),
                       out=os.path.join(args.smoke, "positive-control"), epochs=2, peak_epoch=1, batch_size=8,
                       holdout=8, pgd_steps=2, runs=[("relu", 0), ("softplus", 0)])
    elif not os.path.isdir(os.path.join(setting["data"], "train")):
        sys.exit(f"positive_control.py: error: no CIFAR-10 copy at {DATA}: make data/cifar10-jpeg/train")
    os.makedirs(setting["out"], exist_ok=True)
    if args.only != "report":
        images, labels, _ = data.load_cifar10(setting["data"], "train")
        for activation, seed in setting.get("runs", RUNS):
            if args.activation in (None, activation):
                train_run(setting, activation, seed, images, labels)
    return None if args.only == "train" else report(setting)


if __name__ == "__main__":
    main()
