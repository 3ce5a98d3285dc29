"""The GPU benchmark's code path, on the CPU with tiny replicas (bench/gpu.py --smoke), and the runner bench."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_bench_smoke_gives_every_row_and_hiresrun_equals_the_pipeline(tmp_path):
    out = tmp_path / "gpu.json"
    assert script("gpu").main(["--smoke", "--out", str(out), "--replicas", str(tmp_path / "replicas")]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert not [r for r in rows if "error" in r]
    same = [r for r in rows if r["who"] == "pipeline, fp32 + autocast"]
    assert len(same) == 4 and all(r["max_abs_diff_uint8"] == 0 for r in same)  # sdxl, sd15 x batch 1, 4
    assert {r["who"] for r in rows if r["row"].startswith("VAE decode")} == {"tiled", "untiled"}
    accel = {r["who"]: r for r in rows if r["who"] in ("deepcache", "adaptive")}
    assert accel["deepcache"]["cost_per_image"] < 4  # 4 DDIM steps, partial calls at their FLOP share


@pytest.mark.slow
def test_runner_bench_quick_writes_the_same_images_inline_and_in_the_background(tmp_path):
    import sys

    out = tmp_path / "runner.json"
    argv = sys.argv
    sys.argv = ["runner.py", "--quick", "--out", str(out)]
    try:
        assert script("runner").main() == 0
    finally:
        sys.argv = argv
    record = json.loads(out.read_text())
    assert record["same_images_on_disk"] is True
    assert set(record["rows"]) == {"generate", "png", "inline", "background"}
