"""Train a CIFAR-10 classifier at ε = 8/255 with LLR or a baseline, on one device or many.

    python train_cifar.py --method llr --llr-steps 10                 # the paper's setting: make cifar
    accelerate launch --num_processes 8 --mixed_precision bf16 train_cifar.py --method llr --llr-steps 10
    python train_cifar.py --method adv --adv-steps 2 --arch preact-resnet18 --epochs 15 --out runs/adv2
    python train_cifar.py --resume runs/cifar-llr                    # continue a stopped run
    python eval.py runs/cifar-llr/best.safetensors --eps 8/255

A run directory (--out) holds config.json (arguments, versions, device, git commit),
log.jsonl (one JSON object per log interval, evaluation and γ measurement),
last.safetensors and best.safetensors (best robust accuracy on the held-out test
subset; both readable by eval.py), and state.pt, from which --resume continues.
Every random draw (data order, augmentation, the methods' random starts) comes
from generators seeded by (seed, step, process), so a resumed run ends with the
same weights as an uninterrupted one. SIGTERM or Ctrl-C stops at the next step
with a checkpoint; a non-finite loss stops the run without overwriting the last
good checkpoint.
"""
import argparse
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import torch
from tqdm import tqdm

import attacks
import data
import llr
import methods
import models

STATE = "state.pt"


def number(text):
    """A float from the command line; fractions such as 2/255 are accepted."""
    return float(Fraction(text))


def method_options(parser):
    """--<method>-<option> flags generated from each method's keyword arguments, with the
    function's own defaults (the one place that holds them)."""
    for name, fn in methods.METHODS.items():
        group = parser.add_argument_group(f"--method {name} (defaults from {fn.__module__}.{fn.__name__})")
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (p.default is not p.empty and p.name != "generator"):
                if p.name == "generator":
                    continue
                kind = int if isinstance(p.default, int) and not isinstance(p.default, bool) else number
                group.add_argument(f"--{name}-{p.name.replace('_', '-')}", type=kind, default=p.default,
                                   dest=f"{name}_{p.name}", metavar="N" if kind is int else "X",
                                   help=f"default {p.default}")


def selected_options(args):
    """The keyword options of the chosen method, read back from the generated flags."""
    fn = methods.METHODS[args.method]
    return {p.name: getattr(args, f"{args.method}_{p.name}") for p in inspect.signature(fn).parameters.values()
            if p.default is not p.empty and p.name != "generator"}


def shared_arguments(parser, out_prefix):
    """The flags both training scripts share: methods and their options, the seed, logging,
    evaluation, checkpoints and --resume."""
    g = parser.add_argument_group("method")
    g.add_argument("--method", default="llr", choices=list(methods.METHODS))
    g = parser.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and every random draw")
    g.add_argument("--out", help=f"run directory (default runs/{out_prefix}-<method>)")
    g.add_argument("--log-every", type=int, default=50, metavar="STEPS",
                   help="log, check for NaN and honour SIGTERM/Ctrl-C every this many steps")
    g.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS")
    g.add_argument("--eval-n", type=int, default=1000, help="held-out images for clean and PGD accuracy")
    g.add_argument("--eval-steps", type=int, default=20, help="steps of the Untargeted attack used there")
    g.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every this many steps (0: at the end of each epoch only)")
    g.add_argument("--log-gamma-every", type=int, default=0, metavar="STEPS",
                   help="log γ(ε, x) on a fixed training subset every this many steps (Fig. 2; 0: never)")
    g.add_argument("--gamma-n", type=int, default=128, help="images in that subset")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved settings")
    method_options(parser)


