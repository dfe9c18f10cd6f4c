"""Cost of a training step of each method, as a ratio to a plain step measured in the same run.

    python bench.py                                   # GPU: PreAct ResNet-18, batch 128; CPU: wrn-10-2, batch 32
    python bench.py --bf16 --channels-last            # the fast path on a GPU
    python bench.py --compile                         # each method eager and compiled, side by side
    python bench.py --arch resnet152 --image-size 224 --batch-size 32 --methods plain,llr-2,adv-30 --bf16
    python bench.py --arch timm:vit_small_patch16_224 --timm-kwargs img_size=32 patch_size=4 --compile
    make bench

A step is what training does: the method's loss, backward (with the double backward
where the method has one), optimizer step. Methods are timed in rounds, in a new
random order each round, so that drift on a shared machine hits all of them alike;
each time is taken after device synchronisation, after warm-up steps. Reports the
median and quartiles of the milliseconds per step, images/s, the ratio of the
median to plain's, and (on CUDA) peak memory, as a table and as JSON.

With --compile every method is also timed compiled (`methods.compiled`: LLR, LFR and CURE through
torch.func traced by torch.compile, the others on torch.compile(model)), as `<name>+compiled`, in
the same interleaved rounds: its ratio to plain is to plain+compiled (the same mode), its
`ratio_to_eager` to its eager twin, and `first_call_s` (the first warm-up step) is the compile time.
GradAlign differentiates twice and has no compiled version (`methods.compilable`): it is timed eager only.
"""
import inspect
import json
import os
import random
import re
import statistics
import time

import torch

import cli
import methods
import models

# name: (method, options); "llr-2" is LLR with 2 inner steps, and so on (`variant` reads any other step count)
VARIANTS = {
    "plain": ("plain", {}),
    "llr-1": ("llr", {"steps": 1}), "llr-2": ("llr", {"steps": 2}), "llr-8": ("llr", {"steps": 8}),
    "llr-fo-1": ("llr", {"steps": 1, "first_order": True}), "llr-fo-2": ("llr", {"steps": 2, "first_order": True}),
    "adv-1": ("adv", {"steps": 1}), "adv-2": ("adv", {"steps": 2}), "adv-10": ("adv", {"steps": 10}),
    "adv-30": ("adv", {"steps": 30}),
    "trades-10": ("trades", {"steps": 10}),
    "cure": ("cure", {}),
    "lfr": ("lfr", {}),
    "n-fgsm": ("n-fgsm", {}), "gradalign": ("gradalign", {}), "elle": ("elle", {}), "elle-a": ("elle-a", {}),
    "lipschitz": ("lipschitz", {}),  # a lipconvnet's training with the fast SOC gradient (soc.py) ...
    "lipschitz-exact": ("lipschitz", {"fast_gradient": False}),  # ... and with autograd's exact one
}


STEPPED = [m for m, fn in methods.METHODS.items() if "steps" in inspect.signature(fn).parameters]  # llr, adv, ...
NAMES = f"{', '.join(VARIANTS)}, or {', '.join(m + '-<k>' for m in STEPPED)}, llr-fo-<k> for k >= 1 steps"


def variant(name):
    """(method, options) of a variant name: one of VARIANTS, or `<method>-<k>` for a method with a
    `steps` option and any k >= 1 (llr-10: LLR with the authors' 10 search steps)."""
    if name in VARIANTS:
        return VARIANTS[name]
    first_order = re.fullmatch(r"llr-fo-([1-9][0-9]*)", name)  # first-order LLR (llr.llr_loss(first_order=True))
    if first_order:
        return "llr", {"steps": int(first_order[1]), "first_order": True}
    stepped = re.fullmatch(r"([a-z]+)-([1-9][0-9]*)", name)
    if stepped and stepped[1] in STEPPED:
        return stepped[1], {"steps": int(stepped[2])}
    raise SystemExit(f"bench.py: error: unknown method {name!r}; choose from {NAMES}")


def suited(name, arch):
    """Whether the variant `name` can train the model `arch` (methods.trains)."""
    return methods.trains(variant(name)[0], arch)


COMPILED = "+compiled"  # the suffix of a method's compiled twin


