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
import functools
import sys

import torch

import ball
import data
import methods
import models
import training


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
    g.add_argument("--eps-warmup", type=training.number, default=0.64, metavar="EPOCHS",
                   help="ε grows linearly from 0 over this many epochs (authors' config: 500 steps at batch 64)")
    g = p.add_argument_group("optimisation (SGD with momentum; the authors' config.py)")
    g.add_argument("--epochs", type=int, default=110, help="paper: ~110 epochs")
    g.add_argument("--batch-size", type=int, default=128, help="global batch, split across processes (paper: 128)")
    g.add_argument("--lr", type=training.number, default=0.1, help="authors' config: 0.1")
    g.add_argument("--lr-warmup", type=training.number, default=0.0, metavar="EPOCHS", help="linear warm-up of the lr")
    g.add_argument("--lr-decay-at", default="0.8,0.88,0.96", metavar="FRACTIONS",
                   help="the learning rate is divided by 10 after these fractions of training "
                        "(authors' config: 80k, 88k, 96k of 100k steps)")
    g.add_argument("--momentum", type=training.number, default=0.9, help="authors' config: 0.9")
    g.add_argument("--weight-decay", type=training.number, default=2e-4,
                   help="on conv and linear weights only (authors' config: ℓ2 2e-4 on weights)")
    training.add_run_arguments(p, "cifar")
    return training.parse_or_resume(p, argv, "cifar")


def batch_for(images, labels, args, step, steps_per_epoch, accelerator):
    """This process's share of the global batch at `step`: a permutation of the training set
    per epoch (seeded by (seed, epoch)), cut into global batches, split across processes,
    and augmented on the device (flip, 4-pixel reflect-pad and crop)."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(len(labels), generator=training.generator_for(args, epoch, "cpu", "epoch"))
    batch = order[i * args.batch_size:(i + 1) * args.batch_size][accelerator.process_index::accelerator.num_processes]
    x = images[batch.to(images.device)].float() / 255
    x = data.crop_and_flip(x, generator=training.generator_for(args, step, x.device, "augment", accelerator.process_index))
    return x, labels[batch.to(labels.device)]


def train(args, accelerator, model, eps, images, labels, held_out):
    """The training loop: `images`, `labels` (uint8, on the device) are the training set; `held_out`
    the (images, labels) evaluated after each epoch."""
    device = accelerator.device
    steps_per_epoch = len(labels) // args.batch_size
    loss_fn, options = methods.METHODS[args.method], training.method_options(args)
    evaluate = functools.partial(training.evaluate, images=held_out[0], labels=held_out[1], eps=eps, args=args,
                                 accelerator=accelerator)
    run = training.Run(args, accelerator, steps_per_epoch, eps,
                       {"dataset": "cifar10", "method": args.method, "options": options, "eps": eps},
                       evaluate, gamma_subset=(images[:args.gamma_n], labels[:args.gamma_n]))
    step, model, optimizer = run.prepare(model, training.make_optimizer(model, args),
                                         f"{args.method} on {args.arch} ({args.activation}), eps {args.eps}, "
                                         f"{run.total_steps} steps of {args.batch_size} images")
    with run.progress(step):
        while step < run.total_steps:
            lr, eps_now = run.schedule(step, optimizer)
            x, y = batch_for(images, labels, args, step, steps_per_epoch, accelerator)
            optimizer.zero_grad(set_to_none=True)
            loss, info = loss_fn(model, x, y, eps_now, **options,
                                 generator=training.generator_for(args, step, device, "method", accelerator.process_index))
            accelerator.backward(loss)  # with the double backward where the method has one
            optimizer.step()
            run.record(loss, info, y)
            step += 1
            if run.end_of_step(step, model, optimizer, lr, eps_now):
                return


def main(argv=None):
    from accelerate import Accelerator

    args = get_args(argv)
    accelerator = Accelerator()
    try:  # everything that can fail because of the user's input, before any training
        eps = ball.parse_eps(args.eps)
        if args.batch_size % accelerator.num_processes:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by {accelerator.num_processes} processes")
        training.check_run(args, accelerator)
        images, labels, _ = data.load_cifar10(args.data_dir, "train", download=args.download)
        test_images, test_labels, _ = data.load_cifar10(args.data_dir, "test")
        if len(labels) < args.batch_size:
            raise ValueError(f"the training set ({len(labels)} images) is smaller than one batch ({args.batch_size})")
        torch.manual_seed(args.seed)
        model = models.build_model(args.arch, num_classes=int(labels.max()) + 1, activation=args.activation)
    except (ValueError, OSError, data.DataError) as e:
        sys.exit(f"train_cifar.py: error: {e}")
    device = accelerator.device
    train(args, accelerator, model, eps, images.to(device), labels.to(device),
          held_out=(test_images.to(device), test_labels.to(device)))


if __name__ == "__main__":
    main()