def finish_args(parser, argv, out_prefix):
    """Parse; with --resume, the run's saved arguments replace the command line's."""
    args = parser.parse_args(argv)
    if args.resume:
        resume_dir = args.resume
        try:
            with open(os.path.join(resume_dir, "config.json")) as f:
                args = argparse.Namespace(**json.load(f)["args"])
        except OSError as e:
            parser.exit(1, f"{parser.prog}: error: cannot resume from {resume_dir}: {e.strerror}\n")
        args.resume, args.out = resume_dir, resume_dir
    args.out = args.out or f"runs/{out_prefix}-{args.method}"
    return args


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/cifar10", help="torchvision's CIFAR-10, or an ImageFolder tree "
                   "with train/ and test/ (default data/cifar10)")
    g.add_argument("--download", action="store_true", help="download torchvision's CIFAR-10 into --data-dir if missing")
    g = p.add_argument_group("model and threat model")
    g.add_argument("--arch", default="wrn-28-8", help=f"one of {models.ARCHITECTURES} (paper: wrn-28-8)")
    g.add_argument("--activation", default="softplus", choices=list(models.ACTIVATIONS),
                   help="softplus: smooth, needed by double backprop")
    g.add_argument("--eps", default="8/255", help="ℓ∞ radius in pixel units (paper: 8/255)")
    g.add_argument("--eps-warmup", type=number, default=0.64, metavar="EPOCHS",
                   help="ε grows linearly from 0 over this many epochs (authors' config: 500 steps at batch 64)")
    g = p.add_argument_group("optimisation (SGD with momentum; the authors' config.py)")
    g.add_argument("--epochs", type=int, default=110, help="paper: ~110 epochs")
    g.add_argument("--batch-size", type=int, default=128, help="global batch, split across processes (paper: 128)")
    g.add_argument("--lr", type=number, default=0.1, help="authors' config: 0.1")
    g.add_argument("--lr-warmup", type=number, default=0.0, metavar="EPOCHS", help="linear warm-up of the lr")
    g.add_argument("--lr-decay-at", default="0.8,0.88,0.96", metavar="FRACTIONS",
                   help="the learning rate is divided by 10 after these fractions of training "
                        "(authors' config: 80k, 88k, 96k of 100k steps)")
    g.add_argument("--momentum", type=number, default=0.9, help="authors' config: 0.9")
    g.add_argument("--weight-decay", type=number, default=2e-4,
                   help="on conv and linear weights only (authors' config: ℓ2 2e-4 on weights)")
    shared_arguments(p, "cifar")
    return finish_args(p, argv, "cifar")


# --------------------------------------------------------------------------- schedules
def learning_rate(args, step, steps_per_epoch, total_steps):
    """Linear warm-up over --lr-warmup epochs, then ÷10 after each fraction of training in --lr-decay-at."""
    warmup = args.lr_warmup * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.1 ** sum(step >= float(f) * total_steps for f in args.lr_decay_at.split(","))


def epsilon(args, eps, step, steps_per_epoch):
    """Linear warm-up of ε over --eps-warmup epochs, then constant."""
    warmup = args.eps_warmup * steps_per_epoch
    return eps * min(1.0, (step + 1) / warmup) if warmup > 0 else eps


STREAMS = {"epoch": 0, "augment": 1, "method": 2, "gamma": 3}


def generator_for(args, step, device, stream, process=0):
    """A generator for one step, purpose and process: every random draw is a function of
    (seed, step, stream, process), so a resumed run draws what an uninterrupted one would.
    (Python's hash() is salted per process, so the seed is mixed by hand.)"""
    seed = ((args.seed * 1_000_003 + step) * 16 + STREAMS[stream]) * 4096 + process
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------- pieces of the loop
def optimizer_for(model, args):
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases, batch-norm scales and shifts
    return torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=args.momentum)


def batch_for(images, labels, args, step, steps_per_epoch, accelerator):
    """This process's share of the global batch at `step`: a permutation of the training set
    per epoch (seeded by (seed, epoch)), cut into global batches, split across processes,
    and augmented on the device (flip, 4-pixel reflect-pad and crop)."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(len(labels), generator=generator_for(args, epoch, "cpu", "epoch"))
    batch = order[i * args.batch_size:(i + 1) * args.batch_size][accelerator.process_index::accelerator.num_processes]
    x = images[batch.to(images.device)].float() / 255
    x = data.crop_and_flip(x, generator=generator_for(args, step, x.device, "augment", accelerator.process_index))
    return x, labels[batch.to(labels.device)]


def evaluate(model, images, labels, eps, args, accelerator):
    """Clean and Untargeted-PGD accuracy on the first --eval-n test images, split across processes."""
    model.eval()
    correct = robust = 0
    share = torch.arange(min(args.eval_n, len(labels)))[accelerator.process_index::accelerator.num_processes]
    for chunk in share.split(256):
        x, y = images[chunk.to(images.device)].float() / 255, labels[chunk.to(labels.device)]
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum()
        x_adv = attacks.untargeted(model, x, y, eps, steps=args.eval_steps, restarts=1, seed=args.seed)
        with torch.no_grad():
            robust += (model(x_adv).argmax(1) == y).sum()
    counts = accelerator.reduce(torch.stack([torch.as_tensor(correct), torch.as_tensor(robust),
                                             torch.tensor(len(share))]).to(accelerator.device).float(), "sum")
    model.train()
    return {"eval_clean_acc": (counts[0] / counts[2]).item(), "eval_robust_acc": (counts[1] / counts[2]).item(),
            "eval_n": int(counts[2].item()), "eval_steps": args.eval_steps}


def measure_gamma(model, images, labels, eps, args, step):
    """γ(ε, x) with `llr.local_linearity` (50 Adam steps) on the first --gamma-n training images,
    without augmentation, model in eval mode (as eval.py --gamma): the paper's Fig. 2."""
    model.eval()
    x, y = images[:args.gamma_n].float() / 255, labels[:args.gamma_n]
    gamma, _ = llr.local_linearity(model, x, y, eps, generator=generator_for(args, step, x.device, "gamma"))
    model.train()
    return {"gamma_mean": gamma.mean().item(), "gamma_median": gamma.median().item(),
            "gamma_max": gamma.max().item(), "gamma_n": len(y)}


