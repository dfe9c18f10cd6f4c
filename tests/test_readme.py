"""The README's (and docs') Python examples and its CPU recipe run as written, its links resolve, it stays
a front door (at most 300 lines), and CI runs the README's test command."""
import os
import re
import subprocess
import sys

from conftest import ROOT


DOCUMENTS = ["README.md", "docs/training.md", "docs/evaluation.md", "docs/bench/README.md",
             "experiments/cpu-repro/README.md", "experiments/l2-compare/README.md", "experiments/gpu-report/README.md",
             "experiments/positive-control/README.md", "experiments/co-bench/README.md"]


def _readme(name="README.md"):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_readme_is_a_front_door():
    assert len(_readme().splitlines()) <= 300


def test_python_examples_run_as_written(tmp_path):
    """Each block runs in a checkout-like folder holding what the README assumes exists: a
    checkpoint at runs/cifar-llr/best.safetensors and CIFAR-10 (here a tiny 10-class folder)."""
    import torch

    import models
    from conftest import make_image_folder

    make_image_folder(str(tmp_path / "data" / "cifar10"), classes=10, per_class=3, size=16)
    (tmp_path / "runs" / "cifar-llr").mkdir(parents=True)
    torch.manual_seed(0)
    models.save_checkpoint(models.build_model("wrn-10-1"), str(tmp_path / "runs" / "cifar-llr" / "best.safetensors"))
    blocks = [b for name in DOCUMENTS for b in re.findall(r"```python\n(.*?)```", _readme(name), flags=re.S)]
    assert len(blocks) >= 2
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
        assert result.returncode == 0, f"README example failed:\n{block}\n{result.stderr}"


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "make test" in ci and "make test" in _readme()


def test_linked_files_exist():
    """Every figure, script and document the README and the docs point to is part of the checkout."""
    missing = []
    for name in DOCUMENTS:
        folder = os.path.dirname(os.path.join(ROOT, name))
        links = re.findall(r"\]\(([\w./-]+)\)", _readme(name))
        assert name != "README.md" or "experiments/gpu-report/README.md" in links  # the pattern finds links
        missing += [f"{name}: {link}" for link in links if not os.path.exists(os.path.normpath(os.path.join(folder, link)))]
    assert not missing, f"links to missing files: {missing}"


def test_the_cpu_recipe_runs_as_written(tmp_path):
    """The README's "try it on a CPU" commands, in a fresh folder with a tiny generated CIFAR-10 in place of
    the JPEG copy that `make data/cifar10-jpeg/train` unpacks (the make line itself is not run)."""
    import shlex

    from conftest import make_image_folder

    block = _readme().split("<!-- try-it -->", 1)[1].split("<!-- try-it:end -->", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if "python" in line]
    assert [c.split()[:2] for c in commands] == [[".venv/bin/python", "train_cifar.py"],
                                                 [".venv/bin/python", "eval.py"]]  # no activated environment assumed
    assert "make install data/cifar10-jpeg/train" in block and "data/cifar10-jpeg/train:" in open(
        os.path.join(ROOT, "Makefile")).read()
    make_image_folder(str(tmp_path / "data" / "cifar10-jpeg"), classes=10, per_class=12, size=32)
    for command in commands:
        argv = shlex.split(command)
        if argv[1] == "train_cifar.py":  # the tiny folder has 120 training images, not 50,000; 2 epochs
            for flag, value in (("--train-n", "60"), ("--val-n", "20"), ("--epochs", "2")):
                argv[argv.index(flag) + 1] = value
        result = subprocess.run([sys.executable, os.path.join(ROOT, argv[1]), *argv[2:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert os.path.isfile(tmp_path / "runs" / "try" / "best.eval.json")


def test_the_imagenet_try_line_runs_as_written(tmp_path, monkeypatch, fresh_accelerate_state):
    """The README's "try train_imagenet.py on a small ImageFolder" line, in-process, on a tiny generated
    folder (39 training images: --val-n 6 in place of 100 leaves one batch of 32)."""
    import shlex

    import train_imagenet
    from conftest import make_image_folder

    line, = [line for line in _readme().splitlines() if "train_imagenet.py --data-dir DIR" in line]
    argv = shlex.split(line.strip())
    assert argv[:2] == [".venv/bin/python", "train_imagenet.py"]
    make_image_folder(str(tmp_path / "folder"), splits=("train", "val"), classes=3, per_class=13, size=40)
    for flag, value in (("--data-dir", str(tmp_path / "folder")), ("--val-n", "6")):
        argv[argv.index(flag) + 1] = value
    monkeypatch.chdir(tmp_path)
    assert train_imagenet.main(argv[2:]) == 0
    assert os.path.isfile(tmp_path / "runs" / "try-imagenet" / "best.safetensors")
