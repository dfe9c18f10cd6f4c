"""Everything owed to a GPU, in one resumable command: `make gpu-report`.

    python -m experiments.gpu_report                  # on a CUDA GPU: every unfinished step, each under 8 minutes
    python -m experiments.gpu_report --budget 10      # only the next steps that fit in 10 minutes, by their estimates
    python -m experiments.gpu_report --list           # the steps in the order they run, their estimates, which are done
    python -m experiments.gpu_report --smoke DIR      # every step on the CPU with tiny sizes, in a minute (the tests)

GPU time comes in short pieces, so the report is a list of steps, each under 8 minutes, each
writing its own JSON into experiments/gpu-report/ (with the device, torch and CUDA versions, and the git
commit) as soon as it is done; run the command again and it goes on with the first step whose
JSON is missing. Then summary.md is written from the JSON files, and the README's GPU tables are
made from it.

A lent GPU comes with about 15 minutes of device time, start-up included, so the steps run in the
order of what they answer (FIRST): the performance row first, `compiled-cifar` (plain, LLR-2 and
ADV-10, each eager and compiled, at WRN-28-8 in bf16: about 6 minutes), then the contrast
(`contrast-*`), then the rest in the order below. Each step carries an estimate of its minutes on
one H100 (ESTIMATE_MINUTES); `--budget MINUTES` runs the unfinished steps in order while the next
one's estimate fits in what is left, and every run ends by printing what is left and how long it
should take (the estimates add up to several hours: most of it is the contrast's 27 training runs).

1. bench-cifar: `bench.py`, WRN-28-8, batch 128, 32 px, bf16 autocast, channels-last: every
   method's ms/step, images/s, peak memory and ratio to plain, measured in the same run (the
   targets: LLR-2 at most 5x plain, 0.7x ADV-10, 0.25x ADV-30).
2. bench-imagenet: ResNet-152, batch 32, 224 px, bf16, channels-last: plain, LLR-2, ADV-10, ADV-30.
3. projections: from 1 and 2, the wall time of `make cifar` (128 epochs of WRN-28-8 LLR with 10
   inner steps) and of one ImageNet epoch per GPU.
4. fast-path: plain, LLR-2 and ADV-10 with each fast-path option changed in turn (channels-last
   off, float32 instead of bf16, fused SGD on, torch.compile on for the methods it supports),
   so that the defaults are chosen from numbers.
5. profile: where the time of a plain and an LLR-2 step goes, on bench-cifar's model and fast path
   (`bench.py --profile`: torch.profiler's operator tables, in experiments/gpu-report/profile.txt).
6. repro-*: cpu_repro.py's comparison (common.RUNS) at GPU scale: PreAct ResNet-18 on the full CIFAR-10 copy,
   the same methods and ε, as many epochs as the budget allows (REPRO_EPOCHS), each run trained in
   pieces of at most 7 minutes (stopped by SIGTERM with a checkpoint, then resumed), then
   evaluated on 1,000 test images with the suite.
7. compiled-cifar: `bench.py --compile` at bench-cifar's scale (WRN-28-8, batch 128, bf16,
   channels-last) for the performance row: plain, LLR-2 and ADV-10 eager and compiled in the same
   run, ratios to plain in the same mode, compile time and peak memory; compiled-cifar-all: every
   method in the same way (the one step estimated over 8 minutes). Targets: compiled LLR-2 at most 5x plain,
   0.7x ADV-10 and 0.25x ADV-30 (each at its fastest path), peak memory at most 3x plain. first-order:
   plain, exact and first-order LLR-1 and LLR-2 (llr-fo-*) at the same scale, eager and compiled in one
   run, step cost and peak memory (targets: compiled first-order LLR-1 within 10% of compiled exact LLR-1,
   its peak memory below exact LLR's); second in the order, after compiled-cifar.
8. compiled-imagenet: the same for ResNet-152, batch 32, 224 px (plain, LLR-2, ADV-10, ADV-30;
   target: LLR-2 at most 0.25x ADV-30).
9. compiled-profile: torch.profiler's operator tables of a compiled plain and LLR-2 step on
   bench-cifar's model (compiled-profile.txt), where the compiled LLR step's time goes.
10. contrast-*: the paper's contrast with a positive control, on the full
   CIFAR-10 copy with PreAct ResNet-18, 15 epochs, the one-cycle learning rate peaking at 0.2
   (CONTRAST): P1 ReLU with train-mode batch norm in the attack, FGSM-RS at step 2ε and FGSM
   from x at step ε, and FGSM-RS with eval-mode batch norm; P2 softplus in P1's setting and at
   16/255; P3 LLR-1 and LLR-2 with μ = 0 and the authors' ADV-2 (Adam, clipped margin); P5
   co_bench.py's methods (FGSM, FGSM-RS, N-FGSM, GradAlign, ELLE, ELLE-A, LLR-1, LLR-2, ADV-10) with
   ReLU at 8/255 and 16/255; then P4, each one's evaluation on 1,000 test images (the suite, APGD-T, γ). The validation curves of
   each run come back in its training step's JSON.
11. sync-bn (only with 2 GPUs or more): a 2-process `accelerate launch` of train_imagenet.py on a
   tiny generated ImageFolder with SyncBatchNorm over NCCL; its LLR losses must equal those of a
   1-process run on the same global batch.
12. timm-vit-s16, timm-convnext-t: `bench.py` on timm's ViT-S/16 and ConvNeXt-T at 224 x 224 on
   random images (ImageNet's shape), batch 32, 1000 classes, bf16, channels-last: ms/step, ratio to plain and
   peak memory of plain, exact LLR-2 (its clean pass's attention by the math backend, memory ∝ tokens²),
   first-order LLR-2 (fused attention throughout), ADV-2, ADV-10 and N-FGSM (TIMM_METHODS), a minute or two
   each on an H100.

The data for step 6 is the CIFAR-10 copy in data/cifar10-jpeg (`--data-dir`), or the archive
../shared/data/cifar10-jpeg.tar.gz (or --archive), unpacked there on first use.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also when run by its path

import cli  # noqa: E402
from experiments import common  # noqa: E402
from experiments.common import HERE, PY, ROOT, read  # noqa: E402

STEP_SECONDS = 7 * 60  # a training piece; the evaluation of a run comes in its own step
REPRO_EPOCHS = 10
REPRO = ["--arch", "preact-resnet18", "--epochs", str(REPRO_EPOCHS), "--batch-size", "128", "--lr", "0.2",
         "--lr-decay-at", "0.5,0.75", "--weight-decay", "5e-4", "--eps-warmup", "0", "--val-n", "1000",
         "--eps", common.EPS, "--log-every", "50"]
# The order of the steps: these first (a name, or a family by its prefix), then the rest in all_steps' order.
FIRST = ("compiled-cifar", "first-order", "contrast-")  # the performance row (about 6 min), the first-order form
# against the exact one (7), then the contrast
# Minutes each step should take on one H100, the GPU's start-up aside (bench-cifar, bench-imagenet and fast-path
# took 0.5, 0.7 and 1.4 min on an H200; the rest are estimates: a compile of WRN-28-8 about 1.5 min per method, a
# training step one 7-minute piece, STEP_SECONDS, and its start). A name, or a family by its prefix.
ESTIMATE_MINUTES = {"compiled-cifar": 6, "first-order": 7, "compiled-cifar-all": 25, "contrast-train-": 8, "contrast-eval-": 4,
                    "bench-cifar": 1, "bench-imagenet": 1, "projections": 0, "fast-path": 6, "profile": 2,
                    "repro-train-": 8, "repro-eval-": 3, "compiled-imagenet": 8, "compiled-profile": 4, "sync-bn": 2,
                    "timm-": 2}  # timm-*: 6 methods of 13 steps each at 224 px, batch 32 (estimate)
UNLISTED_MINUTES = 8  # a step without an estimate: the most a step should take


def estimate_minutes(name):
    """The step's estimate (ESTIMATE_MINUTES), by its name or its family's prefix."""
    return next((m for key, m in ESTIMATE_MINUTES.items() if name == key or (key.endswith("-") and
                                                                             name.startswith(key))), UNLISTED_MINUTES)


def ordered(steps):
    """The steps in the order they run: FIRST's, then the rest in their own order."""
    def rank(name):
        return next((i for i, key in enumerate(FIRST) if name == key or (key.endswith("-") and name.startswith(key))),
                    len(FIRST))
    return dict(sorted(steps.items(), key=lambda item: rank(item[0])))  # sorted is stable


