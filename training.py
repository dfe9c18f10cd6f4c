"""What the two training scripts share, so that each can hold only its own experiment and loop:
the command-line flags of the methods and of a run, the learning-rate and ε schedules, seeded
random streams, the run directory (config, log, checkpoints, resume, lock), stop signals, the
metrics of a log interval, and the evaluation and γ measurement during training. These are
mechanics; the policy (when to log, evaluate and save, which checkpoint is best, what a NaN or
a stop does) is written out in each script's loop.

A run directory holds config.json (arguments, command, versions, device, git commit), log.jsonl
(one JSON object per log interval, evaluation and γ measurement), last.safetensors and
best.safetensors (readable by eval.py and `models.load_checkpoint`), and state.pt, from which
--resume continues. Every random draw is a function of (seed, step, stream, process), so a
resumed run ends with the same weights as an uninterrupted one.
"""
import argparse
import contextlib
import fcntl
import fnmatch
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import attacks
import ball
import cli
import data
import llr
import methods
import models
import soc
from cli import boolean, fractions_of_training, number, require

STATE = "state.pt"
LOCK = "lock"  # held by the training process that writes the run directory
CYCLIC_CLOCK = {"cyclic": 0, "cyclic-gradalign": 1}  # the step s of a one-cycle schedule reads it at (s + this)/steps
CYCLIC_PEAK = 0.5  # --lr-peak: CyclicLR's half-way peak (train_fgsm.py)
RUN_FILES = ("config.json", "log.jsonl", "last.safetensors", "best.safetensors", STATE)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # pre-emption by a scheduler, Ctrl-C
# flags that may change when a run is resumed (the rest are the run's setting, fixed in config.json)
RESUMABLE = ("data_dir", "download", "workers", "log_every", "save_every", "save_minutes", "lr", "lr_per_256",
             "compile")


# --------------------------------------------------------------------------- command line

def add_method_options(parser):
    """--<method>-<option> flags generated from each method's keyword arguments, with the
    function's own defaults (the one place that holds them)."""
    for name, fn in methods.METHODS.items():
        group = parser.add_argument_group(f"--method {name} (defaults from {fn.__module__}.{fn.__name__})")
        for p in inspect.signature(fn).parameters.values():
            if p.default is p.empty or p.name in ("generator", "norm"):
                continue
            flag, dest = f"--{name}-{p.name.replace('_', '-')}", _option_dest(name, p.name)
            helped = f"{p.name} of {fn.__name__}" + (" (unset: its own rule)" if p.default is None else "")
            if isinstance(p.default, str):  # a text option: one of methods.CHOICES
                group.add_argument(flag, default=p.default, dest=dest, choices=methods.CHOICES[p.name], help=helped)
                continue
            kind = (boolean if isinstance(p.default, bool) else int if isinstance(p.default, int) else number)
            group.add_argument(flag, type=kind, default=p.default, dest=dest, **(  # a bare boolean flag means true
                               {"nargs": "?", "const": True} if kind is boolean else {}),
                               metavar={boolean: "BOOL", int: "N"}.get(kind, "X"), help=helped)


def method_options(args):
    """The keyword options of the chosen method, read back from the generated flags."""
    fn = methods.METHODS[args.method]
    return {p.name: getattr(args, _option_dest(args.method, p.name)) for p in inspect.signature(fn).parameters.values()
            if p.default is not p.empty and p.name not in ("generator", "norm")}


def _option_dest(method, option):
    """The attribute of a method's option: elle-a's lambda_max is args.elle_a_lambda_max."""
    return f"{method.replace('-', '_')}_{option}"


def add_model_arguments(group):
    """The model flags both training scripts share, beside their own --arch: --activation, and a timm
    model's size arguments and initial weights."""
    group.add_argument("--activation", choices=list(models.ACTIVATIONS),
                       help="softplus (smooth, as double backprop needs; the default) or relu; for a timm: model, "
                            "unset keeps the model's own (GELU in ViT, DeiT, Swin, ConvNeXt: smooth), and a choice "
                            "here is passed as timm's act_layer (refused by a model that takes none, e.g. Swin)")
    group.add_argument("--timm-kwargs", nargs="+", default=[], metavar="NAME=VALUE",
                       help="a timm: model's size arguments, passed to timm.create_model: e.g. img_size=32 "
                            "patch_size=4 depth=6 (ViT), depths=2,2 (a tuple); values are Python literals, else text")
    group.add_argument("--init", metavar="PATH",
                       help="start from these weights (fine-tuning): safetensors or a torch state dict in the "
                            "network's key layout (timm's for a timm: model), checked key by key; a classifier of "
                            "another class count starts fresh, as timm's load_pretrained. Nothing is downloaded")


def build_model(args, num_classes, normalization):
    """The model of --arch, --activation and --timm-kwargs (models.build_model); ValueError in one line."""
    return models.build_model(args.arch, num_classes=num_classes, activation=args.activation,
                              normalization=normalization, timm_kwargs=models.parse_timm_kwargs(args.timm_kwargs))