def save(run_dir, model, optimizer, step, best, metadata, name="last.safetensors"):
    """Training state (for --resume) and the eval-format checkpoint, each written atomically."""
    models.save_checkpoint(model, os.path.join(run_dir, name), **metadata)
    if name == "last.safetensors":
        tmp = os.path.join(run_dir, STATE + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best}, tmp)
        os.replace(tmp, os.path.join(run_dir, STATE))


def provenance(args, accelerator):
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    import accelerate

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"args": vars(args), "command": sys.argv, "git_commit": commit, "git_dirty": dirty,
            "torch": torch.__version__, "accelerate": accelerate.__version__, "device": device,
            "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # pre-emption by a scheduler, Ctrl-C


class StopRequest:
    """SIGTERM (pre-emption) or Ctrl-C: note it; the loop stops at its next check with a checkpoint."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.requested = True


# --------------------------------------------------------------------------- the loop
def check_run(args, accelerator):
    """The checks of a run's setting that both scripts share: precision, and --out / --resume."""
    if accelerator.mixed_precision == "fp16":
        raise ValueError("use bf16 (or no) mixed precision: fp16 would need loss scaling through the double backward")
    state_path = os.path.join(args.out, STATE)
    if os.path.exists(state_path) and not args.resume:
        raise ValueError(f"{args.out} already holds a run: continue it with --resume {args.out}, or choose another --out")
    if args.resume and not os.path.exists(state_path):
        raise ValueError(f"nothing to resume: {state_path} does not exist")


