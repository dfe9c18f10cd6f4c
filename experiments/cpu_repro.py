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
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also when run by its path

from experiments import common  # noqa: E402
from experiments.common import (COLLAPSING, EPS, HERE, LINEAR, ROOT, RUNS, SMOKE_COMMON, SMOKE_EVAL,  # noqa: E402
                                call, epoch_seconds, evaluate, machine, marked, parse_args, read, require_data,
                                run_dir, run_eval_once, runs, train, trained, write_readme_parts)

# --------------------------------------------------------------------------- the experiment
# the runs compared (RUNS), ε and the pair whose surfaces are drawn: common.py (gpu_report.py runs them too)
COMMON = ["--arch", "wrn-10-1", "--eps", EPS, "--train-n", "6000", "--epochs", "10", "--batch-size", "128",
          "--lr", "0.1", "--lr-decay-at", "0.5,0.75", "--weight-decay", "5e-4", "--eps-warmup", "0", "--val-n", "300",
          "--eval-steps", "10", "--gamma-n", "32", "--log-every", "10"]
COST_ORDER = ["adv10", "llr2-mu", "llr2", "llr1", "adv2", "fgsm", "fgsm-seed1", "plain"]  # most expensive first
EVAL = ["--eps", EPS, "--n", "1000", "--gamma", "--autoattack", "--aa-version", "custom", "--aa-attacks", "apgd-t"]
SURFACES = 3  # the first this many test images that both models of the pair classify correctly
# γ(ε, x) found by searches of 1, 2, ... steps on the same test images: how much of the 50-step gap
# the 1- or 2-step search of LLR's training sees
GAMMA_SWEEP = ["--eps", EPS, "--n", "1000", "--gamma-sweep", "1,2,5,10,50"]

SMOKE_GAMMA_SWEEP = ["--eps", EPS, "--n", "8", "--gamma-sweep", "1,2"]


# --------------------------------------------------------------------------- the stages
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
                  setting["data"], "--surface", *images, "--surface-grid", str(setting["grid"]), "--out", path],
                 in_process=setting["in_process"])


def gamma_sweep(setting, name):
    run_eval_once(setting, name, "gamma", setting["gamma_sweep"])


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
        call(["plots.py", "validation", *logs, "--out", os.path.join(setting["out"], "validation.png")],
             in_process=setting["in_process"])
    reports = [os.path.join(setting["out"], f"{name}.surface.json") for name in (COLLAPSING, LINEAR)]
    if all(os.path.exists(p) for p in reports):
        for i in surface_images(setting):
            call(["plots.py", "surface", *reports, "--index", str(i),
                  "--out", os.path.join(setting["out"], f"surface-{i}.png")], in_process=setting["in_process"])
    evaluations = [p for p in (os.path.join(setting["out"], f"{n}.eval.json") for n in setting["runs"])
                   if os.path.exists(p)]
    if evaluations:
        call(["plots.py", "gamma-hist", *evaluations, "--out", os.path.join(setting["out"], "gamma-test.png")],
             in_process=setting["in_process"])


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
    data = common.make_image_folder(os.path.join(root, "data"), classes=3, per_class=10, size=16)
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


def main(argv=None):
    args = parse_args(__doc__, __file__, STAGES, argv)
    if args.smoke:
        setting = smoke_setting(args.smoke)
    else:
        require_data("cpu_repro.py")
        os.makedirs(os.path.join(HERE, "cpu-repro"), exist_ok=True)
        setting = {"name": "cpu-repro", "root": ROOT, "data": common.DATA, "out": os.path.join(HERE, "cpu-repro"),
                   "common": COMMON, "eval": EVAL, "gamma_sweep": GAMMA_SWEEP, "runs": RUNS, "surfaces": SURFACES,
                   "grid": 41, "readme": os.path.join(HERE, "cpu-repro", "README.md"), "machine": machine()}
    # the smoke runs each script in this process, one at a time (no interpreter start-ups: the tests' time)
    setting.update(jobs=1 if args.smoke else args.jobs, in_process=bool(args.smoke), order=COST_ORDER)
    start = time.time()
    if args.only:
        STAGES[args.only](setting)
    else:
        for stage in STAGES.values():
            stage(setting)
    print(f"cpu_repro.py: done in {time.time() - start:.0f} s; results in {setting['out']}")


if __name__ == "__main__":
    main()
