"""The README's Python examples run as written, and CI runs the README's test command."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


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
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
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
    """Every figure, script and document the README points to is part of the checkout."""
    paths = (re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:png|md|json|sh))\)", _readme())
             + re.findall(r"\bdocs/[\w./-]+\.sh\b", _readme()))
    assert "docs/gpu-report/summary.md" in paths  # the pattern finds links
    missing = [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, f"README links to missing files: {missing}"
