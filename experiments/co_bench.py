"""Catastrophic overfitting (CO), side by side: LLR against FGSM, FGSM-RS, N-FGSM, GradAlign,
ELLE and ELLE-A, each a train_cifar.py run, on a small ReLU CNN that a 2-core CPU trains, where FGSM
collapses reproducibly. `make co-bench`; the write-up is experiments/co-bench/README.md.

    python -m experiments.co_bench                       # every stage, skipping what is done (resumable)
    OMP_NUM_THREADS=1 python -m experiments.co_bench --only explore --worker 0/2 &   # two processes, one core each
    OMP_NUM_THREADS=1 python -m experiments.co_bench --only explore --worker 1/2
    python -m experiments.co_bench --only report         # table, figures, summary.json from what is done
    python -m experiments.co_bench --smoke DIR           # every stage on generated images, in seconds (the tests)

Fixed before any run (the README says why):
- Protocol, every run (the positive control's, GradAlign's CNN setting, their code): `PROTOCOL` below, ReLU,
  Adam (lr 0.003, weight decay 5e-4 on all parameters), their one-cycle schedule peaking at 40%, batch 128,
  zero-padded crops and flips, EPOCHS = 15 epochs (the budget: the literature trains 30, or 15 for
  FGSM-RS), 1,000 training images held out and evaluated after each epoch (clean, one FGSM step, PGD-20).
  Each method at its authors' hyperparameters for its ε (`common.CO_METHODS`; methods.py's defaults
  follow ε).
- Stages (`--only`), each skipping what is done; `--worker I/N` trains (or evaluates) the I-th of N shares
  of a stage's runs, dealt out by estimated cost, so that two one-thread processes share 2 cores:
  1. explore: FGSM (zero init) with 3 seeds, FGSM-RS and ADV-10 with 1 seed, at ε ∈ {8, 12, 16}/255, on
     cnn-1x4 (the positive control's model), then cnn-1x16; the larger model's runs are skipped once the
     smaller meets the setting rule (the rule takes the smallest). Writes explore.md, then setting.json.
  2. train: the methods × the chosen ε × seeds 0, 1, 2; ADV-10 1 seed per ε; the LLR grid (LLR-1, `GRID`,
     1 seed) at the larger ε. Refuses to run without setting.json. Runs the explore stage made are reused.
  3. eval: eval.py's suite, APGD-T (pyautoattack) and γ on the LAST checkpoint of every train-stage run
     (choosing by validation would hide a collapse), 1,000 test images: RUN/last.eval.json.
  4. bench: bench.py --activation relu --compile on the chosen CNN and on PreAct ResNet-18 (bench-*.json).
  5. report: table.md, robust.png, curves.png, grid.md, summary.json.
- The setting rule (`choose_setting`): on the smallest model where one exists, the pair of ε (lo < hi) with
  FGSM collapsed in 3 of 3 seeds at hi and ADV-10's final held-out clean accuracy ≥ 30% at both; among
  such pairs, one that includes an ε where FGSM-RS collapsed if any does, then the smallest hi, then the
  smallest lo. If the estimated cost of the train and eval stages exceeds what is left of the budget, the
  seeds of the compared methods at lo are cut to seed 0 (the issue: cut seeds at the ε that discriminates
  least, never the evaluation). When the finished exploration meets no setting, `--choose MODEL:LO,HI
  --reason TEXT` writes setting.json in the same way with "by hand: TEXT" as its "rule" (and the README
  says why).
- The collapse rule (`common.collapsed`, as the design fixed it): a run has collapsed when, at the end of training,
  its held-out PGD-20 accuracy is at most a quarter of its best during training and at most half of
  its FGSM accuracy (the log's "eval" entries: val_pgd_acc, val_fgsm_acc).
- The LLR grid's point is chosen by the held-out PGD-20 accuracy at the end of training (the run's own
  validation), never the test set; both the authors' point (λ = 2, μ = 0.6) and the chosen one are reported.
Run directories: experiments/co-bench/runs/<model>/<name>/ (config.json, log.jsonl, last.safetensors,
last.eval.json; state.pt while unfinished, deleted when the run has trained its last epoch).
"""
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the project's modules, also when this file is run by its path

import bench  # noqa: E402
import cli  # noqa: E402
import eval as eval_py  # noqa: E402  (eval.py; the alias keeps the builtin)
import train_cifar  # noqa: E402
import training  # noqa: E402
from experiments import common  # noqa: E402
from experiments.common import collapsed  # noqa: E402  (the collapse rule)

