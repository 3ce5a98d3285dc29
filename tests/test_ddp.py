"""DDP on CPU (2 processes, gloo): seeds split across ranks, rank 0 writes, images equal one process's."""

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


def test_ddp_training_runs_and_checkpoints(tiny_model_dir, tmp_path):
    proc = cli("train", "+method=finetune", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16",
               "trainer=ddp", "trainer.devices=2", "trainer.max_steps=3", "data.batch_size=4",
               "train.grid_every=2", "train.grid_seeds=3", "logger=none", "hydra.run.dir=ddp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert (tmp_path / "ddp" / "grids" / "step_0000002.png").is_file()
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["steps"] == 3