def add_run_arguments(parser, out_prefix, val_n):
    """The flags both training scripts share: methods and their options, the seed, the held-out
    validation images, logging, evaluation, checkpoints and --resume."""
    g = parser.add_argument_group("method")
    g.add_argument("--method", default="llr", choices=list(methods.METHODS), help="the training objective (methods.py)")
    g.add_argument("--compile", type=boolean, nargs="?", const=True, default=False, metavar="BOOL",
                   help="compute the method's loss with compiled code (methods.compiled): llr, lfr and cure through "
                        "torch.func.grad traced by torch.compile, the others on torch.compile(model) (gradalign is refused: "
                        "no compiled double backprop); the same "
                        "math, rounding aside. The first steps compile (minutes); one process only, but for first-order LLR "
                        "(--llr-first-order), which averages its gradients across processes itself. May change on "
                        "--resume")
    g.add_argument("--norm", default="linf", choices=["linf", "l2"],
                   help="the threat model: the ball of LLR's search and of ADV's, TRADES' and LFR's attacks, and of "
                        "the evaluation after each epoch (every method); the paper's is linf")
    g = parser.add_argument_group("optimiser and learning-rate schedule (the rate, momentum, weight decay: above)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                   help="sgd: SGD with --momentum (the LLR authors', and the CO literature's for PreAct ResNet-18); "
                        "adam: torch's Adam, β1 = --momentum, β2 = 0.999 (torch's defaults at 0.9), weight decay "
                        "added to the gradient (L2, not AdamW): GradAlign's CNN runs, their train.py:96")
    g.add_argument("--weight-decay-on", default="weights", choices=["weights", "all"],
                   help="the parameters --weight-decay applies to: weights: conv and linear weights, not biases or "
                        "batch norm (the LLR authors' config, Xie et al.); all: every parameter, as the CO literature "
                        "passes model.parameters() to torch (GradAlign train.py:94-98, fast_adversarial "
                        "CIFAR10/train_fgsm.py:75, N-FGSM train.py:175, ELLE core/utils/train.py:92)")
    g.add_argument("--lr-schedule", default="step", choices=["step", *CYCLIC_CLOCK],
                   help="step: warm-up (--lr-warmup), then ÷10 at --lr-decay-at. One cycle, linear from 0 up to --lr "
                        "at --lr-peak of training and back to 0, stepped per batch: cyclic: the rate of step s "
                        "(from 0) at s/steps, 0 at the first step (torch's CyclicLR stepped after each batch: "
                        "fast_adversarial train_fgsm.py:87, N-FGSM train.py:180-184, ELLE core/utils/train.py:121-125)"
                        "; cyclic-gradalign: at (s + 1)/steps, 0 at the last step (GradAlign's np.interp at "
                        "epoch + (i + 1)/batches, their train.py:127 and utils.py:335)")
    g.add_argument("--lr-peak", type=number, default=CYCLIC_PEAK, metavar="FRACTION",
                   help="the fraction of training at which a cyclic schedule peaks: 0.5 in the CyclicLR runs on "
                        "CIFAR-10 (0.4 on SVHN: N-FGSM, ELLE); 0.4 in GradAlign's (their code peaks at epoch "
                        "2·epochs//5: 0.4 exactly when --epochs is a multiple of 5)")
    g = parser.add_argument_group("validation, logging, checkpoints")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and every random draw")
    g.add_argument("--out", help=f"run directory (unset: runs/{out_prefix}-<method>)")
    g.add_argument("--val-n", type=int, default=val_n, metavar="N",
                   help=f"training images held out (never trained on) for the evaluation after each epoch and the "
                        f"choice of best.safetensors; the same N images for every run (0: no evaluation, keep "
                        f"last.safetensors only)")
    g.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS", help="evaluate every this many epochs")
    g.add_argument("--eval-steps", type=int, default=20, help="steps of the Untargeted attack there")
    g.add_argument("--eval-restarts", type=int, default=1, help="its random restarts")
    g.add_argument("--gamma-n", type=int, default=128,
                   help="images on which γ(ε, x) is measured: the first N held-out ones at each evaluation, and a "
                        "fixed training subset with --log-gamma-every")
    g.add_argument("--log-every", type=int, default=50, metavar="STEPS",
                   help="log and check for NaN every this many steps (a stop request is honoured after any step)")
    g.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every this many steps (0: by epoch and by the clock only)")
    g.add_argument("--save-minutes", type=number, default=10, metavar="MINUTES",
                   help="also checkpoint when this much wall time has passed since the last checkpoint (0: never)")
    g.add_argument("--log-gamma-every", type=int, default=0, metavar="STEPS",
                   help="log γ(ε, x) on a fixed training subset every this many steps (Fig. 2; 0: never)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its saved settings: a flag of the run's setting may be "
                        "repeated with its saved value, a different value is refused; the data's location, logging, "
                        "checkpoint cadence, the learning rate and --compile may change (each change is printed and "
                        "recorded in config.json)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds an earlier run, deleting its files and "
                        "eval.py's reports of it (a folder holding anything else is refused)")
    add_method_options(parser)


