"""Train a CIFAR-10 classifier at ε = 8/255 with LLR or a baseline, on one device or many.

    python train_cifar.py --method llr                                # the authors' config: make cifar
    accelerate launch --num_processes 8 --mixed_precision bf16 train_cifar.py --method llr
    python train_cifar.py --method adv --adv-steps 2 --arch preact-resnet18 --epochs 15 --out runs/adv2
    python train_cifar.py --resume runs/cifar-llr                    # continue a stopped run
    python train_cifar.py --arch timm:vit_small_patch16_224 --timm-kwargs img_size=32 patch_size=4 --llr-steps 2
    python eval.py runs/cifar-llr --eps 8/255                        # its best.safetensors, on the test set

A run directory (--out) holds config.json (arguments, versions, device, git commit),
log.jsonl (one JSON object per log interval, evaluation and γ measurement),
last.safetensors and best.safetensors (the best Untargeted accuracy on --val-n training
images held out from training; both readable by eval.py), and state.pt, from which
--resume continues. The test set is not read. Every random draw (data order,
augmentation, the methods' random starts) comes from generators seeded by (seed, step,
process), so a resumed run ends with the same weights as an uninterrupted one. SIGTERM or
Ctrl-C stops after the current step with a checkpoint and exit status 143 or 130 (so that
`train && eval` does not evaluate a half-trained model); a non-finite loss stops the run
without overwriting the last good checkpoint.
"""
import os
import sys

import torch

import ball
import cli
import data
import models
import training


def get_args(argv=None):
    p = cli.ArgumentParser(__doc__, __file__)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/cifar10", help="torchvision's CIFAR-10, or an ImageFolder tree "
                   "with train/ and test/")
    g.add_argument("--download", action="store_true", help="download torchvision's CIFAR-10 into --data-dir if missing")
    g.add_argument("--train-n", type=int, default=0, metavar="N",
                   help="train on a fixed, class-balanced subset of N training images (0: all of them but the "
                        "held-out ones)")
    g.add_argument("--pad-mode", default="reflect", choices=list(data.PAD_MODES),
                   help="the 4-pixel padding of the random crops: reflect (the LLR authors' datasets.py) or zeros "
                        "(torchvision's RandomCrop(32, padding=4): GradAlign data.py:12, train_fgsm.py, N-FGSM, ELLE)")
    g = p.add_argument_group("model and threat model")
    g.add_argument("--arch", default="wrn-28-8", help=f"one of {models.ARCHITECTURES} (paper: wrn-28-8; GradAlign's "
                                                      f"Fig. 11: cnn-1x4 with --activation relu)")
    training.add_model_arguments(g)
    g.add_argument("--eps", default="8/255",
                   help="the radius, in pixel units of [0, 1] images: ℓ∞: 8/255, or 8 meaning 8/255 (the "
                        "paper's; a number of 1 or more is in units of 1/255); with --norm l2 every number is in "
                        "pixel units: 0.5, or 36/255 (ball.parse_eps)")
    g.add_argument("--eps-warmup", type=cli.number, default=None, metavar="EPOCHS",
                   help="ε grows linearly from 0 over this many epochs (default: 0.64 for LLR, the authors' "
                        "500 steps of 64 images; 0 for the other methods, as their own code)")
    g = p.add_argument_group("optimisation (SGD with momentum by default; the authors' config.py, see the README's "
                             "table; --optimizer, --lr-schedule below)")
    g.add_argument("--epochs", type=int, default=128, help="authors' config: 100k steps of 64 images")
    g.add_argument("--batch-size", type=int, default=64, help="global batch, split across processes (authors' config)")
    g.add_argument("--lr", type=cli.number, default=0.2,
                   help="authors' config: 0.1 on their loss, which is twice ours")
    g.add_argument("--lr-warmup", type=cli.number, default=0.0, metavar="EPOCHS",
                   help="linear warm-up of the lr")
    g.add_argument("--lr-decay-at", default="0.8,0.88,0.96", metavar="FRACTIONS",
                   help="the learning rate is divided by 10 after these fractions of training "
                        "(authors' config: 80k, 88k, 96k of 100k steps)")
    g.add_argument("--momentum", type=cli.number, default=0.9,
                   help="authors' config: 0.9 (Adam's β1 with --optimizer adam)")
    g.add_argument("--weight-decay", type=cli.number, default=1e-4,
                   help="on conv and linear weights only, or on all parameters with --weight-decay-on all (authors' "
                        "config: ℓ2 weight 2e-4 on their doubled loss)")
    training.add_run_arguments(p, "cifar", val_n=1000)
    return training.parse_or_resume(p, argv, "cifar", llr_eps_warmup=0.64)


