"""`eval.py --autoattack`: AutoAttack (Croce & Hein 2020, the pyautoattack package) on the suite's
images, as a cross-check of the suite, resumable chunk by chunk.

    python eval.py runs/cifar-llr/best.safetensors --eps 8/255 --autoattack
    python eval.py runs/cifar-llr/best.safetensors --eps 8/255 --autoattack --aa-version custom --aa-attacks apgd-t

Its examples are verified as the suite's are (`suite.verify`); the report gains AutoAttack's
accuracy, the per-sample worst case over the suite and AutoAttack together, the cross-check counts,
and two checks in the obfuscation report. The package is imported only when the flag is given.
"""
import json
import logging
import os
import time

from tqdm import tqdm

import suite  # the suite's verification (eval.py imports this module; it never imports eval.py)

AUTOATTACK_VERSION = "0.2.0"  # the pyautoattack release this was tested with (requirements-extras.txt)
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AUTOATTACK_MISS_SHARE = 0.005  # flag the model when AutoAttack breaks more than 0.5% of images the suite did not
STATE_SUFFIX = ".autoattack-state.json"  # OUT + this: the verified chunks of an unfinished run


def import_autoattack():
    """pyautoattack's AutoAttack, or a one-line error saying how to install it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ValueError(f"--autoattack needs the optional package pyautoattack: run `make install-extras` "
                         f"(or pip install pyautoattack=={AUTOATTACK_VERSION})") from None
    return AutoAttack


def autoattack_options(args):
    """AutoAttack's keyword options from --aa-version and --aa-attacks (ValueError if they do not fit)."""
    if args.aa_version == "custom":
        attacks = [a.strip() for a in (args.aa_attacks or "").split(",") if a.strip()]
        if not attacks or any(a not in AA_ATTACKS for a in attacks):
            raise ValueError(f"--aa-version custom needs --aa-attacks from {', '.join(AA_ATTACKS)}")
        return {"version": "custom", "attacks": attacks}
    if args.aa_attacks:
        raise ValueError("--aa-attacks goes with --aa-version custom")
    return {"version": args.aa_version}


class _Warnings(logging.Handler):
    """Collects AutoAttack's own warnings (its checks for randomised defences, probabilities as
    outputs, dynamic models...)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if record.getMessage() not in self.messages:
            self.messages.append(record.getMessage())


def run_autoattack(model, images, labels, eps, args, device, state_path):
    """AutoAttack on the same images, chunk by chunk. Each chunk's adversarial examples are
    verified as the suite's are (ball, box, a fresh forward pass) and its verified per-sample
    result is saved in `state_path` at once, so an interrupted run continues with the next chunk.
    (pyautoattack's own state file cannot serve: after a resume it returns only the examples of
    the current run, which could then not be verified.)"""
    AutoAttack = import_autoattack()
    options = autoattack_options(args)
    config = {"checkpoint": args.checkpoint, "norm": args.norm, "eps": eps, "n": len(labels), "seed": args.seed,
              "chunk": args.batch_size, "bf16": args.bf16, **options}
    state = {"written_by": "eval.py", "config": config, "chunks": {}}
    if os.path.exists(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        if saved["config"] != config:
            raise ValueError(f"{state_path} belongs to another evaluation ({saved['config']}); delete it or use --out")
        state = saved
        tqdm.write(f"AutoAttack: continuing from {state_path} ({len(state['chunks'])} chunks done)")
    log = _Warnings()
    logging.getLogger("auto-attack").addHandler(log)
    try:
        for start in tqdm(range(0, len(labels), args.batch_size), desc=f"AutoAttack ({options['version']})", leave=False):
            if str(start) in state["chunks"]:
                continue
            begin = time.time()
            x = images[start:start + args.batch_size].to(device).float() / 255
            y = labels[start:start + args.batch_size].to(device)
            adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[args.norm], eps=eps, seed=args.seed + start,
                                   device=device, **options)
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=args.batch_size)
            valid, broken, _ = suite.verify(model, x, x_adv, eps, y, norm=args.norm)
            state["chunks"][str(start)] = {"robust": (~broken).tolist(), "invalid": int((~valid).sum()),
                                           "time_s": time.time() - begin, "warnings": list(log.messages)}
            suite.write_compact_json(state_path, state)
    finally:
        logging.getLogger("auto-attack").removeHandler(log)
    chunks = [state["chunks"][str(start)] for start in range(0, len(labels), args.batch_size)]
    robust = [r for c in chunks for r in c["robust"]]
    warnings = sorted({w for c in chunks for w in c["warnings"]})
    return {**options, "package_version": AUTOATTACK_VERSION, "accuracy": sum(robust) / len(robust),
            "robust": robust, "invalid_examples": sum(c["invalid"] for c in chunks),
            "time_s": round(sum(c["time_s"] for c in chunks), 2), "warnings": warnings}


def cross_check(suite_robust, autoattack_robust):
    """Per-sample agreement of the suite's worst case and AutoAttack's result."""
    pairs = list(zip(suite_robust, autoattack_robust))
    return {"autoattack_only": sum(s and not a for s, a in pairs),  # broken by AutoAttack, not by the suite
            "suite_only": sum(a and not s for s, a in pairs),
            "both": sum(not s and not a for s, a in pairs),
            "autoattack_only_indices": [i for i, (s, a) in enumerate(pairs) if s and not a]}


def add_autoattack(results, autoattack, checks, n):
    """Worst case over the suite and AutoAttack, the cross-check, and its two report lines."""
    worst = [s and a for s, a in zip(results["worst_case"]["robust"], autoattack["robust"])]
    results["autoattack"] = autoattack
    results["worst_case_with_autoattack"] = {"accuracy": sum(worst) / n, "robust": worst}
    counts = cross_check(results["worst_case"]["robust"], autoattack["robust"])
    checks.append({"name": "AutoAttack finds little that the suite missed",
                   "ok": counts["autoattack_only"] <= AUTOATTACK_MISS_SHARE * n,
                   "detail": f"AutoAttack broke {counts['autoattack_only']} images the suite did not (flag above "
                             f"{100 * AUTOATTACK_MISS_SHARE:g}% of {n}); the suite broke {counts['suite_only']} "
                             f"that AutoAttack did not"})
    checks.append({"name": "AutoAttack's own checks (randomised defence, output range, dynamic model, classes)",
                   "ok": not autoattack["warnings"], "detail": "; ".join(autoattack["warnings"]) or "no warnings"})
    return counts
