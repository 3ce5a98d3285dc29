"""DDP on CPU (2 processes, gloo): batches dealt across ranks, each rank writes its own images and records, images
equal one process's byte for byte; a killed DDP sample resumes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

from hiresrun.outputs import load_images

pytestmark = pytest.mark.slow


def test_ddp_sampling_equals_one_process(tiny_model_dir, tmp_path):
    common = ["sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16",
              "sampler.num_steps=3", "sample.num_samples=5", "sample.batch_size=2", "logger=none"]
    one = cli(*common, "hydra.run.dir=one", cwd=tmp_path)
    two = cli(*common, "trainer=ddp", "trainer.devices=2", "hydra.run.dir=two", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert torch.equal(load_images(tmp_path / "one" / "samples"), load_images(tmp_path / "two" / "samples"))
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["num_samples"] == 5 and m2["protocol"]["world_size"] == 2 and m2["nfe_per_image"] == 3
    assert len(list((tmp_path / "two" / "samples").iterdir())) == 5
    records = [json.loads(x) for f in (tmp_path / "two" / "records").glob("*.jsonl")
               for x in f.read_text().splitlines()]
    assert sorted(r["rank"] for r in records) == [0, 0, 1]  # 3 batches: ranks 0, 1, 0 wrote them
    assert len(list((tmp_path / "two" / "records").glob("*.jsonl"))) == 2  # one file per process
    assert sorted(s for r in records for s in r["seeds"]) == [0, 1, 2, 3, 4]


def test_a_killed_ddp_sample_resumes_to_one_process_bytes(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    common = ["sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16",
              "sampler.num_steps=30", "sample.num_samples=16", "sample.batch_size=1", "logger=none",
              "trainer.enable_progress_bar=false"]
    one = cli(*common, "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    exe = Path(sys.executable).with_name("hiresrun")
    proc = subprocess.Popen([str(exe), *common, "trainer=ddp", "trainer.devices=2", "hydra.run.dir=two"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HIRESRUN_OUTPUTS": str(tmp_path / "o")})
    lines = lambda: sum(len(f.read_text().splitlines()) for f in (tmp_path / "two" / "records").glob("*.jsonl"))
    deadline = time.time() + 200
    while time.time() < deadline and (not (tmp_path / "two" / "records").is_dir() or lines() < 4):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks
    proc.wait()
    assert 4 <= lines() < 16 and not (tmp_path / "two" / "metrics.json").exists()
    again = cli(*common, "trainer=ddp", "trainer.devices=2", "hydra.run.dir=two", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    names = sorted(p.name for p in (tmp_path / "one" / "samples").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "two" / "samples").glob("*.png")) and len(names) == 16
    for n in names:
        assert (tmp_path / "one" / "samples" / n).read_bytes() == (tmp_path / "two" / "samples" / n).read_bytes()


def test_ddp_training_runs_and_checkpoints(tiny_model_dir, tmp_path):
    proc = cli("train", "+method=finetune", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16",
               "trainer=ddp", "trainer.devices=2", "trainer.max_steps=3", "data.batch_size=4",
               "train.grid_every=2", "train.grid_seeds=3", "logger=none", "hydra.run.dir=ddp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert (tmp_path / "ddp" / "grids" / "step_0000002.png").is_file()
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["steps"] == 3
