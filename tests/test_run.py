"""Config readers of run.py and the output helpers."""

from __future__ import annotations

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
