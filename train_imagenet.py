"""Train a softplus ResNet-152 on ImageNet with LLR (or ADV, or plain) at ε = 4/255 or 16/255.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_imagenet.py --eps 4 --data-dir /data/imagenet
    accelerate launch --mixed_precision bf16 train_imagenet.py --eps 4 --data-dir /data/imagenet   # one GPU: same global batch
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_imagenet.py --eps 16 --data-dir /data/imagenet
    accelerate launch ... train_imagenet.py --method adv --adv-steps 30 --eps 4 --data-dir /data/imagenet  # the paper's ADV
    accelerate launch ... train_imagenet.py --resume runs/imagenet-llr                                     # after pre-emption
    accelerate launch ... train_imagenet.py --arch timm:vit_small_patch16_224 --init vit_s.safetensors --epochs 10 ...  # fine-tune
    python eval.py runs/imagenet-llr/best.safetensors --eps 4/255 --data-dir /data/imagenet --num-targets 20 --bf16

--eps 4 means 4/255, as in every script here. The global batch (--batch-size) is reached on any
number of devices by gradient accumulation: per-device batch × processes × accumulation steps.
The method functions, the run directory and the checkpoint format are those of train_cifar.py
(training.py holds what both share): config.json, log.jsonl, last/best.safetensors (best is
chosen on --val-n training images held out from training) and state.pt; --resume continues
exactly; SIGTERM or Ctrl-C stops after the current step with a checkpoint and exit status 143
or 130.
Batch norm is synchronised across GPUs (nn.SyncBatchNorm; llr.py makes it twice
differentiable); the data order and each image's augmentation are functions of
(seed, epoch, index), so a resumed run reads exactly the images an uninterrupted one would.
"""
import os
import signal
import sys

import torch

import ball
import cli
import data
import models
import training
from cli import number
from training import STOP_SIGNALS

MIX = 1_000_003  # to combine integers into one seed