FAST_PATH = [("baseline: bf16, channels-last", []), ("float32", ["--no-bf16"]),
             ("contiguous (not channels-last)", ["--no-channels-last"]), ("fused SGD", ["--fused-optimizer"]),
             ("torch.compile (each method beside its eager step)", ["--compile"])]


def environment():
    import torch

    # GIT_COMMIT first: a copy of the tree sent to a lent GPU machine may carry a stale .git
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"],
                                                            capture_output=True, text=True).stdout.strip()
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "git_commit": commit or "unknown",
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def call(setting, argv, timeout=None):
    """Run a project script; returns its exit status (124 if it ran past `timeout` and was stopped
    with SIGTERM, which the training scripts answer with a checkpoint). The smoke runs each script in
    this process (common.run_script: no time limit, none is reached there)."""
    print("+ " + " ".join(argv), flush=True)
    if setting["in_process"]:
        return common.run_script(argv, in_process=True)
    process = subprocess.Popen([PY, *argv], cwd=ROOT)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the trainer finishes its step and checkpoints
        process.wait()
        return 124


def run_bench(setting, flags, out):
    """One bench.py run; its JSON report."""
    status = call(setting, ["bench.py", *setting["bench"], *flags, "--out", out])
    if status:
        raise RuntimeError(f"bench.py failed (exit status {status})")
    with open(out) as f:
        return json.load(f)


