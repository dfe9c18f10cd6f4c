"""timm's ViT, DeiT, Swin and ConvNeXt (tiny, conftest.TINY_TIMM) in llr: built, trained by every method,
resumed bit for bit, evaluated; the math attention backend scoped to the passes differentiated twice;
--init; CompiledLLR; two processes."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import eval as eval_script
import llr
import methods
import models
import train_cifar
from conftest import ROOT, TINY_TIMM, hooked, make_image_folder, read_log, signal_at, tiny_timm

FAMILIES = list(TINY_TIMM)
# (method, options) that each family trains one step of: every method, LLR exact and first-order
STEPS = [("plain", {}), ("adv", {"steps": 2}), ("trades", {"steps": 2}), ("cure", {}), ("lfr", {"steps": 1}),
         ("n-fgsm", {}), ("gradalign", {}), ("elle", {}), ("elle-a", {}), ("llr", {"steps": 1}),
         ("llr", {"steps": 1, "first_order": True})]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny 3-class ImageFolder per image size of TINY_TIMM."""
    root = tmp_path_factory.mktemp("timm-data")
    return {size: make_image_folder(str(root / str(size)), classes=3, per_class=10, size=size)
            for size in {size for _, _, size in TINY_TIMM.values()}}


def _flags(family, folders):
    arch, kwargs, size = TINY_TIMM[family]
    return ["--arch", arch, "--timm-kwargs", *kwargs, "--data-dir", folders[size], "--batch-size", "8",
            "--log-every", "1", "--val-n", "6", "--eval-steps", "2", "--gamma-n", "4"]


def _batch(size, n=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_llr_resumes_exactly_and_evaluates(family, folders, tmp_path, monkeypatch, capsys):
    """train_cifar.py with LLR-1 on the tiny model: stopped by SIGTERM after 4 of 6 steps and resumed, its
    weights equal an uninterrupted run's bit for bit; eval.py and models.load_checkpoint read the checkpoint
    as they read any other."""
    common = [*_flags(family, folders), "--method", "llr", "--llr-steps", "1", "--epochs", "2"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train_cifar.main([*common, "--out", whole])
    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "llr", hooked(methods.METHODS["llr"], signal_at(4)))
        train_cifar.main([*common, "--out", parts])
    assert "stopped at step 4" in capsys.readouterr().out
    train_cifar.main(["--resume", parts])
    a, b = load_file(os.path.join(whole, "last.safetensors")), load_file(os.path.join(parts, "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = [e for e in read_log(parts) if e["kind"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 7)) and all(e["gamma"] > 0 for e in train)
    fresh = tiny_timm(family).state_dict()  # the weights moved: training happened
    assert any(not torch.equal(a[k], fresh[k]) for k in fresh)
    model = models.load_checkpoint(os.path.join(parts, "last.safetensors"))  # rebuilt from the config alone
    assert model.state_dict().keys() == a.keys() and all(torch.equal(v, a[k]) for k, v in model.state_dict().items())
    report = eval_script.main([os.path.join(parts, "last.safetensors"), "--eps", "8/255", "--data-dir",
                               folders[TINY_TIMM[family][2]], "--n", "6", "--steps", "2", "--restarts", "1",
                               "--attacks", "fgsm20,untargeted", "--no-sanity", "--out", str(tmp_path / "eval.json")])
    assert report["model"]["arch"] == TINY_TIMM[family][0] and report["training"]["method"] == "llr"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", STEPS, ids=[m + ("-fo" if o.get("first_order") else "") for m, o in STEPS])
def test_every_method_trains_one_step(family, method, options):
    """One eager optimiser step through `methods.bind`, as the trainers take it: a finite loss, finite
    gradients, and weights that moved."""
    torch.manual_seed(0)
    model = tiny_timm(family).train()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(TINY_TIMM[family][2])
    loss_fn = methods.bind(method, model, options)
    loss, _ = loss_fn(x, y, 8 / 255, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    optimizer.step()
    loss_fn.after_optimizer_step()
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fused_attention_has_no_double_backward():
    """Why the math backend is needed: the tiny ViT's attention (timm's fused_attn, F.scaled_dot_product_attention)
    fails a double backward under the CPU's default kernel, and passes under llr.math_attention."""
    model = tiny_timm("vit")
    x, y = _batch(16)

    def double_backward():
        x_ = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x_), y), x_, create_graph=True)
        grad.square().sum().backward()

    with pytest.raises(RuntimeError, match="scaled_dot_product"):
        double_backward()
    with llr.math_attention():
        double_backward()


SDPA_FLAGS = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
              torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled)


