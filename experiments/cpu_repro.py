"""The paper's central claim where anyone can check it, on 2 CPU cores: adversarial training
against a cheap attack can learn to hide its gradients (weak attacks fail, strong ones still
break it), while LLR with the same few inner steps keeps the loss locally linear, so that weak
and strong attacks agree. `make cpu-repro` runs this file.

    python -m experiments.cpu_repro                  # every step not done yet: train, evaluate, draw, write the results
    python -m experiments.cpu_repro --only train     # just one stage (train, evaluate, surfaces, gamma-sweep, report)
    python -m experiments.cpu_repro --smoke DIR      # the whole pipeline on generated images in a minute (tests)

Every run trains with train_cifar.py into runs/cpu-repro/NAME (interrupted runs resume), is
evaluated with eval.py on the test set, and lands in experiments/cpu-repro/: its last checkpoint
(loadable with models.load_checkpoint), its training log and config, its evaluation JSON, γ
found by searches of 1 to 50 steps (NAME.gamma.json), the figures, summary.json, and
the README's section between the cpu-repro markers. The last checkpoint of each run is the one
evaluated: choosing by validation accuracy is early stopping, which is exactly how a collapse
would be hidden. The setting (model, data, ε, schedule) is the one the exploration written up in
the README found; see EXPLORED there.
"""
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/: the write-ups and their data
ROOT = os.path.dirname(HERE)  # the repository: its scripts run from here
sys.path.insert(0, ROOT)  # the project's modules, also when this file is run by its path

import cli  # noqa: E402
PY = sys.executable

# --------------------------------------------------------------------------- the experiment
DATA = "data/cifar10-jpeg"  # the JPEG copy of CIFAR-10 (see the README)
EPS = "8/255"
COMMON = ["--arch", "wrn-10-1", "--eps", EPS, "--train-n", "6000", "--epochs", "10", "--batch-size", "128",
          "--lr", "0.1", "--lr-decay-at", "0.5,0.75", "--weight-decay", "5e-4", "--eps-warmup", "0", "--val-n", "300",
          "--eval-steps", "10", "--gamma-n", "32", "--log-every", "10"]
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
COST_ORDER = ["adv10", "llr2-mu", "llr2", "llr1", "adv2", "fgsm", "fgsm-seed1", "plain"]  # most expensive first
COLLAPSING, LINEAR = "fgsm", "llr1"  # the pair whose loss surfaces are drawn
EVAL = ["--eps", EPS, "--n", "1000", "--gamma", "--autoattack", "--aa-version", "custom", "--aa-attacks", "apgd-t"]
SURFACES = 3  # the first this many test images that both models of the pair classify correctly
# γ(ε, x) found by searches of 1, 2, ... steps on the same test images: how much of the 50-step gap
# the 1- or 2-step search of LLR's training sees
GAMMA_SWEEP = ["--eps", EPS, "--n", "1000", "--gamma-sweep", "1,2,5,10,50"]

SMOKE_COMMON = ["--arch", "wrn-10-1", "--eps", EPS, "--epochs", "2", "--batch-size", "8", "--val-n", "6",
                "--eval-steps", "2", "--gamma-n", "4", "--log-every", "1"]
SMOKE_EVAL = ["--eps", EPS, "--n", "8", "--gamma", "--steps", "2", "--restarts", "1", "--square-queries", "5",
              "--no-sanity"]
SMOKE_GAMMA_SWEEP = ["--eps", EPS, "--n", "8", "--gamma-sweep", "1,2"]


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


