"""Training: exact resume, pretrain export in diffusers format, methods that train nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, tiny_overrides

from hiresrun import run
from hiresrun.errors import UsageError
from hiresrun.models import load_model


def train_cfg(model_dir, run_dir, steps, *extra):
    return compose(tiny_overrides(model_dir) + ["task=train", "method=finetune", f"trainer.max_steps={steps}",
                                               "data.batch_size=8", "train.checkpoint_every=3",
                                               "train.grid_every=0", "train.ema_decay=0.9", *extra], run_dir)


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    run.run(train_cfg(tiny_model_dir, tmp_path / "train" / "a" / "whole", 6))
    run.run(train_cfg(tiny_model_dir, tmp_path / "train" / "b" / "first", 3))
    run.run(train_cfg(tiny_model_dir, tmp_path / "train" / "c" / "rest", 6, f"ckpt_path={tmp_path}/train/b/first"))
    whole = torch.load(tmp_path / "train/a/whole/checkpoints/last.ckpt", weights_only=True)
    rest = torch.load(tmp_path / "train/c/rest/checkpoints/last.ckpt", weights_only=True)
    assert whole["global_step"] == rest["global_step"] == 6
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        assert whole[key].keys() == rest[key].keys()
        for name in whole[key]:
            assert torch.equal(whole[key][name], rest[key][name]), (key, name)
    first = torch.load(tmp_path / "train/b/first/checkpoints/last.ckpt", weights_only=True)
    changed = [n for n in whole["current_model_state"]
               if not torch.equal(whole["current_model_state"][n], first["current_model_state"][n])]
    assert changed  # the resumed half did train


def test_ckpt_path_last_finds_the_newest_earlier_run(tiny_model_dir, tmp_path):
    run.run(train_cfg(tiny_model_dir, tmp_path / "train" / "d" / "one", 3))
    path = run.resolve_ckpt("last", str(tmp_path), "train")
    assert path.endswith("d/one/checkpoints/last.ckpt")
    with pytest.raises(UsageError, match="no earlier"):
        run.resolve_ckpt("last", str(tmp_path / "nothing"), "train")


def test_pretrain_exports_a_diffusers_model(tiny_model_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_model_dir) + ["task=pretrain", "trainer.max_steps=2", "data.batch_size=4",
                                                   "train.grid_every=1", "train.grid_seeds=2"], tmp_path / "p")
    run.run(cfg)
    base = load_model(str(tmp_path / "p" / "model"))
    assert base.resolution == 8 and base.weights_hash != "scratch"
    assert (tmp_path / "p" / "grids" / "step_0000002.png").is_file()
    from diffusers import DDPMPipeline

    assert DDPMPipeline.from_pretrained(tmp_path / "p" / "model").unet.config.sample_size == 8
    fresh = load_model(str(tiny_model_dir))
    trained = dict(base.unet.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.unet.named_parameters())


def test_train_refuses_a_method_that_trains_nothing(tiny_model_dir, tmp_path):
    cfg = compose(tiny_overrides(tiny_model_dir) + ["task=train"], tmp_path / "x")
    with pytest.raises(UsageError, match="trains nothing"):
        run.run(cfg)
