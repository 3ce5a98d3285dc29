"""Run folders a person can tell apart (hiresrun/naming.py) and `hiresrun runs` (hiresrun/runs.py): the table of the
runs under a folder with their names, numbers and status."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import hiresrun
from hiresrun import runs


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model_dir):
    """One finished sample run under an outputs root named by the defaults (no hydra.run.dir=)."""
    root = tmp_path_factory.mktemp("outputs")
    mp = pytest.MonkeyPatch()
    mp.setenv("HIRESRUN_OUTPUTS", str(root))
    try:
        run = hiresrun.sample("+method=upsample", "+accelerator=stepskip", data__resolution=32, sampler__num_steps=4,
                              sample__num_samples=2, logger="none")
    finally:
        mp.undo()
    return root, run


def test_a_run_folder_is_named_by_time_model_method_and_accelerator(outputs):
    root, run = outputs
    assert run.run_dir.parent.parent == root / "sample"
    assert re.fullmatch(r"\d{2}-\d{2}-\d{2}-\d{6}-tiny-mnist-upsample-stepskip", run.run_dir.name), run.run_dir.name


def test_runs_lists_each_run_with_its_names_numbers_and_status(outputs, tmp_path, capsys):
    root, run = outputs
    refused = tmp_path / "refused"
    shutil.copytree(run.run_dir / ".hydra", refused / ".hydra")
    (refused / "status.json").write_text(json.dumps({"status": "refused", "reason": "pagoda takes no steps"}))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run.run_dir, unfinished)
    (unfinished / "metrics.json").unlink()
    assert runs.main([str(root), str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:6] == ["when", "verb", "model", "method", "accelerator", "n"] and "NFE" in header
    by_folder = {line.split()[-1].rsplit("/", 1)[-1]: line for line in lines[1:]}
    assert set(by_folder) == {run.run_dir.name, "refused", "unfinished"}
    done = by_folder[run.run_dir.name].split()
    assert done[2:8] == ["sample", "tiny-mnist", "upsample", "stepskip", "2", f"{run.metrics['nfe_per_image']:.1f}"]
    assert "  done  " in by_folder[run.run_dir.name]
    assert "refused: pagoda takes no steps" in by_folder["refused"]
    assert "unfinished: 2 images on disk" in by_folder["unfinished"]


def test_runs_of_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(hiresrun.HiresrunError, match=r"hiresrun runs .*nowhere: no such folder"):
        runs.main([str(tmp_path / "nowhere")])