EPOCHS = 15  # the budget: 10 hours of a 2-core machine for the exploration, the grid and its evaluation
PROTOCOL = ["--activation", "relu", *common.GRADALIGN_CNN]  # the positive control's: GradAlign's CNN setting
GRID = ((2, 0.6), (2, 3), (8, 0.6), (8, 3), (4, 1.5))  # LLR-1's (λ, μ), 1 seed; (2, 0.6): the authors' CIFAR-10
SETTING = {
    "models": ("cnn-1x4", "cnn-1x16"), "explore_eps": (8, 12, 16), "min_adv10_clean": 0.30,  # the exploration
    "seeds": (0, 1, 2), "epochs": EPOCHS, "batch_size": 128, "holdout": 1000, "pgd_steps": 20, "grid": GRID,  # runs
    # eval.py on 1,000 test images: the suite (FGSM, FGSM-20, Untargeted, Multi-Targeted, Square), APGD-T, γ
    "eval_argv": ["--n", "1000", "--gamma", "--autoattack", "--aa-version", "custom", "--aa-attacks", "apgd-t"],
    # bench.py, ReLU as trained: the chosen CNN at the training batch, 20 steps timed after 3 (a step takes
    # milliseconds: 5 after 1 varied 1.5x between rounds), and PreAct ResNet-18 at bench.py's CPU batch, 5 after 1
    "bench_cnn_argv": ["--rounds", "20", "--warmup", "3"],
    "bench_archs": {"preact-resnet18": ["--batch-size", "32", "--rounds", "5", "--warmup", "1"]},
    "bench_argv": ["--activation", "relu", "--compile"],
    "budget_hours": 10, "processes": 2}  # hours of the 2-core machine, in one-thread processes
# the methods (common.CO_METHODS: label, train_cifar.py flags): bench.py's variant, and the step cost relative to
# FGSM's on one CPU thread (cnn-1x4, batch 128, measured with methods.py: an estimate, for the shares and the budget)
BENCH = {"fgsm": ("adv-1", 1.0), "fgsmrs": ("adv-1", 1.0), "nfgsm": ("n-fgsm", 1.0), "gradalign": ("gradalign", 2.1),
         "elle": ("elle", 2.0), "ellea": ("elle-a", 2.0), "llr1-mu0": ("llr-1", 2.2), "llr2": ("llr-2", 2.7),
         "adv10": ("adv-10", 7.5)}
# first-order LLR (llr_loss(first_order=True)) beside its exact twin, same protocol and seeds, at both ε: LLR-1 at the
# grid's chosen (λ, μ) = (8, 3) and LLR-2 at the authors' (2, 0.6) (whose exact runs are COMPARED's llr2); the rule
# that reads them was fixed before they ran (the write-up's "First-order LLR")
TWINS = {"llr1-83": ("LLR-1, λ = 8, μ = 3", "--method llr --llr-steps 1 --llr-lam 8 --llr-mu 3"),
         "llr1fo-83": ("first-order LLR-1, λ = 8, μ = 3",
                       "--method llr --llr-steps 1 --llr-lam 8 --llr-mu 3 --llr-first-order"),
         "llr2fo": ("first-order LLR-2", "--method llr --llr-steps 2 --llr-first-order")}
EXACT_TWIN = {"llr1fo-83": "llr1-83", "llr2fo": "llr2"}
GRID_TWIN = {"llr1-83": (8, 3)}  # at the grid's ε, seed 0, this twin is the grid's run of this (λ, μ): the same flags
BENCH.update({"llr1-83": ("llr-1", 2.2), "llr1fo-83": ("llr-fo-1", 2.6), "llr2fo": ("llr-fo-2", 3.1)})
METHODS = {name: (label, *BENCH[name]) for name, (label, _) in [*common.CO_METHODS.items(), *TWINS.items()]}
COMPARED = ("fgsm", "fgsmrs", "nfgsm", "gradalign", "elle", "ellea", "llr1-mu0", "llr2")  # 3 seeds at each ε
MODEL_COST = {"cnn-1x4": 1.0, "cnn-1x16": 2.8}  # an FGSM step's cost relative to cnn-1x4's (one thread): an estimate
EVAL_COST = 5.0  # an evaluation (suite, APGD-T, γ; 1,000 test images) in FGSM epochs of its model: measured, ~3.5-5


# --------------------------------------------------------------------------- the runs
def make_run(setting, model, method, eps, seed, lam=None, mu=None, directory=None):
    """One run: its name, directory (`directory`: another name's, the same run), train_cifar.py flags and estimated
    cost (FGSM epochs of cnn-1x4)."""
    name = f"{method}-e{eps}-s{seed}" if lam is None else f"llr1-lam{lam:g}-mu{mu:g}-e{eps}-s{seed}"
    flags = (["--eps", f"{eps}/255", *TWINS[method][1].split()] if method in TWINS else
             common.co_flags(method, eps) if lam is None else [
                 "--eps", f"{eps}/255", "--method", "llr", "--llr-steps", "1", "--llr-lam", f"{lam:g}", "--llr-mu",
                 f"{mu:g}"])
    out = os.path.join(setting["out"], "runs", model, directory or name)
    argv = ["--data-dir", setting["data"], "--out", out, "--seed", str(seed), "--arch", model,
            "--epochs", str(setting["epochs"]), "--batch-size", str(setting["batch_size"]), "--val-n",
            str(setting["holdout"]), "--eval-steps", str(setting["pgd_steps"]), *PROTOCOL, *flags]
    return {"name": name, "model": model, "method": method, "eps": eps, "seed": seed, "lam": lam, "mu": mu,
            "dir": out, "argv": argv, "cost": METHODS[method][2] * MODEL_COST.get(model, 1.0) * setting["epochs"]}