def methods_flag(names):
    """bench.py's --methods NAMES; None: no flag, so that bench.py times every method that suits the model."""
    return [] if names is None else ["--methods", names]


def step_bench_cifar(setting, work):
    return run_bench(setting, ["--arch", setting["cifar_arch"], "--batch-size", str(setting["cifar_batch"]),
                           "--image-size", "32", *methods_flag(setting["cifar_methods"]), *setting["fast"]],
                 os.path.join(work, "bench-cifar.json"))


def step_fast_path(setting, work):
    results = {}
    for name, change in FAST_PATH:
        flags = set(setting["fast"])
        flags -= {"--" + f[len("--no-"):] for f in change if f.startswith("--no-")}
        flags |= {f for f in change if not f.startswith("--no-")}
        argv = ["--arch", setting["cifar_arch"], "--batch-size", str(setting["cifar_batch"]), "--image-size", "32",
                "--methods", setting["fast_path_methods"], *sorted(flags), *setting["compile_backend"]]
        results[name] = run_bench(setting, argv, os.path.join(work, f"fast-path-{len(results)}.json"))
    return {"variants": results}


def step_profile(setting, work):
    report = run_bench(setting, ["--arch", setting["cifar_arch"], "--batch-size", str(setting["cifar_batch"]),
                                 "--image-size", "32", "--methods", "plain,llr-2", *setting["fast"], "--profile"],
                       os.path.join(work, "profile.json"))
    shutil.copyfile(report["profile"], os.path.join(setting["out"], "profile.txt"))
    report["profile"] = "profile.txt"  # beside the step's JSON
    return report


def step_compiled_cifar(setting, work, methods="plain,llr-2,adv-10", name="compiled-cifar"):
    """The performance row (plain, LLR-2, ADV-10); with `methods` from the setting, every method."""
    return run_bench(setting, ["--arch", setting["cifar_arch"], "--batch-size", str(setting["cifar_batch"]),
                               "--image-size", "32", *methods_flag(methods), *setting["fast"],
                               "--compile", *setting["compile_backend"]],
                     os.path.join(work, f"{name}.json"))


def step_first_order(setting, work):
    """First-order LLR against exact LLR at bench-cifar's scale, eager and compiled in one run: the step cost and
    peak memory of LLR-1 and LLR-2 in both forms (the target: compiled first-order LLR-1 within 10% of compiled
    exact LLR-1, its peak memory below exact LLR's)."""
    return run_bench(setting, ["--arch", setting["cifar_arch"], "--batch-size", str(setting["cifar_batch"]),
                               "--image-size", "32", "--methods", FIRST_ORDER_METHODS, *setting["fast"],
                               "--compile", *setting["compile_backend"]],
                     os.path.join(work, "first-order.json"))


FIRST_ORDER_METHODS = "plain,llr-1,llr-fo-1,llr-2,llr-fo-2"


