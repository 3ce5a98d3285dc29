"""Training: exact resume, pretrain export in diffusers format, methods that train nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose, tiny_overrides

from hiresrun import checkpoint, run
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
    path = checkpoint.resolve("last", str(tmp_path), "train")
    assert path.endswith("d/one/checkpoints/last.ckpt")
    with pytest.raises(UsageError, match="no earlier"):
        checkpoint.resolve("last", str(tmp_path / "nothing"), "train")


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


# -- reliability (issue: checkpoints that are final, seeded initialisation, NaN stops, values refused) -------------
def test_last_checkpoint_is_the_final_step_when_not_a_multiple(tiny_model_dir, tmp_path):
    run.run(train_cfg(tiny_model_dir, tmp_path / "train" / "a" / "r", 7))  # checkpoint_every=3: 3, 6, then 7
    last = torch.load(tmp_path / "train/a/r/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 7
    # and it resumes exactly: 7 + 3 more steps equals 10 steps in one go
    run.run(train_cfg(tiny_model_dir, tmp_path / "train" / "b" / "whole", 10))
    run.run(train_cfg(tiny_model_dir, tmp_path / "train" / "c" / "rest", 10, f"ckpt_path={tmp_path}/train/a/r"))
    whole = torch.load(tmp_path / "train/b/whole/checkpoints/last.ckpt", weights_only=True)
    rest = torch.load(tmp_path / "train/c/rest/checkpoints/last.ckpt", weights_only=True)
    assert all(torch.equal(whole["current_model_state"][k], rest["current_model_state"][k])
               for k in whole["current_model_state"])


def test_same_seed_same_initial_weights_for_what_a_method_adds(tiny_model_dir, tmp_path):
    """Tuned Self-Cascade's upsamplers start from `seed`: two identical commands, identical checkpoints."""
    def once(name, seed=0):
        cfg = compose(tiny_overrides(tiny_model_dir) + ["task=train", "method=selfcascade", "trainer.max_steps=1",
                                                       "data.batch_size=4", "train.grid_every=0", f"seed={seed}",
                                                       "train.ema_decay=0"], tmp_path / name)
        run.run(cfg)
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    a, b, c = once("a"), once("b"), once("c", seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_pretrain_initialisation_follows_the_seed(tiny_model_dir, tmp_path):
    def once(name):
        cfg = compose(tiny_overrides(tiny_model_dir) + ["task=pretrain", "trainer.max_steps=1", "data.batch_size=4",
                                                       "train.grid_every=0"], tmp_path / name)
        run.run(cfg)
        return load_model(str(tmp_path / name / "model")).unet.state_dict()

    a, b = once("a"), once("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_training_with_one_line(tiny_model_dir, tmp_path):
    from hiresrun.errors import DataError

    cfg = train_cfg(tiny_model_dir, tmp_path / "nan", 8, "optimizer.lr=1e12", "train.ema_decay=0")
    with pytest.raises(DataError, match=r"the loss is (nan|inf) \(loss\) at step \d+: training diverged; lower "
                                        r"optimizer.lr"):
        run.run(cfg)
    assert not (tmp_path / "nan" / "metrics.json").exists()
    for f in (tmp_path / "nan" / "checkpoints").glob("*.ckpt"):  # whatever was saved is finite
        state = torch.load(f, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), f


def test_a_missing_model_path_or_data_root_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"model.path is required with model=diffusers: pass model.path=<folder>"):
        run.run(compose(["model=diffusers"], tmp_path / "r"))
    with pytest.raises(UsageError, match=r"data.root is required with data=folder"):
        run.run(compose(["data=folder"], tmp_path / "r"))


def test_metrics_json_is_strict_json(tmp_path):
    import json

    from hiresrun.outputs import write_json

    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [float("inf")], "c": {"d": -float("inf")}, "e": 1.5})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": ["inf"], "c": {"d": "-inf"}, "e": 1.5}