def explore_runs(setting):
    """FGSM × 3 seeds, FGSM-RS and ADV-10 × 1 seed, at each ε, per model; smallest model first, cheap first."""
    return [make_run(setting, model, method, eps, seed) for model in setting["models"]
            for method, seeds in (("fgsm", setting["seeds"]), ("fgsmrs", (0,)), ("adv10", (0,)))
            for eps in setting["explore_eps"] for seed in seeds]


def train_runs(setting, chosen):
    """The comparison on the chosen model and ε (`chosen`: setting.json): the methods × seeds (per ε, as
    chosen), ADV-10 × 1 seed, and the LLR grid × 1 seed at the larger ε."""
    runs = []
    for eps in chosen["eps"]:
        seeds = chosen.get("seeds", {}).get(str(eps), setting["seeds"])
        runs += [make_run(setting, chosen["model"], m, eps, s) for m in COMPARED for s in seeds]
        runs.append(make_run(setting, chosen["model"], "adv10", eps, 0))
    runs += [make_run(setting, chosen["model"], "llr1-mu0", chosen["grid_eps"], 0, lam, mu)
             for lam, mu in setting["grid"]]
    grid = {(lam, mu) for lam, mu in setting["grid"]}
    return runs + [make_run(setting, chosen["model"], m, eps, s, directory=(
        f"llr1-lam{GRID_TWIN[m][0]:g}-mu{GRID_TWIN[m][1]:g}-e{eps}-s0" if m in GRID_TWIN and GRID_TWIN[m] in grid
        and (eps, s) == (chosen["grid_eps"], 0) else None))
        for s in setting["seeds"] for eps in chosen["eps"] for m in TWINS
        if s in chosen.get("seeds", {}).get(str(eps), setting["seeds"])]


def share(runs, worker):
    """The runs of worker "I/N": each model's runs dealt out, dearest first, to the least loaded worker by
    estimated cost, so that the workers finish each model at about the same time; in the list's order."""
    index, count = worker
    load, mine = [0.0] * count, []
    for model in dict.fromkeys(r["model"] for r in runs):
        for run in sorted((r for r in runs if r["model"] == model), key=lambda r: -r["cost"]):
            w = load.index(min(load))
            load[w] += run["cost"]
            mine += [run] if w == index else []
    return [r for r in runs if r in mine]


def train_run(setting, run):
    """Train one run with train_cifar.py, or continue it from its state.pt (exactly: every random draw is
    a function of the seed and the step); a stop by SIGTERM or Ctrl-C stops this script too. When it has
    trained its last epoch its state.pt goes: a finished run is never resumed, and what is committed is
    config.json, log.jsonl and last.safetensors (best.safetensors is ignored: the benchmark uses last)."""
    if common.trained(run["dir"]):
        return
    resume = os.path.exists(os.path.join(run["dir"], training.STATE))
    status = train_cifar.main(["--resume", run["dir"], "--data-dir", setting["data"]] if resume
                              else [*run["argv"], "--overwrite"])
    if status or not common.trained(run["dir"]):
        sys.exit(f"co_bench.py: {run['dir']} stopped before its last epoch; the same command continues it")
    os.remove(os.path.join(run["dir"], training.STATE))


# --------------------------------------------------------------------------- explore and the setting rule
def explore_table(setting):
    """Per (model, ε): FGSM collapsed k of n, FGSM-RS collapsed, ADV-10's last held-out clean and PGD-20
    accuracy, FGSM's training seconds per epoch, and whether every run of the cell has finished."""
    table = {}
    for run in explore_runs(setting):
        cell = table.setdefault((run["model"], run["eps"]), {"fgsm": [], "fgsmrs": None, "adv10": None, "done": True,
                                                             "seconds": []})
        if not common.trained(run["dir"]):
            cell["done"] = False
            continue
        log = common.epoch_evaluations(run["dir"])
        if run["method"] == "fgsm":
            cell["fgsm"].append(collapsed(log))
            cell["seconds"].append(common.epoch_seconds(run["dir"]))
        elif run["method"] == "fgsmrs":
            cell["fgsmrs"] = collapsed(log)
        else:
            cell["adv10"] = {"clean": log[-1]["clean"], "pgd": log[-1]["pgd"]}
    return table


def choose_setting(table, setting):
    """The setting rule (the module docstring): {"model", "eps": [lo, hi]} for the smallest model that has a
    qualifying pair, None while a model before it is unfinished or when no model has one; and why."""
    for model in setting["models"]:
        cells = {eps: table[(model, eps)] for eps in setting["explore_eps"]}
        if not all(c["done"] for c in cells.values()):
            return None, f"{model}'s exploration is not finished"
        eligible = [e for e, c in cells.items() if c["adv10"]["clean"] >= setting["min_adv10_clean"]]
        pairs = [(lo, hi) for lo in eligible for hi in eligible
                 if lo < hi and sum(cells[hi]["fgsm"]) == len(setting["seeds"])]
        if pairs:
            lo, hi = min(pairs, key=lambda p: (not (cells[p[0]]["fgsmrs"] or cells[p[1]]["fgsmrs"]), p[1], p[0]))
            return {"model": model, "eps": [lo, hi]}, "the rule"
    return None, "no model has a pair of ε that meets the rule"


