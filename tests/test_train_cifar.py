"""train_cifar.py end to end on a tiny ImageFolder: every method, resume, NaN stop, 2 processes, errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_script
import methods
import models
import train_cifar
from conftest import ROOT, hooked, make_image_folder, nan_from, read_log, signal_at

TINY = ["--arch", "wrn-10-1", "--batch-size", "8", "--log-every", "1", "--val-n", "6", "--eval-steps", "2",
        "--eps-warmup", "0.5"]  # 3 steps per epoch: ε reaches its value at step 2


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("cifar")), classes=3, per_class=10, size=16)


@pytest.mark.parametrize("method", [m for m in methods.METHODS if m != "lipschitz"])  # lipconvnets: test_soc.py
def test_each_method_trains_and_evaluates(method, data_dir, tmp_path):
    run = str(tmp_path / method)
    train_cifar.main(["--method", method, "--data-dir", data_dir, "--epochs", "2", "--out", run,
                      "--log-gamma-every", "3", "--gamma-n", "4", *TINY])
    assert {"config.json", "log.jsonl", "last.safetensors", "best.safetensors", "state.pt"} <= set(os.listdir(run))
    log = read_log(run)
    train = [e for e in log if e["kind"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 7))
    assert all({"loss", "lr", "eps", "images_per_s"} <= set(e) for e in train)
    assert train[0]["eps"] == pytest.approx(8 / 255 / 1.5) and train[-1]["eps"] == pytest.approx(8 / 255)  # warm-up
    expected_terms = {"llr": {"gamma", "grad_term"}, "adv": {"adv_acc"}, "trades": {"kl"}, "cure": {"curvature"},
                      "lfr": {"flatness"}, "plain": {"train_acc"}, "n-fgsm": {"adv_acc"},
                      "gradalign": {"adv_acc", "grad_cos"}, "elle": {"adv_acc", "lin_err"},
                      "elle-a": {"adv_acc", "lin_err", "elle_lambda"}}[method]
    assert expected_terms <= set(train[-1])
    assert [e["step"] for e in log if e["kind"] == "eval"] == [3, 6]
    assert [e["step"] for e in log if e["kind"] == "gamma"] == [3, 6]  # Fig. 2's γ for any method
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["args"]["method"] == method and config["torch"] == torch.__version__ and "git_commit" in config
    report = eval_script.main([os.path.join(run, "best.safetensors"), "--eps", "8/255", "--data-dir", data_dir,
                               "--n", "6", "--steps", "2", "--restarts", "1", "--attacks", "fgsm20,untargeted",
                               "--no-sanity", "--out", str(tmp_path / "eval.json")])
    assert report["training"]["method"] == method and report["model"]["arch"] == "wrn-10-1"


def test_resume_continues_exactly(data_dir, tmp_path, monkeypatch, capsys):
    """Stop after 4 of 9 steps (SIGTERM, in the middle of an epoch), resume: the final weights
    equal those of an uninterrupted run, bit for bit."""
    common = ["--data-dir", data_dir, "--epochs", "3", *TINY, "--llr-steps", "2"]
    whole = str(tmp_path / "whole")
    train_cifar.main([*common, "--out", whole])
    parts = str(tmp_path / "parts")
    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "llr", hooked(methods.METHODS["llr"], signal_at(4)))
        train_cifar.main([*common, "--out", parts])
    assert "stopped at step 4" in capsys.readouterr().out
    assert torch.load(os.path.join(parts, "state.pt"), weights_only=True)["step"] == 4
    train_cifar.main(["--resume", parts])
    a, b = load_file(os.path.join(whole, "last.safetensors")), load_file(os.path.join(parts, "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in read_log(parts) if e["kind"] == "train"] == list(range(1, 10))
    # a different seed gives different weights: the comparison can fail
    other = str(tmp_path / "other")
    train_cifar.main([*common, "--out", other, "--seed", "1"])
    c = load_file(os.path.join(other, "last.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    run = str(tmp_path / "nan")
    monkeypatch.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], nan_from(5)))
    with pytest.raises(SystemExit) as e:
        train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "3", "--out", run, *TINY])
    assert "NaN or inf" in str(e.value.code) and "before step 5" in str(e.value.code)
    state = torch.load(os.path.join(run, "state.pt"), weights_only=True)
    assert state["step"] == 3  # the checkpoint at the end of epoch 1, untouched
    weights = load_file(os.path.join(run, "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    torch.testing.assert_close(weights["net.fc.weight"], state["model"]["net.fc.weight"])


@pytest.mark.parametrize("flags, message", [
    (["--eps", "300/255"], "more than 64/255, almost surely a unit mistake for an ℓ∞ radius"),
    (["--eps", "x"], "cannot read eps"),
    (["--arch", "vgg"], "unknown architecture"),
    (["--arch", "cnn-0x4"], "at least 1 layer"),
    (["--lr-peak", "1"], "--lr-peak is a fraction of training in (0, 1), got 1.0"),
    (["--lr-schedule", "cyclic-gradalign", "--lr-warmup", "1"], "ramps the learning rate up by itself"),
])
def test_bad_input_gives_one_line_error(flags, message, data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_cifar.main(["--data-dir", data_dir, "--out", str(tmp_path / "r"), *TINY, *flags])
    text = str(e.value.code)
    assert text.startswith("train_cifar.py: error:") and message in text and "\n" not in text


def test_missing_data_gives_one_line_and_nonzero_exit(tmp_path):
    argv = [sys.executable, os.path.join(ROOT, "train_cifar.py"), "--data-dir", str(tmp_path / "nothing"),
            "--out", str(tmp_path / "r"), *TINY]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "no CIFAR-10 at" in lines[0] and "--download" in lines[0], result.stderr


def test_existing_run_is_not_overwritten(data_dir, tmp_path):
    run = str(tmp_path / "run")
    train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY])
    with pytest.raises(SystemExit, match="holds an earlier run"):
        train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY])


def test_two_process_llr_run(data_dir, tmp_path):
    """Double backprop under multi-process data parallel: `accelerate launch` with 2 CPU processes
    (ACCELERATE_USE_CPU=1 makes Accelerate use gloo on a machine without GPUs)."""
    run = str(tmp_path / "ddp")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            os.path.join(ROOT, "train_cifar.py"), "--data-dir", data_dir, "--epochs", "2", "--out", run, *TINY]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["processes"] == 2
    log = read_log(run)
    assert [e["step"] for e in log if e["kind"] == "train"] == list(range(1, 7))
    assert [e["val_n"] for e in log if e["kind"] == "eval"] == [6, 6]  # both shards counted
    weights = load_file(os.path.join(run, "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_two_process_compiled_first_order_llr_run(tmp_path):
    """`accelerate launch --num_processes 2 ... --compile --method llr --llr-first-order` (gloo on the CPU): the
    compiled first-order step, its gradients averaged across the processes by llr.CompiledLLR (the equality with
    the whole batch: tests/test_llr_distributed.py), trains, and the run records the form it trained. GradAlign's
    one-filter CNN (32 px), the smallest model to compile."""
    run, data = str(tmp_path / "ddp-fo"), make_image_folder(str(tmp_path / "data"), classes=3, per_class=10, size=32)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            os.path.join(ROOT, "train_cifar.py"), "--data-dir", data, "--epochs", "1", "--out", run, *TINY,
            "--arch", "cnn-1x1", "--method", "llr", "--llr-steps", "1", "--llr-first-order", "--compile"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["processes"] == 2 and config["args"]["compile"] and config["args"]["llr_first_order"]
    assert models.read_checkpoint_metadata(os.path.join(run, "last.safetensors"))["options"]["first_order"]
    assert [e["step"] for e in read_log(run) if e["kind"] == "train"] == [1, 2, 3]


def test_bf16_mixed_precision_through_accelerate(data_dir, tmp_path, monkeypatch):
    """Accelerate's mixed-precision setting (here from the environment, as `accelerate launch
    --mixed_precision bf16` sets it) runs LLR's double backward under bf16 autocast."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = str(tmp_path / "bf16")
    train_cifar.main(["--method", "llr", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY])
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["mixed_precision"] == "bf16"
    train = [e for e in read_log(run) if e["kind"] == "train"]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["gamma"]) for e in train)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit, match="use bf16"):
        train_cifar.main(["--method", "llr", "--data-dir", data_dir, "--epochs", "1", "--out", str(tmp_path / "f"), *TINY])


def test_selection_uses_held_out_training_images_only(tmp_path, capsys):
    """The evaluation after each epoch and the choice of best.safetensors use --val-n training
    images that are never trained on; the test set is not even read (training works without it),
    and best.safetensors records where it was chosen. The header and the checkpoints say what the
    images are (channels, size, classes): here 16-pixel images, not CIFAR-10's 32."""
    import data

    data_dir = make_image_folder(str(tmp_path / "data"), splits=("train",), classes=3, per_class=10, size=16)
    run = str(tmp_path / "run")
    seen = []
    recording = hooked(methods.METHODS["plain"], lambda n, loss, info: seen.append(len(info["logits"])))
    with pytest.MonkeyPatch.context() as m:
        m.setitem(methods.METHODS, "plain", recording)
        train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "2", "--out", run, *TINY])
    train_indices, holdout = data.holdout_split(30, 6)
    assert len(set(train_indices.tolist()) | set(holdout.tolist())) == 30 and len(train_indices) == 24
    assert sum(seen) == 2 * 24  # 3 steps of 8 per epoch: the 24 training images, not the 6 held out
    meta = models.read_checkpoint_metadata(os.path.join(run, "best.safetensors"))
    assert meta["images"] == {"channels": 3, "size": [16, 16], "classes": 3}
    assert "images 3x16x16 in 3 classes" in capsys.readouterr().out
    assert meta["selection"] == {"split": "train", "dataset": "cifar10", "dataset_size": 30, "holdout_n": 6,
                                 "indices_sha256": data.indices_digest(holdout), "metric": "untargeted 2x1 accuracy"}
    evals = [e for e in read_log(run) if e["kind"] == "eval"]
    assert [e["val_n"] for e in evals] == [6, 6]
    assert {"val_clean_acc", "val_fgsm_acc", "val_pgd_acc", "val_gamma_mean"} <= set(evals[0])


def test_no_holdout_keeps_only_last(data_dir, tmp_path):
    run = str(tmp_path / "run")
    train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY, "--val-n", "0"])
    assert not os.path.exists(os.path.join(run, "best.safetensors"))
    assert os.path.exists(os.path.join(run, "last.safetensors"))
    assert not [e for e in read_log(run) if e["kind"] == "eval"]


def test_eval_refuses_the_images_that_chose_the_checkpoint(data_dir, tmp_path):
    run = str(tmp_path / "run")
    train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY])
    best = os.path.join(run, "best.safetensors")
    common = ["--eps", "8/255", "--data-dir", data_dir, "--n", "4", "--attacks", "fgsm20", "--no-sanity",
              "--out", str(tmp_path / "e.json")]
    with pytest.raises(SystemExit) as e:
        eval_script.main([best, *common, "--split", "holdout"])
    assert "chosen on the 6 held-out training images" in str(e.value.code) and "\n" not in str(e.value.code)
    report = eval_script.main([best, *common, "--split", "holdout", "--allow-selection-images"])
    assert report["selection_conflict"] and report["split"] == "holdout"
    test_split = [*common[:-1], str(tmp_path / "e-test.json")]  # e.json holds the holdout split's evaluation
    assert eval_script.main([run, *test_split])["checkpoint"] == best  # a run directory: its best checkpoint
    # an older best.safetensors, chosen on the first test images, is refused on them
    legacy = str(tmp_path / "legacy.safetensors")
    models.save_checkpoint(models.load_checkpoint(best), legacy, eval_robust_acc=0.5, eval_n=1000)
    with pytest.raises(SystemExit, match="first 1000 test images"):
        eval_script.main([legacy, *common])


def test_l2_threat_model_from_training_to_evaluation(data_dir, tmp_path):
    """--norm l2: the method's ball, the evaluation after each epoch and the checkpoint's record are
    ℓ2; eval.py reads the norm from the checkpoint and runs the ℓ2 suite (no ℓ∞-only Square)."""
    run = str(tmp_path / "run")
    train_cifar.main(["--method", "llr", "--llr-steps", "1", "--norm", "l2", "--eps", "36/255", "--data-dir", data_dir,
                      "--epochs", "1", "--out", run, *TINY])
    meta = models.read_checkpoint_metadata(os.path.join(run, "last.safetensors"))
    assert meta["norm"] == "l2" and meta["eps"] == pytest.approx(36 / 255)
    report = eval_script.main([run, "--eps", "36/255", "--data-dir", data_dir, "--n", "4", "--steps", "2",
                               "--restarts", "1", "--fgsm-steps", "2", "--square-queries", "2", "--no-sanity",
                               "--out", str(tmp_path / "e.json")])
    assert report["norm"] == "l2" and "square" not in report["results"] and "untargeted" in report["results"]


# --------------------------------------------------------------------------- the CO literature's settings
def test_cyclic_schedules_against_their_sources():
    """cyclic-gradalign at --lr-peak 0.4 is GradAlign's np.interp(t, [0, 2·epochs//5, epochs], [0, lr, 0]) at
    t = epoch + (i + 1)/batches (their utils.py:335, train.py:127); cyclic is torch's CyclicLR stepped after
    each batch, at 0.5 (train_fgsm.py) and 0.4 (N-FGSM's and ELLE's SVHN runs)."""
    import numpy as np

    import training

    batches, epochs = 382, 30
    args = train_cifar.get_args(["--lr-schedule", "cyclic-gradalign", "--lr-peak", "0.4", "--lr", "0.003",
                                 "--epochs", str(epochs)])
    for epoch in (0, 5, 11, 12, 20, 29):
        for i in (0, 1, 100, batches - 1):
            expected = np.interp([epoch + (i + 1) / batches], [0, epochs * 2 // 5, epochs], [0, 0.003, 0])[0]
            rate = training.learning_rate(args, epoch * batches + i, batches, epochs * batches)
            assert rate == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert training.learning_rate(args, epochs * batches - 1, batches, epochs * batches) == 0  # their last step
    for peak in (0.5, 0.4):
        args = train_cifar.get_args(["--lr-schedule", "cyclic", "--lr-peak", str(peak), "--lr", "0.2"])
        total = 100
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        cyclic = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0, max_lr=0.2, step_size_up=total * peak,
                                                   step_size_down=total * (1 - peak))
        for step in range(total):
            assert training.learning_rate(args, step, 10, total) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                                   rel=1e-12, abs=1e-18)
            optimizer.step()
            cyclic.step()


def _trained_parameters(optimizer_for, steps=3):
    """The parameters of a small model after `steps` steps of the optimiser `optimizer_for(model)` on fixed batches."""
    torch.manual_seed(0)
    model = models.build_model("cnn-1x2", num_classes=3)
    optimizer = optimizer_for(model)
    for k in range(steps):
        g = torch.Generator().manual_seed(k)
        x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return list(model.parameters())


@pytest.mark.parametrize("flags, theirs", [
    # GradAlign train.py:96: torch.optim.Adam(model.parameters(), lr=args.lr_max, weight_decay=args.weight_decay)
    (["--optimizer", "adam", "--weight-decay-on", "all"],
     lambda m: torch.optim.Adam(m.parameters(), lr=0.003, weight_decay=5e-4)),
    # fast_adversarial train_fgsm.py:75: SGD(model.parameters(), lr, momentum=0.9, weight_decay)
    (["--weight-decay-on", "all"],
     lambda m: torch.optim.SGD(m.parameters(), lr=0.003, momentum=0.9, weight_decay=5e-4)),
    # the default: conv and linear weights decayed, biases not
    ([], lambda m: torch.optim.SGD([{"params": [m.net.features[0].weight, m.net.fc.weight], "weight_decay": 5e-4},
                                    {"params": [m.net.features[0].bias, m.net.fc.bias]}], lr=0.003, momentum=0.9)),
], ids=["adam-all-gradalign", "sgd-all-train_fgsm", "sgd-weights-default"])
def test_optimizer_flags_build_their_optimizer(flags, theirs):
    import training

    args = train_cifar.get_args([*flags, "--lr", "0.003", "--weight-decay", "5e-4"])
    ours = _trained_parameters(lambda m: training.make_optimizer(m, args))
    expected = _trained_parameters(theirs)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    if flags[-1:] == ["all"]:  # the rule matters: with the biases left undecayed the weights differ
        args.weight_decay_on = "weights"
        other = _trained_parameters(lambda m: training.make_optimizer(m, args))
        assert not all(torch.equal(a, b) for a, b in zip(ours, other))


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_pad_mode_reaches_the_crops(mode):
    """--pad-mode zeros: white images get black borders in some crops (torchvision's RandomCrop(32, padding=4));
    reflect: never."""
    from types import SimpleNamespace

    args = train_cifar.get_args(["--pad-mode", mode])
    images, labels = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64)
    x, _ = train_cifar.batch_for(images, labels, args, 0, 1, SimpleNamespace(process_index=0, num_processes=1))
    assert x.shape == (64, 3, 32, 32) and x.max() == 1
    assert (x.min() == 0) == (mode == "zeros")


def test_evaluate_takes_explicit_settings_and_splits_across_processes():
    """training.evaluate needs neither the command line's args nor Accelerate: any driver calls it.
    Two shards (process 0 and 1 of 2) whose counts are summed by `reduce` count the images, the
    clean and the FGSM accuracy of one process's call; the strong attack's name carries its
    settings."""
    import training
    from conftest import TinyConvNet

    torch.manual_seed(0)
    model = TinyConvNet()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(10) % 3
    settings = dict(norm="linf", steps=2, restarts=1, seed=0, gamma_n=4, gamma_seed=7)
    whole = training.evaluate(model, images, labels, 8 / 255, **settings)
    assert whole["val_n"] == 10 and whole["val_gamma_n"] == 4 and whole["pgd"] == "untargeted 2x1"
    assert model.training  # left in train mode
    counts = [None, None]

    def all_reduce(process):
        def reduce(t):
            counts[process] = t.clone()
            return t if None in counts else counts[0] + counts[1]
        return reduce

    for process in (0, 1):
        shard = training.evaluate(model, images, labels, 8 / 255, **settings, process=process, processes=2,
                                  reduce=all_reduce(process))
    assert counts[0][3] == counts[1][3] == 5  # every other image each
    assert (shard["val_n"], shard["val_gamma_n"]) == (10, 4)
    assert (shard["val_clean_acc"], shard["val_fgsm_acc"]) == (whole["val_clean_acc"], whole["val_fgsm_acc"])
