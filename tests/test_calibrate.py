"""`hiresrun calibrate`: the chosen delta keeps the target and the next grid value does not (checked by sampling
again), delta = 0 when only the full run keeps it, the file round-trips, and a file for another setting is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import SCHED, cli, compose, tiny_overrides, tiny_unet
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hiresrun import run as task
from hiresrun import sampling
from hiresrun.accelerators.adaptive import AdaptiveDiffusion
from hiresrun.build import build_accelerator
from hiresrun.errors import UsageError
from hiresrun.metrics.lpips import LPIPS
from hiresrun.models import load_model, model_fn, save_pipeline
from hiresrun.sampling import to_uint8

GRID = [0.01, 0.03, 0.1, 0.3]
SEEDS = [0, 1, 2, 3]


def overrides(model_dir, *extra: str) -> list[str]:
    """12 DDIM steps at 16x16 on the random tiny model; its fidelity falls from ~40 dB (0.01) to ~22 dB (0.3)."""
    return tiny_overrides(model_dir) + ["task=calibrate", "accelerator=adaptive", "sampler.num_steps=12",
                                        "calibrate.seeds=0-3", "sample.batch_size=4",
                                        f"calibrate.deltas=[{','.join(map(str, GRID))}]", *extra]


def calibrate(model_dir, run_dir, *extra: str) -> dict:
    return task.run(compose(overrides(model_dir, *extra), run_dir))


@pytest.fixture(scope="module")
def psnr30(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cal") / "run"
    record = calibrate(tiny_model_dir, run_dir, "target.psnr=30")
    summary = json.loads((run_dir / "metrics.json").read_text())  # the run record beside the calibration file
    assert summary["task"] == "calibrate" and summary["delta"] == record["delta"]
    return record, run_dir / "calibration.json"


def resample(model_dir, delta: float) -> torch.Tensor:
    """The 16x16 images of SEEDS, sampled again outside the verb (delta None: the full run)."""
    base = load_model(str(model_dir))
    unet, scheduler = base.unet.eval(), instantiate(compose(["sampler=ddim"]).sampler.scheduler)(base.scheduler_config)
    acc = AdaptiveDiffusion(delta=delta) if delta is not None else None
    gens = sampling.generators(SEEDS)
    with torch.no_grad():
        x = sampling.sample(model_fn(unet), sampling.noise(gens, (1, 16, 16)), scheduler, 12,
                            wrap=acc.wrap if acc else (lambda f, step: f))
    return to_uint8(x)


def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1) / 255 ** 2
    assert (mse > 0).all()  # no identical image here, so no cap is involved
    return float((10 * torch.log10(1 / mse)).mean())


@pytest.mark.parametrize("metric,value", [("psnr", 30.0), ("lpips", 0.001)])
def test_chosen_delta_meets_the_target_and_the_next_grid_value_does_not(tiny_model_dir, tmp_path, psnr30,
                                                                        metric, value):
    record = psnr30[0] if metric == "psnr" else calibrate(tiny_model_dir, tmp_path / "r", f"target.lpips={value}")
    chosen = record["delta"]
    assert 0 < chosen < GRID[-1] and record["curve"][-1]["delta"] == GRID[GRID.index(chosen) + 1]
    full = resample(tiny_model_dir, None)
    kept, missed = resample(tiny_model_dir, chosen), resample(tiny_model_dir, GRID[GRID.index(chosen) + 1])
    if metric == "psnr":
        assert mean_psnr(kept, full) >= value > mean_psnr(missed, full)
    else:
        lpips = LPIPS()
        assert float(lpips(kept, full).mean()) <= value < float(lpips(missed, full).mean())
    assert record["full"]["nfe_per_image"] == 12 > record["curve"][GRID.index(chosen)]["nfe_per_image"]


def test_a_target_only_the_full_run_meets_gives_delta_zero(tiny_model_dir, tmp_path):
    record = calibrate(tiny_model_dir, tmp_path / "r", "target.psnr=60")
    assert record["delta"] == 0.0 and [p["delta"] for p in record["curve"]] == GRID[:1]  # stopped at the first miss
    cfg = compose(tiny_overrides(tiny_model_dir) + ["accelerator=adaptive", "sampler.num_steps=12",
                                                    f"accelerator.calibration={tmp_path / 'r' / 'calibration.json'}"],
                  tmp_path / "s")
    OmegaConf.resolve(cfg)
    assert build_accelerator(cfg).delta == 0.0


def test_the_file_round_trips_into_a_sample_run(tiny_model_dir, tmp_path, psnr30):
    record, path = psnr30
    saved = json.loads(path.read_text())
    assert saved["delta"] == record["delta"] and saved["key"]["num_steps"] == 12 and saved["key"]["resolution"] == 16
    assert saved["key"]["model_weights_sha256"] == load_model(str(tiny_model_dir)).weights_hash
    use = tiny_overrides(tiny_model_dir) + ["accelerator=adaptive", "sampler.num_steps=12", "sample.batch_size=4",
                                            f"accelerator.calibration={path}"]
    with pytest.raises(UsageError, match=r"was calibrated on seeds 2-3, which this run samples"):
        task.run(compose(use + ["sample.seeds=2-5"], tmp_path / "same"))  # tuned on the images it would report
    assert not (tmp_path / "same").exists()
    metrics = task.run(compose(use + ["sample.seeds=4-7"], tmp_path / "s"))
    OmegaConf.resolve(cfg := compose(use, tmp_path / "x"))
    assert build_accelerator(cfg).delta == record["delta"] > 0
    assert metrics["nfe_per_image"] < 12  # the calibrated delta skips steps on the reported seeds too


def test_calibration_seeds_default_to_a_range_no_run_reaches_and_a_list_is_refused_before_work(tiny_model_dir,
                                                                                               tmp_path):
    from hiresrun.build import parse_seeds

    cfg = compose(["task=calibrate"])
    seeds = parse_seeds(cfg.calibrate.seeds, 0)
    assert seeds == list(range(2 ** 31 - 1024, 2 ** 31 - 1024 + 32))
    assert min(seeds) > 10 ** 9  # beyond any FID-50k / 1M-image run's seeds 0..n-1
    cfg = compose(overrides(tiny_model_dir, "target.psnr=30", "accelerator=[adaptive,deepcache]",
                            "accelerator.adaptive.decision_scope=batch"), tmp_path / "l")
    with pytest.raises(UsageError, match=r"use calibrate.families=\[adaptive-deepcache\]"):
        task.run(cfg)
    assert not (tmp_path / "l").exists()


@pytest.mark.parametrize("change,field", [("sampler.num_steps=13", "num_steps"), ("sampler=euler", "sampler"),
                                          ("accelerator.c_max=6", "rule"), ("data.resolution=32", "resolution"),
                                          ("method=upsample", "method"), ("other model", "model_weights_sha256")])
def test_a_file_for_another_setting_is_refused(tiny_model_dir, tmp_path, psnr30, change, field):
    base = ["accelerator=adaptive", "sampler.num_steps=12", f"accelerator.calibration={psnr30[1]}"]
    if change == "other model":
        unet = tiny_unet()
        with torch.no_grad():
            next(unet.parameters()).add_(1e-3)
        save_pipeline(unet, SCHED, tmp_path / "m")
        cfg = compose(tiny_overrides(tmp_path / "m") + base, tmp_path / "s")
    else:
        cfg = compose(tiny_overrides(tiny_model_dir) + base + [change], tmp_path / "s")
    OmegaConf.resolve(cfg)
    with pytest.raises(Exception) as e:
        build_accelerator(cfg)
    error = e.value
    while error is not None and not isinstance(error, UsageError):  # Hydra wraps what constructors raise
        error = error.__cause__
    assert error is not None and f"calibrated for {field} " in str(error) and "run `hiresrun calibrate`" in str(error)


@pytest.mark.parametrize("extra,match", [([], "one fidelity target"),
                                         (["target.psnr=30", "target.lpips=0.1"], "one fidelity target"),
                                         (["target.psnr=30", "accelerator=none"], r"\+accelerator=adaptive"),
                                         (["target.psnr=30", "calibrate.deltas=[0.1,0.01]"], "ascending")])
def test_bad_calibrations_are_refused(tiny_model_dir, tmp_path, extra, match):
    with pytest.raises(UsageError, match=match):
        calibrate(tiny_model_dir, tmp_path / "r", *extra)
    assert not (tmp_path / "r" / "calibration.json").exists()


def test_the_verb_prints_the_file_it_saved(tiny_model_dir, tmp_path, psnr30):
    chosen = psnr30[0]["delta"]
    grid = f"calibrate.deltas=[{chosen},{GRID[GRID.index(chosen) + 1]}]"  # the two grid values that decide it
    args = [a for a in overrides(tiny_model_dir, "target.psnr=30") if a != "task=calibrate" and "deltas" not in a]
    proc = cli("calibrate", *args, grid, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1].split("accelerator.calibration=")[-1].rstrip(")")
    assert str(tmp_path / "outputs" / "calibrate") in path and json.loads(open(path).read())["delta"] == chosen
    said = [x for x in proc.stdout.splitlines() if x.startswith("hiresrun: calibrate delta=")]  # its progress
    assert len(said) == 2 and said[0].endswith("meets the target") and said[1].endswith("misses the target")


# -- across accelerators: the cost-fidelity front -------------------------------------------------------------
def test_pareto_keeps_exactly_the_undominated_points():
    from hiresrun.tune import pareto

    pts = [{"cost_per_image": c, "psnr_to_ref": q} for c, q in ((10, 60), (5, 30), (5, 35), (3, 20), (8, 34), (3, 25))]
    assert pareto(pts, "psnr_to_ref", True) == [5, 2, 0]  # (3, 25), (5, 35), (10, 60); cheapest first
    lp = [{"cost_per_image": c, "lpips_to_ref": q} for c, q in ((4, 0.1), (4, 0.05), (2, 0.2))]
    assert pareto(lp, "lpips_to_ref", False) == [2, 1]


@pytest.fixture(scope="module")
def front_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("front") / "run"
    extra = ["target.psnr=30", "calibrate.families=[steps,steps:dpmsolver,stepskip,deepcache,adaptive-deepcache,"
             "steps:dpmsolver x deepcache]",
             "calibrate.grid.steps.num_steps=[12,6]", "calibrate.grid.stepskip.every=[2]",
             "calibrate.grid.deepcache.interval=[1,2]", "calibrate.grid.adaptive-deepcache.adaptive.delta=[0.3]",
             "calibrate.grid.adaptive-deepcache.deepcache.interval=[2]", "accelerator=none"]
    return calibrate(tiny_model_dir, run_dir, *extra), run_dir


def test_the_front_measures_each_setting_against_the_full_run(front_run):
    from hiresrun.metrics.lpips import psnr

    record, run_dir = front_run
    blank = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    cap = float(psnr(blank, blank))  # identical images: PSNR's finite cap at this size
    points = {(p["family"], json.dumps(p["knobs"], sort_keys=True)): p for p in record["points"]}
    full = record["full"]
    assert full["nfe_per_image"] == 12 and full["cost_per_image"] == 12
    same = points[("steps", '{"num_steps": 12}')]  # the full run itself: identical images, equal cost
    assert same["cost_per_image"] == 12 and same["psnr_to_ref"] == pytest.approx(cap)
    assert points[("steps", '{"num_steps": 6}')]["cost_per_image"] == 6
    assert points[("steps:dpmsolver", '{"num_steps": 6}')]["overrides"] == ["sampler=dpmsolver",
                                                                            "sampler.num_steps=6"]
    assert points[("stepskip", '{"every": 2}')]["cost_per_image"] == 6  # steps 0, 2, ..., 10 computed
    assert points[("deepcache", '{"interval": 1}')]["psnr_to_ref"] == pytest.approx(cap)  # neutral: bit-exact
    dc = points[("deepcache", '{"interval": 2}')]
    share = (dc["cost_per_image"] - 6) / 6  # 6 full calls, 6 partial ones at their FLOP share
    assert 0 < share < 1 and dc["nfe_per_image"] == 12
    both = points[("adaptive-deepcache",
                   '{"adaptive.decision_scope": "batch", "adaptive.delta": 0.3, "deepcache.interval": 2}')]
    assert both["nfe_per_image"] < 12 and both["cost_per_image"] < both["nfe_per_image"]
    assert both["overrides"] == ["+accelerator=[adaptive,deepcache]", "accelerator.adaptive.delta=0.3",
                                 "accelerator.adaptive.decision_scope=batch", "accelerator.deepcache.interval=2"]
    # a joint family: each step count of the sampler with each accelerator setting; interval 1 is the sampler alone
    joint = {(n, i): points[("steps:dpmsolver x deepcache", json.dumps({"interval": i, "num_steps": n},
                                                                        sort_keys=True))]
             for n in (6, 12) for i in (1, 2)}
    alone = points[("steps:dpmsolver", '{"num_steps": 6}')]
    assert {k: joint[6, 1][k] for k in ("cost_per_image", "psnr_to_ref", "lpips_to_ref")} == \
        {k: alone[k] for k in ("cost_per_image", "psnr_to_ref", "lpips_to_ref")}
    reuse = joint[6, 2]
    assert reuse["nfe_per_image"] == 6 and 3 < reuse["cost_per_image"] < 6  # 3 full calls + 3 at the branch's share
    assert joint[12, 2]["cost_per_image"] == pytest.approx(2 * reuse["cost_per_image"])
    assert reuse["overrides"] == ["sampler=dpmsolver", "sampler.num_steps=6", "+accelerator=deepcache",
                                  "accelerator.interval=2"]
    # the front and the answer follow from the points
    from hiresrun.tune import pareto

    assert record["front"] == pareto(record["points"], "psnr_to_ref", True)
    meeting = [p for p in record["points"] if p["psnr_to_ref"] >= 30]
    assert record["best"]["cost_per_image"] == min(p["cost_per_image"] for p in meeting)
    assert json.loads((run_dir / "metrics.json").read_text())["front"] == str(run_dir / "front.json")


def test_the_best_settings_overrides_sample_with_it(front_run, tiny_model_dir):
    from hiresrun.build import build_accelerator

    best = front_run[0]["best"]
    cfg = compose(tiny_overrides(tiny_model_dir) + [o.lstrip("+") for o in best["overrides"]])
    if best["family"].startswith("steps"):
        assert cfg.sampler.num_steps == best["knobs"]["num_steps"]
    else:
        built = build_accelerator(cfg)
        for name, value in best["knobs"].items():
            members = getattr(built, "members", {"": built}).values()
            assert any(getattr(m, name, None) == value for m in members), name


def test_a_family_without_a_grid_or_option_is_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="calibrate.grid has no banana entry"):
        calibrate(tiny_model_dir, tmp_path / "r", "target.psnr=30", "calibrate.families=[banana]")
    with pytest.raises(UsageError, match="calibrate.families has steps:banana: no sampler option banana"):
        calibrate(tiny_model_dir, tmp_path / "r", "target.psnr=30", "calibrate.families=[steps:banana]")
    with pytest.raises(UsageError, match=re.escape("a joint family is one steps[:<sampler>] and one accelerator")):
        calibrate(tiny_model_dir, tmp_path / "r", "target.psnr=30", "calibrate.families=[steps x steps:dpmsolver]")
    with pytest.raises(UsageError, match="calibrate.families has banana: banana is not an accelerator option"):
        calibrate(tiny_model_dir, tmp_path / "r", "target.psnr=30", "calibrate.families=[steps:ddim x banana]",
                  "+calibrate.grid.banana={k: [1]}")
    assert not (tmp_path / "r" / "front.json").exists()