def unmet(table, setting, model):
    """Why no pair of `model`'s ε meets the setting rule, in the rule's terms and as explore.md shows it."""
    cells = {eps: table[(model, eps)] for eps in setting["explore_eps"]}
    low = [f"{e}/255" for e, c in cells.items() if c["adv10"]["clean"] < setting["min_adv10_clean"]]
    partial = [f"{e}/255" for e, c in cells.items() if sum(c["fgsm"]) < len(setting["seeds"])]
    floor = 100 * setting["min_adv10_clean"]
    reasons = [f"ADV-10's final clean accuracy under {floor:g}% at {', '.join(low)}"] * bool(low)
    reasons += [f"FGSM collapsed in fewer than all seeds at {', '.join(partial)}"] * bool(partial)
    return "; ".join(reasons) or "no two ε qualify"


def budget(setting, table, chosen):
    """Hours (of the 2-core machine, `processes` one-thread processes) spent by the exploration and the
    estimate of the train and eval stages still to run: each run's step cost × epochs (and EVAL_COST epochs
    for its evaluation) × the model's measured FGSM seconds per epoch."""
    per_epoch = {m: statistics.median(s) for m in setting["models"]
                 if (s := [x for (model, _), c in table.items() if model == m for x in c["seconds"]])}
    spent = sum(common.epoch_seconds(r["dir"]) * setting["epochs"] for r in explore_runs(setting)
                if common.trained(r["dir"]))
    todo = [r for r in train_runs(setting, chosen) if not common.trained(r["dir"])]
    fgsm_s = per_epoch.get(chosen["model"], 0.0)
    estimate = sum((METHODS[r["method"]][2] * setting["epochs"] + EVAL_COST) * fgsm_s for r in todo)
    estimate += EVAL_COST * fgsm_s * sum(common.trained(r["dir"]) for r in train_runs(setting, chosen))
    hours = setting["processes"] * 3600
    return {"explore_hours": round(spent / hours, 2), "train_and_eval_hours_estimate": round(estimate / hours, 2),
            "budget_hours": setting["budget_hours"], "fgsm_seconds_per_epoch": per_epoch}


def explore(setting, worker):
    """Train this worker's share of the exploration (a larger model's runs only while no smaller model
    meets the rule), then write explore.md and, once decided, setting.json. Returns the setting or None."""
    for run in share(explore_runs(setting), worker):
        smaller = {**setting, "models": setting["models"][:setting["models"].index(run["model"])]}
        if smaller["models"] and choose_setting(explore_table(smaller), smaller)[0]:
            print(f"skipping {run['model']}/{run['name']}: {smaller['models'][-1]} meets the setting rule")
            continue
        train_run(setting, run)
    table = explore_table(setting)
    chosen, why = choose_setting(table, setting)
    path = os.path.join(setting["out"], "setting.json")
    if chosen is None and os.path.exists(path):  # chosen by hand (--choose): the rule met none
        chosen = read_setting(setting)
    if chosen is None and all(c["done"] for c in table.values()) and setting.get("smoke"):
        chosen = {"model": setting["models"][0], "eps": list(setting["explore_eps"][:2])}
        why = (f"smoke: no pair of ε meets the setting rule on generated images "
               f"({unmet(table, setting, chosen['model'])}); the first model and the first two ε instead")
    write_explore_table(setting, table, chosen)
    if chosen is None and all(c["done"] for c in table.values()):
        sys.exit(f"co_bench.py: no setting meets the rule ({why}): see explore.md, and the README for what then")
    if chosen is None:
        print(f"no setting yet ({why}): setting.json is written when the rule decides")
        return None
    if os.path.exists(path):
        return read_setting(setting)
    return write_setting(setting, table, chosen, why)


def write_setting(setting, table, chosen, why):
    """setting.json: the chosen model and ε, why, the budget (seeds at the lower ε cut to seed 0 when the
    estimate exceeds it) and the exploration's table."""
    chosen.update(grid_eps=chosen["eps"][1], epochs=setting["epochs"], rule=why)
    chosen["budget"] = cost = budget(setting, table, chosen)
    if cost["explore_hours"] + cost["train_and_eval_hours_estimate"] > setting["budget_hours"]:
        chosen["seeds"] = {str(chosen["eps"][0]): [0]}  # cut seeds at the lower ε, never the evaluation
        chosen["budget"]["after_cut"] = budget(setting, table, chosen)
    chosen["explore"] = {f"{m} {e}/255": cell for (m, e), cell in table.items()}
    training.write_json(os.path.join(setting["out"], "setting.json"), chosen)
    print(f"setting.json: {chosen['model']} at ε = {chosen['eps'][0]}/255 and {chosen['eps'][1]}/255 ({why})")
    return chosen