def step_compiled_imagenet(setting, work):
    return run_bench(setting, ["--arch", setting["imagenet_arch"], "--batch-size", str(setting["imagenet_batch"]),
                               "--image-size", str(setting["imagenet_size"]), "--num-classes", "1000",
                               "--methods", setting["imagenet_compiled_methods"], *setting["fast"], "--compile",
                               *setting["compile_backend"]],
                     os.path.join(work, "compiled-imagenet.json"))


def step_compiled_profile(setting, work):
    report = run_bench(setting, ["--arch", setting["cifar_arch"], "--batch-size", str(setting["cifar_batch"]),
                                 "--image-size", "32", "--methods", "plain,llr-2", *setting["fast"], "--compile",
                                 *setting["compile_backend"], "--profile"],
                       os.path.join(work, "compiled-profile.json"))
    shutil.copyfile(report["profile"], os.path.join(setting["out"], "compiled-profile.txt"))
    report["profile"] = "compiled-profile.txt"
    return report


def step_bench_imagenet(setting, work):
    return run_bench(setting, ["--arch", setting["imagenet_arch"], "--batch-size", str(setting["imagenet_batch"]),
                           "--image-size", str(setting["imagenet_size"]), "--num-classes", "1000",
                           "--methods", setting["imagenet_methods"], *setting["fast"]],
                 os.path.join(work, "bench-imagenet.json"))


def step_projections(setting, work):
    cifar, imagenet = (read(os.path.join(setting["out"], f"{n}.json"))["result"] for n in ("bench-cifar", "bench-imagenet"))
    ms = {m: r["ms_median"] for m, r in cifar["results"].items()}
    llr10_ms = ms["llr-8"] + (ms["llr-8"] - ms["llr-2"]) / 6 * 2  # linear in the inner steps, from the same run
    hours_cifar = 128 * 50000 / cifar["batch_size"] * llr10_ms / 1000 / 3600
    imagenet_rates = {m: r["images_per_s"] for m, r in imagenet["results"].items()}
    return {"make_cifar_hours_one_gpu": hours_cifar, "llr10_ms_per_step": llr10_ms,
            "make_cifar_assumption": f"128 epochs of 50,000 images at the images/s of an LLR-10 step of batch "
                                     f"{cifar['batch_size']}, extrapolated linearly from the LLR-2 and LLR-8 steps "
                                     f"of the same run; make cifar uses batch 64 (the authors'), which may run "
                                     f"fewer images/s; evaluation time not included",
            "imagenet_epoch_hours_per_gpu": {m: 1281167 / ips / 3600 for m, ips in imagenet_rates.items()}}


def repro_steps(setting):
    """The training pieces and evaluations of the GPU-scale reproduction, one step each."""
    steps = {}
    for name in setting["runs"]:
        flags = [*setting["repro"], *common.RUNS[name][1]]
        steps[f"repro-train-{name}"] = lambda s, w, name=name, flags=flags: train_piece(s, name, flags)
        steps[f"repro-eval-{name}"] = lambda s, w, name=name: evaluate_run(s, name)
    return steps


# the contrast's GPU experiment: PreAct ResNet-18 on the full CIFAR-10 copy, 15 epochs, the one-cycle learning rate
# peaking at 0.2 (fast adversarial training's setting, locuslab/fast_adversarial train_fgsm.py)
CONTRAST_COMMON = ["--arch", "preact-resnet18", "--epochs", "15", "--batch-size", "128", "--lr", "0.2",
                   "--lr-schedule", "cyclic", "--weight-decay", "5e-4", "--eps-warmup", "0", "--val-n", "1000",
                   "--eval-steps", "20", "--log-every", "50"]