def get_args(argv=None):
    p = cli.ArgumentParser(__doc__, __file__)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="ImageNet as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (required)")
    g.add_argument("--image-size", type=int, default=224, help="training crop and evaluation size (standard)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    g = p.add_argument_group("model and threat model")
    g.add_argument("--arch", default="resnet152", help=f"one of {models.ARCHITECTURES} (paper: resnet152)")
    training.add_model_arguments(g)
    g.add_argument("--eps", default="4",
                   help="the radius, in pixel units: ℓ∞: 4 means 4/255, as does 4/255 (paper: 4 or 16); with --norm "
                        "l2 every number is in pixel units (ball.parse_eps)")
    g.add_argument("--eps-warmup", type=number, default=None, metavar="EPOCHS",
                   help="ε grows linearly from 0 over this many epochs (default: 6 for LLR, our choice, the lr "
                        "warm-up's length; 0 for the other methods)")
    g.add_argument("--no-sync-bn", action="store_true", help="keep batch norm per device on multiple GPUs")
    g = p.add_argument_group("optimisation (SGD with momentum; the ImageNet adversarial-training recipe of "
                             "Xie et al. 2019, 110 epochs as the paper)")
    g.add_argument("--epochs", type=int, default=110, help="the paper, as the first release read it")
    g.add_argument("--batch-size", type=int, default=4096, help="global batch (Xie et al.)")
    g.add_argument("--per-device-batch", type=int, default=32,
                   help="images per device per micro-batch; gradients accumulate to --batch-size")
    g.add_argument("--lr-per-256", type=number, default=0.1, help="the lr is this × global batch / 256 (Goyal et al.)")
    g.add_argument("--lr-warmup", type=number, default=6.0, metavar="EPOCHS", help="linear lr warm-up (Xie et al.)")
    g.add_argument("--lr-decay-at", default="0.318,0.636,0.864", metavar="FRACTIONS",
                   help="÷10 after these fractions of training: epochs 35, 70 and 95 of 110 (Xie et al.)")
    g.add_argument("--momentum", type=number, default=0.9, help="Xie et al.")
    g.add_argument("--weight-decay", type=number, default=1e-4, help="on conv and linear weights only (Xie et al.)")
    training.add_run_arguments(p, "imagenet", val_n=10000)
    p.set_defaults(save_every=200, log_every=20)
    llr_steps = next(a for a in p._actions if a.dest == "llr_steps")  # its default depends on --eps
    llr_steps.default = None
    llr_steps.help = "steps of llr_loss (unset: 2 at --eps 4/255 or less, 10 above: the paper's)"
    args = training.parse_or_resume(p, argv, "imagenet", llr_eps_warmup=6.0)
    if args.data_dir is None:
        p.error("--data-dir is required (ImageNet as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    if args.llr_steps is None:  # the paper: 2 inner steps at ε = 4/255, 10 at 16/255
        try:
            args.llr_steps = 10 if ball.parse_eps(args.eps, args.norm) > 4 / 255 else 2
        except ValueError:
            pass  # main() reports a bad --eps in one line
    return args


class SeededFolder(torch.utils.data.Dataset):
    """An ImageFolder whose item (index, seed) is that image with its augmentation drawn from `seed`:
    augmentation is a function of the sample, not of the worker that happens to load it."""

    def __init__(self, folder, transform):
        self.folder = data.ImageFolderDataset(folder, transform)

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global RNG
            torch.manual_seed(seed)
            return self.folder[index]


def _ignore_stop_signals(worker_id):
    """A scheduler's SIGTERM (or Ctrl-C) reaches the DataLoader workers too: they keep loading,
    and the main process finishes the step and checkpoints before it stops. The workers are
    started with these signals blocked (see FolderBatches._start), so one that arrives while a
    worker starts, before this runs, is discarded here instead of killing the worker."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class FolderBatches:
    """The micro-batches of optimiser step `step` for this process. Each epoch is a permutation
    of the training images (`indices` of the dataset) seeded by (seed, epoch), cut into global
    batches; each global batch is split across processes, then into micro-batches. A new
    DataLoader starts at the step asked for, so a resumed run continues mid-epoch with the same
    images and augmentations."""

    def __init__(self, dataset, indices, args, accelerator, steps_per_epoch, accumulation):
        self.dataset, self.indices, self.args, self.accelerator = dataset, indices, args, accelerator
        self.steps_per_epoch, self.accumulation = steps_per_epoch, accumulation
        self.iterator, self.next_step = None, None

    def _start(self, step):
        args, rank, world = self.args, self.accelerator.process_index, self.accelerator.num_processes
        epoch, first = divmod(step, self.steps_per_epoch)
        epoch_seed = args.seed * MIX + epoch
        order = self.indices[torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(epoch_seed))]
        keys = []
        for b in range(first, self.steps_per_epoch):
            for i in order[b * args.batch_size:(b + 1) * args.batch_size][rank::world].tolist():
                keys.append((i, epoch_seed * MIX + i))
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=args.per_device_batch, sampler=keys,
                                             num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                             drop_last=True, worker_init_fn=_ignore_stop_signals)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by the workers
        try:
            self.iterator = iter(loader)  # starts the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a signal held meanwhile arrives now

    def __call__(self, step):
        if step != self.next_step or step % self.steps_per_epoch == 0:
            self._start(step)
        self.next_step = step + 1
        device = self.accelerator.device
        return [(x.to(device, non_blocking=True).float() / 255, y.to(device, non_blocking=True))
                for x, y in (next(self.iterator) for _ in range(self.accumulation))]


def check_val_folder(data_dir):
    """eval.py reads ImageNet's validation images as val/<wnid>/*.JPEG: a val/ that holds its images
    directly (as ImageNet distributes them) is refused at start-up, not found after training."""
    val = os.path.join(data_dir, "val")
    if os.path.isdir(val):
        with os.scandir(val) as entries:
            flat = not any(e.is_dir() for e in entries)
        cli.require(not flat, f"{val} holds no class folders (a flat ImageNet validation folder?); eval.py reads "
                              f"val/<wnid>/*.JPEG, the layout of train/: sort the images into class folders first")


def main(argv=None):
    """The command line (`argv`: sys.argv[1:] when None). Returns the exit status: 0, or after a
    stop by SIGTERM or Ctrl-C, with its checkpoint written, 143 or 130 (128 + the signal)."""
    from accelerate import Accelerator

    args = get_args(argv)
    accelerator = Accelerator()
    processes = accelerator.num_processes
    try:
        try:  # everything that can fail because of the user's input, before any training
            eps = ball.parse_eps(args.eps, args.norm)
            args.lr = args.lr_per_256 * args.batch_size / 256
            training.check_run_args(args)
            for flag in ("per_device_batch", "image_size"):
                cli.require(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1")
            cli.require(args.workers >= 0, f"--workers must not be negative, got {args.workers}")
            accumulation, rest = divmod(args.batch_size, args.per_device_batch * processes)
            cli.require(rest == 0 and accumulation >= 1, f"--batch-size {args.batch_size} is not a multiple of "
                                                         f"--per-device-batch {args.per_device_batch} x {processes} "
                                                         f"processes")
            accelerator.gradient_accumulation_steps = accumulation
            # an unknown architecture, or one that cannot take --image-size images, fails here
            models.check_image_size(training.build_model(args, 1000, "imagenet"), 3, args.image_size, args.image_size)
            training.check_compile(args, accelerator)
            check_val_folder(args.data_dir)
            training.claim_run_dir(args, accelerator)
            finished = training.finished_run(args)
            if finished:
                accelerator.print(finished)
                return 0
            train_folder = os.path.join(args.data_dir, "train")
            train_set = SeededFolder(train_folder, data.imagenet_transform(True, args.image_size))
            train_indices, holdout_indices = data.holdout_split(len(train_set), args.val_n)
            holdout = data.load_folder_images(train_folder, holdout_indices, args.image_size, args.workers)
            spread = torch.randperm(len(train_indices), generator=torch.Generator().manual_seed(0))[:args.gamma_n]
            gamma_subset = data.load_folder_images(train_folder, train_indices[spread], args.image_size, args.workers)
            steps_per_epoch = len(train_indices) // args.batch_size
            cli.require(steps_per_epoch > 0,
                        f"the training images ({len(train_indices)}) are fewer than one batch ({args.batch_size})")
            torch.manual_seed(args.seed)
            model = training.build_model(args, len(train_set.folder.classes), "imagenet")
            if args.init and not args.resume:  # a resumed run's weights come from state.pt
                accelerator.print(models.load_init(model, args.init))
        except (ValueError, OSError, data.DataError) as e:
            sys.exit(f"train_imagenet.py: error: {e}")
        training.warn_if_cpu_is_too_slow(model, accelerator, "train_cifar.py with a small model (make cpu-repro)")
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda" and not args.no_sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict keys as BatchNorm2d
        device = accelerator.device
        batches = FolderBatches(train_set, train_indices, args, accelerator, steps_per_epoch, accumulation)
        return train(args, accelerator, model, eps, batches, steps_per_epoch,
                     holdout=tuple(t.to(device) for t in holdout),
                     selection=training.selection_record("imagenet", len(train_set), holdout_indices, args),
                     gamma_subset=tuple(t.to(device) for t in gamma_subset), classes=train_set.folder.classes)
    finally:
        training.release_run_dir(args)  # the lock; and the directory, if a failed start left it empty


def train(args, accelerator, model, eps, batches, steps_per_epoch, holdout, selection, gamma_subset, classes):
    """The training loop: `batches(step)` gives this process's micro-batches of optimiser step
    `step`; gradients are accumulated over them. `holdout` (the training images held out, evaluated
    after each epoch to choose best.safetensors) and `gamma_subset` (for γ, Fig. 2) are (uint8
    images, labels) on the device. Returns the exit status: 0, or 128 + the signal that stopped
    the run (with a checkpoint)."""
    device, main = accelerator.device, accelerator.is_main_process
    run = training.Run(args, accelerator, steps_per_epoch, eps,
                       {"dataset": "imagenet", "classes": classes, "data_dir": cli.record_path(args.data_dir),
                        "image_size": args.image_size})
    step, best, model, optimizer, loss_fn = run.prepare(
        model, training.make_optimizer(model, args),
        f"{args.method} on {args.arch} ({model.config['activation']}), {ball.describe_eps(eps, args.norm)}, "
        f"{run.total_steps} steps of "
        f"{args.batch_size} images in {accelerator.gradient_accumulation_steps} micro-batches per process"
        f"{', compiled' if args.compile else ''}")
    unwrapped = accelerator.unwrap_model(model)  # what is evaluated and saved
    metrics = training.IntervalMetrics(device, images=args.per_device_batch * accelerator.num_processes)
    with training.StopRequest(step + 1, run.total_steps, announce=main) as stop, run.progress(step) as bar:
        while step < run.total_steps:
            lr, eps_now = run.schedule(step, optimizer)
            for micro, (x, y) in enumerate(batches(step)):
                with accelerator.accumulate(model):  # gradients are synchronised on the last micro-batch
                    stream = accelerator.process_index + accelerator.num_processes * micro
                    generator = training.generator_for(args, step, device, "method", stream)
                    loss, info = loss_fn(x, y, eps_now, generator)
                    accelerator.backward(loss)
                    training.clip_gradients(args, accelerator, model)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                metrics.add(loss, info, y)
            loss_fn.after_optimizer_step()  # once per optimiser step: a method's state (ELLE-A's λ)
            step += 1
            bar.update(1)

            # the policy: when to measure γ, log, evaluate, keep the best, save and stop (alike on every process)
            if args.log_gamma_every and step % args.log_gamma_every == 0:  # Fig. 2, on training images
                run.log_gamma(step, unwrapped, *gamma_subset)
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


if __name__ == "__main__":
    sys.exit(main())
