"""Config readers of run.py and the output helpers."""

from __future__ import annotations

import pytest
import torch

from hiresrun.errors import UsageError
from hiresrun.outputs import grid, seed_ranges
from hiresrun.run import parse_seeds


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