FGSM_RS = ["--method", "adv", "--adv-steps", "1", "--adv-random-start", "true"]  # step 2ε, given per run
CONTRAST = {  # name: (what it tests, flags after CONTRAST_COMMON)
    # P1, the positive control: ReLU, batch norm in train mode during the attack, as train_fgsm.py
    "p1-relu-fgsm-rs": ("P1 ReLU, FGSM-RS step 2ε, train-mode BN", [
        "--activation", "relu", "--eps", "8/255", *FGSM_RS, "--adv-step-size", "16/255", "--adv-bn", "train"]),
    "p1-relu-fgsm-zero": ("P1 ReLU, FGSM from x, step ε, train-mode BN", [
        "--activation", "relu", "--eps", "8/255", "--method", "adv", "--adv-steps", "1", "--adv-step-size", "8/255",
        "--adv-random-start", "false", "--adv-bn", "train"]),
    "p1-relu-fgsm-rs-evalbn": ("P1 ReLU, FGSM-RS step 2ε, eval-mode BN", [
        "--activation", "relu", "--eps", "8/255", *FGSM_RS, "--adv-step-size", "16/255", "--adv-bn", "eval"]),
    # P2: softplus in P1's setting, and at 16/255 (twice the radius: the most collapse-prone we can justify)
    "p2-softplus-fgsm-rs": ("P2 softplus, FGSM-RS step 2ε, train-mode BN", [
        "--activation", "softplus", "--eps", "8/255", *FGSM_RS, "--adv-step-size", "16/255", "--adv-bn", "train"]),
    "p2-softplus-fgsm-rs-16": ("P2 softplus, ε 16/255, FGSM-RS step 2ε, train-mode BN", [
        "--activation", "softplus", "--eps", "16/255", *FGSM_RS, "--adv-step-size", "32/255", "--adv-bn", "train"]),
    # P3: LLR and the authors' ADV-2 at the same cost, softplus at 16/255 (to be moved to whichever softplus
    # setting P2 finds most collapse-prone; LLR needs curvature, which ReLU has not)
    "p3-llr1": ("P3 LLR-1 (μ = 0), softplus, ε 16/255", [
        "--activation", "softplus", "--eps", "16/255", "--method", "llr", "--llr-steps", "1", "--llr-mu", "0"]),
    "p3-llr2": ("P3 LLR-2 (μ = 0), softplus, ε 16/255", [
        "--activation", "softplus", "--eps", "16/255", "--method", "llr", "--llr-steps", "2", "--llr-mu", "0"]),
    "p3-adv2-authors": ("P3 ADV-2, the authors' Adam steps on the clipped margin, softplus, ε 16/255", [
        "--activation", "softplus", "--eps", "16/255", "--method", "adv", "--adv-steps", "2", "--adv-optimizer",
        "adam", "--adv-loss", "margin"]),
}
# P5: co_bench.py's catastrophic-overfitting comparison (common.CO_METHODS, each at its authors'
# hyperparameters for its ε) at PreAct ResNet-18 scale, as the CO literature trains it: ReLU, zero-padded crops,
# weight decay on every parameter, at 8/255 and 16/255
CONTRAST.update({f"p5-{name}-e{eps}": (f"P5 {label}, ReLU, ε {eps}/255", [
    "--activation", "relu", "--pad-mode", "zeros", "--weight-decay-on", "all", *common.co_flags(name, eps)])
    for name, (label, _) in common.CO_METHODS.items() for eps in (8, 16)})
CONTRAST_EVAL = ["--n", "1000", "--gamma", "--autoattack", "--aa-version", "custom", "--aa-attacks", "apgd-t"]


def contrast_steps(setting):
    """P1-P3's training pieces and P4's evaluation of each (at the ε it was trained at), one step each."""
    steps = {}
    for name in setting["contrast"]:
        flags = [*setting["contrast_common"], *CONTRAST[name][1]]
        steps[f"contrast-train-{name}"] = lambda s, w, name=name, flags=flags: train_piece(s, name, flags, "gpu-contrast")
    for name in setting["contrast"]:
        steps[f"contrast-eval-{name}"] = lambda s, w, name=name: evaluate_run(s, name, "gpu-contrast", "contrast",
                                                                             s["contrast_eval"])
    return steps


def train_piece(setting, name, flags, group="gpu-repro"):
    """Train (or resume) one run for at most STEP_SECONDS; None (not done) if it must go on."""
    run = os.path.join(setting["root"], "runs", group, name)
    if not common.trained(run):
        data = ensure_data(setting)
        argv = (["train_cifar.py", "--resume", run] if os.path.exists(os.path.join(run, "state.pt")) else
                ["train_cifar.py", "--data-dir", data, "--out", run, "--overwrite", *flags])
        status = call(setting, argv, timeout=setting["step_seconds"])
        if status not in (0, 124):
            raise RuntimeError(f"train_cifar.py failed (exit status {status})")
        if not common.trained(run):
            return None
    with open(os.path.join(run, "config.json")) as f:
        return {"run": name, "flags": flags, "config": json.load(f)["args"],
                "epoch_seconds": common.epoch_seconds(run), "log": read_lines(os.path.join(run, "log.jsonl"))}