def test_resume_into_the_same_folder_keeps_one_last_ckpt(tiny_model_dir, tmp_path):
    from conftest import cli

    common = ["model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none",
              "+method=finetune", "data.batch_size=4", "train.grid_every=0", "train.checkpoint_every=2",
              "trainer.enable_progress_bar=false", "hydra.run.dir=run"]
    assert cli("train", *common, "trainer.max_steps=2", cwd=tmp_path).returncode == 0
    out = cli("train", *common, "trainer.max_steps=5", "ckpt_path=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in names and "last.ckpt" in names
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5


def test_ckpt_path_last_follows_the_method_and_another_methods_checkpoint_is_refused(tiny_model_dir, tmp_path):
    from conftest import cli

    common = ["model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none",
              "data.batch_size=4", "train.grid_every=0", "trainer.max_steps=1", "trainer.enable_progress_bar=false"]
    assert cli("train", "+method=finetune", *common, cwd=tmp_path).returncode == 0
    assert cli("train", "+method=selfcascade", *common, cwd=tmp_path).returncode == 0  # the newest run
    runs = list((tmp_path / "outputs" / "train").glob("*/*"))
    finetune_run = next(p for p in runs if "finetune" in (p / ".hydra" / "config.yaml").read_text())
    cascade_run = next(p for p in runs if p != finetune_run)
    out = cli("train", "+method=finetune", *common, "trainer.max_steps=2", "ckpt_path=last", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    resumed = next(line for line in out.stdout.splitlines() if "resuming from" in line)
    assert str(finetune_run) in resumed
    refused = cli("sample", "+method=finetune", *common[:4], f"ckpt_path={cascade_run}", cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert "was trained with method SelfCascade, this run is Finetune: use the same +method=" in line


@pytest.mark.parametrize("method, stop", [(m, s) if s == 2 or m in ("finetune", "pagoda") else
                                          pytest.param(m, s, marks=pytest.mark.slow)
                                          for m in ("finetune", "selfcascade", "simple", "pagoda", "lora")
                                          for s in (3, 2)])
def test_resume_is_exact_across_two_epoch_boundaries(method, stop, tiny_model_dir, tmp_path):
    """8 images at batch 4 = 2 steps per epoch: stop at step 3 (mid-epoch 2) or at step 2 (the checkpoint written on
    epoch 1's last batch), resume to 7 (crossing the later boundaries). PaGoDA: stage=base (G and D steps alternate,
    both counted) on latents its stage=encode cached first. The epoch-end stop runs for every method; the mid-epoch
    one (the same loader state, restored from a position inside the epoch) for finetune and PaGoDA, the rest under
    `slow`."""
    from PIL import Image

    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / f"{i}.png")

    def cfg(name, steps, *extra):
        return compose(tiny_overrides(tiny_model_dir) + [
            "task=train", f"method={method}", f"trainer.max_steps={steps}", "data=folder", f"data.root={tmp_path}",
            "data.channels=1", "data.resolution=16", "data.batch_size=4", f"train.checkpoint_every={stop}",
            "train.grid_every=0", "train.ema_decay=0.9", *pagoda, *extra], tmp_path / "train" / name)

    pagoda = []
    if method == "pagoda":
        pagoda = ["method.inv_steps=3", "method.rec_loss=l2_pyramid", f"paths.cache_dir={tmp_path / 'cache'}"]
        run.run(cfg("encode", 1, "method.stage=encode"))
        pagoda.append("method.stage=base")
    run.run(cfg("whole", 7))
    run.run(cfg("first", stop))
    run.run(cfg("rest", 7, f"ckpt_path={tmp_path}/train/first"))
    whole = torch.load(tmp_path / "train/whole/checkpoints/last.ckpt", weights_only=True)
    rest = torch.load(tmp_path / "train/rest/checkpoints/last.ckpt", weights_only=True)
    assert whole["global_step"] == rest["global_step"] == 7 and whole["epoch"] == rest["epoch"]
    def same(a, b) -> bool:  # tensors, or the nested dicts a method keeps beside them (simple's schedule)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    for key in ("state_dict", "current_model_state"):
        for name in whole[key]:
            assert same(whole[key][name], rest[key][name]), (key, name)


def test_the_shuffle_is_a_function_of_seed_and_epoch():
    from hiresrun.data import EpochShuffle

    a, b = EpochShuffle(10, seed=3), EpochShuffle(10, seed=3)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first and sorted(first) == list(range(10))
    b.set_epoch(0)
    assert list(b) == first


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_a_resume_in_the_same_folder_continues_the_logger_run_and_totals_the_time(logger, tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "run"
    every = "trainer.log_every_n_steps=1"
    run.run(train_cfg(tiny_model_dir, folder, 3, f"logger={logger}", every))
    first = json.loads((folder / "metrics.json").read_text())
    record = json.loads((folder / "logger.json").read_text())
    run.run(train_cfg(tiny_model_dir, folder, 6, f"logger={logger}", every, f"ckpt_path={folder}"))
    second = json.loads((folder / "metrics.json").read_text())
    assert json.loads((folder / "logger.json").read_text()) == record  # the same wandb id / CSV version
    assert second["steps"] == 6 and second["train_seconds"] > first["train_seconds"]
    assert first["task"] == second["task"] == "train"
    if logger == "csv":
        assert [p.name for p in (folder / "csv").iterdir()] == [f"version_{record['version']}"]
        rows = (folder / "csv" / f"version_{record['version']}" / "metrics.csv").read_text().splitlines()
        steps = {int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:] if r}
        assert {0, 1, 2}.issubset(steps) and {3, 4, 5}.issubset(steps)  # rows of both parts, one file
    else:
        assert len(list((folder / "wandb").glob(f"offline-run-*-{record['version']}"))) >= 1


def test_training_says_its_step_loss_pace_and_eta_every_five_percent(capsys):
    """Without a terminal, rank 0 prints a line every 5% of the steps left (a resumed run counts from its step):
    step of max_steps, the last logged loss, the pace and the time left; other ranks print nothing."""
    from types import SimpleNamespace

    from hiresrun.lit import TrainProgress

    now = [0.0]
    trainer = SimpleNamespace(max_steps=1000, global_step=200, is_global_zero=True,
                              callback_metrics={"train/loss": torch.tensor(0.0612)})
    progress = TrainProgress(bar=False, clock=lambda: now[0])
    progress.on_train_start(trainer, None)  # resumed at 200: 800 steps to go, a line every 40
    for step in range(201, 1001):
        now[0] += 0.25
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None, None, None, 0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20
    assert lines[0] == "hiresrun: training step 240/1,000, loss 0.0612, 4 steps/s, ETA 3 min 10 s"
    assert lines[-1] == "hiresrun: training step 1,000/1,000, loss 0.0612, 4 steps/s, ETA 0 s"
    other = SimpleNamespace(max_steps=1000, global_step=0, is_global_zero=False, callback_metrics={})
    quiet = TrainProgress(bar=False, clock=lambda: now[0])
    quiet.on_train_start(other, None)
    other.global_step = 1000
    quiet.on_train_batch_end(other, None, None, None, 0)
    assert capsys.readouterr().out == ""