def parse_or_resume(parser, argv, out_prefix, llr_eps_warmup):
    """Parse; with --resume, the run's saved arguments replace the command line's, except the
    RESUMABLE flags given with it (recorded in config.json when the run starts again). ε is warmed
    up (--eps-warmup) for LLR only by default, as in the authors' code; ADV, TRADES, CURE and LFR
    start at full ε, as their papers' code."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.eps_warmup is None:
        args.eps_warmup = llr_eps_warmup if args.method == "llr" else 0.0
    if args.resume:
        options = {option: action.dest for action in parser._actions for option in action.option_strings}
        given = {options[t.split("=")[0]] for t in argv if t.split("=")[0] in options} - {"resume"}
        if not os.path.isdir(args.resume) or not os.path.isfile(os.path.join(args.resume, "config.json")):
            parser.error(f"cannot resume from {args.resume}: " + (
                "it is not a run: a run directory holds config.json and state.pt" if os.path.isdir(args.resume) else
                "it is a file; give the run's directory" if os.path.exists(args.resume) else "no such directory"))
        try:
            with open(os.path.join(args.resume, "config.json")) as f:
                saved = json.load(f)["args"]
        except OSError as e:
            parser.error(f"cannot resume from {args.resume}: {e.strerror}")
        except (ValueError, KeyError, TypeError):
            parser.error(f"cannot resume from {args.resume}: its config.json is not a run's configuration")
        if saved.get("data_dir"):  # recorded relative to the repository when inside it (cli.record_path)
            saved["data_dir"] = cli.recorded_path(saved["data_dir"])
        if "data_dir" in given:  # compared with the recorded directory as a path, not as typed
            args.data_dir = os.path.abspath(args.data_dir)
        # a flag of the run's setting may be repeated with its recorded value (make cifar ARGS="--epochs 5" again)
        differing = sorted(k for k in given - set(RESUMABLE)
                           if not _same_setting(k, getattr(args, k), saved.get(k), saved.get("norm", "linf")))
        if differing:
            flag, can = differing[0], [o for o in options if o.startswith("--") and options[o] in RESUMABLE]
            why = "; the learning-rate schedule depends on it: train longer in a new run" if flag == "epochs" else ""
            parser.error(f"--{flag.replace('_', '-')} cannot change when a run is resumed (it is {saved.get(flag)!r} "
                         f"in {os.path.join(args.resume, 'config.json')}, part of the run's setting{why}); only "
                         f"{', '.join(can)} can")
        defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}  # flags newer than the run
        # the others were repeated with their saved values; so may these be (co_bench.py repeats --data-dir)
        recorded = {k: saved.get(k, defaults.get(k)) for k in sorted(given & set(RESUMABLE))}
        changed = {k: getattr(args, k) for k, v in recorded.items() if getattr(args, k) != v}
        args = argparse.Namespace(**{**defaults, **saved, **changed, "resume": args.resume, "out": args.resume,
                                     "overwrite": False, "resume_changes": changed,
                                     "resume_recorded": {k: recorded[k] for k in changed}})
    args.out = args.out or f"runs/{out_prefix}-{args.method}"
    return args


def _same_setting(flag, given, saved, norm):
    """Whether a flag repeated on --resume names the recorded setting (ε compared as a radius, read
    in the run's norm: "3" is 3/255 in ℓ∞ but 3 in ℓ2)."""
    if flag == "eps" and saved is not None:
        try:
            return abs(ball.parse_eps(given, norm) - ball.parse_eps(saved, norm)) < 1e-12 or given == saved
        except ValueError:
            return given == saved
    return given == saved


def resume_changes(args):
    """The flags this --resume changes from the run's recorded setting, as text ("--lr 0.05
    (recorded: 0.2)"; "" when none does). A change holds for this resume only: the next one
    starts from config.json's setting again."""
    return ", ".join(f"--{k.replace('_', '-')} {v} (recorded: {args.resume_recorded[k]})"
                     for k, v in getattr(args, "resume_changes", {}).items())


def finished_run(args):
    """For --resume of a run that has trained all its epochs: the line saying so (else None)."""
    path = os.path.join(args.out, "last.safetensors")
    if not args.resume or not os.path.exists(path):
        return None
    try:
        epoch = models.read_checkpoint_metadata(path).get("epoch", 0)
    except ValueError:
        return None
    if epoch < args.epochs:
        return None
    changes = resume_changes(args)
    return (f"{args.out} is finished ({args.epochs} of {args.epochs} epochs): nothing to resume"
            f"{f' (so {changes} is not applied)' if changes else ''}. Its checkpoints are "
            f"{os.path.join(args.out, 'best.safetensors')} and last.safetensors; to train longer, start a new run "
            f"with more --epochs (the learning-rate schedule depends on the run's length)")


def check_run_args(args):
    """The range of every flag both training scripts share, and of the methods' options (ValueError)."""
    for flag, least in (("epochs", 1), ("batch_size", 1), ("log_every", 1), ("eval_every", 1), ("eval_steps", 1),
                        ("eval_restarts", 1), ("val_n", 0), ("gamma_n", 0), ("save_every", 0), ("log_gamma_every", 0)):
        require(getattr(args, flag) >= least, f"--{flag.replace('_', '-')} must be at least {least}, "
                                              f"got {getattr(args, flag)}")
    for flag in ("lr_warmup", "eps_warmup", "weight_decay", "save_minutes"):
        require(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    require(args.lr > 0, f"--lr must be positive, got {args.lr}")
    require(args.resume or not args.init or os.path.isfile(args.init), f"--init {args.init}: no such file")
    require(args.lr_schedule not in CYCLIC_CLOCK or args.lr_warmup == 0,
            f"--lr-schedule {args.lr_schedule} ramps the learning rate up by itself: give --lr-warmup 0 with it")
    require(0 < args.lr_peak < 1, f"--lr-peak is a fraction of training in (0, 1), got {args.lr_peak}")
    require(0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}")
    try:
        fractions_of_training(args.lr_decay_at)
    except ValueError as e:
        raise ValueError(f"--lr-decay-at: {e}") from None
    require(methods.trains(args.method, args.arch),
            "--method lipschitz trains a lipconvnet-* model" if args.method == "lipschitz" else
            f"--method {args.method} differentiates twice, through softplus: a lipconvnet (MaxMin, and SOC's "
            f"fast gradient) cannot; use {', '.join(m for m in methods.METHODS if methods.trains(m, args.arch))}")
    require(args.norm == "linf" or args.method not in methods.LINF_ONLY,
            f"--method {args.method} is an ℓ∞ method (its authors' code): use --norm linf")
    if args.method == "lipschitz":
        methods.check_lipschitz_options(soc.parse_arch(args.arch)["last"], args.lipschitz_gamma, args.lipschitz_beta)
    options = method_options(args)
    require(args.method != "llr" or not options["first_order"] or options["h"] <= 1,
            f"--llr-h is the first-order difference's step as a fraction of δ_LLR: at most 1, got {options.get('h')}")
    for name, value in options.items():
        flag = f"--{args.method}-{name.replace('_', '-')}"
        if isinstance(value, (bool, str)) or value is None:
            continue
        require(value > 0 if name in ("lr", "step_size", "h") else value >= 0,
                f"{flag} must be {'positive' if name in ('lr', 'step_size', 'h') else 'at least 0'}, got {value}")


def check_compile(args, accelerator):
    """--compile's requirements, before any work (ValueError): a compiler for Inductor's code (a C++
    compiler on a CPU, Triton on a GPU), and one process, but for first-order LLR: the methods compiled
    through torch.func call the model past DistributedDataParallel's forward, so their gradients would
    not be all-reduced, nor SyncBatchNorm's statistics; `llr.CompiledLLR(first_order=True)` averages
    its gradients itself and measures SyncBatchNorm's statistics in its eager clean pass (tested with
    two processes); torch.compile of a DDP model (plain, ADV, TRADES) has no multi-process test here
    yet. A method differentiated twice without a compiled version (GradAlign: `methods.compilable`) is
    refused."""
    if not args.compile:
        return
    require(methods.compilable(args.method),
            f"--method {args.method} differentiates twice and has no compiled version (torch.compile cannot trace "
            f"its autograd.grad(create_graph=True)): train it without --compile")
    if accelerator.device.type == "cpu":
        import shutil
        from torch._inductor import config as inductor_config

        compiler = inductor_config.cpp.cxx[-1] if inductor_config.cpp.cxx else "g++"
        require(shutil.which(os.environ.get("CXX", compiler)) or shutil.which("g++") or shutil.which("clang++"),
                "--compile needs a C++ compiler on a CPU (torch.compile's Inductor builds C++): install g++, or "
                "train without --compile")
    elif accelerator.device.type == "cuda":
        from torch.utils._triton import has_triton

        require(has_triton(), "--compile needs Triton on a GPU (torch.compile's Inductor): pip install triton, or "
                              "train without --compile")
    first_order = args.method == "llr" and method_options(args)["first_order"]
    require(accelerator.num_processes == 1 or first_order,
            f"--compile across processes runs first-order LLR alone (--method llr --llr-first-order: its gradients "
            f"are averaged by llr.CompiledLLR, tested); with --method {args.method} across {accelerator.num_processes} "
            f"processes its gradients would not be all-reduced, or it is untested: train without --compile")


def loss_function(args, model):
    """The method with its options bound to the model as prepared by Accelerate (`methods.bind`):
    `loss_fn(x, y, eps, generator)` -> (loss, info), `loss_fn.after_optimizer_step()`, and its state
    for state.pt; eager, or compiled with --compile."""
    return methods.bind(args.method, model, method_options(args), args.norm, compile=args.compile)


# --------------------------------------------------------------------------- schedules and randomness
def learning_rate(args, step, steps_per_epoch, total_steps):
    """--lr-schedule step: linear warm-up over --lr-warmup epochs, then ÷10 after each fraction of
    training in --lr-decay-at. One cycle: np.interp(t, [0, peak, 1], [0, lr, 0]) at the fraction of
    training t = (step + c)/total_steps, peak = --lr-peak: c = 0 for cyclic (torch's CyclicLR with
    base 0 and peak·total_steps steps up, stepped after each batch, as train_fgsm.py: 0 at step 0),
    c = 1 for cyclic-gradalign (their lr_schedule(epoch + (i + 1)/batches): 0 at the last step)."""
    schedule = getattr(args, "lr_schedule", "step")  # (getattr: Namespaces of tests older than the flags)
    if schedule in CYCLIC_CLOCK:
        t, peak = (step + CYCLIC_CLOCK[schedule]) / total_steps, getattr(args, "lr_peak", CYCLIC_PEAK)
        return args.lr * (t / peak if t <= peak else (1 - t) / (1 - peak))
    warmup = args.lr_warmup * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.1 ** sum(step >= f * total_steps for f in fractions_of_training(args.lr_decay_at))


def epsilon(args, eps, step, steps_per_epoch):
    """Linear warm-up of ε over --eps-warmup epochs, then constant."""
    warmup = args.eps_warmup * steps_per_epoch
    return eps * min(1.0, (step + 1) / warmup) if warmup > 0 else eps


STREAMS = {"epoch": 0, "augment": 1, "method": 2, "gamma": 3}


def stream_seed(seed, step, stream, process=0):
    """The seed of one step, purpose and process: every random draw is a function of (--seed,
    step, stream, process), so a resumed run draws what an uninterrupted one would. (Python's
    hash() is salted per process, so the seed is mixed by hand.)"""
    return ((seed * 1_000_003 + step) * 16 + STREAMS[stream]) * 4096 + process


def generator_for(args, step, device, stream, process=0):
    """A generator on `device` seeded with `stream_seed(args.seed, step, stream, process)`."""
    return torch.Generator(device=device).manual_seed(stream_seed(args.seed, step, stream, process))


def make_optimizer(model, args):
    """--optimizer: SGD with --momentum, or torch's Adam with β1 = --momentum (β2 0.999, torch's), both
    with torch's weight decay (--weight-decay·w added to the gradient) on conv and linear weights
    (the parameters of two or more dimensions, less those a timm model's no_weight_decay() names:
    position embeddings, class tokens, Swin's relative position tables, as timm's
    param_groups_weight_decay), and on the rest (biases, batch norm, those) with --weight-decay-on all."""
    exempt = [f"{prefix}.{pattern}" if prefix else pattern for prefix, module in model.named_modules()
              if callable(getattr(module, "no_weight_decay", None)) for pattern in module.no_weight_decay()]
    undecayed = {name for name, p in model.named_parameters()
                 if p.ndim <= 1 or any(fnmatch.fnmatchcase(name, pattern) for pattern in exempt)}
    decay = [p for name, p in model.named_parameters() if name not in undecayed]
    rest = [p for name, p in model.named_parameters() if name in undecayed]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": rest, "weight_decay": args.weight_decay if args.weight_decay_on == "all" else 0.0}]
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr, betas=(args.momentum, 0.999))
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


CRC_CLIP_NORM = 1.0  # the authors' train_robust.py clips the gradient norm to --clip-norm 1 for crc last layers


def clip_gradients(args, accelerator, model):
    """--method lipschitz with a CRC-Lip last layer: clip the gradient's norm to 1 before the step, as
    the authors' train_robust.py does for that layer alone; every other run is left unclipped."""
    if args.method == "lipschitz" and soc.parse_arch(args.arch)["last"] == "crc" \
            and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), CRC_CLIP_NORM)


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- the run directory
def claim_run_dir(args, accelerator):
    """Before any work: check the precision, and take the run directory for this run. The main
    process locks RUN/lock until `release_run_dir` (a second training process on the same
    directory gets a one-line error naming the holder's PID). A new run needs a directory that
    holds nothing, or with --overwrite only an earlier run's files and eval.py's reports of it,
    which are deleted; anything else there is refused by name. --resume needs a saved state. All
    processes raise the same ValueError, so that none waits for another that has stopped."""
    require(accelerator.mixed_precision != "fp16",
            "use bf16 (or no) mixed precision: fp16 would need loss scaling through the double backward")
    problem = [None]
    if accelerator.is_main_process:
        try:
            _lock(args.out)
            _check_run_dir(args)
        except (ValueError, OSError) as e:
            problem[0] = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
    require(problem[0] is None, problem[0])


