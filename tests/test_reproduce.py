"""experiments/reproduce.py (`make reproduce`): every study folder is in the plan, and a wrong name is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "reproduce.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)


def test_plan_covers_every_study_folder_and_every_script():
    proc = run("--list", "--root", "/r")
    assert proc.returncode == 0, proc.stderr
    planned = {line[2:] for line in proc.stdout.splitlines() if line.startswith("# ")}
    folders = {p.parent.name for p in (REPO / "experiments").glob("*/README.md")}
    assert folders and planned == folders
    for script in REPO.glob("experiments/*/*.py"):  # every study script is called by some command
        assert f"experiments/{script.parent.name}/{script.name}" in proc.stdout, script
    assert "/tmp" not in proc.stdout.replace(str(Path(sys.executable).parent), "")  # run folders go under --root


def test_unknown_study_is_refused_in_one_line():
    proc = run("--only", "nope")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope" in proc.stderr
