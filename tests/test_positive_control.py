"""experiments/positive_control.py: its train_cifar.py flags say GradAlign's setting as their code has it
(per step: the batch, the learning rate against their np.interp, Adam and its weight decay, the
zero-init FGSM step, zero padding, their CNN), the collapse rule, and the pipeline end to end through
train_cifar.py on generated images (no accuracy is asserted)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ball
import data
import methods
import models
import train_cifar
import training
from experiments import common, positive_control as pc


@pytest.fixture
def args(tmp_path):
    setting = {**pc.SETTING, "data": str(tmp_path / "data"), "out": str(tmp_path / "out")}
    return train_cifar.get_args(pc.train_argv(setting, "relu", 1))


def test_flags_say_their_setting(args):
    assert (args.arch, args.activation, args.seed, args.epochs, args.batch_size, args.val_n, args.eval_steps,
            args.eval_restarts) == ("cnn-1x4", "relu", 1, 30, 128, 1000, 20, 1)
    assert (args.pad_mode, args.eps_warmup, args.norm) == ("zeros", 0.0, "linf")  # full ε from the first step
    assert ball.parse_eps(args.eps, args.norm) == pytest.approx(10 / 255, rel=1e-15)
    steps_per_epoch = (50000 - 1000) // 128  # train_cifar.py's: the last incomplete batch dropped (drop_last=True)
    assert steps_per_epoch == 382
    for epoch in (0, 11, 12, 29):
        for i in (0, 200, steps_per_epoch - 1):  # their lr_schedule(epoch - 1 + (i + 1) / len(train_batches))
            expected = np.interp([epoch + (i + 1) / steps_per_epoch], [0, 30 * 2 // 5, 30], [0, 0.003, 0])[0]
            assert training.learning_rate(args, epoch * steps_per_epoch + i, steps_per_epoch, 30 * steps_per_epoch) \
                == pytest.approx(expected, rel=1e-12, abs=1e-18)
    model = models.build_model(args.arch, activation=args.activation)
    assert model.config["normalization"] == "none"
    optimizer = training.make_optimizer(model, args)  # their train.py:96: Adam(model.parameters(), weight_decay)
    assert isinstance(optimizer, torch.optim.Adam)
    assert all(g["weight_decay"] == 5e-4 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_method_is_their_zero_init_fgsm(args):
    """methods.adv_loss with the run's options is their train.py:141-170 and :186-187: δ = clip(0 + 1.25ε·sign(∇),
    −ε, ε), x + δ clipped to [0, 1], then the cross-entropy on it (images reaching both ends of the box)."""
    torch.manual_seed(0)
    model = models.build_model(args.arch, activation=args.activation).double()
    x, y = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    eps = ball.parse_eps(args.eps, args.norm)
    loss, info = methods.adv_loss(model, x, y, eps, **training.method_options(args))
    delta = torch.zeros_like(x, requires_grad=True)  # theirs
    (grad,) = torch.autograd.grad(F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta)
    delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    output = model(x + delta)
    torch.testing.assert_close(info["adv_logits"], output.detach())
    torch.testing.assert_close(loss, F.cross_entropy(output, y))
    assert (grad != 0).float().mean() > 0.5 and ((x + delta == 0) | (x + delta == 1)).any()


def test_collapse_rule():
    def log(pairs):
        return [{"epoch": e + 1, "fgsm": f, "pgd": p} for e, (f, p) in enumerate(pairs)]

    assert pc.collapse_epoch(log([(0.4, 0.3), (0.5, 0.04), (0.6, 0.02)])) == 2
    assert pc.collapse_epoch(log([(0.4, 0.3), (0.5, 0.04), (0.4, 0.3)])) is None  # not through the end
    assert pc.collapse_epoch(log([(0.2, 0.01), (0.2, 0.01)])) is None  # weak under both: not obfuscation
    assert pc.collapse_epoch(log([(0.6, 0.3), (0.6, 0.3)])) == 1  # a gap of 30 points


def test_pipeline_end_to_end_stopped_and_resumed(tmp_path, monkeypatch, fresh_accelerate_state):
    """Two runs of train_cifar.py, the first stopped by SIGTERM in its step 3 of 8, which stops the script;
    run again, it resumes that run (Adam's state, the schedule) to the weights of an uninterrupted run, bit
    for bit, then trains the second. Checkpoints loadable by eval.py, chosen on positive_control.py's former
    held-out images (the same data.holdout_split, in the same order); done runs are not trained again."""
    from safetensors.torch import load_file

    from conftest import hooked, signal_at

    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "adv", hooked(methods.METHODS["adv"], signal_at(3)))
        with pytest.raises(SystemExit, match="relu-seed0 stopped before its last epoch"):
            pc.main(["--smoke", str(tmp_path)])
    summary = pc.main(["--smoke", str(tmp_path)])
    assert set(summary["runs"]) == {"relu-seed0", "softplus-seed0"}
    assert all(r["done"] and r["epochs"] == 2 for r in summary["runs"].values())
    out = tmp_path / "positive-control"
    log = pc.read_log({"out": str(out)}, "relu", 0)
    assert [e["epoch"] for e in log] == [1, 2] and set(log[0]) == {"epoch", "clean", "fgsm", "pgd"}
    assert "| relu | 0 | 2 |" in (out / "table.md").read_text() and os.path.exists(out / "curves.png")
    assert "collapsed (the collapse rule) |" in (out / "table.md").read_text()
    for name, run in summary["runs"].items():  # the collapse rule beside the gap rule
        activation, seed = name.split("-seed")
        log = pc.read_log({"out": str(out)}, activation, int(seed))
        assert run["collapsed_by_collapse_rule"] == common.collapsed(log)
    config = json.loads((out / "relu-seed0" / "config.json").read_text())["args"]
    assert (config["optimizer"], config["lr_schedule"], config["pad_mode"], config["arch"]) == (
        "adam", "cyclic-gradalign", "zeros", "cnn-1x4")
    best = str(out / "relu-seed0" / "best.safetensors")
    assert models.load_checkpoint(best).config == {"arch": "cnn-1x4", "num_classes": 10, "activation": "relu",
                                                   "normalization": "none"}
    images, labels, _ = data.load_cifar10(str(tmp_path / "data"), "train")
    held_out = data.holdout_split(len(labels), 8)[1]  # what positive_control.py held out in its private loop
    assert models.read_checkpoint_metadata(best)["selection"]["indices_sha256"] == data.indices_digest(held_out)
    whole = {**summary["setting"], "data": str(tmp_path / "data"), "out": str(tmp_path / "whole")}
    train_cifar.main(pc.train_argv(whole, "relu", 0))
    a = load_file(str(tmp_path / "whole" / "relu-seed0" / "last.safetensors"))
    b = load_file(str(out / "relu-seed0" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = (out / "relu-seed0" / "log.jsonl").read_text()
    pc.main(["--smoke", str(tmp_path)])  # done: nothing is trained again
    assert (out / "relu-seed0" / "log.jsonl").read_text() == before
