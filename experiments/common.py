"""What the experiment scripts share (cpu_repro.py, l2_compare.py, gpu_report.py), so that none
imports another: where things are, running the project's scripts, the stages of a
train-then-evaluate experiment (each run trained with train_cifar.py, resumed when interrupted,
then evaluated with eval.py, several at once), reading runs and reports, the README parts an
experiment writes, its command line, the generated images of the smoke runs (no test runner
needed); and the comparison cpu_repro.py runs on 2 CPU cores, which gpu_report.py runs again at
GPU scale."""
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/: the write-ups and their data
ROOT = os.path.dirname(HERE)  # the repository: its scripts run from here
sys.path.insert(0, ROOT)  # the project's modules, also when an experiment is run by its path

import cli  # noqa: E402

PY = sys.executable
DATA = "data/cifar10-jpeg"  # the JPEG copy of CIFAR-10 (see the README)

# --------------------------------------------------------------------------- the comparison (cpu_repro.py)
EPS = "8/255"
# FGSM from a random start with a step of 2ε: the failure case of fast adversarial training
# (Wong, Rice & Kolter 2020, Fig. 3), the most collapse-prone single-step setting; two seeds.
FGSM = ["--method", "adv", "--adv-steps", "1", "--adv-step-size", "16/255", "--adv-random-start", "true"]
RUNS = {  # name: (label in the table, train_cifar.py flags)
    "plain": ("plain", ["--method", "plain"]),
    "fgsm": ("ADV-1 (FGSM-RS, step 2ε)", FGSM),
    "fgsm-seed1": ("ADV-1 (FGSM-RS, step 2ε), seed 1", [*FGSM, "--seed", "1"]),
    "adv2": ("ADV-2", ["--method", "adv", "--adv-steps", "2"]),
    "llr1": ("LLR-1 (μ = 0)", ["--method", "llr", "--llr-steps", "1", "--llr-mu", "0"]),
    "llr2": ("LLR-2 (μ = 0)", ["--method", "llr", "--llr-steps", "2", "--llr-mu", "0"]),
    "llr2-mu": ("LLR-2", ["--method", "llr", "--llr-steps", "2"]),
    "adv10": ("ADV-10", ["--method", "adv", "--adv-steps", "10"]),
}
COLLAPSING, LINEAR = "fgsm", "llr1"  # the pair whose loss surfaces are drawn

SMOKE_COMMON = ["--arch", "wrn-10-1", "--eps", EPS, "--epochs", "2", "--batch-size", "8", "--val-n", "6",
                "--eval-steps", "2", "--gamma-n", "4", "--log-every", "1"]
SMOKE_EVAL = ["--eps", EPS, "--n", "8", "--gamma", "--steps", "2", "--restarts", "1", "--square-queries", "5",
              "--no-sanity"]