_held_locks = {}  # run directory -> (its open lock file, whether this process made the directory)


def _lock(out):
    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK)
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise ValueError(f"{out} is being written by another training process (PID {holder}); "
                             f"wait for it to finish or stop it, or choose another --out") from None
        try:
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        lock.close()  # its holder removed the file between our open and lock: lock the new one
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held_locks[os.path.realpath(out)] = (lock, made)


def release_run_dir(args):
    """At the end of the process that claimed RUN (finished, stopped, failed): remove RUN/lock and
    unlock it, and remove RUN itself if this process made it and nothing else was written there
    (a start that failed). Does nothing where no lock is held (the other processes)."""
    lock, made = _held_locks.pop(os.path.realpath(args.out), (None, False))
    if lock is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(args.out, LOCK))  # before unlocking: the next process locks a new file
    lock.close()
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(args.out)  # only if empty


# eval.py's files beside a run's checkpoints (eval.output_path; autoattack_check.STATE_SUFFIX):
# CHECKPOINT.MODE.json (best.eval.json, last.gamma.json, ...), MODE.json for the directory as --out in
# older versions, and while one runs OUT.partial.json and OUT.autoattack-state.json; temporaries end in
# .tmp[PID]. A JSON file of another name is eval.py's when it says so ("written_by": "eval.py"), or,
# from versions before that mark, when it is a report (a "mode" of EVAL_MODES and a "checkpoint").
EVAL_MODES = ("eval", "surface", "strength", "gamma")
EVAL_FILES = {f"{stem}{mode}.json" for stem in ("", "best.", "last.") for mode in EVAL_MODES}
EVAL_LEFTOVERS = (".partial.json", ".autoattack-state.json")


