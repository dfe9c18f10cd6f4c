"""Certified and empirical ℓ2 robustness side by side, at the development machine's scale: SOC
LipConvNets (Singla & Feizi, NeurIPS 2022; soc.py) with the ortho, LLN and CRC-Lip last layers,
against LLR and ADV trained in the ℓ2 ball of radius 36/255, on the CIFAR-10 copy. `make
l2-compare` runs this file.

    python -m experiments.l2_compare                 # every step not done yet: train, evaluate, write the results
    python -m experiments.l2_compare --only train    # just one stage (train, evaluate, report)
    python -m experiments.l2_compare --smoke DIR     # the whole pipeline on generated images (the tests)

Every run trains with train_cifar.py into runs/l2-compare/NAME (interrupted runs resume) and its
last checkpoint is evaluated with eval.py on the first 1,000 test images: the ℓ2 attack suite for
every model (FGSM-20, Untargeted, Multi-Targeted, Random-Targeted and the sanity checks, in ℓ2
steps), and `--certify` for the LipConvNets (which also fails loudly if an attack breaks an image
certified at 36/255). Training fits the development CPU (minutes per epoch); the LipConvNets'
evaluation does not (hours per model there: run it on a GPU, as the README's table was). Results land in
experiments/l2-compare/ (evaluation JSONs, checkpoints, summary.json, table.md) and in its README between
the l2-compare markers. The machinery (resuming, parallel jobs, timing) is common.py's. This is
not the authors' headline: theirs needs their schedule (200 epochs of the full training set on a
GPU) and their widths.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also when run by its path

from experiments import common  # noqa: E402
from experiments.common import HERE, ROOT  # noqa: E402

EPS = "36/255"
COMMON = ["--norm", "l2", "--eps", EPS, "--train-n", "6000", "--epochs", "10", "--batch-size", "128", "--lr", "0.1",
          "--lr-decay-at", "0.5,0.75", "--weight-decay", "5e-4", "--eps-warmup", "0", "--val-n", "300",
          "--eval-steps", "10", "--gamma-n", "0", "--log-every", "10"]
SOC = "lipconvnet-5-c16"  # the authors' LipConvNet-5 at half their width (32): trainable on the CPU
RUNS = {  # name: (label in the table, train_cifar.py flags)
    "soc-ortho": ("SOC LipConvNet-5, ortho last layer", ["--arch", SOC, "--method", "lipschitz"]),
    "soc-lln": ("SOC LipConvNet-5, LLN last layer", ["--arch", f"{SOC}-lln", "--method", "lipschitz"]),
    "soc-crc": ("SOC LipConvNet-5, CRC-Lip last layer", ["--arch", f"{SOC}-crc", "--method", "lipschitz"]),
    "llr": ("LLR-2, WRN-10-1", ["--arch", "wrn-10-1", "--method", "llr", "--llr-steps", "2"]),
    "adv": ("ADV-10, WRN-10-1", ["--arch", "wrn-10-1", "--method", "adv", "--adv-steps", "10"]),
}
EVAL = ["--norm", "l2", "--eps", EPS, "--n", "1000", "--batch-size", "1000"]  # one batch: the models are small
ORDER = ["adv", "llr", "soc-crc", "soc-lln", "soc-ortho"]  # most expensive first (common.runs' order)
RADII = ("36/255", "72/255", "108/255")

SMOKE_COMMON = ["--norm", "l2", "--eps", EPS, "--epochs", "1", "--batch-size", "8", "--val-n", "6",
                "--eval-steps", "2", "--gamma-n", "0", "--log-every", "1"]
SMOKE_EVAL = ["--norm", "l2", "--eps", EPS, "--n", "8", "--steps", "2", "--restarts", "1", "--no-sanity"]


def certifies(flags):
    return flags[flags.index("--arch") + 1].startswith("lipconvnet")


def summarise(setting):
    """summary.json: per run, clean accuracy, the empirical ℓ2 robust accuracy (the suite's worst case,
    with AutoAttack's where it ran), the certified accuracy at the papers' radii, and the training time per epoch."""
    rows = {}
    for name, (label, flags) in setting["runs"].items():
        report = common.read(os.path.join(setting["out"], f"{name}.eval.json"))
        r = report["results"]
        certificates = report.get("certificates", {})
        rows[name] = {"label": label, "flags": flags, "nominal": r["nominal"]["accuracy"],
                      "empirical": r.get("worst_case_with_autoattack", r["worst_case"])["accuracy"],
                      "certified": {k: v for k, v in certificates.get("certified_accuracy", {}).items() if k in RADII},
                      "contradictions": len(certificates.get("contradictions", [])),
                      "epoch_seconds": common.epoch_seconds(common.run_dir(setting, name)),
                      "eval_device": report["device"]}
    summary = {"machine": setting["machine"], "data": setting["data"], "common_flags": setting["common"],
               "eval_flags": setting["eval"], "runs": rows}
    with open(os.path.join(setting["out"], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def table(summary):
    """The results table in Markdown."""
    cell = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    head = ("| model, training | clean | empirical ℓ2 at 36/255 | certified 36/255 | 72/255 | 108/255 | "
            "s per epoch |\n| --- " + "| ---: " * 6 + "|\n")
    return head + "\n".join(
        f"| {r['label']} | {cell(r['nominal'])} | {cell(r['empirical'])} | "
        + " | ".join(cell(r["certified"].get(k)) for k in RADII) + f" | {r['epoch_seconds']:.0f} |"
        for r in summary["runs"].values()) + "\n"


def report(setting):
    summary = summarise(setting)
    text = table(summary)
    with open(os.path.join(setting["out"], "table.md"), "w") as f:
        f.write(text)
    if setting["readme"]:
        common.write_readme_parts(setting["readme"], {"table": text}, "l2-compare", "l2_compare.py")
    print(text)


STAGES = {"train": lambda s: common.runs(s, [common.train]),
          "evaluate": lambda s: common.runs(s, [common.evaluate]), "report": report}


def smoke_setting(root):
    """A tiny generated ImageFolder, one LipConvNet and LLR (as the tests run it)."""
    data = common.make_image_folder(os.path.join(root, "data"), classes=3, per_class=10, size=32)
    out = os.path.join(root, "docs")
    os.makedirs(out, exist_ok=True)
    runs = {"soc-lln": ("SOC", ["--arch", "lipconvnet-5-c4-lln", "--method", "lipschitz"]),
            "llr": ("LLR", ["--arch", "wrn-10-1", "--method", "llr", "--llr-steps", "1"])}
    readme = os.path.join(root, "README.md")
    if not os.path.exists(readme):
        with open(readme, "w") as f:
            f.write("\n".join(["before", *common.marked("table", "l2-compare", "l2_compare.py"), "after\n"]))
    return {"name": "l2-compare", "root": root, "data": data, "out": out, "common": SMOKE_COMMON, "eval": SMOKE_EVAL,
            "runs": runs, "readme": readme, "machine": "smoke test"}


def main(argv=None):
    args = common.parse_args(__doc__, __file__, STAGES, argv)
    if args.smoke:
        setting = smoke_setting(args.smoke)
    else:
        common.require_data("l2_compare.py")
        out = os.path.join(HERE, "l2-compare")
        os.makedirs(out, exist_ok=True)
        setting = {"name": "l2-compare", "root": ROOT, "data": common.DATA, "out": out, "common": COMMON,
                   "eval": EVAL, "runs": RUNS, "readme": os.path.join(out, "README.md"),
                   "machine": common.machine()}
    setting.update(jobs=1 if args.smoke else args.jobs, in_process=bool(args.smoke), order=ORDER,  # as cpu_repro's
                   eval_extra={name: ["--certify"] for name, (_, flags) in setting["runs"].items() if certifies(flags)})
    start = time.time()
    if args.only:
        STAGES[args.only](setting)
    else:
        common.runs(setting, [common.train, common.evaluate])
        report(setting)
    print(f"l2_compare.py: done in {time.time() - start:.0f} s; results in {setting['out']}")


if __name__ == "__main__":
    main()