def batch_for(images, labels, args, step, steps_per_epoch, accelerator):
    """This process's share of the global batch at `step`: a permutation of the training set
    per epoch (seeded by (seed, epoch)), cut into global batches, split across processes,
    and augmented on the device (flip, 4-pixel --pad-mode padding and crop)."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(len(labels), generator=training.generator_for(args, epoch, "cpu", "epoch"))
    batch = order[i * args.batch_size:(i + 1) * args.batch_size][accelerator.process_index::accelerator.num_processes]
    x = images[batch.to(images.device)].float() / 255
    augment = training.generator_for(args, step, x.device, "augment", accelerator.process_index)
    x = data.crop_and_flip(x, generator=augment, mode=args.pad_mode)
    return x, labels[batch.to(labels.device)]


def train(args, accelerator, model, eps, images, labels, holdout, selection, classes):
    """The training loop: `images`, `labels` (uint8, on the device) are the training images; `holdout`
    the (images, labels) held out from them, evaluated after each epoch to choose best.safetensors.
    Returns the exit status: 0, or 128 + the signal that stopped the run (with a checkpoint)."""
    device, main = accelerator.device, accelerator.is_main_process
    steps_per_epoch = len(labels) // args.batch_size
    shape = data.describe(images, classes)  # what the ε-ball is a ball of: channels, size, classes
    run = training.Run(args, accelerator, steps_per_epoch, eps,
                       {"dataset": "cifar10", "classes": classes, "data_dir": cli.record_path(args.data_dir),
                        "images": shape})
    step, best, model, optimizer, loss_fn = run.prepare(
        model, training.make_optimizer(model, args),
        f"{args.method} on {args.arch} ({model.config['activation']}), {ball.describe_eps(eps, args.norm)}, "
        f"images {shape['channels']}x{shape['size'][0]}x{shape['size'][1]} in {shape['classes']} classes, "
        f"{run.total_steps} steps of {args.batch_size} images{', compiled' if args.compile else ''}")
    unwrapped = accelerator.unwrap_model(model)  # what is evaluated and saved
    metrics = training.IntervalMetrics(device, images=args.batch_size)
    with training.StopRequest(step + 1, run.total_steps, announce=main) as stop, run.progress(step) as bar:
        while step < run.total_steps:
            lr, eps_now = run.schedule(step, optimizer)
            x, y = batch_for(images, labels, args, step, steps_per_epoch, accelerator)
            optimizer.zero_grad(set_to_none=True)
            loss, info = loss_fn(x, y, eps_now, training.generator_for(args, step, device, "method",
                                                                        accelerator.process_index))
            accelerator.backward(loss)  # with the double backward where the method has one
            training.clip_gradients(args, accelerator, model)
            optimizer.step()
            loss_fn.after_optimizer_step()  # a method's state across steps (ELLE-A's λ)
            metrics.add(loss, info, y)
            step += 1
            bar.update(1)

            # the policy: when to measure γ, log, evaluate, keep the best, save and stop (alike on every process)
            if args.log_gamma_every and step % args.log_gamma_every == 0:  # Fig. 2, on training images
                run.log_gamma(step, unwrapped, images[:args.gamma_n], labels[:args.gamma_n])
            stop_now, by_clock = run.stop_and_clock(stop, step)  # a SIGTERM or Ctrl-C; --save-minutes
            end_of_epoch = step % steps_per_epoch == 0
            save = (end_of_epoch or step == run.total_steps or by_clock or stop_now
                    or (args.save_every and step % args.save_every == 0))
            if step % args.log_every and not save:
                continue
            if metrics.nonfinite(accelerator):  # NaN or inf: stop, keeping the last good checkpoint
                run.exit_nonfinite(step, metrics.count)
            run.log_train(step, metrics, bar, lr=lr, eps=eps_now)
            if args.val_n and not stop_now and (step == run.total_steps or (
                    end_of_epoch and (step // steps_per_epoch) % args.eval_every == 0)):
                result = run.evaluate(step, unwrapped, *holdout)  # logged and printed
                if result["val_pgd_acc"] > best:  # the strong attack's accuracy chooses best.safetensors
                    best = result["val_pgd_acc"]
                    run.save_best(step, unwrapped, {**result, "selection": selection})
            if save:
                run.save(step, unwrapped, optimizer, loss_fn, best)
            if stop_now:
                return run.stopped(step, stop)
            metrics.start_clock()  # evaluating and saving are not training
    run.done(best if args.val_n else None, selection["metric"])
    return 0


def main(argv=None):
    """The command line (`argv`: sys.argv[1:] when None). Returns the exit status: 0, or after a
    stop by SIGTERM or Ctrl-C, with its checkpoint written, 143 or 130 (128 + the signal)."""
    from accelerate import Accelerator

    args = get_args(argv)
    accelerator = Accelerator()
    try:
        try:  # everything that can fail because of the user's input, before any training
            eps = ball.parse_eps(args.eps, args.norm)
            training.check_run_args(args)
            cli.require(args.train_n >= 0, f"--train-n must not be negative, got {args.train_n}")
            class_count = data.cifar10_class_count(args.data_dir)  # before the data is read
            cli.require(not args.train_n or not class_count or args.train_n % class_count == 0,
                        f"--train-n {args.train_n} must be a multiple of the {class_count} classes")
            cli.require(args.batch_size % accelerator.num_processes == 0,
                        f"--batch-size {args.batch_size} is not divisible by {accelerator.num_processes} processes")
            training.build_model(args, 10, "cifar10")  # an unknown architecture fails here, before the data is read
            training.check_compile(args, accelerator)
            training.claim_run_dir(args, accelerator)
            finished = training.finished_run(args)
            if finished:
                accelerator.print(finished)
                return 0
            images, labels, classes = data.load_cifar10(args.data_dir, "train", download=args.download)
            train_indices, holdout_indices = data.holdout_split(len(labels), args.val_n)
            if args.train_n:
                train_indices = data.balanced_subset(labels, train_indices, args.train_n)
            cli.require(len(train_indices) >= args.batch_size,
                        f"the training images ({len(train_indices)}) are fewer than one batch ({args.batch_size})")
            torch.manual_seed(args.seed)
            model = training.build_model(args, len(classes), "cifar10")
            models.check_image_size(model, *images.shape[1:])
            if args.init and not args.resume:  # a resumed run's weights come from state.pt
                accelerator.print(models.load_init(model, args.init))
        except (ValueError, OSError, data.DataError) as e:
            sys.exit(f"train_cifar.py: error: {e}")
        training.warn_if_cpu_is_too_slow(model, accelerator, "make cpu-repro (the paper's claim at CPU scale)")
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        return train(args, accelerator, model, eps, images[train_indices], labels[train_indices],
                     holdout=(images[holdout_indices], labels[holdout_indices]),
                     selection=training.selection_record("cifar10", len(labels), holdout_indices, args),
                     classes=classes)
    finally:
        training.release_run_dir(args)  # the lock; and the directory, if a failed start left it empty


if __name__ == "__main__":
    sys.exit(main())