def written_by_eval(path):
    """Whether the JSON file at `path` is a report or a leftover that eval.py wrote, whatever its name."""
    if not path.endswith(".json"):
        return False
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(content, dict) and (content.get("written_by") == "eval.py" or (
        content.get("mode") in EVAL_MODES and "checkpoint" in content))


def earlier_files(out):
    """The names in directory `out` as (the files of a run, eval.py's reports and leftovers,
    anything else), each sorted; the lock aside."""
    run, evaluations, other = [], [], []
    for name in sorted(os.listdir(out)):
        base = re.sub(r"\.tmp\d*$", "", name)
        base = next((base[:-len(s)] for s in EVAL_LEFTOVERS if base.endswith(s) and base[:-len(s)] in EVAL_FILES),
                    base)
        if base == LOCK:
            continue
        if base in RUN_FILES:
            run.append(name)
        elif base in EVAL_FILES or (base == name and written_by_eval(os.path.join(out, name))):
            evaluations.append(name)
        else:
            other.append(name)
    return run, evaluations, other


def _check_run_dir(args):
    run, evaluations, other = earlier_files(args.out)
    if args.resume:
        require(STATE in run, f"nothing to resume in {args.out}: it holds no {STATE} "
                              f"({'only ' + ', '.join(run) if run else 'no run files'}; a run that "
                              f"stopped before its first checkpoint must start again, with --overwrite)")
        return
    named = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
    require(not other, f"{args.out} holds files that are not a training run's ({named}): a run needs a directory "
                       f"of its own{' (--overwrite deletes only a run and its evaluations)' if args.overwrite else ''}"
                       f"; choose another --out")
    if args.overwrite:
        for name in run + evaluations:
            os.remove(os.path.join(args.out, name))
        if run or evaluations:
            print(f"--overwrite: removed {', '.join(run + evaluations)} from {args.out}", flush=True)
        return
    require(run or not evaluations, f"{args.out} holds eval.py's reports of an earlier run ({', '.join(evaluations)}) "
                                    f"but not the run: start afresh there with --overwrite (deletes them), or choose "
                                    f"another --out")
    require(not run, f"{args.out} holds an earlier run ({', '.join(run + evaluations)}): continue it with --resume "
                     f"{args.out}{'' if STATE in run else ' (no checkpoint was saved: use --overwrite)'}, start afresh "
                     f"there with --overwrite, or choose another --out")


def warn_if_cpu_is_too_slow(model, accelerator, alternative):
    """A CPU trains models of millions of parameters for weeks: say so before starting."""
    params = sum(p.numel() for p in model.parameters())
    if accelerator.device.type == "cpu" and params > 2_000_000:
        accelerator.print(f"note: {params / 1e6:.1f}M parameters on a CPU; this is a GPU job and will take weeks "
                          f"here (watch the progress bar's estimate). On a CPU, try {alternative}.")


def selection_record(dataset, dataset_size, holdout_indices, args):
    """What best.safetensors records of its choice: which training images were held out for it
    (their count and a fingerprint of their indices) and by which metric, so that eval.py can
    refuse to report a number on the images that chose the checkpoint."""
    return {"split": "train", "dataset": dataset, "dataset_size": dataset_size, "holdout_n": len(holdout_indices),
            "indices_sha256": data.indices_digest(holdout_indices),
            "metric": f"untargeted {args.eval_steps}x{args.eval_restarts} accuracy"}


