"""What the two training scripts share, so that each can hold only its own experiment and loop:
the command-line flags of the methods and of a run, the learning-rate and ε schedules, seeded
random streams, the run directory (config, log, checkpoints, resume), stop signals, the metrics of
a log interval, and the evaluation and γ measurement during training.

A run directory holds config.json (arguments, command, versions, device, git commit), log.jsonl
(one JSON object per log interval, evaluation and γ measurement), last.safetensors and
best.safetensors (readable by eval.py and `models.load_checkpoint`), and state.pt, from which
--resume continues. Every random draw is a function of (seed, step, stream, process), so a
resumed run ends with the same weights as an uninterrupted one.
"""
import argparse
import contextlib
import fcntl
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import attacks
import ball
import data
import llr
import methods
import models
import soc
from cli import boolean, fractions_of_training, number, require

STATE = "state.pt"
LOCK = "lock"  # held by the training process that writes the run directory
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
            flag, dest = f"--{name}-{p.name.replace('_', '-')}", f"{name}_{p.name}"
            helped = f"{p.name} of {fn.__name__}" + (" (unset: its own rule)" if p.default is None else "")
            if isinstance(p.default, str):  # a text option: one of methods.CHOICES
                group.add_argument(flag, default=p.default, dest=dest, choices=methods.CHOICES[p.name], help=helped)
                continue
            kind = (boolean if isinstance(p.default, bool) else int if isinstance(p.default, int) else number)
            group.add_argument(flag, type=kind, default=p.default, dest=dest,
                               metavar={boolean: "BOOL", int: "N"}.get(kind, "X"), help=helped)


def method_options(args):
    """The keyword options of the chosen method, read back from the generated flags."""
    fn = methods.METHODS[args.method]
    return {p.name: getattr(args, f"{args.method}_{p.name}") for p in inspect.signature(fn).parameters.values()
            if p.default is not p.empty and p.name not in ("generator", "norm")}


