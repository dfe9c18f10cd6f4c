"""train_imagenet.py on a tiny generated ImageFolder: LLR and ADV end to end with gradient
accumulation, exact resume through DataLoader workers, 2 processes, errors; eval.py on ImageNet."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_script
import methods
import train_imagenet
from conftest import ROOT, hooked, make_image_folder, read_log, signal_at

# 3 classes x 8 images, 32 px crops, global batch 8 = 2 micro-batches of 4: 3 steps per epoch
TINY = ["--arch", "wrn-10-1", "--image-size", "32", "--batch-size", "8", "--per-device-batch", "4", "--workers", "0",
        "--log-every", "1", "--val-n", "6", "--eval-steps", "2", "--gamma-n", "4", "--lr-warmup", "0.5",
        "--eps-warmup", "0.5"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagenet")), splits=("train", "val"), classes=3,
                             per_class=10, size=40)


@pytest.mark.parametrize("method, flags", [("llr", []), ("adv", ["--adv-steps", "2"]), ("plain", [])])
def test_methods_train_and_evaluate(method, flags, imagenet, tmp_path):
    run = str(tmp_path / method)
    train_imagenet.main(["--data-dir", imagenet, "--method", method, "--eps", "4", "--epochs", "2", "--out", run,
                         "--log-gamma-every", "3", *TINY, *flags])
    log = read_log(run)
    train = [e for e in log if e["kind"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 7))  # optimiser steps, each of 2 micro-batches
    assert train[-1]["eps"] == pytest.approx(4 / 255)
    assert train[0]["lr"] == pytest.approx(0.1 * 8 / 256 / 1.5)  # lr per 256 x batch, warm-up over 1.5 steps
    assert [e["step"] for e in log if e["kind"] == "eval"] == [3, 6]
    assert [e["step"] for e in log if e["kind"] == "gamma"] == [3, 6]
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["args"]["llr_steps"] == 2 and config["args"]["lr"] == pytest.approx(0.1 * 8 / 256)
    report = eval_script.main([os.path.join(run, "best.safetensors"), "--eps", "4/255", "--data-dir", imagenet,
                               "--n", "6", "--steps", "2", "--restarts", "1", "--num-targets", "1", "--no-sanity",
                               "--attacks", "untargeted,multi-targeted,random-targeted", "--out", str(tmp_path / "e.json")])
    assert report["dataset"] == "imagenet" and report["n_images"] == 6
    assert report["results"]["multi-targeted"]["options"]["num_targets"] == 1


def test_llr_steps_follow_the_paper_by_epsilon():
    assert train_imagenet.get_args(["--data-dir", "x", "--eps", "4"]).llr_steps == 2
    assert train_imagenet.get_args(["--data-dir", "x", "--eps", "16"]).llr_steps == 10
    assert train_imagenet.get_args(["--data-dir", "x", "--eps", "16", "--llr-steps", "3"]).llr_steps == 3


def test_resume_continues_exactly_with_workers_and_accumulation(imagenet, tmp_path, monkeypatch, capsys):
    common = ["--data-dir", imagenet, "--epochs", "3", *TINY, "--workers", "2"]
    whole = str(tmp_path / "whole")
    train_imagenet.main([*common, "--out", whole])
    parts = str(tmp_path / "parts")
    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "llr", hooked(methods.METHODS["llr"], signal_at(9)))  # step 5's first micro-batch
        train_imagenet.main([*common, "--out", parts])
    assert "stopped at step 5" in capsys.readouterr().out
    train_imagenet.main(["--resume", parts])
    a, b = load_file(os.path.join(whole, "last.safetensors")), load_file(os.path.join(parts, "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message", [
    (["--eps", "300"], "more than 64/255"),
    (["--per-device-batch", "3"], "not a multiple of --per-device-batch"),
])
def test_bad_input_gives_one_line_error(flags, message, imagenet, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(["--data-dir", imagenet, "--out", str(tmp_path / "r"), *TINY, *flags])
    assert str(e.value.code).startswith("train_imagenet.py: error:") and message in str(e.value.code)


def test_missing_imagenet_gives_one_line_and_nonzero_exit(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--data-dir",
                             str(tmp_path / "none"), "--out", str(tmp_path / "r"), *TINY],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert result.returncode != 0 and len(lines) == 1 and "no folder" in lines[0], result.stderr


def test_a_flat_val_folder_is_refused_at_start_up(tmp_path):
    """ImageNet distributes its validation images in one folder; eval.py reads val/<wnid>/*.JPEG:
    said in one line before training, not found after it."""
    import shutil

    data_dir = make_image_folder(str(tmp_path / "data"), splits=("train",), classes=3, per_class=10, size=40)
    os.makedirs(os.path.join(data_dir, "val"))
    shutil.copy(os.path.join(data_dir, "train", "class0", "0.jpg"), os.path.join(data_dir, "val", "0.jpg"))
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_imagenet.main(["--data-dir", data_dir, "--out", run, "--epochs", "1", *TINY])
    text = str(e.value.code)
    assert text.startswith("train_imagenet.py: error:") and "val holds no class folders" in text
    assert "\n" not in text and not os.path.exists(run)


def test_two_process_run(imagenet, tmp_path):
    run = str(tmp_path / "ddp")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            os.path.join(ROOT, "train_imagenet.py"), "--data-dir", imagenet, "--epochs", "1", "--out", run, *TINY,
            "--per-device-batch", "2"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(os.path.join(run, "config.json")))["processes"] == 2
    assert [e["step"] for e in read_log(run) if e["kind"] == "train"] == [1, 2, 3]


def test_sigterm_to_the_whole_process_group_stops_with_a_checkpoint(imagenet, tmp_path):
    """As a cluster scheduler does before pre-emption: SIGTERM to the training process and its
    DataLoader workers alike. The run finishes its step, checkpoints and exits with status 143
    (128 + SIGTERM), so that `train && eval` does not evaluate a half-trained model."""
    import time

    run = str(tmp_path / "preempted")
    argv = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--data-dir", imagenet, "--epochs", "200",
            "--out", run, "--method", "plain", *TINY, "--workers", "2"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if os.path.exists(os.path.join(run, "log.jsonl")) and len(read_log(run)) >= 3:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, stderr[-2000:]
    assert "stopped at step" in stdout and f"continue with --resume {run}" in stdout
    state = torch.load(os.path.join(run, "state.pt"), weights_only=True)
    assert 0 < state["step"] < 600
