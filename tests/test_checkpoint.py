"""Checkpoints cannot run code: every path that reads a .ckpt refuses a hostile pickle before it executes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import cli, compose, tiny_overrides

from hiresrun import checkpoint, run
from hiresrun.errors import UsageError
from hiresrun.methods.pagoda.grow import generator_state


class Payload:
    """Unpickling this calls os.system: the classic hostile checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(tmp_path, name="hostile.ckpt"):
    marker = tmp_path / f"{name}.pwned"
    path = tmp_path / name
    torch.save({"state_dict": {"net.x": torch.zeros(1)}, "payload": Payload(marker)}, path)
    return path, marker


def test_the_payload_really_runs_under_a_plain_unpickle(tmp_path):
    path, marker = hostile(tmp_path)  # the fixture is live: without weights_only the command runs
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_refuses_a_hostile_checkpoint_and_runs_nothing(tmp_path):
    path, marker = hostile(tmp_path)
    with pytest.raises(UsageError, match="refused to load") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value) and "system" in str(e.value)
    assert not marker.exists()


def test_load_names_a_broken_or_foreign_file(tmp_path):
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "cut.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bare.ckpt")
    with pytest.raises(UsageError, match="no state_dict"):
        checkpoint.load(tmp_path / "bare.ckpt")


def test_sample_with_a_hostile_checkpoint_exits_2_with_one_line(tiny_model_dir, tmp_path):
    path, marker = hostile(tmp_path)
    out = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16",
              "+method=finetune", f"ckpt_path={path}", "logger=none", "sample.num_samples=1", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "refused to load" in lines[0], out.stderr
    assert not marker.exists()
    assert not list((tmp_path / "outputs").glob("sample/*/*/metrics.json"))


def test_train_resume_from_a_hostile_checkpoint_runs_nothing(tiny_model_dir, tmp_path):
    path, marker = hostile(tmp_path)
    cfg = compose(tiny_overrides(tiny_model_dir) + ["task=train", "method=finetune", "trainer.max_steps=2",
                                                    "data.batch_size=4", "train.grid_every=0", f"ckpt_path={path}"],
                  tmp_path / "train" / "r")
    with pytest.raises(UsageError, match="refused to load"):
        run.run(cfg)
    assert not marker.exists()


def test_pagoda_previous_stage_from_a_hostile_checkpoint_runs_nothing(tmp_path):
    path, marker = hostile(tmp_path)
    with pytest.raises(UsageError, match="method.previous=.*refused to load"):
        generator_state(str(path), "0" * 64)
    assert not marker.exists()