def provenance(args, accelerator):
    """What config.json records: arguments, command, git commit, versions, device, processes."""
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
    paths = {k: cli.record_path(getattr(args, k)) for k in ("data_dir", "out", "resume")}  # relative inside the repo
    return {"args": {**vars(args), **paths}, "command": sys.argv, "git_commit": commit, "git_dirty": dirty,
            "torch": torch.__version__, "accelerate": accelerate.__version__, "device": device,
            "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}


def _cannot_resume(path, error):
    sys.exit(f"{os.path.basename(sys.argv[0])}: error: cannot resume from {path}: it is damaged or not this run's "
             f"({str(error).splitlines()[0][:120] if str(error) else type(error).__name__})")


class Run:
    """A training process's run directory, once `claim_run_dir` has taken it: config.json (written
    here for a new run), log.jsonl, the checkpoints and state.pt, the resume (`prepare`); and what
    a loop calls after each step (the schedules, the stop request agreed across processes, the
    evaluation, the messages). The loop and its policy (when to log, evaluate and save, which
    checkpoint is best, what a NaN or a stop does) are each script's: see train_cifar.train.
    `dataset` describes the data; with the method, its options, ε and the norm it goes into every
    checkpoint. Only the main process writes."""

    def __init__(self, args, accelerator, steps_per_epoch, eps, dataset):
        self.args, self.accelerator, self.eps = args, accelerator, eps
        self.steps_per_epoch, self.total_steps = steps_per_epoch, args.epochs * steps_per_epoch
        self.metadata = {**dataset, "method": args.method, "options": method_options(args), "eps": eps,
                         "norm": args.norm}
        self.saved_step, self.last_save = None, time.time()  # of last.safetensors and state.pt
        self.bar = None  # the progress bar, once `progress` has made it
        if accelerator.is_main_process and not args.resume:
            write_json(os.path.join(args.out, "config.json"), provenance(args, accelerator))

    def prepare(self, model, optimizer, description):
        """`accelerator.prepare`, the model in train mode, and the method bound to it
        (`loss_function`). With --resume, first: load the weights, optimiser state, step, best
        validation accuracy and the method's state (ELLE-A's λ and history) of state.pt, drop the
        log's entries after that step (a run killed between checkpoints logged steps it will redo),
        and record the resume and its changed flags in config.json. Prints `description`, where it
        runs and the flags the resume changes. Returns (step, best, model, optimizer, loss_fn): a
        new run is at step 0 with best -1."""
        step, best, method_state = 0, -1.0, None
        if self.args.resume:
            path = os.path.join(self.args.out, STATE)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                method_state = state.get("method", {})  # absent from older runs' state.pt: stateless methods
            except (RuntimeError, KeyError, EOFError, OSError, ValueError) as e:
                _cannot_resume(path, e)
            step, best, self.saved_step = state["step"], state["best"], state["step"]
            if self.accelerator.is_main_process:
                self._forget_log_after(step)
                config_path = os.path.join(self.args.out, "config.json")
                with open(config_path) as f:
                    config = json.load(f)
                config.setdefault("resumes", []).append({"step": step, "command": sys.argv,
                                                         "changed": self.args.resume_changes})
                write_json(config_path, config)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        loss_fn = loss_function(self.args, model)
        if method_state is not None:
            try:
                loss_fn.load_state_dict(method_state)
            except (KeyError, ValueError, TypeError) as e:
                _cannot_resume(path, e)
        changes = resume_changes(self.args)
        self.accelerator.print(f"{description}, {self.accelerator.num_processes} process(es) on "
                               f"{self.accelerator.device}; {f'resuming at step {step}' if step else 'starting'}"
                               f"{f' with {changes}' if changes else ''} -> {self.args.out}")
        self.last_save = time.time()
        return step, best, model.train(), optimizer, loss_fn

    def _forget_log_after(self, step):
        path = os.path.join(self.args.out, "log.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)

    def progress(self, step):
        """A progress bar (main process) from `step` to the end; `evaluate` pauses its clock."""
        self.bar = tqdm(total=self.total_steps, initial=step, dynamic_ncols=True,
                        disable=not self.accelerator.is_main_process)
        return self.bar

    def schedule(self, step, optimizer):
        """The learning rate (set in `optimizer`) and ε of optimiser step `step` (counted from 0)."""
        lr = learning_rate(self.args, step, self.steps_per_epoch, self.total_steps)
        set_learning_rate(optimizer, lr)
        return lr, epsilon(self.args, self.eps, step, self.steps_per_epoch)

    def stop_and_clock(self, stop, step):
        """After step `step` (counted from 1): (a stop was requested, --save-minutes have passed since
        the last checkpoint), the same on every process (one small all-reduce per step when there
        are several). A request that comes later is honoured after step + 1, as `stop` announces."""
        flags = [stop.requested, self.args.save_minutes > 0 and
                 time.time() - self.last_save >= 60 * self.args.save_minutes]
        if self.accelerator.num_processes > 1:
            flags = (self.accelerator.reduce(torch.tensor(flags, dtype=torch.float32, device=self.accelerator.device),
                                             "sum") > 0).tolist()
        stop.step = step + 1
        return flags

    def log(self, step, entry):
        """One JSON line in log.jsonl, stamped with the step and epoch (main process only)."""
        if self.accelerator.is_main_process:
            with open(os.path.join(self.args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "epoch": step / self.steps_per_epoch, **entry}) + "\n")

    def print(self, line):
        """A line on the console, above the progress bar (main process only)."""
        if self.accelerator.is_main_process:
            tqdm.write(line)

    def log_train(self, step, metrics, bar, lr, eps):
        """The log interval's means (`metrics`, reduced across processes), with the learning rate,
        ε and images/s, in the log and the progress bar."""
        means = metrics.reduce(self.accelerator)
        self.log(step, {"kind": "train", "lr": lr, "eps": eps, **means})
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means.get('train_acc', means.get('adv_acc')):.3f}")

    def log_gamma(self, step, model, images, labels):
        """γ(ε, x) of these (training) images after step `step`, logged (`measure_gamma`; main process)."""
        if self.accelerator.is_main_process:
            generator = generator_for(self.args, step, labels.device, "gamma")
            gamma = measure_gamma(model, images, labels, self.eps, norm=self.args.norm, generator=generator)
            self.log(step, {"kind": "gamma", "eps": self.eps, **gamma})

    def evaluate(self, step, model, images, labels):
        """`evaluate` of the held-out images with the run's settings (--eval-steps, --eval-restarts,
        --gamma-n; γ's random starts from (seed, step)), split across the processes; logged and
        printed. Returns its metrics. Its own progress shows in a second bar (this process's share of
        the images), and the training bar's clock stops meanwhile: its rate and time left count training only."""
        args, accelerator = self.args, self.accelerator
        share = len(range(accelerator.process_index, len(labels), accelerator.num_processes))
        with tqdm(total=share, desc="validation", unit="img", leave=False, dynamic_ncols=True,
                  disable=not accelerator.is_main_process) as shown:
            result = evaluate(model, images, labels, self.eps, norm=args.norm, steps=args.eval_steps,
                              restarts=args.eval_restarts, seed=args.seed, gamma_n=args.gamma_n,
                              gamma_seed=stream_seed(args.seed, step, "gamma", 1),  # (another stream than log_gamma's)
                              process=accelerator.process_index, processes=accelerator.num_processes,
                              reduce=accelerator.reduce, progress=shown.update)
        if self.bar is not None:
            self.bar.unpause()  # the time since its last update was the evaluation's: left out of its rate
        self.log(step, {"kind": "eval", "eps": self.eps, **result})
        self.print(f"step {step}, {result['val_n']} validation images: clean {100 * result['val_clean_acc']:.2f}%, "
                   f"FGSM {100 * result['val_fgsm_acc']:.2f}%, {result['pgd']} {100 * result['val_pgd_acc']:.2f}%, "
                   f"γ {result['val_gamma_mean']:.4f}")
        return result

    def save(self, step, model, optimizer, loss_fn, best):
        """last.safetensors (eval.py's format) and state.pt (what --resume reads: the weights, the
        optimiser, the step, the best validation accuracy and the method's state), each atomically."""
        if self.accelerator.is_main_process:
            models.save_checkpoint(model, os.path.join(self.args.out, "last.safetensors"), **self._stamp(step))
            tmp = os.path.join(self.args.out, STATE + ".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "best": best, "method": loss_fn.state_dict()}, tmp)
            os.replace(tmp, os.path.join(self.args.out, STATE))
        self.saved_step, self.last_save = step, time.time()
        self.accelerator.wait_for_everyone()

    def save_best(self, step, model, metrics):
        """best.safetensors, with `metrics` (the evaluation that chose it, and on which images)."""
        if self.accelerator.is_main_process:
            models.save_checkpoint(model, os.path.join(self.args.out, "best.safetensors"),
                                   **self._stamp(step), **metrics)
        self.accelerator.wait_for_everyone()

    def _stamp(self, step):
        return {**self.metadata, "step": step, "epoch": step / self.steps_per_epoch}

    def exit_nonfinite(self, step, count):
        """Exit without saving after a NaN or inf loss in the `count` micro-batches before `step`,
        saying what is on disk and what to do."""
        args = self.args
        happened = (f"the loss became NaN or inf within the {count} micro-batches before step {step}; stopped without "
                    f"saving.")
        if self.saved_step is None:
            advice = (f"No checkpoint was saved yet: start again with --overwrite (in {args.out}) and a smaller "
                      f"learning rate")
        else:
            flag, value = ("--lr-per-256", args.lr_per_256) if hasattr(args, "lr_per_256") else ("--lr", args.lr)
            advice = (f"The last good checkpoint is {os.path.join(args.out, 'last.safetensors')} (step "
                      f"{self.saved_step}): continue from it with --resume {args.out} {flag} SMALLER (it was "
                      f"{value:g})")
        sys.exit(f"{os.path.basename(sys.argv[0])}: {happened} {advice}" if self.accelerator.is_main_process else 1)

    def stopped(self, step, stop):
        """After the checkpoint of a stop request: say so and how to resume; the exit status, 128 + the
        signal (130 for Ctrl-C, 143 for SIGTERM), so that `train && eval` does not go on."""
        self.print(f"stopped at step {step} with a checkpoint; continue with --resume {self.args.out} "
                   f"(exit status {stop.exit_status}: {signal.Signals(stop.exit_status - 128).name})")
        return stop.exit_status

    def done(self, best, metric):
        """The end of the run: where its checkpoints are (best.safetensors chosen by `metric` at
        validation accuracy `best`; best None: no validation, no best.safetensors)."""
        chosen = (f"{os.path.join(self.args.out, 'best.safetensors')} (validation {metric} {100 * best:.2f}%), "
                  if best is not None else "")
        self.print(f"done: {chosen}{os.path.join(self.args.out, 'last.safetensors')}")


# --------------------------------------------------------------------------- during training
class StopRequest:
    """SIGTERM (pre-emption) or Ctrl-C, inside `with StopRequest(step, last) as stop:`: the first
    is noted and acknowledged, and the loop stops after step `stop.step` with a checkpoint
    (`Run.stop_and_clock` reads `stop.requested` after each step and moves `stop.step` on to the
    next); a second stops the process at once (the checkpoints on disk are whole: they are
    written atomically). `last` is the run's last step: a request after it changes nothing."""

    def __init__(self, step, last, announce=True):
        self.step, self.last, self.announce = step, last, announce
        self.requested, self.signal = False, None

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_status(self):
        """128 + the signal, as a shell reports a process it stopped (a stop requested by another
        process of the run: SIGTERM's)."""
        return 128 + (self.signal or signal.SIGTERM)

    def _handler(self, signum, frame):
        if self.requested:
            raise SystemExit(f"{os.path.basename(sys.argv[0])}: stopped at once by a second "
                             f"{signal.Signals(signum).name}; the last checkpoint on disk is intact")
        self.requested, self.signal = True, signum
        if self.announce:
            then = (f"stopping after step {self.step}, saving a checkpoint (again to stop at once)"
                    if self.step <= self.last else "the run has trained its last step and is finishing")
            tqdm.write(f"{signal.Signals(signum).name}: {then}", file=sys.stderr)


class IntervalMetrics:
    """Sums of the loss, accuracy and the method's own terms over the micro-batches of a log
    interval, kept on the device until `reduce` (no synchronisation per step), and the interval's
    training time, from `start_clock` to `reduce`. `images` is the number of images of one
    micro-batch over all processes (for images/s)."""

    def __init__(self, device, images):
        self.device, self.images = device, images
        self.sums, self.count, self.nonfinite_count = {}, 0, torch.zeros((), device=device)
        self.start_clock()

    def start_clock(self):
        self.started = time.time()

    def add(self, loss, info, y):
        self.nonfinite_count += ~torch.isfinite(loss.detach())
        logits = info.get("logits", info.get("adv_logits"))
        terms = {"loss": loss.detach(),
                 "train_acc" if "logits" in info else "adv_acc": (logits.argmax(1) == y).float().mean()}
        terms.update({k: v.float().mean() for k, v in info.items() if k not in ("logits", "adv_logits", "delta")})
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += 1

    def nonfinite(self, accelerator):
        """Whether a loss of this interval was NaN or inf on any process: the same answer on all."""
        return accelerator.reduce(self.nonfinite_count.clone(), "sum").item() > 0

    def reduce(self, accelerator):
        """The interval's means over micro-batches and processes, and images/s; starts a new interval
        (its clock starts at `start_clock`)."""
        means = {k: accelerator.reduce(v / self.count, "mean").item() for k, v in self.sums.items()}
        means["images_per_s"] = self.count * self.images / (time.time() - self.started)
        self.sums, self.count = {}, 0
        return means


def write_json(path, obj):
    """`obj` as indented JSON at `path`, atomically (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def evaluate(model, images, labels, eps, *, norm="linf", steps=20, restarts=1, seed=0, gamma_n=128, gamma_seed=0,
             process=0, processes=1, reduce=None, progress=None):
    """An evaluation on held-out images (uint8 [N, 3, H, W] and labels [N], on the model's device):
    clean accuracy; accuracy under FGSM (one signed step of ε on the cross-entropy from x: the weak
    attack a model that obfuscates its gradients learns to resist) and under the Untargeted margin
    attack (`steps` x `restarts`, its random starts seeded by `seed`: the strong one, and the
    metric that chooses best.safetensors); and γ(ε, x) (50 Adam steps from a generator seeded by
    `gamma_seed`) on the first `gamma_n` images. Across processes, this one (`process` of
    `processes`) takes every processes-th image and `reduce(tensor)` sums a tensor over them
    (Accelerate's `accelerator.reduce`; None: one process); `progress(k)`, if given, is called after
    each chunk of k images (a progress bar's update). Returns val_clean_acc, val_fgsm_acc,
    val_pgd_acc, val_gamma_mean, val_n, val_gamma_n and pgd (the strong attack's name)."""
    model.eval()
    share = torch.arange(len(labels))[process::processes]
    counts = torch.zeros(6, device=labels.device)  # clean, fgsm, pgd, images, γ sum, γ images
    for chunk in share.split(256):
        x, y = images[chunk.to(images.device)].float() / 255, labels[chunk.to(labels.device)]
        x_fgsm = attacks.fgsm_k(model, x, y, eps, steps=1, step_size=eps, loss="ce", norm=norm)
        x_pgd = attacks.untargeted(model, x, y, eps, steps=steps, restarts=restarts, seed=seed, norm=norm)
        with torch.no_grad():
            correct = [(model(v).argmax(1) == y).sum() for v in (x, x_fgsm, x_pgd)]
            counts[:4] += torch.stack(correct + [torch.tensor(len(y), device=y.device)])
        first = chunk < gamma_n
        if first.any():
            gamma, _ = llr.local_linearity(model, x[first], y[first], eps, norm=norm,
                                           generator=torch.Generator(device=x.device).manual_seed(gamma_seed))
            counts[4:] += torch.stack([gamma.sum(), torch.tensor(float(len(gamma)), device=gamma.device)])
        if progress is not None:
            progress(len(chunk))
    counts = counts if reduce is None else reduce(counts)
    model.train()
    n = counts[3].item()
    return {"val_clean_acc": counts[0].item() / n, "val_fgsm_acc": counts[1].item() / n,
            "val_pgd_acc": counts[2].item() / n, "val_gamma_mean": counts[4].item() / max(counts[5].item(), 1),
            "val_n": int(n), "val_gamma_n": int(counts[5].item()), "pgd": f"untargeted {steps}x{restarts}"}


def measure_gamma(model, images, labels, eps, *, norm="linf", generator=None):
    """γ(ε, x) with `llr.local_linearity` (50 Adam steps) on these images (uint8), without
    augmentation, model in eval mode (as eval.py --gamma): the paper's Fig. 2."""
    model.eval()
    x, y = images.float() / 255, labels
    gamma, _ = llr.local_linearity(model, x, y, eps, norm=norm, generator=generator)
    model.train()
    return {"gamma_mean": gamma.mean().item(), "gamma_median": gamma.median().item(),
            "gamma_max": gamma.max().item(), "gamma_n": len(y)}
