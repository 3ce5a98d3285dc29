"""`hiresrun report`: a hand-made sweep (ok, refused, failed and missing jobs) -> exact rows, Pareto set, PNGs."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import cli
from test_cli import one_error_line

from hiresrun import report

# 2 methods x 3 step counts; job number = position in Hydra's product order
SWEEP = ["method=none,upsample", "sampler.num_steps=10,20,40", "metrics=default"]
OK = {  # job: (method, steps, fid, sec_per_image, digit_acc)
    0: ("none", 10, 50.0, 0.1, 0.5),
    1: ("none", 20, 55.0, 0.2, 0.6),
    3: ("upsample", 10, 30.0, 0.3, 0.4),
}
LOG = """[2026-11-30 05:37:23,176][hiresrun.traceback][ERROR] - failed
Traceback (most recent call last):
  File "run.py", line 1, in sample
    raise ValueError("root cause here")
ValueError: root cause here

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "instantiate.py", line 9, in _call_target
hydra.errors.InstantiationException: Error in call to target 'hiresrun.models.load_model':
ValueError('root cause here')
full_key: model
"""


def job(sweep, num: int, method: str, steps: int):
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    config = {"task": "sample", "method": {"_target_": f"hiresrun.methods.{method}.X"}, "sampler": {"num_steps": steps}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"method={method}", f"sampler.num_steps={steps}", "metrics=default"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return folder


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"params": None},
                                                                   "overrides": {"task": SWEEP}}}))
    for num, (method, steps, fid, sec, acc) in OK.items():
        metrics = {"method": method, "accelerator": "none", "sampler": "ddim", "num_steps": steps, "fid": fid,
                   "kid": fid / 1000, "digit_acc": acc, "nfe_per_image": float(steps), "sec_per_image": sec,
                   "num_samples": 8, "resolution": 32, "protocol": {"n": 8, "seeds": "0-7"}}
        if num == 3:
            metrics.update(lpips_to_ref=0.1234, psnr_to_ref=31.456)
        if num == 0:
            metrics["peak_memory_mb"] = 123.4
        (job(sweep, num, method, steps) / "metrics.json").write_text(json.dumps(metrics))
    refused = {"status": "refused", "reason": "freeu needs a UNet2DConditionModel"}
    (job(sweep, 2, "none", 40) / "status.json").write_text(json.dumps(refused))
    (job(sweep, 4, "upsample", 20) / "sample.log").write_text(LOG)
    return sweep  # job 5 (upsample, 40 steps) has no folder


def test_rows_are_exact_and_failures_are_listed(sweep):
    runs = report.load_sweep(sweep)
    assert [(r["run"], r["status"]) for r in runs] == [("0", "ok"), ("1", "ok"), ("2", "refused"), ("3", "ok"),
                                                        ("4", "failed"), ("5", "missing")]
    assert report.markdown_table(runs).splitlines() == [
        "| run | method | accelerator | sampler | steps | FID | KID | digit_acc | LPIPS | PSNR | NFE | s/image "
        "| peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| 0 | none | none | ddim | 10 | 50.00 | 0.0500 | 0.500 | – | – | 10.0 | 0.1000 | 123 |",
        "| 1 | none | none | ddim | 20 | 55.00 | 0.0550 | 0.600 | – | – | 20.0 | 0.2000 | – |",
        "| 3 | upsample | none | ddim | 10 | 30.00 | 0.0300 | 0.400 | 0.123 | 31.46 | 10.0 | 0.3000 | – |",
    ]
    assert report.problems_table(runs).splitlines()[2:] == [
        "| 2 | refused | method=none sampler.num_steps=40 | freeu needs a UNet2DConditionModel |",
        "| 4 | failed | method=upsample sampler.num_steps=20 | ValueError: root cause here |",
        "| 5 | missing | method=upsample sampler.num_steps=40 | no job folder (the sweep stopped before it) |",
    ]


def test_pareto_front_follows_the_metric_direction(sweep):
    runs = report.load_sweep(sweep)
    # fid (lower is better): 0 is fastest, 3 best; 1 is slower and worse than 0
    assert report.pareto(runs, "fid") == ["0", "3"]
    # digit_acc (higher is better): 1 beats 3 on both; 0 is fastest
    assert report.pareto(runs, "digit_acc") == ["0", "1"]
    assert report.pick_quality(runs, None) == "fid"


def test_report_writes_markdown_and_plots(sweep, tmp_path, capsys):
    assert report.main([str(sweep), "--quality", "digit_acc"]) == 0
    text = (sweep / "report.md").read_text()
    assert "3 runs with results, 1 refused, 1 failed, 1 missing." in text
    assert "Pareto front (digit_acc, higher is better, vs seconds per image): 0, 1" in text
    assert "| 5 | missing |" in text and text in capsys.readouterr().out
    for name in ("digit_acc_vs_sec_per_image.png", "digit_acc_vs_nfe.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.main([str(sweep), "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "fid_vs_sec_per_image.png").is_file()


def test_training_runs_show_their_own_numbers(tmp_path):
    run = job(tmp_path, 0, "finetune", 50)
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text()) | {"task": "train"}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps({"task": "train", "method": "finetune", "steps": 300,
                                                  "trainable_params": 1110000, "train_seconds": 59.04,
                                                  "train/loss": 0.06762}))
    lines = report.markdown_table(report.load_sweep(tmp_path)).splitlines()
    assert lines[0] == ("| run | method | accelerator | sampler | steps | trainable | train steps | train s "
                        "| train loss |")
    assert lines[2] == "| 0 | finetune | – | – | – | 1110000 | 300 | 59.0 | 0.0676 |"


def test_cli_report_verb(sweep, tmp_path):
    proc = cli("report", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| 3 | upsample | none | ddim | 10 |" in proc.stdout and (sweep / "fid_vs_nfe.png").is_file()
    proc = cli("report", str(tmp_path / "no-such-sweep"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "no-such-sweep is not a folder" in one_error_line(proc)


def test_a_job_without_metrics_or_error_says_so(tmp_path):
    (job(tmp_path, 0, "none", 10) / "sample.log").write_text("[2026-11-30][HYDRA] starting\n[2026-11-30][x] step 3\n")
    job(tmp_path, 1, "none", 20)  # no log at all
    reasons = [r["reason"] for r in report.load_sweep(tmp_path)]
    assert reasons == ["no metrics.json and no error in the log (still running, or killed); it ends: [2026-11-30][x] "
                       "step 3", "no metrics.json and no log (crashed before logging, or still running)"]


def test_a_malformed_or_unwritable_sweep_is_one_line(sweep, tmp_path):
    import shutil

    from hiresrun.errors import UsageError

    broken = tmp_path / "broken"
    shutil.copytree(sweep, broken)
    first = sorted(p for p in broken.iterdir() if (p / "metrics.json").is_file())[0]
    (first / "metrics.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"metrics.json is not readable JSON \(JSONDecodeError\); repair or remove"):
        report.main([str(broken)])
    with pytest.raises(UsageError, match=r"report: cannot write into /proc/hiresrun-report .*pass --out"):
        report.main([str(sweep), "--out", "/proc/hiresrun-report"])
    proc = cli("report", str(broken), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def with_images(sweep, side_of=lambda num: 32):
    """samples/<seed>.png for the finished jobs: seeds 0-9 for jobs 0 and 1, 0-4 for job 3."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for num, count in ((0, 10), (1, 10), (3, 5)):
        folder = sweep / str(num) / "samples"
        folder.mkdir()
        for seed in range(count):
            side = side_of(num)
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(folder / f"{seed:06d}.png")
    return sweep