def add_run_arguments(parser, out_prefix, val_n):
    """The flags both training scripts share: methods and their options, the seed, the held-out
    validation images, logging, evaluation, checkpoints and --resume."""
    g = parser.add_argument_group("method")
    g.add_argument("--method", default="llr", choices=list(methods.METHODS), help="the training objective (methods.py)")
    g.add_argument("--compile", type=boolean, nargs="?", const=True, default=False, metavar="BOOL",
                   help="compute the method's loss with compiled code (methods.compiled): llr, lfr and cure through "
                        "torch.func.grad traced by torch.compile, the others on torch.compile(model); the same "
                        "math, rounding aside. The first steps compile (minutes); one process only. May change on "
                        "--resume")
    g.add_argument("--norm", default="linf", choices=["linf", "l2"],
                   help="the threat model: the ball of LLR's search and of ADV's, TRADES' and LFR's attacks, and of "
                        "the evaluation after each epoch (every method); the paper's is linf")
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
    g.add_argument("--lr-schedule", default="step", choices=["step", "cyclic"],
                   help="step: warm-up (--lr-warmup), then ÷10 at --lr-decay-at; cyclic: one cycle, linear from 0 "
                        "to --lr at half of training and back to 0 (fast adversarial training's train_fgsm.py: "
                        "CyclicLR stepped per batch)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its saved settings; of the other flags only those of "
                        "the data's location, logging, checkpoint cadence and the learning rate may be given too")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds files of an earlier run, deleting them")
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
        try:
            with open(os.path.join(args.resume, "config.json")) as f:
                saved = json.load(f)["args"]
        except OSError as e:
            parser.error(f"cannot resume from {args.resume}: {e.strerror}")
        except (ValueError, KeyError, TypeError):
            parser.error(f"cannot resume from {args.resume}: its config.json is not a run's configuration")
        # a flag of the run's setting may be repeated with its recorded value (make cifar ARGS="--epochs 5" again)
        differing = sorted(k for k in given - set(RESUMABLE)
                           if not _same_setting(k, getattr(args, k), saved.get(k), saved.get("norm", "linf")))
        if differing:
            flag, can = differing[0], [o for o in options if o.startswith("--") and options[o] in RESUMABLE]
            why = "; the learning-rate schedule depends on it: train longer in a new run" if flag == "epochs" else ""
            parser.error(f"--{flag.replace('_', '-')} cannot change when a run is resumed (it is {saved.get(flag)!r} "
                         f"in {os.path.join(args.resume, 'config.json')}, part of the run's setting{why}); only "
                         f"{', '.join(can)} can")
        given &= set(RESUMABLE)  # the others were repeated with their saved values
        changed = {k: getattr(args, k) for k in sorted(given)}
        defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}  # flags newer than the run
        args = argparse.Namespace(**{**defaults, **saved, **changed, "resume": args.resume, "out": args.resume,
                                     "overwrite": False, "resume_changes": changed})
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
    return (f"{args.out} is finished ({args.epochs} of {args.epochs} epochs): nothing to resume. Its checkpoints are "
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
    require(args.lr_schedule != "cyclic" or args.lr_warmup == 0,
            "--lr-schedule cyclic ramps the learning rate up by itself: give --lr-warmup 0 with it")
    require(0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}")
    try:
        fractions_of_training(args.lr_decay_at)
    except ValueError as e:
        raise ValueError(f"--lr-decay-at: {e}") from None
    require(methods.trains(args.method, args.arch),
            "--method lipschitz trains a lipconvnet-* model" if args.method == "lipschitz" else
            f"--method {args.method} differentiates twice, through softplus: a lipconvnet (MaxMin, and SOC's "
            f"fast gradient) cannot; use plain, adv, trades or lipschitz")
    if args.method == "lipschitz":
        methods.check_lipschitz_options(soc.parse_arch(args.arch)["last"], args.lipschitz_gamma, args.lipschitz_beta)
    for name, value in method_options(args).items():
        flag = f"--{args.method}-{name.replace('_', '-')}"
        if isinstance(value, (bool, str)) or value is None:
            continue
        require(value > 0 if name in ("lr", "step_size", "h") else value >= 0,
                f"{flag} must be {'positive' if name in ('lr', 'step_size', 'h') else 'at least 0'}, got {value}")


def check_compile(args, accelerator):
    """--compile's requirements, before any work (ValueError): a compiler for Inductor's code (a C++
    compiler on a CPU, Triton on a GPU), and one process: the methods compiled through torch.func
    call the model past DistributedDataParallel's forward, so their gradients would not be
    all-reduced, nor SyncBatchNorm's statistics; torch.compile of a DDP model (plain, ADV, TRADES)
    has no multi-process test here yet."""
    if not args.compile:
        return
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
    require(accelerator.num_processes == 1,
            f"--compile runs in one process only (with --method {args.method} across {accelerator.num_processes} "
            f"processes its gradients would not be all-reduced, or it is untested): train without --compile")


def loss_function(args, model):
    """The method's loss with its options as `fn(x, y, eps, generator)` -> (loss, info): eager, or
    compiled with --compile (`methods.compiled`, built on the model as prepared by Accelerate)."""
    options = method_options(args)
    if args.compile:
        return methods.compiled(args.method, model, options, args.norm)
    fn = methods.METHODS[args.method]
    return lambda x, y, eps, generator=None: fn(model, x, y, eps, generator=generator, norm=args.norm, **options)


# --------------------------------------------------------------------------- schedules and randomness
def learning_rate(args, step, steps_per_epoch, total_steps):
    """--lr-schedule step: linear warm-up over --lr-warmup epochs, then ÷10 after each fraction of
    training in --lr-decay-at. cyclic: 0 at step 0, --lr at half of training, towards 0 at the end
    (torch's CyclicLR with base 0 and half the steps up, half down, as train_fgsm.py)."""
    if getattr(args, "lr_schedule", "step") == "cyclic":
        return args.lr * (1 - abs(2 * step / total_steps - 1))
    warmup = args.lr_warmup * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.1 ** sum(step >= f * total_steps for f in fractions_of_training(args.lr_decay_at))


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


def make_optimizer(model, args):
    """SGD with momentum; weight decay on conv and linear weights only (not biases or batch norm)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=args.momentum)


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
    process locks RUN/lock for its lifetime (a second training process on the same directory gets
    a one-line error naming the holder's PID); a new run needs an empty directory (or --overwrite,
    which deletes the earlier run's files); --resume needs a saved state. All processes raise the
    same ValueError, so that none waits for another that has stopped."""
    require(accelerator.mixed_precision != "fp16",
            "use bf16 (or no) mixed precision: fp16 would need loss scaling through the double backward")
    problem = [None]
    if accelerator.is_main_process:
        try:
            _lock_and_check(args)
        except (ValueError, OSError) as e:
            problem[0] = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
    require(problem[0] is None, problem[0])


_held_locks = {}  # run directory -> its open lock file: a lock lasts as long as the process


def _lock_and_check(args):
    os.makedirs(args.out, exist_ok=True)
    key = os.path.realpath(args.out)
    if key not in _held_locks:  # (a process that trained here before, e.g. the tests, holds it already)
        lock = open(os.path.join(args.out, LOCK), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise ValueError(f"{args.out} is being written by another training process (PID {holder}); "
                             f"wait for it to finish or stop it, or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        _held_locks[key] = lock
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if args.resume:
        require(STATE in present, f"nothing to resume in {args.out}: it holds no {STATE} "
                                  f"({'only ' + ', '.join(present) if present else 'no run files'}; a run that "
                                  f"stopped before its first checkpoint must start again, with --overwrite)")
    elif present and args.overwrite:
        for f in present:
            os.remove(os.path.join(args.out, f))
    else:
        require(not present, f"{args.out} holds an earlier run ({', '.join(present)}): continue it with --resume "
                             f"{args.out}{'' if STATE in present else ' (no checkpoint was saved: use --overwrite)'}, "
                             f"start afresh there with --overwrite, or choose another --out")


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
    return {"args": vars(args), "command": sys.argv, "git_commit": commit, "git_dirty": dirty,
            "torch": torch.__version__, "accelerate": accelerate.__version__, "device": device,
            "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}


class Run:
    """One training process's run: its directory (config.json, log.jsonl, checkpoints, state.pt),
    its schedules, and the bookkeeping at the end of each step (metrics, the checks for NaN and
    stop requests, evaluation, the best checkpoint, γ, checkpoints by epoch and by the clock).
    `claim_run_dir` has checked and locked the directory. A script builds one, then writes its loop:

        run = Run(args, accelerator, steps_per_epoch, eps, metadata, evaluate, selection, gamma_subset)
        step, model, optimizer = run.prepare(model, optimizer, "what this run is")
        with run.progress(step):
            while step < run.total_steps:
                lr, eps_now = run.schedule(step, optimizer)
                ... loss, backward, optimizer step ...
                run.record(loss, info, y)
                step += 1
                if run.end_of_step(step, model, optimizer, lr, eps_now):
                    return

    `metadata` (the dataset, the method and its options, ε, ...) goes into every checkpoint;
    `evaluate(model, step)` returns the metrics of an evaluation on held-out training images, or is
    None (no evaluation, no best.safetensors); `selection` says which images those are, and goes
    into best.safetensors; `gamma_subset` is (uint8 images, labels) on which γ is measured every
    --log-gamma-every steps."""

    def __init__(self, args, accelerator, steps_per_epoch, eps, metadata, evaluate, selection, gamma_subset):
        self.args, self.accelerator, self.eps, self.metadata = args, accelerator, eps, metadata
        self.evaluate, self.selection, self.gamma_subset = evaluate, selection, gamma_subset
        self.steps_per_epoch, self.total_steps = steps_per_epoch, args.epochs * steps_per_epoch
        self.best, self.saved_step = -1.0, None
        self.metrics = IntervalMetrics(accelerator.device)
        if accelerator.is_main_process and not args.resume:
            write_json(os.path.join(args.out, "config.json"), provenance(args, accelerator))

    def prepare(self, model, optimizer, description):
        """With --resume: load the weights, optimiser state and step of state.pt, drop the log's
        entries after that step (a run killed between checkpoints logged steps it will redo), and
        record the resume and its changed flags in config.json. Then `accelerator.prepare`, and the
        model in train mode. Returns (step, model, optimizer)."""
        step = 0
        if self.args.resume:
            path = os.path.join(self.args.out, STATE)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, KeyError, EOFError, OSError, ValueError) as e:
                sys.exit(f"{os.path.basename(sys.argv[0])}: error: cannot resume from {path}: it is damaged "
                         f"or not this run's ({str(e).splitlines()[0][:120]})")
            step, self.best, self.saved_step = state["step"], state["best"], state["step"]
            if self.accelerator.is_main_process:
                self._forget_log_after(step)
                config_path = os.path.join(self.args.out, "config.json")
                with open(config_path) as f:
                    config = json.load(f)
                config.setdefault("resumes", []).append({"step": step, "command": sys.argv,
                                                         "changed": self.args.resume_changes})
                write_json(config_path, config)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.print(f"{description}, {self.accelerator.num_processes} process(es) on "
                               f"{self.accelerator.device}; {'resuming at step ' + str(step) if step else 'starting'}"
                               f" -> {self.args.out}")
        return step, model.train(), optimizer

    def _forget_log_after(self, step):
        path = os.path.join(self.args.out, "log.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)

    @contextlib.contextmanager
    def progress(self, step):
        """The loop's context: a progress bar from `step`, and SIGTERM/Ctrl-C turned into stop requests."""
        main = self.accelerator.is_main_process
        with StopRequest(announce=main) as self.stop, tqdm(total=self.total_steps, initial=step, dynamic_ncols=True,
                                                           disable=not main) as self.bar:
            self.interval_start = self.last_save = time.time()
            yield

    def schedule(self, step, optimizer):
        """The learning rate (set in `optimizer`) and ε of optimiser step `step` (counted from 0)."""
        self.stop.step = step + 1  # the step a stop request would finish
        lr = learning_rate(self.args, step, self.steps_per_epoch, self.total_steps)
        set_learning_rate(optimizer, lr)
        return lr, epsilon(self.args, self.eps, step, self.steps_per_epoch)

    def record(self, loss, info, y):
        """The loss and the method's `info` of one (micro-)batch, into this log interval's metrics."""
        self.metrics.add(loss, info, y)

    def log(self, step, entry):
        """One JSON line in log.jsonl, stamped with the step and epoch (main process only)."""
        if self.accelerator.is_main_process:
            with open(os.path.join(self.args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "epoch": step / self.steps_per_epoch, **entry}) + "\n")

    def checkpoint(self, model, optimizer, step, name="last.safetensors", metrics=None):
        """The eval-format checkpoint `name` and, for last.safetensors, state.pt; each atomically."""
        if self.accelerator.is_main_process:
            metadata = {**self.metadata, "step": step, "epoch": step / self.steps_per_epoch, **(metrics or {})}
            models.save_checkpoint(model, os.path.join(self.args.out, name), **metadata)
            if name == "last.safetensors":
                tmp = os.path.join(self.args.out, STATE + ".tmp")
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "best": self.best}, tmp)
                os.replace(tmp, os.path.join(self.args.out, STATE))
        if name == "last.safetensors":
            self.saved_step, self.last_save = step, time.time()
        self.accelerator.wait_for_everyone()

    def _stop_and_clock(self):
        """(a stop was requested, --save-minutes have passed since the last checkpoint), agreed by
        all processes (one small all-reduce per step when there are several)."""
        flags = [self.stop.requested, self.args.save_minutes > 0 and
                 time.time() - self.last_save >= 60 * self.args.save_minutes]
        if self.accelerator.num_processes > 1:
            flags = (self.accelerator.reduce(torch.tensor(flags, dtype=torch.float32, device=self.accelerator.device),
                                             "sum") > 0).tolist()
        return flags

    def end_of_step(self, step, model, optimizer, lr, eps):
        """After optimiser step `step` (counted from 1): every --log-gamma-every steps, measure γ;
        at every step, honour a stop request (SIGTERM, Ctrl-C); every --log-every steps and before
        every checkpoint, check for a non-finite loss (exit without saving) and log the interval's
        metrics; at the end of every --eval-every epochs, evaluate and keep the best checkpoint; at
        each epoch's end, every --save-every steps and every --save-minutes, checkpoint. The same
        steps on every process. Returns True when the run is done, or must stop now (with a
        checkpoint)."""
        args, accelerator = self.args, self.accelerator
        model = accelerator.unwrap_model(model)
        self.bar.update(1)
        if args.log_gamma_every and step % args.log_gamma_every == 0 and accelerator.is_main_process:
            self.log(step, {"kind": "gamma", "eps": self.eps, **measure_gamma(model, *self.gamma_subset, self.eps,
                                                                               args, step)})
        stop_now, clock = self._stop_and_clock()
        end_of_epoch = step % self.steps_per_epoch == 0
        save_now = (end_of_epoch or step == self.total_steps or clock or stop_now
                    or (args.save_every and step % args.save_every == 0))
        if step % args.log_every and not save_now:
            return False
        if self.metrics.nonfinite(accelerator):
            message = nonfinite_message(args, self.metrics.count, step, self.saved_step)
            sys.exit(f"{os.path.basename(sys.argv[0])}: {message}" if accelerator.is_main_process else 1)
        images = self.metrics.count * args.batch_size / accelerator.gradient_accumulation_steps  # all processes
        means = self.metrics.reduce(accelerator)
        self.log(step, {"kind": "train", "lr": lr, "eps": eps, **means,
                        "images_per_s": images / (time.time() - self.interval_start)})
        self.bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means.get('train_acc', means.get('adv_acc')):.3f}")
        evaluation_due = (end_of_epoch and (step // self.steps_per_epoch) % args.eval_every == 0) or step == self.total_steps
        if self.evaluate is not None and evaluation_due and not stop_now:
            result = self.evaluate(model, step=step)
            self.log(step, {"kind": "eval", "eps": self.eps, **result})
            self.bar.write(f"step {step}, {result['val_n']} validation images: clean "
                           f"{100 * result['val_clean_acc']:.2f}%, FGSM {100 * result['val_fgsm_acc']:.2f}%, "
                           f"{result['pgd']} {100 * result['val_pgd_acc']:.2f}%, γ {result['val_gamma_mean']:.4f}")
            if result["val_pgd_acc"] > self.best:
                self.best = result["val_pgd_acc"]
                self.checkpoint(model, optimizer, step, "best.safetensors", {**result, "selection": self.selection})
        if save_now:
            self.checkpoint(model, optimizer, step)
        if stop_now:
            self.bar.write(f"stopped at step {step} with a checkpoint; continue with --resume {args.out}")
        elif step == self.total_steps:
            best = (f"{os.path.join(args.out, 'best.safetensors')} (validation {self.selection['metric']} "
                    f"{100 * self.best:.2f}%), " if self.evaluate is not None else "")
            self.bar.write(f"done: {best}{os.path.join(args.out, 'last.safetensors')}")
        self.interval_start = time.time()  # evaluation and saving are not training time
        return stop_now or step == self.total_steps


# --------------------------------------------------------------------------- during training
class StopRequest:
    """SIGTERM (pre-emption) or Ctrl-C: the first is noted, acknowledged, and the loop stops after
    the current step with a checkpoint; a second stops the process at once (the checkpoints on
    disk are whole: they are written atomically)."""

    def __init__(self, announce=True):
        self.requested, self.announce, self.step = False, announce, 0

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if self.requested:
            raise SystemExit(f"{os.path.basename(sys.argv[0])}: stopped at once by a second "
                             f"{signal.Signals(signum).name}; the last checkpoint on disk is intact")
        self.requested = True
        if self.announce:
            tqdm.write(f"{signal.Signals(signum).name}: stopping after step {self.step}, saving a checkpoint "
                       f"(again to stop at once)", file=sys.stderr)


class IntervalMetrics:
    """Sums of the loss, accuracy and the method's own terms over the micro-batches of a log
    interval, kept on the device until `reduce` (no synchronisation per step)."""

    def __init__(self, device):
        self.device = device
        self.sums, self.count, self.nonfinite_count = {}, 0, torch.zeros((), device=device)

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
        """The interval's means over micro-batches and processes; starts a new interval."""
        means = {k: accelerator.reduce(v / self.count, "mean").item() for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


def nonfinite_message(args, count, step, saved_step):
    """What happened and, from what is on disk, what to do."""
    happened = f"the loss became NaN or inf within the {count} micro-batches before step {step}; stopped without saving."
    if saved_step is None:
        return (f"{happened} No checkpoint was saved yet: start again with --overwrite (in {args.out}) and a smaller "
                f"learning rate")
    flag, value = ("--lr-per-256", args.lr_per_256) if hasattr(args, "lr_per_256") else ("--lr", args.lr)
    return (f"{happened} The last good checkpoint is {os.path.join(args.out, 'last.safetensors')} (step {saved_step}): "
            f"continue from it with --resume {args.out} {flag} SMALLER (it was {value:g})")


def write_json(path, obj):
    """`obj` as indented JSON at `path`, atomically (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def evaluate(model, images, labels, eps, args, accelerator, step):
    """The evaluation after an epoch, on the held-out validation images (uint8, on the device),
    split across processes: clean accuracy; accuracy under FGSM (one signed step of ε on the
    cross-entropy from x: the weak attack a model that obfuscates its gradients learns to resist)
    and under the Untargeted margin attack (--eval-steps x --eval-restarts: the strong one, and the
    metric that chooses best.safetensors); and γ(ε, x) (50 Adam steps) on the first --gamma-n."""
    model.eval()
    share = torch.arange(len(labels))[accelerator.process_index::accelerator.num_processes]
    counts = torch.zeros(6, device=accelerator.device)  # clean, fgsm, pgd, images, γ sum, γ images
    for chunk in share.split(256):
        x, y = images[chunk.to(images.device)].float() / 255, labels[chunk.to(labels.device)]
        x_fgsm = attacks.fgsm_k(model, x, y, eps, steps=1, step_size=eps, loss="ce", norm=args.norm)
        x_pgd = attacks.untargeted(model, x, y, eps, steps=args.eval_steps, restarts=args.eval_restarts, seed=args.seed,
                                   norm=args.norm)
        with torch.no_grad():
            correct = [(model(v).argmax(1) == y).sum() for v in (x, x_fgsm, x_pgd)]
            counts[:4] += torch.stack(correct + [torch.tensor(len(y), device=y.device)])
        first = chunk < args.gamma_n
        if first.any():
            gamma, _ = llr.local_linearity(model, x[first], y[first], eps, norm=args.norm,
                                           generator=generator_for(args, step, x.device, "gamma", 1))
            counts[4:] += torch.stack([gamma.sum(), torch.tensor(float(len(gamma)), device=gamma.device)])
    counts = accelerator.reduce(counts, "sum")
    model.train()
    n = counts[3].item()
    return {"val_clean_acc": counts[0].item() / n, "val_fgsm_acc": counts[1].item() / n,
            "val_pgd_acc": counts[2].item() / n, "val_gamma_mean": counts[4].item() / max(counts[5].item(), 1),
            "val_n": int(n), "val_gamma_n": int(counts[5].item()), "pgd": f"untargeted {args.eval_steps}x{args.eval_restarts}"}


def measure_gamma(model, images, labels, eps, args, step):
    """γ(ε, x) with `llr.local_linearity` (50 Adam steps) on the first --gamma-n training images,
    without augmentation, model in eval mode (as eval.py --gamma): the paper's Fig. 2."""
    model.eval()
    x, y = images[:args.gamma_n].float() / 255, labels[:args.gamma_n]
    gamma, _ = llr.local_linearity(model, x, y, eps, norm=args.norm, generator=generator_for(args, step, x.device, "gamma"))
    model.train()
    return {"gamma_mean": gamma.mean().item(), "gamma_median": gamma.median().item(),
            "gamma_max": gamma.max().item(), "gamma_n": len(y)}
