"""The compiled training objectives (llr.CompiledLLR, methods.CompiledLFR/CompiledCURE, --compile)
against the eager reference: loss, every weight gradient, running statistics and their count, in
float64 with Inductor's generated code (so that only rounding can differ), and under bf16 autocast;
the number of graphs compiled; a compiled training run end to end, with resume."""
import copy
import os
import signal

import pytest
import torch

import llr
import methods
import train_cifar
import training
from conftest import TinyConvNet, make_image_folder, read_log

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture
def fresh_dynamo():
    """Each test compiles afresh and counts its own graphs (compiled code of one code object is
    cached across instances, up to torch.compile's limit)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _pair(dtype=torch.float64, seed=0):
    """The same TinyConvNet twice (eager, compiled), a batch of 8 and its labels."""
    torch.manual_seed(seed)
    eager = TinyConvNet().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.rand(8, 3, 4, 4, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)
    return eager, copy.deepcopy(eager), x, y


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def _assert_same_step(eager_model, compiled_model, eager_out, compiled_out, rtol):
    """Loss, info, weight gradients, running statistics and num_batches_tracked agree."""
    (loss_e, info_e), (loss_c, info_c) = eager_out, compiled_out
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=0)
    for key in info_e:
        torch.testing.assert_close(info_c[key], info_e[key], rtol=rtol, atol=rtol * info_e[key].abs().max().item())
    grads = [(n, pc.grad, pe.grad) for (n, pc), pe in zip(compiled_model.named_parameters(), eager_model.parameters())]
    everything = torch.cat([ge.flatten() for _, _, ge in grads])
    for name, gc, ge in grads:  # relative to the whole gradient: a conv bias before batch norm has none of its own
        assert (gc - ge).norm() <= rtol * everything.norm(), name
    for name, buffer in eager_model.named_buffers():
        other = dict(compiled_model.named_buffers())[name]
        if name.endswith("num_batches_tracked"):
            assert torch.equal(other, buffer)
        else:
            torch.testing.assert_close(other, buffer, rtol=rtol, atol=0)
    compiled_model.zero_grad()
    eager_model.zero_grad()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_compiled_llr_equals_eager(norm):
    """Two steps with a different ε each (the warm-up): the same numbers as llr_loss from the same
    generator, and three graphs in all (the clean pass, a search step, Eq. 8): ε did not recompile."""
    eager, compiled_model, x, y = _pair()
    compiled = llr.CompiledLLR(compiled_model, lam=2.0, mu=0.6, steps=3, norm=norm)
    for call, eps in enumerate((0.05, 0.1)):
        _assert_same_step(
            eager, compiled_model,
            llr.llr_loss(eager, x, y, eps, steps=3, norm=norm, generator=torch.Generator().manual_seed(call)),
            compiled(x, y, eps, generator=torch.Generator().manual_seed(call)), rtol=1e-7)
    assert _graphs() == 3 and compiled_model.bn.num_batches_tracked.item() == 2
    # a non-trivial step: the search moved, and the gap is not zero (the comparison can fail)
    _, info = compiled(x, y, 0.1, generator=torch.Generator().manual_seed(5))
    size = info["delta"].flatten(1).abs().amax(1) if norm == "linf" else info["delta"].flatten(1).norm(dim=1)
    assert (info["gamma"] > 1e-4).all() and (size > 0.05).all()


def test_compiled_first_order_llr_equals_eager():
    """The first-order form compiled (Inductor's code, float64): the same loss, info, weight gradients and running
    statistics as llr_loss(first_order=True) from the same generator, over two steps of different ε; three graphs
    (the clean pass, a search step, the first-order Eq. 8), the compiled exact Eq. 8 never traced."""
    eager, compiled_model, x, y = _pair()
    compiled = llr.CompiledLLR(compiled_model, lam=4.0, mu=3.0, steps=2, first_order=True)
    for call, eps in enumerate((0.05, 0.1)):
        _assert_same_step(
            eager, compiled_model,
            llr.llr_loss(eager, x, y, eps, lam=4.0, mu=3.0, steps=2, first_order=True,
                         generator=torch.Generator().manual_seed(call)),
            compiled(x, y, eps, generator=torch.Generator().manual_seed(call)), rtol=1e-7)
    assert _graphs() == 3 and compiled_model.bn.num_batches_tracked.item() == 2


def test_compiled_llr_without_batch_norm_and_in_eval_mode():
    """No batch-norm layer to record; a model in eval mode (running statistics, untouched)."""
    torch.manual_seed(0)
    eager = TinyConvNet(batchnorm=False).double()
    compiled_model = copy.deepcopy(eager)
    x, y = torch.rand(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    compiled = llr.CompiledLLR(compiled_model, steps=2, backend="aot_eager")
    _assert_same_step(eager, compiled_model, llr.llr_loss(eager, x, y, 0.1, steps=2, generator=torch.Generator()),
                      compiled(x, y, 0.1, generator=torch.Generator()), rtol=1e-7)
    eager, compiled_model, x, y = _pair()
    eager.eval(), compiled_model.eval()
    compiled = llr.CompiledLLR(compiled_model, steps=2, backend="aot_eager")
    _assert_same_step(eager, compiled_model, llr.llr_loss(eager, x, y, 0.1, steps=2, generator=torch.Generator()),
                      compiled(x, y, 0.1, generator=torch.Generator()), rtol=1e-7)
    assert eager.bn.num_batches_tracked.item() == 0 == compiled_model.bn.num_batches_tracked.item()


@pytest.mark.parametrize("method", ["lfr", "cure"])
def test_compiled_double_backprop_baselines_equal_eager(method):
    """LFR (its search in eval mode, the clean statistics on x_adv) and CURE (both gradients in eval
    mode on the running statistics the clean pass has just updated) as their eager functions."""
    eager, compiled_model, x, y = _pair()
    compiled = methods.compiled(method, compiled_model, {}, norm="linf")
    for call, eps in enumerate((0.05, 0.1)):
        _assert_same_step(
            eager, compiled_model,
            methods.METHODS[method](eager, x, y, eps, generator=torch.Generator().manual_seed(call)),
            compiled(x, y, eps, generator=torch.Generator().manual_seed(call)), rtol=1e-9)
    assert _graphs() == 2 and compiled_model.bn.num_batches_tracked.item() == 2


def test_compiled_llr_under_bf16_autocast():
    """bf16 autocast in the compiled step, the gap in float32: within bf16's rounding of the eager
    bf16 step (stated tolerance: 5% of the gradient's norm, 1% of the loss), and both far closer to
    each other than to float32 is not required, only finite."""
    eager, compiled_model, x, y = _pair(torch.float32)
    compiled = llr.CompiledLLR(compiled_model, steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_e, info_e = llr.llr_loss(eager, x, y, 0.1, steps=2, generator=torch.Generator().manual_seed(0))
        loss_c, info_c = compiled(x, y, 0.1, generator=torch.Generator().manual_seed(0))
    assert loss_c.dtype == torch.float32 and info_c["gamma"].dtype == torch.float32
    loss_e.backward()
    loss_c.backward()
    assert abs(loss_c.item() - loss_e.item()) <= 0.01 * abs(loss_e.item())
    ge = torch.cat([p.grad.flatten() for p in eager.parameters()])
    gc = torch.cat([p.grad.flatten() for p in compiled_model.parameters()])
    assert torch.isfinite(gc).all() and _relative(gc, ge) < 0.05
    assert torch.equal(compiled_model.bn.num_batches_tracked, eager.bn.num_batches_tracked)


def test_compiled_paths_refuse_sync_batch_norm_across_processes(monkeypatch):
    """In a multi-process run a SyncBatchNorm layer reduces over a group (llr._sync_group): the compiled
    paths would not, so they refuse, naming the eager path."""
    model = TinyConvNet()
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 3, (4,))
    monkeypatch.setattr(llr, "_sync_group", lambda layer: "group")
    for compiled in (llr.CompiledLLR(model, backend="aot_eager"), methods.compiled("lfr", model, {}, backend="aot_eager"),
                     methods.compiled("cure", model, {}, backend="aot_eager")):
        with pytest.raises(RuntimeError, match="does not all-reduce SyncBatchNorm's statistics .* eager path"):
            compiled(x, y, 0.1)


def test_compiled_llr_refuses_bad_input():
    model = TinyConvNet()
    with pytest.raises(ValueError, match="unknown norm"):
        llr.CompiledLLR(model, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        llr.CompiledLLR(model, steps=-1)
    with pytest.raises(ValueError, match="eps must lie"):
        llr.CompiledLLR(model, backend="aot_eager")(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), 3.0)


def test_compiled_llr_refuses_a_model_without_logits_bad_labels_and_x_requiring_grad_before_compiling():
    """One line each, naming what is expected, before anything compiles (no graph: no Dynamo error)."""
    from test_llr import _bad_model

    x, y = torch.rand(4, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    for kind in ("tuple", "object", "shape"):
        with pytest.raises(ValueError, match=r"the model must return logits \[B, K\] for B = 4 images") as caught:
            llr.CompiledLLR(_bad_model(kind), steps=1)(x, y, 0.1)
        assert "\n" not in str(caught.value)
    compiled = llr.CompiledLLR(TinyConvNet().double(), steps=1)
    with pytest.raises(ValueError, match=r"labels y must be \[B\] = \[4\] for images x \[4, 3, 4, 4\], got \[3\]"):
        compiled(x, y[:3], 0.1)
    with pytest.raises(ValueError, match="images x must not require grad .* pass x.detach()"):
        compiled(x.clone().requires_grad_(True), y, 0.1)
    assert _graphs() == 0


# --------------------------------------------------------------------------- --compile end to end
TINY = ["--arch", "wrn-10-1", "--batch-size", "7", "--log-every", "1", "--val-n", "6", "--eval-steps", "2",
        "--eps-warmup", "1", "--llr-steps", "2", "--gamma-n", "2"]  # 24 images: 3 batches of 7, 3 dropped


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("cifar")), classes=3, per_class=10, size=16)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_compiled_training_run_resumes_exactly(data_dir, tmp_path, monkeypatch, capsys):
    """train_cifar.py --compile: ε changes at every step of the first epoch, the last 3 images of each
    epoch are dropped, and the LLR step compiles three graphs once (no recompilation). Stopped after
    4 of 6 steps and resumed, it ends with the weights of the uninterrupted compiled run, bit for
    bit; and close to the eager run's."""
    from safetensors.torch import load_file

    common = ["--data-dir", data_dir, "--epochs", "2", "--compile", *TINY]
    whole = str(tmp_path / "whole")
    train_cifar.main([*common, "--out", whole])
    assert _graphs() == 3
    config = read_log(whole)
    assert len({e["eps"] for e in config if e["kind"] == "train"}) == 3  # the warm-up: ε changed while compiled

    original = training.loss_function

    def stopping_at_4(args, model):
        fn, calls = original(args, model), [0]

        def call(*a):
            calls[0] += 1
            if calls[0] == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return fn(*a)
        return methods.BoundLoss(call)

    parts = str(tmp_path / "parts")
    with monkeypatch.context() as m:
        m.setattr(training, "loss_function", stopping_at_4)
        train_cifar.main([*common, "--out", parts])
    assert "stopped at step 4" in capsys.readouterr().out
    train_cifar.main(["--resume", parts])
    a, b = load_file(os.path.join(whole, "last.safetensors")), load_file(os.path.join(parts, "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    eager = str(tmp_path / "eager")
    train_cifar.main([*common[:-len(TINY) - 1], *TINY, "--out", eager])
    c = load_file(os.path.join(eager, "last.safetensors"))
    weights = [k for k in a if a[k].is_floating_point()]
    assert all(_relative(a[k], c[k]) < 1e-3 for k in weights)
    assert any(not torch.equal(a[k], c[k]) for k in weights)  # compiled code really ran (rounding differs)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_compile_errors_are_one_line(data_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="--compile needs a C\\+\\+ compiler"):
        train_cifar.main(["--data-dir", data_dir, "--compile", "--out", str(tmp_path / "a"), *TINY])

    class TwoProcesses:
        num_processes, device = 2, torch.device("meta")

    for method in ("llr", "adv"):  # exact LLR and the others compiled across processes: untested, refused
        with pytest.raises(ValueError, match="--compile across processes runs first-order LLR alone"):
            training.check_compile(train_cifar.get_args(["--compile", "--method", method]), TwoProcesses())
    training.check_compile(train_cifar.get_args(["--method", "llr"]), TwoProcesses())  # eager: any number
    training.check_compile(train_cifar.get_args(["--compile", "--method", "llr", "--llr-first-order"]), TwoProcesses())