class Flags(torch.nn.Module):
    """The model, recording at each call whether the fused kernels were allowed (flash_sdp_enabled)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.fused = net, []

    def forward(self, x):
        self.fused.append(torch.backends.cuda.flash_sdp_enabled())
        return self.net(x)


# each method's passes in order: True where the caller's (fused) kernels run, False where the math backend runs
PASSES = {"llr": [False, True, True],  # clean (differentiated twice), 1 search step, Eq. 8 on x + δ
          "llr-fo": [True, True, True],  # first-order: clean, 1 search step, Eq. 8 on [x, x + δ, x ± hδ]
          "gradalign": [True, True, False],  # FGSM, CE on x + δ, g₂ (differentiated twice)
          "cure": [True, False, False],  # clean, the two gradients
          "lfr": [False, True, False]}  # 1 search step (a double backward), clean, flatness on x + δ


@pytest.mark.parametrize("name", list(PASSES))
def test_math_attention_only_in_the_passes_differentiated_twice(name):
    """Under the caller's own choice of kernels (flash and math here), the passes whose input gradient is
    differentiated again run by the math backend alone, the others by the caller's; the caller's choice is
    restored after the loss and after an exception inside."""
    model = Flags(tiny_timm("vit"))
    x, y = _batch(16)
    method = name.removesuffix("-fo")
    options = {"steps": 1, **({"first_order": True} if name == "llr-fo" else {})} if method in ("llr", "lfr") else {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        callers = [flag() for flag in SDPA_FLAGS]
        loss, _ = methods.METHODS[method](model, x, y, 8 / 255, generator=torch.Generator().manual_seed(0), **options)
        loss.backward()
        assert [flag() for flag in SDPA_FLAGS] == callers == [True, False, True, False]
        assert model.fused == PASSES[name]
        with pytest.raises(ZeroDivisionError), llr.math_attention():
            1 / 0
        assert [flag() for flag in SDPA_FLAGS] == callers


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("first_order", [False, True], ids=["exact", "first-order"])
def test_compiled_llr_equals_llr_loss_on_a_vit(first_order):
    """CompiledLLR (traced by torch.compile and AOTAutograd, aot_eager: the graphs, without Inductor's code
    generation, which test_compiled.py covers on a CNN; the exact form's clean-pass attention by the math backend
    inside the graph, the first-order form's fused) gives llr_loss's loss and weight gradients on the tiny ViT,
    in float64."""
    torch.manual_seed(0)
    eager = tiny_timm("vit").double()
    compiled_model = copy.deepcopy(eager)
    x, y = _batch(16, dtype=torch.float64)
    loss_e, info_e = llr.llr_loss(eager, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(0),
                                  first_order=first_order)
    loss_c, info_c = llr.CompiledLLR(compiled_model, steps=2, first_order=first_order, backend="aot_eager")(
        x, y, 8 / 255, generator=torch.Generator().manual_seed(0))
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-9, atol=0)
    torch.testing.assert_close(info_c["gamma"], info_e["gamma"], rtol=1e-7, atol=1e-12)
    for (name, pc), pe in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-7, atol=1e-12, msg=name)
    assert (info_e["gamma"] > 0).all()  # a non-trivial gap: the comparison can fail


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("method", ["lfr", "cure"])
def test_compiled_double_backprop_baselines_on_a_vit(method):
    """CompiledLFR and CompiledCURE trace the math backend's scope too (aot_eager: the graphs AOTAutograd
    differentiates, without generating code): the eager loss and gradients, in float64."""
    torch.manual_seed(0)
    eager = tiny_timm("vit").double()
    compiled_model = copy.deepcopy(eager)
    x, y = _batch(16, dtype=torch.float64)
    options = {"steps": 1} if method == "lfr" else {}
    loss_e, _ = methods.METHODS[method](eager, x, y, 8 / 255, generator=torch.Generator().manual_seed(0), **options)
    loss_c, _ = methods.compiled(method, compiled_model, options, backend="aot_eager")(
        x, y, 8 / 255, generator=torch.Generator().manual_seed(0))
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-9, atol=0)
    for (name, pc), pe in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-7, atol=1e-12, msg=name)


def test_init_loads_a_saved_model_and_refuses_a_mismatched_one(tmp_path):
    """--init's loader: safetensors and torch files in timm's layout load exactly; a classifier of another class
    count starts fresh; another depth is refused in one line naming the first tensor that does not match."""
    torch.manual_seed(0)
    source = tiny_timm("vit").net.state_dict()
    save_file(source, str(tmp_path / "vit.safetensors"))
    torch.save(source, str(tmp_path / "vit.pt"))
    for name in ("vit.safetensors", "vit.pt"):
        torch.manual_seed(1)
        model = tiny_timm("vit")
        assert not torch.equal(model.net.pos_embed, source["pos_embed"])
        assert "tensors loaded" in models.load_init(model, str(tmp_path / name))
        assert all(torch.equal(v, source[k]) for k, v in model.net.state_dict().items())
    torch.manual_seed(1)
    ten = tiny_timm("vit", num_classes=10)
    fresh_head = ten.net.head.weight.clone()
    line = models.load_init(ten, str(tmp_path / "vit.safetensors"))
    assert "head.weight" in line and torch.equal(ten.net.head.weight, fresh_head)
    assert torch.equal(ten.net.pos_embed, source["pos_embed"])
    deeper = models.build_model(TINY_TIMM["vit"][0], 3, timm_kwargs={
        **models.parse_timm_kwargs(TINY_TIMM["vit"][1]), "depth": 2}).net.state_dict()
    save_file(deeper, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ValueError) as e:
        models.load_init(tiny_timm("vit"), str(tmp_path / "deeper.safetensors"))
    assert "unexpected blocks.1." in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a state dict"):
        torch.save({"model": source}, str(tmp_path / "nested.pt"))
        models.load_init(tiny_timm("vit"), str(tmp_path / "nested.pt"))


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_init_through_the_trainer(folders, tmp_path, capsys):
    """train_cifar.py --init starts from the file (and says so); a mismatched file stops it in one line before
    training, and a missing one before the data is read."""
    torch.manual_seed(0)
    save_file(tiny_timm("vit").net.state_dict(), str(tmp_path / "vit.safetensors"))
    train_cifar.main([*_flags("vit", folders), "--epochs", "1", "--method", "plain", "--init",
                      str(tmp_path / "vit.safetensors"), "--out", str(tmp_path / "run")])
    assert "--init: " in capsys.readouterr().out
    save_file(tiny_timm("deit").net.state_dict(), str(tmp_path / "other.safetensors"))  # same keys, other values: fine
    other = tiny_timm("convnext").net.state_dict()
    save_file(other, str(tmp_path / "convnext.safetensors"))
    for path, message in ((tmp_path / "convnext.safetensors", "does not match timm:vit_tiny_patch16_224"),
                          (tmp_path / "none.safetensors", "no such file")):
        with pytest.raises(SystemExit) as e:
            train_cifar.main([*_flags("vit", folders), "--epochs", "1", "--init", str(path), "--out",
                              str(tmp_path / "refused")])
        text = str(e.value.code)
        assert text.startswith("train_cifar.py: error: --init") and message in text and "\n" not in text
        assert not os.path.exists(os.path.join(tmp_path, "refused", "log.jsonl"))


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("change,message", [
    (["--activation", "softplus", "--arch", TINY_TIMM["swin"][0], "--timm-kwargs", *TINY_TIMM["swin"][1]],
     "takes no act_layer"),
    (["--timm-kwargs", "img_size=16", "no_such_size=3"], "no_such_size"),
    (["--timm-kwargs", "img_size"], "is not NAME=VALUE"),
    (["--timm-kwargs", "patch_size=4"], "cannot take 3x16x16 images (give img_size in --timm-kwargs)"),
    (["--arch", "timm:no_such_model"], "unknown timm model"),
    (["--timm-kwargs", *TINY_TIMM["vit"][1], "drop_rate=0.1"], "drops units at random in training (head_drop)"),
])
def test_bad_timm_flags_are_one_line_errors(change, message, folders, tmp_path):
    argv = [*_flags("vit", folders), "--epochs", "1", "--out", str(tmp_path / "r")]
    if "--timm-kwargs" in change:  # replace the tiny model's arguments
        start = argv.index("--timm-kwargs")
        del argv[start:start + 1 + len(TINY_TIMM["vit"][1])]
    with pytest.raises(SystemExit) as e:
        train_cifar.main([*argv, *change])
    text = str(e.value.code)
    assert text.startswith("train_cifar.py: error:") and message in text and "\n" not in text


def test_activation_becomes_timms_act_layer():
    """--activation softplus replaces a ViT's GELU (act_layer); unset, the model keeps its own."""
    own = tiny_timm("vit")
    softplus = tiny_timm("vit", activation="softplus")
    assert own.config["activation"] == models.OWN and any(isinstance(m, torch.nn.GELU) for m in own.modules())
    assert any(isinstance(m, torch.nn.Softplus) for m in softplus.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in softplus.modules())
    mean = torch.tensor(softplus.net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    assert torch.equal(softplus.mean, mean)  # normalised as its pretrained weights expect


def test_bench_times_a_timm_model(tmp_path):
    out = str(tmp_path / "bench.json")
    arch, kwargs, size = TINY_TIMM["vit"]
    report = bench.run(bench.get_args(["--arch", arch, "--timm-kwargs", *kwargs, "--image-size", str(size),
                                       "--batch-size", "4", "--rounds", "1", "--warmup", "1", "--device", "cpu",
                                       "--methods", "plain,llr-1,gradalign", "--out", out]))
    assert set(report["results"]) == {"plain", "llr-1", "gradalign"} and report["activation"] == models.OWN


WORKER = '''
import copy, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
from accelerate import Accelerator
import llr
from conftest import tiny_timm

accelerator = Accelerator()
rank = accelerator.process_index
torch.manual_seed(0)
model = tiny_timm("vit").double()
whole = copy.deepcopy(model)
g = torch.Generator().manual_seed(1)
x, y = torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
mine = slice(4 * rank, 4 * rank + 4)
start = torch.Generator().manual_seed(2)
if rank == 1:  # this process's random starts are those the whole batch draws for its half
    torch.rand(4, 3, 16, 16, generator=start, dtype=torch.float64)
ddp = accelerator.prepare(model)
loss, _ = llr.llr_loss(ddp, x[mine], y[mine], 8 / 255, steps=2, generator=start)
accelerator.backward(loss)  # DDP's own all-reduce, by its hooks on the outer (first-order) backward
reference, _ = llr.llr_loss(whole, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(2))
reference.backward()
torch.testing.assert_close(accelerator.gather(loss.detach()[None]).mean(), reference.detach(), rtol=1e-10, atol=0)
for (name, p), q in zip(accelerator.unwrap_model(ddp).named_parameters(), whole.parameters()):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)
print(f"rank {{rank}}: equal")
'''


def test_two_processes_equal_the_whole_batch_on_a_vit(tmp_path):
    """LLR-2 on the tiny ViT under `accelerate launch` with 2 CPU processes (gloo, DDP): the mean loss and the
    all-reduced weight gradients equal one process's on the whole batch, in float64."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: equal" in result.stdout and "rank 1: equal" in result.stdout


def test_gpu_report_timm_steps_smoke(tmp_path):
    """gpu_report.py's timm steps on the CPU with the tiny ViT and ConvNeXt (TINY_TIMM): every method of
    TIMM_METHODS timed, and a second call finds them done (resumable)."""
    from experiments import gpu_report

    steps = "timm-vit-s16,timm-convnext-t"
    gpu_report.main(["--smoke", str(tmp_path), "--steps", steps])
    for name in steps.split(","):
        record = json.loads((tmp_path / "gpu-report" / f"{name}.json").read_text())
        assert set(record["result"]["results"]) == set(gpu_report.TIMM_METHODS.split(","))
        assert record["result"]["arch"] == gpu_report.smoke_setting(str(tmp_path))["timm"][name][0]
    done = (tmp_path / "gpu-report" / "timm-vit-s16.json").stat().st_mtime
    gpu_report.main(["--smoke", str(tmp_path), "--steps", steps])
    assert (tmp_path / "gpu-report" / "timm-vit-s16.json").stat().st_mtime == done


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_imagenet_fine_tunes_a_timm_model_from_init(tmp_path, capsys):
    """train_imagenet.py with --arch timm: and --init: a 1000-class file's weights into a 3-class model (the
    classifier starts fresh), LLR-1 with gradient accumulation, a checkpoint eval.py-style loaders rebuild."""
    import train_imagenet

    arch, kwargs, size = TINY_TIMM["convnext"]
    folder = make_image_folder(str(tmp_path / "imagenet"), splits=("train", "val"), classes=3, per_class=10,
                               size=size + 8)
    torch.manual_seed(0)
    save_file(tiny_timm("convnext", num_classes=1000).net.state_dict(), str(tmp_path / "in1k.safetensors"))
    run = str(tmp_path / "run")
    train_imagenet.main(["--data-dir", folder, "--arch", arch, "--timm-kwargs", *kwargs, "--image-size", str(size),
                         "--init", str(tmp_path / "in1k.safetensors"), "--method", "llr", "--eps", "4",
                         "--epochs", "1", "--batch-size", "8", "--per-device-batch", "4", "--workers", "0",
                         "--val-n", "6", "--eval-steps", "2", "--gamma-n", "4", "--log-every", "1", "--out", run])
    assert "head.fc.weight, head.fc.bias of another class count left as initialised" in capsys.readouterr().out
    assert [e["step"] for e in read_log(run) if e["kind"] == "train"] == [1, 2, 3]
    assert models.load_checkpoint(os.path.join(run, "last.safetensors")).config["arch"] == arch


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_weight_decay_spares_what_timm_spares(family):
    """make_optimizer decays conv and linear weights but not what the timm model's no_weight_decay() names
    (ViT's position embedding and class token, Swin's relative position tables), as timm's recipes; with
    --weight-decay-on all, everything."""
    import training

    model = tiny_timm(family)
    args = train_cifar.get_args(["--weight-decay", "5e-4"])
    decayed, spared = (training.make_optimizer(model, args).param_groups[i]["params"] for i in (0, 1))
    names = {id(p): name for name, p in model.named_parameters()}
    spared_names = {names[id(p)].rsplit(".", 1)[-1] for p in spared}
    expected = {"pos_embed", "cls_token"} if family == "vit" else {"relative_position_bias_table"}
    assert expected <= spared_names and all(p.ndim > 1 for p in decayed) and decayed
    assert not expected & {names[id(p)].rsplit(".", 1)[-1] for p in decayed}
    args.weight_decay_on = "all"
    assert training.make_optimizer(model, args).param_groups[1]["weight_decay"] == 5e-4
