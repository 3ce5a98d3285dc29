"""experiments/skiptuning/report.py: a fabricated 3 rho x 2 NFE multirun folder -> parsed values and best-rho marks."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from conftest import REPO

spec = importlib.util.spec_from_file_location("report", REPO / "experiments" / "skiptuning" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

FID = {(0.8, 10): 40.0, (0.9, 10): 30.0, (1.0, 10): 50.0, (0.8, 20): 35.0, (0.9, 20): 25.0, (1.0, 20): 20.0}


@pytest.fixture
def sweep(tmp_path):
    for job, ((rho, nfe), fid) in enumerate(FID.items()):
        run = tmp_path / str(job)
        (run / ".hydra").mkdir(parents=True)
        acc = {"_target_": "hiresrun.accelerators.skiptuning.SkipTuning", "mode": "constant", "rho": rho,
               "time_schedule": "none"}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"accelerator": acc}))
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"accelerator.rho={rho}",
                                                                       f"sampler.num_steps={nfe}"]))
        metrics = {"fid": fid, "fd_digits": fid * 2, "fid_floor": 12.5, "kid": fid / 1e4, "kid_std": 0.001,
                   "digit_acc": rho / 2, "num_samples": 8, "resolution": 32, "nfe_per_image": float(nfe),
                   "method": "none", "sampler": "ddim", "accelerator": "skiptuning"}
        (run / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def test_runs_are_parsed_with_rho_nfe_and_overrides(sweep):
    runs = report.load_runs([sweep])
    assert {(r["rho"], r["nfe"]): r["fid"] for r in runs} == FID
    assert {r["setting"] for r in runs} == {"none 32px ddim constant"}
    assert runs[0]["overrides"] == ["accelerator.rho=0.8", "sampler.num_steps=10"]
    assert runs[0]["digit_acc"] == 0.4 and runs[0]["kid"] == pytest.approx(4e-3)


def test_best_rho_per_nfe_is_marked_and_gain_is_against_rho_one(sweep):
    runs = report.load_runs([sweep])
    assert report.best_rho(runs) == {10: 0.9, 20: 1.0}
    rows = {line.split(" | ")[0]: line for line in report.markdown_table(runs).splitlines()}
    assert "| 0.9 | **30.0 / 3.0 / 0.450 / 60.0** | 25.0 / 2.5 / 0.450 / 50.0 |" in rows.values()
    assert "| 1 | 50.0 / 5.0 / 0.500 / 100.0 | **20.0 / 2.0 / 0.500 / 40.0** |" in rows.values()
    assert rows["| vs rho=1"] == "| vs rho=1 | best rho 0.9: -40.0% fid | best rho 1: +0.0% fid |"
    assert rows["| fid_floor"] == "| fid_floor | 12.5 | 12.5 |"


def test_digit_only_runs_are_ranked_by_fd_digits(sweep):
    runs = report.load_runs([sweep])
    for r in runs:
        r["fid"] = r["kid"] = r["fid_floor"] = None
        r["fd_digits"] = 10.0 if r["rho"] == 0.8 else 20.0
    assert report.best_rho(runs) == {10: 0.8, 20: 0.8}
    assert "| 0.8 | **– / – / 0.400 / 10.0** |" in report.markdown_table(runs)


def test_linear_and_time_schedules_are_their_own_settings():
    acc = {"_target_": "x.SkipTuning", "mode": "linear", "rho_bottom": 0.6, "rho_top": 1.0,
           "time_schedule": "increasing"}
    assert report.describe(acc) == (0.6, "linear to 1.0, increasing in t")
    assert report.describe({"_target_": "hiresrun.accelerators.Accelerator"}) == (1.0, "constant")