def train(args, accelerator, model, eps, micro_batches, steps_per_epoch, held_out, gamma_subset, metadata):
    """The training loop of both scripts. `micro_batches(step)` gives the (x, y) micro-batches of
    optimiser step `step` on this process (one, or the gradient-accumulation steps). `held_out`
    and `gamma_subset` are (uint8 images, labels) on the device for evaluation and for γ; `metadata`
    (the dataset, ...) goes into every checkpoint."""
    device = accelerator.device
    optimizer = optimizer_for(model, args)
    step, best = 0, -1.0
    if args.resume:
        state = torch.load(os.path.join(args.out, STATE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    loss_fn, options = methods.METHODS[args.method], selected_options(args)
    total_steps = args.epochs * steps_per_epoch
    log_path = os.path.join(args.out, "log.jsonl")
    if accelerator.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        if not args.resume:
            with open(os.path.join(args.out, "config.json"), "w") as f:
                json.dump(provenance(args, accelerator), f, indent=1)
        accelerator.print(f"{args.method} on {args.arch} ({args.activation}), eps {args.eps}, {total_steps} steps of "
                          f"{args.batch_size} images, {accelerator.num_processes} process(es) on {device}; "
                          f"{'resuming at step ' + str(step) if step else 'starting'} -> {args.out}")

    def log(entry):
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, **entry}) + "\n")

    def checkpoint(name="last.safetensors", metrics=None):
        if accelerator.is_main_process:
            meta = {**metadata, "method": args.method, "options": options, "eps": eps, "step": step,
                    "epoch": step / steps_per_epoch, **(metrics or {})}
            save(args.out, unwrapped, optimizer, step, best, meta, name)
        accelerator.wait_for_everyone()

    sums, count, nonfinite, interval_start = {}, 0, torch.zeros((), device=device), time.time()
    model.train()
    with StopRequest() as stop, tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process,
                                     dynamic_ncols=True) as bar:
        while step < total_steps:
            # ---- one optimiser step: set lr and ε, the method's loss and backward on each micro-batch
            lr, eps_now = learning_rate(args, step, steps_per_epoch, total_steps), epsilon(args, eps, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro, (x, y) in enumerate(micro_batches(step)):
                with accelerator.accumulate(model):  # gradients are synchronised on the last micro-batch
                    stream = accelerator.process_index + accelerator.num_processes * micro
                    generator = generator_for(args, step, device, "method", stream)
                    loss, info = loss_fn(model, x, y, eps_now, generator=generator, **options)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                # metrics stay on the device until the checks below
                nonfinite += ~torch.isfinite(loss.detach())
                logits = info.get("logits", info.get("adv_logits"))
                terms = {"loss": loss.detach(),
                         "train_acc" if "logits" in info else "adv_acc": (logits.argmax(1) == y).float().mean()}
                terms.update({k: v.float().mean() for k, v in info.items() if k not in ("logits", "adv_logits", "delta")})
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v
                count += 1
            step += 1
            bar.update(1)
            if args.log_gamma_every and step % args.log_gamma_every == 0 and accelerator.is_main_process:
                log({"kind": "gamma", "eps": eps, **measure_gamma(unwrapped, *gamma_subset, eps, args, step)})
            # ---- checks, at the same steps on every process: before any checkpoint, and every --log-every
            end_of_epoch = step % steps_per_epoch == 0
            save_now = end_of_epoch or step == total_steps or (args.save_every and step % args.save_every == 0)
            if step % args.log_every and not save_now:
                continue
            flags = accelerator.reduce(torch.stack([nonfinite, torch.tensor(float(stop.requested), device=device)]), "sum")
            if flags[0].item() > 0:
                message = (f"the loss became NaN or inf within the {count} micro-batches before step {step}; stopped "
                           f"without saving. The last good checkpoint is {os.path.join(args.out, 'last.safetensors')} "
                           f"(continue with --resume {args.out}, e.g. after lowering lr in its config.json)")
                sys.exit(f"{os.path.basename(sys.argv[0])}: {message}" if accelerator.is_main_process else 1)
            means = {k: accelerator.reduce(v / count, "mean").item() for k, v in sums.items()}
            images = count * args.batch_size / accelerator.gradient_accumulation_steps  # all processes
            log({"kind": "train", "lr": lr, "eps": eps_now, **means, "images_per_s": images / (time.time() - interval_start)})
            bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means.get('train_acc', means.get('adv_acc')):.3f}")
            sums, count = {}, 0
            # ---- evaluation and checkpoints
            if (end_of_epoch and (step // steps_per_epoch) % args.eval_every == 0) or step == total_steps:
                metrics = evaluate(unwrapped, *held_out, eps, args, accelerator)
                log({"kind": "eval", "eps": eps, **metrics})
                accelerator.print(f"step {step}: clean {100 * metrics['eval_clean_acc']:.2f}%  "
                                  f"PGD-{args.eval_steps} {100 * metrics['eval_robust_acc']:.2f}%")
                if metrics["eval_robust_acc"] > best:
                    best = metrics["eval_robust_acc"]
                    checkpoint("best.safetensors", metrics)
            if save_now or flags[1].item() > 0:
                checkpoint()
            if flags[1].item() > 0:
                accelerator.print(f"stopped at step {step} with a checkpoint; continue with --resume {args.out}")
                return
            interval_start = time.time()  # evaluation and saving are not training time
    accelerator.print(f"done: {os.path.join(args.out, 'best.safetensors')} (PGD accuracy {100 * best:.2f}%), "
                      f"{os.path.join(args.out, 'last.safetensors')}")


def main(argv=None):
    from accelerate import Accelerator

    args = get_args(argv)
    accelerator = Accelerator()
    try:  # everything that can fail because of the user's input, before any training
        eps = attacks.parse_eps(args.eps)
        if args.batch_size % accelerator.num_processes:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by {accelerator.num_processes} processes")
        check_run(args, accelerator)
        images, labels, _ = data.load_cifar10(args.data_dir, "train", download=args.download)
        test_images, test_labels, _ = data.load_cifar10(args.data_dir, "test")
        if len(labels) < args.batch_size:
            raise ValueError(f"the training set ({len(labels)} images) is smaller than one batch ({args.batch_size})")
        torch.manual_seed(args.seed)
        model = models.build_model(args.arch, num_classes=int(labels.max()) + 1, activation=args.activation)
    except (ValueError, OSError, data.DataError) as e:
        sys.exit(f"train_cifar.py: error: {e}")
    device = accelerator.device
    images, labels = images.to(device), labels.to(device)
    steps_per_epoch = len(labels) // args.batch_size
    train(args, accelerator, model, eps,
          lambda step: [batch_for(images, labels, args, step, steps_per_epoch, accelerator)], steps_per_epoch,
          held_out=(test_images.to(device), test_labels.to(device)),
          gamma_subset=(images[:args.gamma_n], labels[:args.gamma_n]), metadata={"dataset": "cifar10"})


if __name__ == "__main__":
    main()
