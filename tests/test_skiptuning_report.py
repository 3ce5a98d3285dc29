"""experiments/skiptuning/report.py: a fabricated 3 rho x 2 NFE multirun folder -> parsed values and best-rho marks;
the README's tables are the rendering of the committed results.json."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

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


# -- the README's tables ---------------------------------------------------------------------------------
STUDY = REPO / "experiments" / "skiptuning"


def blocks(text: str) -> dict[str, str]:
    """marker name -> the text between `<!-- table:name -->` and `<!-- /table:name -->`."""
    found = re.findall(r"<!-- table:([\w-]+) -->\n(.*?)\n<!-- /table:\1 -->", text, flags=re.S)
    return dict(found)


def test_readme_tables_are_what_results_json_renders():
    """Every results table of experiments/skiptuning/README.md is the report script's rendering of results.json."""
    runs = json.loads((STUDY / "results.json").read_text())
    rendered, committed = report.readme_tables(runs), blocks((STUDY / "README.md").read_text())
    assert set(committed) == set(rendered)
    for name, table in rendered.items():
        assert committed[name] == table, name


def test_readme_rendering_follows_the_numbers(tmp_path):
    """A changed number changes the table, bold follows the best FID, and write_block puts it in place."""
    runs = json.loads((STUDY / "results.json").read_text())
    sc = [r for r in runs if r["setting"] == report.SC32 and r["num_samples"] == 1000]
    for r in sc:
        r["fid"] = {0.9: 50.0, 0.95: 60.0, 1.0: 70.0}[r["rho"]]
    table = report.readme_tables(runs)["n1000"]
    assert "| 0.9 | 128.2 / 132.9 / 0.174 / 60.6 | **50.0 / 96.0 / 0.283 / 89.1** |" in table
    assert "| 1.0 | **65.3 / 49.0 / 0.313 / 28.7** | 70.0 / 65.3 / 0.430 / 46.2 |" in table
    assert "| 0.98 | 75.7 / 61.1 / 0.296 / 32.2 | – |" in table
    readme = tmp_path / "README.md"
    readme.write_text((STUDY / "README.md").read_text())
    report.write_readme(runs, readme)
    assert blocks(readme.read_text())["n1000"] == table
    assert blocks(readme.read_text())["grid32"] == blocks((STUDY / "README.md").read_text())["grid32"]


def test_time_schedule_and_paper_tables():
    runs = json.loads((STUDY / "results.json").read_text())
    tables = report.readme_tables(runs)
    assert tables["time16"].splitlines()[2:] == [
        "| rho = 1 (no tuning) | 0.327 | **26.8** |", "| none (rho = 0.8 at every t) | 0.053 | 116.6 |",
        "| increasing (0.8 at t = 0, 1.0 at t = T) | 0.247 | 36.9 |",
        "| decreasing (1.0 at t = 0, 0.8 at t = T) | 0.097 | 86.4 |"]
    assert "| ours: tiny-mnist 16 px, DDIM | 10 | best rho < 1 = 0.99 | FID 72.7 -> 76.9 | +5.8 % |" in tables["paper"]
    assert "| 0.8 (paper-like) | fd_digits 26.8 -> 116.6 | +335 % |" in tables["paper"]
    assert report.change(1.0, 2.0) == "-50.0 %" and report.change(5.0, 1.0) == "+400 %"


def test_missing_sweep_is_an_error_not_a_stale_table():
    runs = [r for r in json.loads((STUDY / "results.json").read_text()) if r["num_samples"] != 1000]
    with pytest.raises(KeyError, match="n = 1000"):
        report.readme_tables(runs)


def test_same_setting_at_another_n_is_its_own_group_and_plot(sweep, tmp_path):
    other = tmp_path / "n1000" / sweep.name
    shutil.copytree(sweep, other)
    for m in other.glob("*/metrics.json"):
        m.write_text(json.dumps({**json.loads(m.read_text()), "num_samples": 1000}))
    runs = report.load_runs([sweep, other])
    assert {r["run"].rsplit("/", 1)[0] for r in runs} == {sweep.name, f"n1000/{sweep.name}"}
    assert list(report.by_setting(runs)) == [("none 32px ddim constant", 8), ("none 32px ddim constant", 1000)]
    assert report.plot_name("none 32px ddim constant", 8, 8) == "vs_rho_none_32px_ddim_constant.png"
    assert report.plot_name("none 32px ddim constant", 1000, 8) == "vs_rho_none_32px_ddim_constant_n1000.png"
