"""Config readers of run.py and the output helpers."""

from __future__ import annotations

import json

import pytest
import torch

from hiresrun.build import parse_seeds
from hiresrun.errors import UsageError
from hiresrun.outputs import grid, seed_ranges


@pytest.mark.parametrize("given,expected", [(None, [0, 1, 2, 3]), (7, [7]), ([3, 7, 11], [3, 7, 11]),
                                            ("0-3", [0, 1, 2, 3]), ("5,8-9", [5, 8, 9]), ("2", [2])])
def test_seed_forms(given, expected):
    assert parse_seeds(given, num_samples=4) == expected


@pytest.mark.parametrize("bad", ["9-3", "a-b", [1, 1], [-1], "1-2,2"])
def test_bad_seeds_are_usage_errors(bad):
    with pytest.raises(UsageError, match="sample.seeds"):
        parse_seeds(bad, num_samples=4)


def test_seed_ranges_round_trips():
    seeds = [0, 1, 2, 5, 7, 8, 20]
    assert seed_ranges(seeds) == "0-2,5,7-8,20"
    assert parse_seeds(seed_ranges(seeds), 0) == seeds


def test_grid_places_every_image():
    images = torch.stack([torch.full((1, 2, 2), i, dtype=torch.uint8) for i in range(5)])
    g = grid(images, pad=1)
    assert g.shape == (1, 2 * 3 + 1, 3 * 3 + 1)  # 3 columns, 2 rows
    assert g[0, 1, 1] == 0 and g[0, 1, 4] == 1 and g[0, 4, 4] == 4 and g[0, 4, 7] == 255


def test_every_verb_writes_one_metrics_schema_with_its_task(tiny_model_dir, tmp_path):
    """sample, merge and eval (train and calibrate in their own tests) write metrics.json through one writer: the
    verb as `task`, flat values, and `protocol` the only nested one."""
    import json

    from conftest import compose, tiny_overrides

    from hiresrun import outputs, run

    cheap = ["metrics=default", "metrics.fid=false", "metrics.kid=false", "metrics.patch_fid=false",
             f"paths.cache_dir={tmp_path / 'cache'}"]
    run.run(compose(tiny_overrides(tiny_model_dir) + ["task=sample", *cheap], tmp_path / "s"))
    run.run(compose(["task=merge", f"merge.gen={tmp_path / 's'}"], tmp_path / "m"))
    run.run(compose(["task=eval", f"eval.gen={tmp_path / 's' / 'samples'}", "data.resolution=16", *cheap],
                    tmp_path / "e"))
    for folder, task in (("s", "sample"), ("m", "merge"), ("e", "eval")):
        record = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert record["task"] == task and "swd" in record, folder
        assert [k for k, v in record.items() if isinstance(v, dict)] == ["protocol"], folder
    with pytest.raises(ValueError, match="nested: \\['stats'\\]"):
        outputs.write_metrics(tmp_path / "x", "train", {"stats": {"a": 1}})
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_one_device_sampling_without_a_trainer_equals_lightnings_test_loop(tiny_model_dir, tmp_path, monkeypatch):
    """`hiresrun sample` on one device calls the sampler directly; under Lightning's test loop (what several devices
    use, forced here) the same seeds give the same PNG bytes, records and costs."""
    from conftest import compose, in_process, tiny_overrides

    from hiresrun import run

    args = ["sample", *tiny_overrides(tiny_model_dir), "+accelerator=adaptive", "accelerator.delta=0.2",
            "sampler.num_steps=12", "sample.batch_size=2"]
    plain = in_process([*args, "hydra.run.dir=plain"], tmp_path)
    assert run.one_device(compose(tiny_overrides(tiny_model_dir))) == torch.device("cpu")
    monkeypatch.setattr(run, "one_device", lambda cfg: None)
    lightning = in_process([*args, "hydra.run.dir=lightning"], tmp_path)
    assert plain.returncode == lightning.returncode == 0, plain.stderr + lightning.stderr
    for seed in range(3):
        name = f"samples/{seed:06d}.png"
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "lightning" / name).read_bytes()
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "lightning")]
    for key in ("nfe_per_image", "unet_passes_per_image", "num_samples"):
        assert metrics[0][key] == metrics[1][key], key
    skips = [json.loads((tmp_path / d / "skip_masks.json").read_text()) for d in ("plain", "lightning")]
    assert skips[0] == skips[1]


def test_one_device_is_decided_from_the_trainer_config_and_the_launch_environment(monkeypatch):
    """One process, one device, strategy auto and a precision the sampler applies as autocast: no Trainer; anything
    else (several devices or nodes, a strategy, a launcher's WORLD_SIZE, a precision that converts weights) goes to
    Lightning."""
    from conftest import compose

    from hiresrun import run

    assert run.one_device(compose([])) == torch.device("cpu")
    assert run.one_device(compose(["trainer.devices=[0]"])) == torch.device("cpu")
    assert run.one_device(compose(["trainer.precision=bf16-mixed"])) == torch.device("cpu")
    for other in (["trainer=ddp"], ["trainer.devices=2"], ["trainer.num_nodes=2"], ["trainer.strategy=ddp"],
                  ["trainer.precision=64-true"], ["trainer.precision=bf16-true"]):
        assert run.one_device(compose(other)) is None, other
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run.one_device(compose([])) is None