def read_lines(path):
    """A run's log.jsonl (its validation curves come back with the step's JSON)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate_run(setting, name, group="gpu-repro", prefix="repro", flags=None):
    run = os.path.join(setting["root"], "runs", group, name)
    out = os.path.join(setting["out"], f"{prefix}-{name}.eval.json")
    status = call(setting, ["eval.py", os.path.join(run, "last.safetensors"), "--data-dir", ensure_data(setting),
                   *(setting["eval"] if flags is None else flags), "--out", out])
    if status:
        raise RuntimeError(f"eval.py failed (exit status {status})")
    report = read(out)
    r = report["results"]
    return {"run": name, "accuracy": {k: v["accuracy"] for k, v in r.items() if "accuracy" in v},
            "gamma_mean": report.get("gamma", {}).get("mean"), "eval": os.path.basename(out)}


# timm's ImageNet models, by their timm names; exact LLR-2 (math attention in its clean pass) against
# first-order LLR-2 (fused attention throughout)
TIMM_MODELS = {"timm-vit-s16": "timm:vit_small_patch16_224", "timm-convnext-t": "timm:convnext_tiny"}
TIMM_METHODS = "plain,llr-2,llr-fo-2,adv-2,adv-10,n-fgsm"


def step_bench_timm(setting, work, name):
    """bench.py on one of TIMM_MODELS (setting["timm"][name]: arch, --timm-kwargs, image size)."""
    arch, kwargs, size = setting["timm"][name]
    return run_bench(setting, ["--arch", arch, *(["--timm-kwargs", *kwargs] if kwargs else []),
                               "--batch-size", str(setting["imagenet_batch"]), "--image-size", str(size),
                               "--num-classes", "1000", "--methods", setting["timm_methods"], *setting["fast"]],
                     os.path.join(work, f"{name}.json"))


def step_sync_bn(setting, work):
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) visible; this step needs 2"}
    folder = common.make_image_folder(os.path.join(work, "imagenet"), splits=("train", "val"), classes=4, per_class=16,
                               size=40)
    tiny = ["--data-dir", folder, "--arch", "resnet18", "--image-size", "32", "--batch-size", "16",
            "--per-device-batch", "8", "--epochs", "1", "--val-n", "8", "--workers", "0", "--log-every", "1",
            "--eps", "4", "--method", "llr", "--llr-steps", "2"]
    losses = {}
    for processes in (1, 2):
        run = os.path.join(work, f"sync-{processes}")
        launch = ["-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else [])]
        status = call(setting, [*launch, "train_imagenet.py", *tiny, "--out", run])
        if status:
            raise RuntimeError(f"train_imagenet.py with {processes} process(es) failed (exit status {status})")
        with open(os.path.join(run, "log.jsonl")) as f:
            losses[processes] = [e["loss"] for e in map(json.loads, f) if e["kind"] == "train"]
    gap = max(abs(a - b) for a, b in zip(losses[1], losses[2]))
    return {"losses_1_process": losses[1], "losses_2_processes": losses[2], "max_abs_difference": gap,
            "ok": gap < 1e-3 * max(abs(v) for v in losses[1])}


def ensure_data(setting):
    data = setting["data"]
    if not os.path.isdir(os.path.join(data, "train")):
        if not os.path.exists(setting["archive"]):
            raise RuntimeError(f"no CIFAR-10 copy at {data} and no archive at {setting['archive']}: copy "
                               f"cifar10-jpeg.tar.gz there (see docs in ../shared/data)")
        os.makedirs(data, exist_ok=True)
        with tarfile.open(setting["archive"]) as archive:
            archive.extractall(data, filter="data")
    return data


def all_steps(setting):
    steps = {"bench-cifar": step_bench_cifar, "bench-imagenet": step_bench_imagenet, "projections": step_projections,
             "fast-path": step_fast_path, "profile": step_profile}
    steps.update(repro_steps(setting))
    steps.update(contrast_steps(setting))
    steps.update({"compiled-cifar": step_compiled_cifar, "first-order": step_first_order, "compiled-imagenet": step_compiled_imagenet,
                  "compiled-profile": step_compiled_profile, "sync-bn": step_sync_bn,
                  "compiled-cifar-all": lambda s, w: step_compiled_cifar(s, w, s["compiled_methods"], "compiled-all")})
    steps.update({name: lambda s, w, name=name: step_bench_timm(s, w, name) for name in setting["timm"]})
    return steps


def summary(setting):
    """summary.md from the step JSON files that exist."""
    lines = ["# GPU report", "", "Written by `gpu_report.py` from the JSON files in this directory.", ""]
    for name in all_steps(setting):
        path = os.path.join(setting["out"], f"{name}.json")
        if not os.path.exists(path):
            lines.append(f"- {name}: not run yet")
            continue
        record = read(path)
        env = record["environment"]
        lines.append(f"## {name}\n\n{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, commit "
                     f"{env['git_commit'][:10]}, {env['time']}\n")
        result = record["result"]
        if "results" in result:  # a bench.py report
            lines.append(bench_table(result))
            if "profile" in result:
                lines.append(f"Operator tables (torch.profiler): [{result['profile']}]({result['profile']})\n")
        elif "variants" in result:
            for variant, report in result["variants"].items():
                lines.append(f"**{variant}**\n\n{bench_table(report)}")
        else:
            lines.append("```\n" + json.dumps(result, indent=1)[:3000] + "\n```\n")
    with open(os.path.join(setting["out"], "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def bench_table(report):
    rows = ["| method | ms/step | images/s | × plain (same mode) | peak GiB | × eager | compile s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        memory = "–" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        compiled = (f"{r['ratio_to_eager']:.2f} | {r['first_call_s']:.0f}" if "ratio_to_eager" in r else "– | –")
        rows.append(f"| {name} | {r['ms_median']:.1f} | {r['images_per_s']:.1f} | {r['ratio_to_plain']:.2f} | "
                    f"{memory} | {compiled} |")
    return (f"{report['arch']}, batch {report['batch_size']}, {report['image_size']} px, bf16 {report['bf16']}, "
            f"channels-last {report['channels_last']}\n\n" + "\n".join(rows) + "\n")


def smoke_setting(root):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import TINY_TIMM

    return {"timm": {"timm-vit-s16": TINY_TIMM["vit"], "timm-convnext-t": TINY_TIMM["convnext"]},
            "timm_methods": TIMM_METHODS,"root": root, "out": os.path.join(root, "gpu-report"), "data": os.path.join(root, "data"),
            "archive": "", "bench": ["--rounds", "1", "--warmup", "1", "--device", "cpu"], "fast": ["--channels-last"],
            "fast_path_methods": "plain,adv-1", "cifar_arch": "wrn-10-1", "cifar_batch": 4,
            "cifar_methods": "plain,llr-2,llr-8,adv-10", "compiled_methods": "plain,llr-2",
            "imagenet_arch": "resnet18", "imagenet_batch": 2,
            "imagenet_size": 32, "imagenet_methods": "plain,llr-2",
            "imagenet_compiled_methods": "plain",
            "compile_backend": ["--compile-backend", "eager"],
            "repro": [*common.SMOKE_COMMON, "--epochs", "1"], "eval": common.SMOKE_EVAL,
            "contrast": ["p3-adv2-authors"],
            "contrast_common": [*common.SMOKE_COMMON, "--epochs", "1", "--lr-schedule", "cyclic"],
            "contrast_eval": ["--n", "8", "--steps", "2", "--restarts", "1", "--attacks", "fgsm20,untargeted",
                              "--no-sanity", "--gamma"],
            "runs": ["plain", common.COLLAPSING],
            "step_seconds": 120, "in_process": True}


def main(argv=None):
    import torch

    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("--data-dir", default="data/cifar10-jpeg", help="the CIFAR-10 copy for the reproduction")
    p.add_argument("--archive", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz"),
                   help="unpacked into --data-dir when that is missing")
    p.add_argument("--list", action="store_true", help="list the steps and which are done")
    p.add_argument("--steps", metavar="NAMES", help="comma-separated: run only these steps (unset: every step)")
    p.add_argument("--smoke", metavar="DIR", help="every step on the CPU with tiny sizes under DIR (the tests)")
    p.add_argument("--budget", type=cli.number, metavar="MINUTES",
                   help="run the unfinished steps in order while the next one's estimate (--list) fits in what is "
                        "left of MINUTES, then stop (unset: every unfinished step)")
    args = p.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be a positive number of minutes, got {args.budget:g}")
    if args.smoke:
        setting = smoke_setting(args.smoke)
        common.make_image_folder(setting["data"], classes=3, per_class=10, size=16)
    else:
        setting = {"root": ROOT, "out": os.path.join(HERE, "gpu-report"), "data": os.path.join(ROOT, args.data_dir),
                   "archive": args.archive, "bench": [], "fast": ["--bf16", "--channels-last"],
                   "fast_path_methods": "plain,llr-2,adv-10", "cifar_arch": "wrn-28-8", "cifar_batch": 128,
                   "cifar_methods": None, "compiled_methods": None,  # bench.py's: every method that suits
                   "imagenet_arch": "resnet152", "imagenet_batch": 32,
                   "imagenet_size": 224, "imagenet_methods": "plain,llr-2,adv-10,adv-30",
                   "imagenet_compiled_methods": "plain,llr-2,adv-10,adv-30", "compile_backend": [],
                   "repro": REPRO, "contrast": list(CONTRAST), "contrast_common": CONTRAST_COMMON,
                   "contrast_eval": CONTRAST_EVAL,
                   "eval": ["--eps", common.EPS, "--n", "1000", "--gamma"], "runs": list(common.RUNS),
                   "step_seconds": STEP_SECONDS, "in_process": False,
                   "timm": {name: (arch, [], 224) for name, arch in TIMM_MODELS.items()}, "timm_methods": TIMM_METHODS}
    steps = ordered(all_steps(setting))
    if args.steps:
        chosen = [n.strip() for n in args.steps.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in steps]
        if unknown or not chosen:
            p.error(f"--steps: unknown step {unknown[0] if unknown else '(none)'!r}; see --list")
        steps = {n: steps[n] for n in steps if n in chosen}
    if args.list:
        for name in steps:
            print(f"{'done ' if os.path.exists(os.path.join(setting['out'], name + '.json')) else 'to do'}  "
                  f"{estimate_minutes(name):3g} min  {name}")
        return
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_report.py: error: no CUDA GPU here; this report measures a GPU (try --smoke DIR for a check)")
    os.makedirs(setting["out"], exist_ok=True)
    work = os.path.join(setting["root"], "runs", "gpu-report")
    os.makedirs(work, exist_ok=True)
    began = time.time()
    for name, step in steps.items():
        path = os.path.join(setting["out"], f"{name}.json")
        if os.path.exists(path):
            continue
        left = None if args.budget is None else args.budget - (time.time() - began) / 60
        if left is not None and estimate_minutes(name) > left:
            print(f"{name}: about {estimate_minutes(name):g} min, more than the {max(left, 0):.1f} min left of "
                  f"--budget {args.budget:g}: stopping before it", flush=True)
            break
        start = time.time()
        try:
            result = step(setting, work)
        except RuntimeError as e:
            sys.exit(f"gpu_report.py: error: step {name}: {e}")
        if result is None:
            print(f"{name}: not finished in this piece; run the command again to go on", flush=True)
            break
        with open(path + ".tmp", "w") as f:
            json.dump({"step": name, "environment": environment(), "seconds": round(time.time() - start, 1),
                       "result": result}, f, indent=1)
        os.replace(path + ".tmp", path)
        summary(setting)  # after every step: a machine taken back mid-report still leaves a summary
        print(f"{name}: done in {time.time() - start:.0f} s -> {path}", flush=True)
    summary(setting)
    remaining = [n for n in steps if not os.path.exists(os.path.join(setting["out"], n + ".json"))]
    print(f"gpu_report.py: {len(steps) - len(remaining)} of {len(steps)} steps done"
          + (f"; next: {remaining[0]}" if remaining else "") + f"; summary in {setting['out']}/summary.md")
    if remaining:  # what a next session (or several) should plan for
        print(f"left: {len(remaining)} steps, about {sum(map(estimate_minutes, remaining)):g} min on one H100 by their "
              f"estimates (a training run that needs more than one piece takes longer): {', '.join(remaining)}")
    shutil.rmtree(os.path.join(work, "imagenet"), ignore_errors=True)


if __name__ == "__main__":
    main()
