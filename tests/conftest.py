"""Shared test helpers: the repository root on sys.path, tiny models, tiny image folders."""
import os
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.common import make_image_folder  # noqa: E402, F401  (the experiments' smoke runs use it too)


# The tiny timm models of the tests (and of gpu_report.py --smoke), one per family: family -> (--arch,
# --timm-kwargs, image size). Thousands of parameters each, so that a step takes milliseconds on a CPU.
TINY_TIMM = {
    "vit": ("timm:vit_tiny_patch16_224", ["img_size=16", "patch_size=4", "depth=1", "embed_dim=16", "num_heads=2"], 16),
    "deit": ("timm:deit_tiny_patch16_224", ["img_size=16", "patch_size=4", "depth=1", "embed_dim=16", "num_heads=2"],
             16),
    "swin": ("timm:swin_tiny_patch4_window7_224", ["img_size=16", "patch_size=2", "window_size=4", "embed_dim=16",
                                                   "depths=1,1", "num_heads=2,2"], 16),
    "convnext": ("timm:convnext_atto", ["depths=1,1,1,1", "dims=8,8,8,8"], 32),  # four stages: 32 px at least
}


def tiny_timm(family, num_classes=3, **kwargs):
    """The tiny timm model of `family` (TINY_TIMM), built as the training scripts build it."""
    import models

    arch, timm_kwargs, _ = TINY_TIMM[family]
    return models.build_model(arch, num_classes=num_classes, timm_kwargs=models.parse_timm_kwargs(timm_kwargs),
                              **kwargs)


class TinyConvNet(nn.Module):
    """conv-BN-softplus-conv-pool-linear on [B, 3, 4, 4]: small enough for finite differences."""

    def __init__(self, num_classes=3, batchnorm=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        h = nn.functional.softplus(self.bn(self.conv1(x)))
        h = nn.functional.softplus(self.conv2(h))
        return self.fc(h.mean((2, 3)))


class Recording(nn.Module):
    """A model that keeps a copy of every input it is called on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; in-process runs of the training scripts each start clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny finished train_cifar.py run, shared by every test that needs some trained checkpoint, its
    log or its data: FGSM (ADV-1) on wrn-10-1, 2 epochs, γ logged, on a generated 3-class folder of
    16-pixel images (ROOT/data; the run in ROOT/run). {"run", "checkpoint", "data_dir"}. Read it only:
    a test that changes a run works on a copy (shutil.copytree)."""
    from accelerate.state import AcceleratorState

    import train_cifar

    root = tmp_path_factory.mktemp("trained")
    data_dir = make_image_folder(str(root / "data"), classes=3, per_class=10, size=16)
    run = str(root / "run")
    AcceleratorState._reset_state(reset_partial_state=True)
    train_cifar.main(["--method", "adv", "--adv-steps", "1", "--data-dir", data_dir, "--arch", "wrn-10-1",
                      "--epochs", "2", "--batch-size", "8", "--log-every", "1", "--val-n", "6", "--eval-steps", "2",
                      "--log-gamma-every", "2", "--gamma-n", "4", "--out", run])
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"run": run, "checkpoint": os.path.join(run, "last.safetensors"), "data_dir": data_dir}


def read_log(run_dir):
    """A run's log.jsonl as a list of dicts."""
    import json

    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyConvNet().double()


def hooked(original, hook):
    """A method function that calls `original`, then `hook(n, loss, info)` with the call's number
    n (from 1); a hook that returns (loss, info) replaces the result. It keeps the signature, from
    which the training scripts generate their flags."""
    import functools

    calls = [0]

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        loss, info = original(*args, **kwargs)
        return hook(calls[0], loss, info) or (loss, info)
    return wrapped


def signal_at(call, *signals):
    """A hook that sends these signals to this process during the given call."""
    import signal as signal_module

    def hook(n, loss, info):
        if n == call:
            for sig in signals or (signal_module.SIGTERM,):
                os.kill(os.getpid(), sig)
    return hook


def crash_at(call):
    """A hook that raises RuntimeError (a crash, or kill -9 as far as the disk can tell) at the given call."""
    def hook(n, loss, info):
        if n == call:
            raise RuntimeError("simulated crash")
    return hook


def nan_from(call):
    """A hook that makes the loss NaN from the given call on."""
    def hook(n, loss, info):
        return (loss * float("nan"), info) if n >= call else None
    return hook


def _gloo_process(rank, world, port, worker, args):
    """One process of `spawn_gloo`: join the group, run `worker(rank, world, *args)`, then leave.

    The exit is `os._exit(0)`, after a barrier and destroy_process_group, not the interpreter's
    shutdown, because of a race in torch's gloo backend (pytorch/pytorch#190489, open; seen here
    as SIGABRT with "terminate called without an active exception" in 1 run of 5): destroy_process_group
    does not join gloo's worker threads, and a worker can drop the last reference to a finished
    collective's tensor after the main thread has begun finalising Python; freeing that tensor's
    Python object then takes the GIL in a finalising interpreter, which ends the thread through a
    noexcept destructor: std::terminate. (Core dump: ProcessGroupGloo::runLoop →
    ~AsyncAllreduceWork → TensorImpl::decref_pyobject → take_gil → PyThread_exit_thread.) A
    failing worker raises as usual, and mp.spawn reports it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(worker, *args, world=2):
    """Run `worker(rank, world, *args)` in `world` CPU processes joined in a gloo group (a free
    local port), each leaving as `_gloo_process` says."""
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_process, args=(world, port, worker, args), nprocs=world)