def get_args(argv=None):
    cuda = torch.cuda.is_available()
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("--arch", default="preact-resnet18" if cuda else "wrn-10-2", help="the model (models.py)")
    p.add_argument("--batch-size", type=int, default=128 if cuda else 32, help="images per step")
    p.add_argument("--image-size", type=int, default=32, help="side of the random square images")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the model")
    p.add_argument("--activation", choices=list(models.ACTIVATIONS),
                   help="the model's activation, as train_cifar.py's: softplus when unset, a timm: model's own (GELU) "
                        "for one (a lipconvnet's is in its name)")
    p.add_argument("--timm-kwargs", nargs="+", default=[], metavar="NAME=VALUE",
                   help="a timm: model's size arguments, as train_cifar.py's (e.g. img_size=32 patch_size=4)")
    p.add_argument("--methods", help=f"comma-separated, from {NAMES} (unset: those listed that suit --arch; "
                                      f"lipschitz* for a lipconvnet, all the others for the others)")
    p.add_argument("--rounds", type=int, default=10 if cuda else 3, help="timed steps of each method")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1,
                   help="untimed steps of each method first, at least 1 (a first step pays one-off costs: allocation, "
                        "kernel choice, lazy imports; compiling takes 2 whatever is given)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA, or CPU for a check)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and input")
    p.add_argument("--fused-optimizer", action="store_true", help="SGD's fused implementation (one kernel)")
    p.add_argument("--compile", action="store_true",
                   help="also time each method compiled (methods.compiled), as <name>+compiled, in the same run")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend (aot_eager: a quick check of the tracing)")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, where each method's time goes: torch.profiler's operator table of "
                        "--rounds more steps per method, written beside --out as .profile.txt")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="where to run")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the data and the methods")
    p.add_argument("--out", default="runs/bench.json", help="the JSON report (its directory is created)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(args, device):
    """A function running one full training step of a named variant, through the interface the
    training loops use (`methods.bind`, built on first use; `<name>+compiled`: compiled): the loss,
    backward, the optimiser step and the method's update after it (ELLE-A's λ)."""
    torch.manual_seed(args.seed)
    model = models.build_model(args.arch, num_classes=args.num_classes, activation=args.activation,
                               normalization="imagenet" if args.image_size > 64 else "cifar10",
                               timm_kwargs=models.parse_timm_kwargs(args.timm_kwargs)).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=args.fused_optimizer or None)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    x = x.to(device).contiguous(memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    bound = {}

    def step(name):
        if name not in bound:
            method, options = variant(name.removesuffix(COMPILED))
            bound[name] = methods.bind(method, model, options, compile=name.endswith(COMPILED),
                                       backend=args.compile_backend)
        loss_fn = bound[name]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            value, _ = loss_fn(x, y, 8 / 255, generator)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_fn.after_optimizer_step()

    return step


BUSY_SPREAD = 1.5  # a method whose slowest timed step took this many times its fastest ran on a busy machine


def activation(args):
    """The model's activation: --activation, or when unset softplus (a timm: model: its own)."""
    return args.activation or (models.OWN if args.arch.startswith(models.TIMM) else "softplus")


def describe_setting(args, device_name):
    """One line naming what was measured: model, batch, image size, device and the fast-path options."""
    return (f"{args.arch}{' ' + ' '.join(args.timm_kwargs) if args.timm_kwargs else ''}, batch {args.batch_size}, "
            f"{args.image_size}px, {device_name}, {activation(args)}"
            f"{', bf16' if args.bf16 else ''}{', channels-last' if args.channels_last else ''}"
            f"{', fused SGD' if args.fused_optimizer else ''}{', eager and compiled' if args.compile else ''}")


def run(args):
    device = torch.device(args.device)
    names = ([n.strip() for n in args.methods.split(",") if n.strip()] if args.methods else
             [n for n in VARIANTS if suited(n, args.arch)])
    unsuited = [n for n in names if not suited(n, args.arch)]
    if unsuited:
        raise SystemExit(f"bench.py: error: {unsuited[0]} cannot train {args.arch} (lipschitz* train a lipconvnet; "
                         f"{', '.join(sorted(methods.TWICE_DIFFERENTIATED))} differentiate twice through softplus, "
                         f"which a lipconvnet has not)")
    for flag in ("batch_size", "image_size", "num_classes", "rounds", "warmup"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"bench.py: error: --{flag.replace('_', '-')} must be at least 1")
    if "plain" not in names:
        names.insert(0, "plain")  # the reference of every ratio
    if args.compile:
        names += [n + COMPILED for n in names if methods.compilable(variant(n)[0])]
    try:
        step = make_step(args, device)
    except ValueError as e:  # the model: an unknown architecture, --timm-kwargs timm refuses
        raise SystemExit(f"bench.py: error: {e}") from None
    times = {n: [] for n in names}
    peak, first_call = {}, {}
    for name in names:  # warm-up: allocator, kernels, lazy imports; compiling (twice: a recompile, e.g. eval mode)
        for i in range(max(args.warmup, 2 if name.endswith(COMPILED) else 0)):
            _sync(device)
            start = time.perf_counter()
            step(name)
            _sync(device)
            if i == 0:
                first_call[name] = time.perf_counter() - start
    order = random.Random(args.seed)
    for _ in range(args.rounds):
        for name in order.sample(names, len(names)):
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step(name)
            _sync(device)
            times[name].append(1000 * (time.perf_counter() - start))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    results = {}
    for name in names:
        t = sorted(times[name])
        plain = "plain" + (COMPILED if name.endswith(COMPILED) else "")  # the reference in the same mode
        q1, median, q3 = (statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3)
        results[name] = {"ms_median": median, "ms_q1": q1, "ms_q3": q3, "ms_min": t[0], "ms_all": times[name],
                         "images_per_s": args.batch_size / (median / 1000),
                         "ratio_to_plain": median / statistics.median(times[plain]),
                         "ratio_of_minima": t[0] / min(times[plain]), "spread": t[-1] / t[0],
                         "first_call_s": first_call.get(name),
                         "peak_memory_gib": peak[name] / 2**30 if name in peak else None}
        if name.endswith(COMPILED):
            eager = name.removesuffix(COMPILED)
            results[name]["ratio_to_eager"] = median / results[eager]["ms_median"]
            results[name]["ratio_to_eager_of_minima"] = t[0] / results[eager]["ms_min"]
        if name in peak and plain in peak:
            results[name]["memory_ratio_to_plain"] = peak[name] / peak[plain]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": device_name, "arch": args.arch, "timm_kwargs": args.timm_kwargs, "activation": activation(args),
              "batch_size": args.batch_size,
              "image_size": args.image_size,
              "bf16": args.bf16, "channels_last": args.channels_last, "fused_optimizer": args.fused_optimizer,
              "compile": args.compile and args.compile_backend, "rounds": args.rounds, "warmup": args.warmup,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    print(f"{describe_setting(args, device_name)}; median of {args.rounds} interleaved steps")
    print(f"{'method':21s}{'ms/step':>10s}{'q1-q3':>17s}{'min':>9s}{'images/s':>11s}{'x plain':>9s}"
          f"{'(minima)':>10s}{'peak GiB':>10s}" + (f"{'x eager':>9s}{'compile s':>11s}" if args.compile else ""))
    for name, r in results.items():
        memory = f"{r['peak_memory_gib']:10.2f}" if r["peak_memory_gib"] is not None else f"{'-':>10s}"
        compiled = (f"{r['ratio_to_eager']:9.2f}{r['first_call_s']:11.1f}" if "ratio_to_eager" in r else "")
        print(f"{name:21s}{r['ms_median']:10.1f}{r['ms_q1']:8.1f}-{r['ms_q3']:<8.1f}{r['ms_min']:9.1f}"
              f"{r['images_per_s']:11.1f}{r['ratio_to_plain']:9.2f}{r['ratio_of_minima']:10.2f}{memory}{compiled}")
    busy = [name for name, r in results.items() if r["spread"] > BUSY_SPREAD]
    report["busy_machine"] = bool(busy)
    if busy:
        print(f"warning: the steps of {', '.join(busy)} varied more than {BUSY_SPREAD}x between rounds: the machine "
              f"was busy, so the medians are unreliable; compare the minima, or measure again on an idle machine")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.profile:
        report["profile"] = os.path.splitext(args.out)[0] + ".profile.txt"
        with open(report["profile"], "w") as f:
            for name in names:
                f.write(f"== {name}: {args.rounds} steps; {describe_setting(args, device_name)}\n"
                        f"{profile(step, name, args.rounds, device)}\n\n")
        print(f"wrote {report['profile']}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return report


def profile(step, name, steps, device):
    """torch.profiler's table of the operators of `steps` steps of `name`, the most expensive first
    (on the GPU by their own kernel time, on the CPU by their own CPU time)."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(name)
        _sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=80)


def main(argv=None):
    """The command line (`argv`: sys.argv[1:] when None); the report is written to --out."""
    run(get_args(argv))


if __name__ == "__main__":
    main()