def choose_by_hand(setting, text, reason):
    """--choose MODEL:LO,HI --reason TEXT: the setting when the finished exploration meets no setting by the
    rule (the README says why), written as the rule's would be with "by hand: TEXT" as its rule; refused
    before the exploration has finished, when the rule chooses, once setting.json exists, and for a model
    or ε that was not explored."""
    try:
        model, pair = text.split(":")
        lo, hi = (int(e) for e in pair.split(","))
    except ValueError:
        raise SystemExit(f"co_bench.py: error: --choose {text!r}: write MODEL:LO,HI, e.g. cnn-1x16:8,12") from None
    if model not in setting["models"] or not {lo, hi} <= set(setting["explore_eps"]) or not lo < hi:
        raise SystemExit(f"co_bench.py: error: --choose {text}: a model of {', '.join(setting['models'])} and two "
                         f"explored ε of {setting['explore_eps']}, the lower first")
    if not (reason or "").strip():
        raise SystemExit("co_bench.py: error: --choose needs --reason: why, since the rule chose nothing")
    if os.path.exists(os.path.join(setting["out"], "setting.json")):
        raise SystemExit("co_bench.py: error: setting.json exists: the setting is fixed")
    table = explore_table(setting)
    if not all(c["done"] for c in table.values()):
        raise SystemExit("co_bench.py: error: the exploration is not finished: the rule decides first")
    if choose_setting(table, setting)[0] is not None:
        raise SystemExit("co_bench.py: error: the rule chooses a setting (--only explore writes it): no hand choice")
    return write_setting(setting, table, {"model": model, "eps": [lo, hi]}, f"by hand: {reason.strip()}")


def read_setting(setting):
    path = os.path.join(setting["out"], "setting.json")
    if not os.path.exists(path):
        sys.exit(f"co_bench.py: error: no {path}: the explore stage writes it once the setting rule has decided "
                 f"(--only explore)")
    with open(path) as f:
        return json.load(f)


def write_explore_table(setting, table, chosen):
    """explore.md: a row per (model, ε); a model after the chosen one is not run (the rule takes the smallest)."""
    rows = []
    for (model, eps), c in table.items():
        if chosen and setting["models"].index(model) > setting["models"].index(chosen["model"]):
            rows.append(f"| {model} | {eps}/255 | not run: {chosen['model']} meets the rule | | | |")
            continue
        adv = f"{100 * c['adv10']['clean']:.1f} / {100 * c['adv10']['pgd']:.1f}" if c["adv10"] else "pending"
        rs = "pending" if c["fgsmrs"] is None else "yes" if c["fgsmrs"] else "no"
        seconds = f"{statistics.median(c['seconds']):.0f}" if c["seconds"] else "–"
        rows.append(f"| {model} | {eps}/255 | {sum(c['fgsm'])}/{len(c['fgsm'])}"
                    f"{'' if len(c['fgsm']) == len(setting['seeds']) else ' (pending)'} | {rs} | {adv} | {seconds} |")
    verdict = (f"chosen{' by hand (no setting met the rule)' if chosen.get('rule', '').startswith('by hand') else ''}: "
               f"{chosen['model']} at ε = {chosen['eps'][0]}/255 and {chosen['eps'][1]}/255" if chosen
               else "no setting chosen yet")
    text = (f"{setting['epochs']} epochs; held-out accuracy (%) at the last epoch; {verdict}\n\n"
            "| model | ε | FGSM collapsed | FGSM-RS collapsed | ADV-10 clean / PGD-20 | FGSM s/epoch |\n"
            "| --- | --- | ---: | --- | ---: | ---: |\n" + "\n".join(rows) + "\n")
    with open(os.path.join(setting["out"], "explore.md"), "w") as f:
        f.write(text)
    print(text)


# --------------------------------------------------------------------------- train, eval, bench
def train(setting, chosen, worker):
    for run in share(train_runs(setting, chosen), worker):
        train_run(setting, run)


def evaluate(setting, chosen, worker):
    """eval.py's suite on each finished run's last.safetensors (RUN/last.eval.json), unless done."""
    for run in share(train_runs(setting, chosen), worker):
        last = os.path.join(run["dir"], "last.safetensors")
        if common.trained(run["dir"]) and not os.path.exists(os.path.join(run["dir"], "last.eval.json")):
            eval_py.main([last, "--eps", f"{run['eps']}/255", "--data-dir", setting["data"], *setting["eval_argv"]])


FIRST_ORDER_BENCH = ("plain", "llr-1", "llr-fo-1", "llr-2", "llr-fo-2", "elle", "gradalign", "n-fgsm")


