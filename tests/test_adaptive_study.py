"""experiments/adaptive/run.py: its README's tables are its JSON files, rendered; and a quick run goes through
`hiresrun sample`'s own per-batch code path (sampling.Sampler.generate) and stepskip, not a copy of them."""

from __future__ import annotations

import copy
import importlib.util
import json
import re

import torch
from conftest import REPO

spec = importlib.util.spec_from_file_location("adaptive_study", REPO / "experiments" / "adaptive" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

BENCH = json.loads(bench.OUT.read_text())
CAL = json.loads(bench.CALIBRATION.read_text())


def blocks(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- table:([\w-]+) -->\n(.*?)\n<!-- /table:\1 -->", text, flags=re.S))


def test_readme_tables_are_what_the_json_files_render():
    rendered, committed = bench.readme_tables(BENCH, CAL), blocks(bench.README.read_text())
    assert set(committed) == set(rendered) == {"matrix", "sweep", "calibration"}
    for name, table in rendered.items():
        assert committed[name] == table, name


def test_matrix_gap_is_unrounded_and_bold_at_the_goal():
    rows = copy.deepcopy(BENCH["results"][:1])
    rows[0]["adaptive"]["psnr_to_ref"], rows[0]["fewer_steps"]["psnr_to_ref"] = 35.004, 33.006  # 1.998 dB
    line = bench.matrix_table(rows).splitlines()[2]
    assert line.endswith("| 29: 33.01 | 38.01 | k=2: 38.01 | +2.00 dB |")  # below 2 dB: not bold, though it shows 2.00
    rows[0]["fewer_steps"]["psnr_to_ref"] = 33.0
    assert bench.matrix_table(rows).splitlines()[2].endswith("| **+2.00 dB** |")


def test_sweep_bold_where_wall_and_psnr_meet_the_goal():
    sw = copy.deepcopy(BENCH["sweep"])
    table = bench.sweep_table(sw)
    assert "| 0.1 | 2.49x / 2.31x, 36.45 | 3.33x / **3.06x, 33.43** | 4.01x / 3.51x, 30.93 |" in table
    for p in sw["adaptive"]:
        if p["delta"] == 0.1 and p["c_max"] == 4:
            p["psnr_to_ref"] = 31.9
    assert "3.33x / 3.06x, 31.90 |" in bench.sweep_table(sw)


def test_calibration_marks_chosen_delta_and_where_the_search_stopped():
    cal = copy.deepcopy(CAL)
    cal["delta"], cal["grid_exhausted"] = 0.02, True
    rows = bench.calibration_table(cal).splitlines()
    assert rows[0].endswith("| PSNR >= 30 |")
    assert rows[-3].endswith("| yes (chosen) |") and rows[-1].endswith("| 0.9665 | no |")


def test_a_batch_is_what_hiresrun_sample_makes_and_the_fixed_schedule_is_stepskip(tmp_path):
    """The study's `generate` is the runner's per-batch path: its images for seeds 0-1 equal `hiresrun sample`'s
    PNGs of the same setting byte for byte, and its every-other-step arm halves the calls."""
    from conftest import compose

    from hiresrun import run
    from hiresrun.accelerators.stepskip import StepSkip
    from hiresrun.models import load_model
    from hiresrun.outputs import load_images

    base = load_model("tiny-mnist")
    net, method = bench.build(base, 16, "none")
    make = lambda: bench.scheduler_factory("ddim")(base.scheduler_config)
    full = bench.generate(net, method, make, [0, 1], 8, None)
    skip = bench.generate(net, method, make, [0, 1], 8, StepSkip(every=2))
    run.run(compose(["data.resolution=16", "sampler.num_steps=8", "sample.num_samples=2", "logger=none",
                     "trainer.enable_progress_bar=false"], tmp_path / "s"))
    assert torch.equal(full["images"], load_images(tmp_path / "s" / "samples"))
    assert full["evals"] == 2 * 8 and skip["evals"] == 2 * 4
