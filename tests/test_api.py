"""The Python API (hiresrun/api.py): the verbs as functions, from a fresh interpreter and twice in one process, with the
command line's checks and one-line errors; `load` gives the sampler without a run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import hiresrun
from hiresrun import api


@pytest.mark.slow  # two fresh interpreters (12 s); the in-process API tests below stay in the fast suite
def test_a_fresh_python_samples_twice_and_equals_the_command_line(tmp_path, tiny_model_dir):
    """From a plain `python -c`: two runs in one process (keyword and string forms), each returning its folder, metrics
    and images; the images equal the command line's for the same overrides, byte for byte."""
    fast = tiny_overrides(tiny_model_dir)
    script = f"""
import json, hiresrun
a = hiresrun.sample(*{fast!r}, "+method=upsample", "data.resolution=32", run_dir="a")
b = hiresrun.sample(*{fast!r}, method="upsample", data__resolution=32, sample__seeds=[0, 2], run_dir="b")
print(json.dumps({{"a": [str(a.run_dir), a.metrics["nfe_per_image"], list(a.images.shape), a.seeds],
                  "b": [str(b.run_dir), b.metrics["num_samples"], list(b.images.shape), b.seeds]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["a"] == [str(tmp_path / "a"), 2.0, [3, 1, 32, 32], [0, 1, 2]]
    assert got["b"] == [str(tmp_path / "b"), 2, [2, 1, 32, 32], [0, 2]]
    exe = Path(sys.executable).with_name("hiresrun")
    line = subprocess.run([str(exe), "sample", *fast, "+method=upsample", "data.resolution=32", "hydra.run.dir=c"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert line.returncode == 0, line.stderr
    for seed in (0, 1, 2):
        name = f"samples/{seed:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    assert (tmp_path / "b" / "samples/000002.png").read_bytes() == (tmp_path / "c" / "samples/000002.png").read_bytes()
    assert (tmp_path / "a" / ".hydra" / "config.yaml").is_file()  # Hydra's record, as a command-line run has


def test_errors_are_one_exception_whose_message_is_the_command_lines_line(tmp_path, tiny_model_dir):
    """An unknown key, an option not in its group and a bad value raise HiresrunError with the line the command line
    prints after `hiresrun: error: `; a refused run leaves no folder behind."""
    exe = Path(sys.executable).with_name("hiresrun")
    for bad in (["sampler.num_step=3"], ["+method=selfcascades"], ["sample.batch_size=0"]):
        with pytest.raises(hiresrun.HiresrunError) as caught:
            hiresrun.sample(*tiny_overrides(tiny_model_dir), *bad, run_dir=str(tmp_path / "refused"))
        line = subprocess.run([str(exe), "sample", *tiny_overrides(tiny_model_dir), *bad,
                               f"hydra.run.dir={tmp_path / 'refused'}"], capture_output=True, text=True, timeout=300)
        assert line.returncode == caught.value.exit_code == 2
        assert line.stderr.strip().splitlines()[-1] == f"hiresrun: error: {caught.value}"
        assert not (tmp_path / "refused").exists()


def test_keyword_values_read_back_as_hydra_reads_them():
    """`a__b=value` is `a.b=<value in Hydra's grammar>`: None, bools, numbers, lists, and strings that need quoting."""
    assert api.overrides([], {"sampler__num_steps": 20, "method": "selfcascade"}) == \
        ["sampler.num_steps=20", "method=selfcascade"]
    assert api.overrides(["+accelerator=adaptive"], {}) == ["accelerator=adaptive"]
    assert api.overrides(["gen=x"], {}, verb="eval") == ["eval.gen=x"]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in (None, True, False, 3, 0.25, 1e-5, [1, 2], ["a b", None], "plain", "a photo, of a cat",
                  "it's", "Ünïcode path/ø", "x=y", "[not a list]", "C:\\dir"):
        parsed = parser.parse_overrides([f"k={api.hydra_value(value)}"])[0].value()
        assert parsed == (list(value) if isinstance(value, list) else value), value
    with pytest.raises(hiresrun.HiresrunError):
        api.overrides(["sampler.num_steps"], {})


def test_load_samples_the_run_images_without_writing(tmp_path, tiny_model_dir, monkeypatch):
    """`hiresrun.load(...)` builds the sampler `hiresrun sample` runs: the same images for the same seeds, bit for bit,
    and nothing is written; its refusals are the command line's."""
    monkeypatch.chdir(tmp_path)
    run = hiresrun.sample(*tiny_overrides(tiny_model_dir), "+method=upsample", "data.resolution=32", run_dir="run")
    before = sorted(p.name for p in tmp_path.iterdir())
    sampler = hiresrun.load(*tiny_overrides(tiny_model_dir), "+method=upsample", "data.resolution=32")
    assert isinstance(sampler, hiresrun.Sampler)
    assert torch.equal(sampler([0, 1, 2]), run.images)
    out = sampler.generate([1])
    assert torch.equal(out["images"][0], run.images[1]) and int(out["evals"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(hiresrun.HiresrunError, match="sampler.num_steps=0"):
        hiresrun.load(*tiny_overrides(tiny_model_dir), "sampler.num_steps=0")


def test_importing_the_package_imports_no_torch():
    """`import hiresrun` and composing a config stay light: the command line's --help and refusals depend on it."""
    script = ("import sys, hiresrun; cfg = hiresrun.config('sample', method='selfcascade'); "
              "print(cfg.method._target_, 'torch' in sys.modules, 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hiresrun.methods.selfcascade.SelfCascade", "False", "False"]


def test_the_api_leaves_no_hydra_state_behind(tiny_model_dir, tmp_path):
    """After `load` and a run, Hydra's global run config is as it was: a later config composed outside Hydra names
    its own options, not the API call's."""
    from hydra.core.hydra_config import HydraConfig

    from hiresrun.build import choice

    before = HydraConfig.initialized()
    hiresrun.load(*tiny_overrides(tiny_model_dir), "+method=upsample", "data.resolution=32")
    hiresrun.sample(*tiny_overrides(tiny_model_dir), "+method=upsample", "data.resolution=32",
                    run_dir=str(tmp_path / "r"))
    assert HydraConfig.initialized() == before
    from conftest import compose

    assert choice(compose(["method=finetune"]), "method") == "finetune"


def test_several_processes_are_refused_before_any_work(tmp_path):
    """DDP re-runs the command that started the process, which a notebook does not have: one line, nothing written."""
    for given in (["trainer=ddp"], ["trainer.devices=2"], ["trainer.num_nodes=2"]):
        with pytest.raises(hiresrun.HiresrunError, match="starts several processes.*run it from the command line"):
            hiresrun.sample(*given, run_dir=str(tmp_path / "r"))
        assert not (tmp_path / "r").exists()
    from hiresrun import run

    assert not run.several_processes(hiresrun.config("sample").trainer)
    assert not run.several_processes(hiresrun.config("sample", "trainer.devices=[1]").trainer)