def run_bench(setting, chosen):
    """bench.py on the chosen CNN (batch 128, as trained) and on PreAct ResNet-18: every compared method of the
    benchmark eager and compiled in one run (a method that cannot compile is timed eager only); then, on the
    chosen CNN, first-order LLR-1 and LLR-2 beside their exact twins, ELLE, GradAlign and N-FGSM in a run of
    their own (bench-first-order-*.json: the twins' step costs)."""
    variants = ",".join(dict.fromkeys(["plain"] + [METHODS[m][1] for m in (*COMPARED, "adv10")]))
    cnn = ["--batch-size", str(setting["batch_size"]), *setting["bench_cnn_argv"]]
    benches = [(f"bench-{arch}", arch, variants, argv) for arch, argv in {chosen["model"]: cnn,
                                                                          **setting["bench_archs"]}.items()]
    for name, arch, names, argv in [*benches, (f"bench-first-order-{chosen['model']}", chosen["model"],
                                               ",".join(FIRST_ORDER_BENCH), cnn)]:
        out = os.path.join(setting["out"], f"{name}.json")
        if not os.path.exists(out):
            bench.run(bench.get_args(["--arch", arch, "--methods", names, "--out", out, *argv,
                                      *setting["bench_argv"]]))


# --------------------------------------------------------------------------- report
def run_summary(setting, run):
    """A finished run's numbers: held-out (the log) and test (last.eval.json, when evaluated)."""
    log = common.epoch_evaluations(run["dir"])
    summary = {"last": log[-1], "best_pgd": max(e["pgd"] for e in log), "collapsed": collapsed(log),
               "epoch_seconds": round(common.epoch_seconds(run["dir"]), 1)}
    path = os.path.join(run["dir"], "last.eval.json")
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        r, checks = report["results"], report["obfuscation"]["checks"]
        summary["test"] = {"clean": r["nominal"]["accuracy"], "fgsm": r.get("fgsm", {}).get("accuracy"),
                           "worst": r.get("worst_case_with_autoattack", r["worst_case"])["accuracy"],
                           "gamma": report.get("gamma", {}).get("mean"),
                           "single_step_masking": any(not c["ok"] for c in checks if "one FGSM step" in c["name"])}
    return summary