def make_image_folder(root, splits=("train", "test"), classes=3, per_class=4, size=8, seed=0):
    """Write a tiny ImageFolder of random JPEGs: root/<split>/<class>/<i>.jpg (the smoke runs' and the
    tests' data; it needs neither pytest nor a download)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                # class-dependent mean colour, so a model can learn something
                pixels = rng.integers(0, 80, (size, size, 3)) + 80 * (np.arange(3) == c % 3)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=95)
    return root


# --------------------------------------------------------------------------- runs and their stages
def run_dir(setting, name):
    return os.path.join(setting["root"], "runs", setting["name"], name)


def trained(run):
    """Whether the run in `run` has finished all its epochs."""
    import models

    last = os.path.join(run, "last.safetensors")
    if not os.path.exists(last):
        return False
    with open(os.path.join(run, "config.json")) as f:
        epochs = json.load(f)["args"]["epochs"]
    return abs(models.read_checkpoint_metadata(last)["epoch"] - epochs) < 1e-9


SCRIPTS = {"train_cifar.py": "train_cifar", "eval.py": "eval", "plots.py": "plots", "bench.py": "bench"}


def run_script(argv, threads=None, in_process=False):
    """Run a project script (`argv`: "eval.py", its flags) and return its exit status: a new Python
    process with OMP_NUM_THREADS=`threads`, or, with `in_process` (the smoke tests), its main(flags) in
    this process, as the command line would (Accelerate's process-wide state reset first; no time limit)."""
    if in_process and argv[0] in SCRIPTS:
        import importlib

        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            status = importlib.import_module(SCRIPTS[argv[0]]).main(argv[1:])
        except SystemExit as stop:
            status = stop.code
            if not isinstance(status, int) and status is not None:
                print(status, file=sys.stderr)  # as Python prints a sys.exit("message")
                status = 1
        return status if isinstance(status, int) else 0  # eval.py's main returns its report
    env = os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run([PY, *argv], cwd=ROOT, env=env).returncode


def call(argv, jobs=1, in_process=False):
    """Run a project script with its share of the CPU cores (`jobs` run at once), or in this process
    (`run_script`); its failure stops this one, with its own message above."""
    print("+ " + " ".join(argv), flush=True)
    status = run_script(argv, max(1, (os.cpu_count() or 1) // jobs), in_process)
    if status:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {' '.join(argv[:2])} ... failed (exit status "
                         f"{status})")


def train(setting, name):
    run = run_dir(setting, name)
    if trained(run):
        return
    if os.path.exists(os.path.join(run, "state.pt")):
        call(["train_cifar.py", "--resume", run], setting["jobs"], setting["in_process"])
    else:
        call(["train_cifar.py", "--data-dir", setting["data"], "--out", run, "--overwrite", *setting["common"],
              *setting["runs"][name][1]], setting["jobs"], setting["in_process"])


def run_eval_once(setting, name, kind, flags):
    """eval.py on the run's last checkpoint, writing docs/…/NAME.KIND.json, unless that exists."""
    path = os.path.join(setting["out"], f"{name}.{kind}.json")
    if not os.path.exists(path):
        call(["eval.py", os.path.join(run_dir(setting, name), "last.safetensors"), "--data-dir", setting["data"],
              *flags, "--out", path], setting["jobs"], setting["in_process"])


def evaluate(setting, name):
    out = setting["out"]
    run_eval_once(setting, name, "eval", [*setting["eval"], *setting.get("eval_extra", {}).get(name, [])])
    for source, published in (("last.safetensors", "safetensors"), ("log.jsonl", "log.jsonl"),
                               ("config.json", "config.json")):  # what a reader needs, without retraining
        path = os.path.join(out, f"{name}.{published}")
        if not os.path.exists(path):
            shutil.copyfile(os.path.join(run_dir(setting, name), source), path)


def runs(setting, stages, first=()):
    """Each run through `stages` (train, evaluate or both), --jobs runs at a time: the runs named in
    `first`, then the most expensive first so that the last to finish is a cheap one."""
    def one(name):
        for stage in stages:
            stage(setting, name)

    order = sorted(setting["runs"], key=lambda name: (name not in first, setting["order"].index(name)))
    if setting["jobs"] == 1:  # in this thread: a script run in this process handles its signals only here
        for name in order:
            one(name)
        return
    with concurrent.futures.ThreadPoolExecutor(setting["jobs"]) as pool:
        for future in [pool.submit(one, name) for name in order]:
            future.result()  # the first failure stops the command (the other jobs finish their run)


def read(path):
    with open(path) as f:
        return json.load(f)


def epoch_evaluations(run_dir):
    """A train_cifar.py run's evaluations after each epoch (its log.jsonl "eval" entries; a resumed run's
    log holds each once), as [{"epoch", "clean", "fgsm", "pgd"}]; [] before the first."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [{"epoch": round(e["epoch"]), "clean": e["val_clean_acc"], "fgsm": e["val_fgsm_acc"],
             "pgd": e["val_pgd_acc"]} for e in entries if e.get("kind") == "eval"]


def collapsed(log):
    """The collapse rule, fixed before any run of co-bench: at the end of training the held-out
    PGD-20 accuracy is at most a quarter of its best during training and at most half of the FGSM
    accuracy. `log`: the evaluations of a finished run (`epoch_evaluations`), in epoch order. (A run
    whose PGD-20 accuracy was 0 at every epoch meets it: the rule's words; no such run is expected.)"""
    last, best = log[-1], max(e["pgd"] for e in log)
    return last["pgd"] <= best / 4 and last["pgd"] <= last["fgsm"] / 2


def epoch_seconds(run):
    """Mean wall time of a training epoch: training images over the logged images/s (evaluation excluded)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        rates = [e["images_per_s"] for e in map(json.loads, f) if e.get("kind") == "train"]
    with open(os.path.join(run, "log.jsonl")) as f:
        first = json.loads(f.readline())
    steps_per_epoch = first["step"] / first["epoch"]
    batch = read(os.path.join(run, "config.json"))["args"]["batch_size"]
    return steps_per_epoch * batch / (sum(rates) / len(rates))


def marked(part, experiment="cpu-repro", script="cpu_repro.py"):
    """The README's markers around the text `script` writes there."""
    return f"<!-- {experiment}:{part} (written by {script}) -->", f"<!-- {experiment}:{part}:end -->"


def write_readme_parts(readme, parts, experiment="cpu-repro", script="cpu_repro.py"):
    """Replace the text between each part's markers in `readme` ({part: text}); parts whose markers
    are missing are left out."""
    with open(readme) as f:
        content = f.read()
    for part, written in parts.items():
        begin, end = marked(part, experiment, script)
        if begin in content and end in content:
            head, rest = content.split(begin, 1)
            content = head + begin + "\n" + written + end + rest.split(end, 1)[1]
    with open(readme, "w") as f:
        f.write(content)


def parse_args(doc, script, stages, argv=None):
    """The command line every experiment script of this kind shares: --only STAGE, --smoke DIR, --jobs."""
    p = cli.ArgumentParser(doc, script)
    p.add_argument("--only", choices=list(stages), help="run this stage alone (unset: every stage, in order)")
    p.add_argument("--smoke", metavar="DIR", help="the whole pipeline on generated images under DIR (the tests)")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs trained or evaluated at once, sharing the CPU cores (2 on a 2-core machine: each "
                        "process then keeps its core busy, which one process with 2 threads does not)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def require_data(script):
    """Exit with a one-line error unless the JPEG copy of CIFAR-10 is unpacked at DATA."""
    if not os.path.isdir(os.path.join(ROOT, DATA)):
        sys.exit(f"{script}: error: no CIFAR-10 copy at {DATA}: unpack it with `mkdir -p {DATA} && tar xzf "
                 f"../shared/data/cifar10-jpeg.tar.gz -C {DATA}` (or make data/cifar10-jpeg/train CIFAR_TAR=...)")


def machine():
    import platform

    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}"


# --------------------------------------------------------------------------- catastrophic overfitting
# GradAlign's CNN training setting (tml-epfl/understanding-fast-adv-training: train.py, utils.py; the positive
# control's docstring gives each flag's source): zero-padded crops, Adam at 0.003 with weight decay 5e-4 on every
# parameter, their one-cycle schedule peaking at 40% of training; and the held-out evaluation after each epoch
# (PGD-20 with 1 restart, no γ). The positive control and co_bench.py train with it; each adds its model,
# activation, method, ε, epochs, batch and held-out images.
GRADALIGN_CNN = ("--pad-mode zeros --optimizer adam --lr 0.003 --lr-schedule cyclic-gradalign --lr-peak 0.4 "
                 "--weight-decay 5e-4 --weight-decay-on all --eval-restarts 1 --gamma-n 0").split()

# co_bench.py's methods, which gpu_report.py's contrast-p5-* steps train at PreAct ResNet-18 scale: name: (label,
# train_cifar.py flags; STEP is FGSM's step 1.25·ε, as GradAlign and Wong et al.), each method at its authors'
# hyperparameters for its ε (the defaults of methods.py follow ε; LLR's are the authors' CIFAR-10 ones)
CO_METHODS = {
    "fgsm": ("FGSM (zero init)", "--method adv --adv-steps 1 --adv-random-start false --adv-step-size STEP "
                                 "--adv-bn train"),
    "fgsmrs": ("FGSM-RS", "--method adv --adv-steps 1 --adv-random-start true --adv-step-size STEP --adv-bn train"),
    "nfgsm": ("N-FGSM", "--method n-fgsm"),
    "gradalign": ("GradAlign", "--method gradalign"),
    "elle": ("ELLE", "--method elle"),
    "ellea": ("ELLE-A", "--method elle-a"),
    "llr1-mu0": ("LLR-1, μ = 0", "--method llr --llr-steps 1 --llr-mu 0"),
    "llr2": ("LLR-2", "--method llr --llr-steps 2"),
    "adv10": ("ADV-10 (reference)", "--method adv --adv-steps 10 --adv-bn train"),
}


def co_flags(name, eps):
    """CO_METHODS[name]'s train_cifar.py flags at ε = eps/255, ε included."""
    return ["--eps", f"{eps}/255", *CO_METHODS[name][1].replace("STEP", repr(1.25 * eps / 255)).split()]
