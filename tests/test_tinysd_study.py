"""experiments/tinysd/run.py end to end at n = 2 (slow): every study runs its arms from the conf/experiment/tinysd
presets, writes results.json and rewrites its README tables (into a copy, --record-dir), and resumes: a second
call reuses every arm."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "tinysd" / "run.py"


@pytest.mark.slow
@pytest.mark.parametrize("study", ["guidance", "selfcascade", "adaptive", "unet"])
def test_study_runs_at_n_2_and_a_rerun_reuses_every_arm(study, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    shutil.copy(REPO / "experiments" / "tinysd" / "README.md", record / "README.md")
    cmd = [sys.executable, str(SCRIPT), study, "--n", "2", "--steps", "1", "--out", str(tmp_path / "runs"),
           "--record-dir", str(record)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((record / "results.json").read_text())[study]
    assert results and "not run yet" not in (record / "README.md").read_text().split(f"table:{study} -->")[1] \
        .split(f"/table:{study}")[0]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "$ hiresrun" not in again.stdout  # every arm reused, nothing sampled again