def test_report_html_is_one_offline_file_with_the_table_plots_and_images_side_by_side(sweep):
    import re

    with_images(sweep, lambda num: 512 if num == 3 else 32)
    assert report.main([str(sweep)]) == 0
    page = (sweep / "report.html").read_text()
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched, no code
    assert "freeu needs a UNet2DConditionModel" in page and page.count("<table>") == 3  # results, problems, images
    rows = re.findall(r"<tr><td class=name>(\d+)</td>(.*?)</tr>", page.split("<h2>Samples")[1])
    assert [seed for seed, _ in rows] == ["0", "1", "2", "3", "4"]  # the seeds every run has
    for _, cells in rows:
        assert cells.count("<td>") == 3 and cells.count("centre crop") == 1  # one column per run; 512 px: zoomed
    assert page.count('alt="fid_vs_sec_per_image"') == 1 and page.count('alt="fid_vs_nfe"') == 1


@pytest.mark.slow
def test_report_html_opens_in_headless_chromium_without_console_errors(sweep, tmp_path):
    """A real browser (Debian's chromium: `apt-get install chromium`) loads the page offline; the screenshot shows the
    page (not blank) and the browser logs no console error."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "needs Debian's chromium: apt-get install chromium"
    with_images(sweep)
    report.main([str(sweep)])
    shot = tmp_path / "report.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1300,1500", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                           (sweep / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1500, 1300) and pixels.std() > 20  # text, plots and samples drawn, not a blank page