def mean_range(values, scale=100, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "pending"
    text = f"{scale * statistics.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ({scale * min(values):.{digits}f}–{scale * max(values):.{digits}f})"


def step_costs(setting, arch, bench_name="bench"):
    """Each variant's median step time on `arch`, eager and compiled, over plain's *eager* step in the same
    bench.py run (empty before the bench): `bench_name`-`arch`.json. Not bench.py's ratio to plain in the same
    mode: on this CPU compiling makes plain's step on the CNN 1.8x slower, so ratios to compiled plain would make
    compiled steps look cheap."""
    path = os.path.join(setting["out"], f"{bench_name}-{arch}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        results = json.load(f)["results"]
    return {name: r["ms_median"] / results["plain"]["ms_median"] for name, r in results.items()}


def method_row(method, eps, runs, done, costs):
    """One method at one ε over its seeds: (the numbers, the markdown row of table.md)."""
    group = [r for r in runs if r["method"] == method and r["eps"] == eps and r["lam"] is None]
    results = [done[r["name"]] for r in group if r["name"] in done]
    tests = [s["test"] for s in results if "test" in s]
    variant = METHODS[method][1]
    cost = (f"{costs[variant]:.2f}" + (f" ({costs[variant + bench.COMPILED]:.2f} compiled)"
                                       if variant + bench.COMPILED in costs else "")) if variant in costs else "pending"
    row = {"method": method, "eps": eps, "runs": len(group), "finished": len(results),
           "collapsed": sum(s["collapsed"] for s in results),
           "masked": sum(t["single_step_masking"] for t in tests), "cost": costs.get(variant),
           **{k: [t[k] for t in tests] for k in ("clean", "fgsm", "worst", "gamma")}}
    gamma = (mean_range(row["gamma"], 1, 4) if not tests or any(g is not None for g in row["gamma"])
             else "not measured")
    masked = f"{row['masked']}/{len(tests)}" if tests else "pending"
    return row, (f"| {METHODS[method][0]} | {eps}/255 | {mean_range(row['clean'])} | "
                 f"{mean_range(row['fgsm'])} | {mean_range(row['worst'])} | {row['collapsed']}/{len(results)}"
                 f"{'' if len(results) == len(group) else f' ({len(group) - len(results)} pending)'} | "
                 f"{masked} | {gamma} | {cost} |")


HEADER = ("| method | ε | clean | FGSM | worst case | collapsed | masked | γ | step cost × plain (eager) |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n")


def twin_verdict(first_order, exact):
    """The reading rule fixed before the first-order runs (the write-up): the first-order form matches its exact
    twin at an ε when it collapses in no more runs and its mean worst case is within 2 points; else better or
    worse by the difference. None until both have every run evaluated."""
    if not (first_order["worst"] and exact["worst"]) or len(first_order["worst"]) < first_order["runs"] \
            or len(exact["worst"]) < exact["runs"]:
        return None
    difference = 100 * (statistics.mean(first_order["worst"]) - statistics.mean(exact["worst"]))
    if first_order["collapsed"] <= exact["collapsed"] and abs(difference) <= 2:
        return {"verdict": "matches", "worst_case_difference": round(difference, 1)}
    worse = first_order["collapsed"] > exact["collapsed"] or difference < -2
    return {"verdict": "worse" if worse else "better", "worst_case_difference": round(difference, 1)}


def report(setting):
    """table.md, first-order.md, grid.md, robust.png, curves.png and summary.json from what is done."""
    chosen = read_setting(setting)
    runs = train_runs(setting, chosen)
    done = {r["name"]: run_summary(setting, r) for r in runs if common.trained(r["dir"])}
    costs = step_costs(setting, chosen["model"])
    rows, table = [], []
    for method in COMPARED + ("adv10",):
        for eps in chosen["eps"]:
            row, line = method_row(method, eps, runs, done, costs)
            table.append(row)
            rows.append(line)
    caption = (f"{chosen['model']}, {setting['epochs']} epochs; the last checkpoint on the test images (%), mean "
               f"(range) over seeds; collapsed: the collapse rule on the held-out log; masked: eval.py's single-step "
               f"masking flag; step cost: a step's median time over plain's eager step (bench.py, one run)")
    text = f"{caption}\n\n{HEADER}" + "\n".join(rows) + "\n"
    with open(os.path.join(setting["out"], "table.md"), "w") as f:
        f.write(text)
    twins, lines = [], []
    twin_costs = step_costs(setting, chosen["model"], "bench-first-order")  # both forms timed in one run
    for first_order, exact in EXACT_TWIN.items():
        for eps in chosen["eps"]:
            (fo_row, fo_line), (exact_row, exact_line) = (method_row(m, eps, runs, done, twin_costs)
                                                          for m in (first_order, exact))
            verdict = twin_verdict(fo_row, exact_row)
            twins.append({"first_order": fo_row, "exact": exact_row, "eps": eps, "reading": verdict})
            lines += [exact_line, fo_line.replace(" |", f" ({verdict['verdict'] if verdict else 'pending'}) |", 1)]
    with open(os.path.join(setting["out"], "first-order.md"), "w") as f:
        source = f"(bench.py, one run: bench-first-order-{chosen['model']}.json)"
        f.write(f"{caption.replace('(bench.py, one run)', source)}; each first-order row is followed by the reading "
                f"rule's verdict against the exact row above it\n\n{HEADER}" + "\n".join(lines) + "\n")
    grid = grid_report(setting, chosen, runs, done)
    summary = {"setting": chosen, "runs": done, "table": table, "first_order": twins, "grid": grid,
               "bench": {arch: step_costs(setting, arch) for arch in [chosen["model"], *setting["bench_archs"]]}}
    training.write_json(os.path.join(setting["out"], "summary.json"), summary)
    figures(setting, chosen, runs, done)
    print(text)
    return summary


def grid_report(setting, chosen, runs, done):
    """grid.md: each grid point's held-out PGD-20 at the end (what chooses) and its test numbers."""
    points = [r for r in runs if r["lam"] is not None]
    scored = [r for r in points if r["name"] in done]
    best = max(scored, key=lambda r: done[r["name"]]["last"]["pgd"]) if len(scored) == len(points) else None
    rows = []
    for r in points:
        s, test = done.get(r["name"]), done.get(r["name"], {}).get("test", {})
        mark = ", ".join(m for m, yes in (("authors'", (r["lam"], r["mu"]) == GRID[0]), ("chosen", r is best)) if yes)
        rows.append(f"| {r['lam']:g} | {r['mu']:g} | {mean_range([s['last']['pgd']]) if s else 'pending'} | "
                    f"{mean_range([test.get('clean')])} | {mean_range([test.get('worst')])} | "
                    f"{'pending' if not s else 'yes' if s['collapsed'] else 'no'} | {mark} |")
    with open(os.path.join(setting["out"], "grid.md"), "w") as f:
        f.write(f"LLR-1 at ε = {chosen['grid_eps']}/255, seed 0, chosen by held-out PGD-20 at the last epoch\n\n"
                "| λ | μ | held-out PGD-20 | test clean | test worst case | collapsed | |\n"
                "| ---: | ---: | ---: | ---: | ---: | --- | --- |\n" + "\n".join(rows) + "\n")
    return {"chosen": best and {"lam": best["lam"], "mu": best["mu"], "run": best["name"]},
            "authors": {"lam": GRID[0][0], "mu": GRID[0][1]}}


def figures(setting, chosen, runs, done):
    """robust.png: the last checkpoint's worst-case test accuracy against ε per method, mean and range over
    seeds (GradAlign's Fig. 1); curves.png: held-out clean / FGSM / PGD-20 per epoch, a panel per method
    and ε, a line per seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib (make install-extras): skipped the figures robust.png and curves.png")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    methods = COMPARED + ("adv10",)
    for index, method in enumerate(methods):
        offset = 0.12 * (index - (len(methods) - 1) / 2)  # side by side, so that the ranges do not overlap
        points = []
        for eps in chosen["eps"]:
            worst = [done[r["name"]]["test"]["worst"] for r in runs if r["method"] == method and r["eps"] == eps
                     and r["lam"] is None and "test" in done.get(r["name"], {})]
            if worst:
                points.append((eps + offset, 100 * statistics.mean(worst), 100 * min(worst), 100 * max(worst)))
        if points:
            e, mean, low, high = zip(*points)
            ax.errorbar(e, mean, yerr=[[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]],
                        marker="o", capsize=3, label=METHODS[method][0])
    ax.set_xticks(chosen["eps"])
    ax.set_xlabel("ε (/255)")
    ax.set_ylabel("worst-case test accuracy (%)")
    ax.set_title(f"{chosen['model']}, last checkpoint, mean and range over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(setting["out"], "robust.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(len(chosen["eps"]), len(methods), figsize=(2.6 * len(methods), 2.4 * len(chosen["eps"])),
                             sharex=True, sharey=True, squeeze=False)
    for row, eps in zip(axes, chosen["eps"]):
        for ax, method in zip(row, methods):
            for r in (r for r in runs if r["method"] == method and r["eps"] == eps and r["lam"] is None):
                log = common.epoch_evaluations(r["dir"])
                for key, color in (("clean", "tab:green"), ("fgsm", "tab:blue"), ("pgd", "tab:red")):
                    ax.plot([e["epoch"] for e in log], [100 * e[key] for e in log], color=color, alpha=0.7,
                            label={"clean": "clean", "fgsm": "FGSM", "pgd": "PGD-20"}[key] if r["seed"] == 0 else None)
            ax.set_title(f"{METHODS[method][0]}, {eps}/255", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    axes[-1][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("held-out accuracy (%)")
    fig.tight_layout()
    fig.savefig(os.path.join(setting["out"], "curves.png"), dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- the command line
def parse_worker(text):
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"co_bench.py: error: --worker {text!r}: write I/N, e.g. 0/2") from None
    if not 0 <= index < count:
        raise SystemExit(f"co_bench.py: error: --worker {text}: I must be in 0..N-1")
    return index, count


def smoke_setting(root):
    """Every stage on generated images in seconds: 2 epochs of 2 steps, one model, two ε, one seed, two grid points,
    eval.py's
    suite on 10 images with 2-step attacks and without γ (its 50-step search is most of an evaluation's time)."""
    return {"data": common.make_image_folder(os.path.join(root, "data"), classes=10, per_class=2, size=32),
            "out": os.path.join(root, "co-bench"), "smoke": True, "models": ("cnn-1x4",), "explore_eps": (8, 16),
            "seeds": (0,),
            "epochs": 2, "batch_size": 8, "holdout": 4, "pgd_steps": 2, "grid": GRID[:2],
            "eval_argv": ["--n", "10", "--steps", "2", "--restarts", "1", "--fgsm-steps", "2", "--square-queries", "5",
                          "--no-sanity"],
            "bench_cnn_argv": ["--rounds", "1", "--warmup", "1"], "bench_archs": {}, "bench_argv": []}


STAGES = ("explore", "train", "eval", "bench", "report")


def main(argv=None):
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("--only", choices=STAGES, help="this stage alone (unset: every stage, in order)")
    p.add_argument("--worker", default="0/1", metavar="I/N",
                   help="train or evaluate the I-th of N shares of the stage's runs (two one-thread processes: "
                        "0/2 and 1/2)")
    p.add_argument("--data", default=os.path.join(ROOT, common.DATA),
                   help="the CIFAR-10 copy (make data/cifar10-jpeg/train)")
    p.add_argument("--smoke", metavar="DIR", help="every stage on generated images under DIR (the tests)")
    p.add_argument("--choose", metavar="MODEL:LO,HI",
                   help="write setting.json by hand when the finished exploration meets no setting (needs --reason)")
    p.add_argument("--reason", help="why --choose chose as it did (recorded as setting.json's rule)")
    args = p.parse_args(argv)
    worker = parse_worker(args.worker)
    setting = {**SETTING, "data": os.path.abspath(args.data), "out": os.path.join(HERE, "co-bench")}
    if args.smoke:
        setting.update(smoke_setting(args.smoke))
    elif not os.path.isdir(os.path.join(setting["data"], "train")):
        sys.exit(f"co_bench.py: error: no CIFAR-10 copy at {args.data}: make data/cifar10-jpeg/train")
    os.makedirs(setting["out"], exist_ok=True)
    if args.choose:
        return choose_by_hand(setting, args.choose, args.reason)
    stages = [args.only] if args.only else STAGES
    if "explore" in stages and explore(setting, worker) is None and not args.only:
        return None
    chosen = read_setting(setting) if set(stages) - {"explore"} else None
    if "train" in stages:
        train(setting, chosen, worker)
    if "eval" in stages:
        evaluate(setting, chosen, worker)
    if "bench" in stages and worker[0] == 0:
        run_bench(setting, chosen)
    return report(setting) if "report" in stages else None


if __name__ == "__main__":
    main()