def call(argv, jobs=1):
    """Run a project script with its share of the CPU cores (`jobs` run at once); its failure stops
    this one, with its own message above."""
    print("+ " + " ".join(argv), flush=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    result = subprocess.run([PY, *argv], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": threads})
    if result.returncode:
        raise SystemExit(f"cpu_repro.py: error: {' '.join(argv[:2])} ... failed (exit status {result.returncode})")


# --------------------------------------------------------------------------- the stages
def train(setting, name):
    run = run_dir(setting, name)
    if trained(run):
        return
    if os.path.exists(os.path.join(run, "state.pt")):
        call(["train_cifar.py", "--resume", run], setting["jobs"])
    else:
        call(["train_cifar.py", "--data-dir", setting["data"], "--out", run, "--overwrite", *setting["common"],
              *setting["runs"][name][1]], setting["jobs"])


def run_eval_once(setting, name, kind, flags):
    """eval.py on the run's last checkpoint, writing docs/…/NAME.KIND.json, unless that exists."""
    path = os.path.join(setting["out"], f"{name}.{kind}.json")
    if not os.path.exists(path):
        call(["eval.py", os.path.join(run_dir(setting, name), "last.safetensors"), "--data-dir", setting["data"],
              *flags, "--out", path], setting["jobs"])


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

    with concurrent.futures.ThreadPoolExecutor(setting["jobs"]) as pool:
        order = sorted(setting["runs"], key=lambda name: (name not in first, setting["order"].index(name)))
        for future in [pool.submit(one, name) for name in order]:
            future.result()  # the first failure stops the command (the other jobs finish their run)


def surface_images(setting):
    """The first SURFACES test images that both models of the pair classify correctly (chosen by
    that rule alone, not by how the surfaces look); none while either is not evaluated yet."""
    paths = [os.path.join(setting["out"], f"{name}.eval.json") for name in (COLLAPSING, LINEAR)]
    if not all(os.path.exists(p) for p in paths):
        return []
    correct = [read(p)["results"]["nominal"]["robust"] for p in paths]
    return [i for i, (a, b) in enumerate(zip(*correct)) if a and b][:setting["surfaces"]]


def surfaces(setting):
    images = [str(i) for i in surface_images(setting)]
    for name in (COLLAPSING, LINEAR):
        path = os.path.join(setting["out"], f"{name}.surface.json")
        if not os.path.exists(path) and images:
            call(["eval.py", os.path.join(setting["out"], f"{name}.safetensors"), "--eps", EPS, "--data-dir",
                  setting["data"], "--surface", *images, "--surface-grid", str(setting["grid"]), "--out", path])


def gamma_sweep(setting, name):
    run_eval_once(setting, name, "gamma", setting["gamma_sweep"])


def read(path):
    with open(path) as f:
        return json.load(f)


def epoch_seconds(run):
    """Mean wall time of a training epoch: training images over the logged images/s (evaluation excluded)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        rates = [e["images_per_s"] for e in map(json.loads, f) if e.get("kind") == "train"]
    with open(os.path.join(run, "log.jsonl")) as f:
        first = json.loads(f.readline())
    steps_per_epoch = first["step"] / first["epoch"]
    batch = read(os.path.join(run, "config.json"))["args"]["batch_size"]
    return steps_per_epoch * batch / (sum(rates) / len(rates))


def last_validation(run):
    """The last per-epoch validation record of the run in `run` (clean, FGSM, PGD accuracy, γ)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        evals = [e for e in map(json.loads, f) if e.get("kind") == "eval"]
    return {k: evals[-1][k] for k in ("epoch", "val_clean_acc", "val_fgsm_acc", "val_pgd_acc", "val_gamma_mean")}


def summarise(setting):
    """summary.json: per run, the accuracy under each attack, the drop from FGSM-20 to the worst case,
    γ, the last validation and the training time per epoch as a multiple of plain's. Runs not trained
    or not evaluated yet are listed with their status ("training", "evaluation"), so that the report
    can be written while the experiment is still running."""
    plain_run = run_dir(setting, "plain")
    plain = epoch_seconds(plain_run) if trained(plain_run) else None
    rows, robust = {}, {}  # robust: per run, per test image, robust under the worst case
    for name, (label, flags) in setting["runs"].items():
        run, path = run_dir(setting, name), os.path.join(setting["out"], f"{name}.eval.json")
        row = rows[name] = {"label": label, "flags": flags, "pending": None}
        if not trained(run):
            row["pending"] = "training"
            continue
        row.update(epoch_seconds=epoch_seconds(run), validation=last_validation(run))
        row["epoch_time_x_plain"] = row["epoch_seconds"] / plain if plain else None
        if not os.path.exists(path):
            row["pending"] = "evaluation"
            continue
        report = read(path)
        r = report["results"]
        row["nominal"] = r["nominal"]["accuracy"]
        for column in ("fgsm20", "untargeted", "multi-targeted", "square"):
            if column in r:
                row[column] = r[column]["accuracy"]
        if "autoattack" in r:
            row["apgd-t"] = r["autoattack"]["accuracy"]
        row["evaluated_on"] = f"{report.get('device_name', report['device'])}, torch {report['torch']}"
        sweep = os.path.join(setting["out"], f"{name}.gamma.json")
        if os.path.exists(sweep):
            row["gamma_by_steps"] = {str(g["steps"]): g["mean"] for g in read(sweep)["gamma_sweep"]}
        worst_case = r.get("worst_case_with_autoattack", r["worst_case"])
        worst, robust[name] = worst_case["accuracy"], worst_case["robust"]
        row.update(worst_case=worst, drop_fgsm20_to_worst=row.get("fgsm20", worst) - worst,
                   gamma_mean=report.get("gamma", {}).get("mean"),
                   flags_raised=[c["name"] for c in report["obfuscation"]["checks"] if not c["ok"]])
    if COLLAPSING in robust:
        for name in robust.keys() - {COLLAPSING}:
            rows[name][f"paired_vs_{COLLAPSING}"] = paired_test(robust[name], robust[COLLAPSING])
    summary = {"machine": setting["machine"], "data": setting["data"], "common_flags": setting["common"],
               "eval_flags": setting["eval"], "surface_images": surface_images(setting), "runs": rows}
    with open(os.path.join(setting["out"], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def paired_test(robust, reference):
    """Two models' worst-case robustness on the same test images, compared image by image: how many
    images only each keeps, and the exact two-sided McNemar p-value (a binomial test on those
    discordant images, fair coin) for "neither model is more robust than the other"."""
    only_this = sum(a and not b for a, b in zip(robust, reference))
    only_reference = sum(b and not a for a, b in zip(robust, reference))
    n, k = only_this + only_reference, min(only_this, only_reference)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_this": only_this, "only_reference": only_reference, "p_mcnemar": p}


def figures(setting):
    logs = [os.path.join(run_dir(setting, name), "log.jsonl") for name in setting["runs"]
            if trained(run_dir(setting, name))]
    if logs:
        call(["plots.py", "validation", *logs, "--out", os.path.join(setting["out"], "validation.png")])
    reports = [os.path.join(setting["out"], f"{name}.surface.json") for name in (COLLAPSING, LINEAR)]
    if all(os.path.exists(p) for p in reports):
        for i in surface_images(setting):
            call(["plots.py", "surface", *reports, "--index", str(i),
                  "--out", os.path.join(setting["out"], f"surface-{i}.png")])
    evaluations = [p for p in (os.path.join(setting["out"], f"{n}.eval.json") for n in setting["runs"])
                   if os.path.exists(p)]
    if evaluations:
        call(["plots.py", "gamma-hist", *evaluations, "--out", os.path.join(setting["out"], "gamma-test.png")])


def table(summary):
    """The results table in Markdown."""
    head = ("| run | Nominal | FGSM-20 | Untargeted | Multi-Targeted | Square | APGD-T | worst case | "
            "FGSM-20 − worst | mean γ | epoch time × plain | obfuscation checks failed |\n"
            + "| --- " + "| ---: " * 10 + "| --- |\n")
    cell = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731

    def line(r):
        ratio = "–" if r.get("epoch_time_x_plain") is None else f"{r['epoch_time_x_plain']:.2f}"
        if r["pending"]:
            return f"| {r['label']} |" + " … |" * 9 + f" {ratio} | {r['pending']} pending |"
        return (f"| {r['label']} | {cell(r['nominal'])} | {cell(r.get('fgsm20'))} | {cell(r.get('untargeted'))} | "
                f"{cell(r.get('multi-targeted'))} | {cell(r.get('square'))} | {cell(r.get('apgd-t'))} | "
                f"{cell(r['worst_case'])} | {cell(r['drop_fgsm20_to_worst'])} | "
                f"{'–' if r['gamma_mean'] is None else format(r['gamma_mean'], '.3f')} | "
                f"{ratio} | {', '.join(r['flags_raised']) or 'none'} |")
    machines = {}  # where each row was evaluated (its eval JSON says), when not all on one machine
    for r in summary["runs"].values():
        if r.get("evaluated_on"):
            machines.setdefault(r["evaluated_on"], []).append(r["label"])
    where = "".join(f"\nEvaluated on {m}: {'; '.join(labels)}.\n" for m, labels in machines.items())
    return head + "\n".join(map(line, summary["runs"].values())) + "\n" + (where if len(machines) > 1 else "")


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


def figure_links(setting):
    """Markdown image links to the figures that exist: validation curves, γ on the test set, and
    one loss-surface figure per chosen test image."""
    folder = os.path.relpath(setting["out"], os.path.dirname(setting["readme"]))
    figures = [("validation curves", "validation.png"), ("gamma on the test set", "gamma-test.png"),
               *((f"loss surfaces, test image {i}", f"surface-{i}.png") for i in surface_images(setting))]
    return "".join(f"![{label}]({folder}/{name})\n" for label, name in figures
                   if os.path.exists(os.path.join(setting["out"], name)))


def report(setting):
    summary = summarise(setting)
    figures(setting)
    text = table(summary)
    with open(os.path.join(setting["out"], "table.md"), "w") as f:
        f.write(text)
    if setting["readme"]:
        write_readme_parts(setting["readme"], {"table": text, "figures": figure_links(setting)})
    print(text)


STAGES = {"train": lambda s: runs(s, [train]),
          "evaluate": lambda s: runs(s, [evaluate], first=(COLLAPSING, LINEAR)),  # what the surfaces need, first
          "surfaces": surfaces, "gamma-sweep": lambda s: runs(s, [gamma_sweep]), "report": report}


def smoke_setting(root):
    """A tiny generated ImageFolder and settings that run every stage in about a minute."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import make_image_folder

    data = make_image_folder(os.path.join(root, "data"), classes=3, per_class=10, size=16)
    out = os.path.join(root, "docs")
    os.makedirs(out, exist_ok=True)
    runs = {name: RUNS[name] for name in ("plain", COLLAPSING, LINEAR)}
    readme = os.path.join(root, "README.md")
    if not os.path.exists(readme):
        with open(readme, "w") as f:
            f.write("\n".join(["before", *marked("table"), "between", *marked("figures"), "after\n"]))
    return {"name": "cpu-repro", "root": root, "data": data, "out": out, "common": SMOKE_COMMON, "eval": SMOKE_EVAL,
            "gamma_sweep": SMOKE_GAMMA_SWEEP,
            "runs": runs, "surfaces": 1, "grid": 5, "readme": readme, "machine": "smoke test"}


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


def main(argv=None):
    args = parse_args(__doc__, __file__, STAGES, argv)
    if args.smoke:
        setting = smoke_setting(args.smoke)
    else:
        require_data("cpu_repro.py")
        os.makedirs(os.path.join(HERE, "cpu-repro"), exist_ok=True)
        setting = {"name": "cpu-repro", "root": ROOT, "data": DATA, "out": os.path.join(HERE, "cpu-repro"),
                   "common": COMMON, "eval": EVAL, "gamma_sweep": GAMMA_SWEEP, "runs": RUNS, "surfaces": SURFACES,
                   "grid": 41, "readme": os.path.join(HERE, "cpu-repro", "README.md"), "machine": machine()}
    setting.update(jobs=args.jobs, order=COST_ORDER)
    start = time.time()
    if args.only:
        STAGES[args.only](setting)
    else:
        for stage in STAGES.values():
            stage(setting)
    print(f"cpu_repro.py: done in {time.time() - start:.0f} s; results in {setting['out']}")


def machine():
    import platform

    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}"


if __name__ == "__main__":
    main()
