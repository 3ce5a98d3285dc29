"""SIGINT / SIGTERM during training save a checkpoint at the step they stop at and say how to resume; checkpoint
writes are atomic and a failed write is one line with nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hiresrun.checkpoint import load
from hiresrun.errors import DataError


def start_training(tmp_path: Path, model_dir: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("hiresrun")
    args = [str(exe), "train", "+method=finetune", "model=diffusers", f"model.path={model_dir}", "data.resolution=16",
            "data.batch_size=8", "trainer.max_steps=100000", "train.checkpoint_every=100000", "train.grid_every=0",
            "logger=none", "trainer.enable_progress_bar=false", "hydra.run.dir=run"]
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HIRESRUN_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"})


# SIGTERM (what SLURM sends) in the fast suite; SIGINT takes the same path and runs with the slow tests
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143),
                                          pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_saves_the_step_it_stops_at_and_says_how_to_resume(signum, code, tmp_path, tiny_model_dir):
    proc = start_training(tmp_path, tiny_model_dir)
    line = proc.stdout.readline()
    while line and "trainable parameters" not in line:
        line = proc.stdout.readline()
    time.sleep(1.5)  # some steps (a step takes a few hundredths of a second)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    said = [x for x in err.splitlines() if x.startswith("hiresrun:")]
    assert len(said) == 1 and f"interrupted by {signal.Signals(signum).name}" in said[0]
    assert f"ckpt_path={tmp_path / 'run'}" in said[0]
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    step = int(said[0].split("after step ")[1].split(":")[0])
    assert ckpt["global_step"] == step > 0
    assert not list((tmp_path / "run" / "checkpoints").glob(".*partial"))


def test_a_failed_checkpoint_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from hiresrun.lit import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)

    def full_disk(self, checkpoint, p, storage_options=None):
        Path(p).write_bytes(b"half")  # what a full disk leaves: a truncated file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    with pytest.raises(DataError, match=f"could not write checkpoint {path}: No space left on device"):
        io.save_checkpoint({"global_step": 2, "state_dict": {}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert load(path)["global_step"] == 1


@pytest.mark.slow  # 20 s of subprocesses; the fast suite keeps the signal-resume test above
def test_sigterm_then_a_slurm_requeue_resumes_bit_exactly_in_the_same_folder_and_logger_run(tmp_path, tiny_model_dir):
    """What SLURM does to a preempted job: SIGTERM, then the same command again with SLURM_RESTART_COUNT=1."""
    from conftest import in_process

    exe = Path(sys.executable).with_name("hiresrun")
    args = ["train", "+method=finetune", "model=diffusers", f"model.path={tiny_model_dir}",
            "data.resolution=16", "data.batch_size=8", "trainer.max_steps=200", "train.checkpoint_every=1000",
            "train.grid_every=0", "logger=csv", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "HIRESRUN_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process (OMP_NUM_THREADS=1): the same arithmetic, bit for bit
    try:
        whole = in_process([*args, "hydra.run.dir=whole"], tmp_path)  # the reference needs no process of its own
        assert whole.returncode == 0, whole.stderr[-2000:]
        proc = subprocess.Popen([str(exe), *args, "hydra.run.dir=job"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()
        while line and "trainable parameters" not in line:
            line = proc.stdout.readline()
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-2000:]
        cut = load(tmp_path / "job" / "checkpoints" / "last.ckpt")["global_step"]
        assert 0 < cut < 200
        logger_before = (tmp_path / "job" / "logger.json").read_text()
        os.environ["SLURM_RESTART_COUNT"] = "1"  # the requeued job, run here: what it reads is its environment
        again = in_process([*args, "hydra.run.dir=job"], tmp_path)
    finally:
        os.environ.pop("SLURM_RESTART_COUNT", None)
        torch.set_num_threads(threads)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "requeued job (SLURM_RESTART_COUNT=1): resuming" in again.stdout
    a, b = (load(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("whole", "job"))
    assert a["global_step"] == b["global_step"] == 200
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert (tmp_path / "job" / "logger.json").read_text() == logger_before  # the same logger run continues
    assert sorted(p.name for p in (tmp_path / "job").rglob("version_*")) == ["version_0"]
