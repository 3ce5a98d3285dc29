"""Every method x accelerator pair on the tiny Stable Diffusion and SDXL folders: it runs (training first where the
method trains, on captioned images), or the Support declarations refuse it up front with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, accelerator_options, compose
from hydra.utils import get_class

from hiresrun import run, support
from hiresrun.errors import Unsupported

METHODS = sorted(f.stem for f in (CONF / "method").glob("*.yaml"))
ACCELERATORS = accelerator_options()
FAST = ["logger=none", "trainer.enable_progress_bar=false", "data.resolution=32"]


def captioned_folder(root: Path) -> Path:
    """Four RGB images with captions in metadata.jsonl (the Hugging Face image-folder convention)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a picture of the number {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train(folder: Path, data: Path, run_dir: Path, method: str, *extra: str) -> Path:
    cfg = compose(["model=diffusers", f"model.path={folder}", f"method={method}", "task=train", "data=folder",
                   f"data.root={data}", "data.batch_size=2", "trainer.max_steps=2", "train.grid_every=0",
                   "train.caption_dropout=0.5", *FAST, *extra], run_dir)
    run.run(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


# SD in the fast suite; SDXL (the same pairs, its own conditioning checked in tests/test_text.py) with the slow tests
@pytest.fixture(scope="module", params=["sd", pytest.param("sdxl", marks=pytest.mark.slow)])
def trained(request, tiny_sd_dir, tiny_sdxl_dir, tmp_path_factory):
    folder = tiny_sdxl_dir if request.param == "sdxl" else tiny_sd_dir
    root = tmp_path_factory.mktemp(f"matrix-{request.param}")
    data = captioned_folder(root / "data")
    ckpts = {m: train(folder, data, root / "train" / m, m) for m in ("finetune", "simple", "selfcascade", "lora")}
    return request.param, folder, root, ckpts


@pytest.mark.parametrize("scope", ["axes", pytest.param("all", marks=pytest.mark.slow)])
def test_every_pair_runs_or_is_refused_on_text_models(scope, trained):
    """Every method x accelerator on a text model: refused exactly where the declarations say, else it runs under
    guidance (two passes per call). The fast suite runs the pairs with method=none or accelerator=none (each option
    once, every refusal of theirs through the run) and checks the other pairs' declarations; the slow one runs all."""
    family, folder, root, ckpts = trained
    ran, refused, skipped = [], [], []
    methods = {m: get_class(compose([f"method={m}"]).method._target_).supports for m in METHODS}
    accelerators = {a: get_class(compose([f"accelerator={a}"]).accelerator._target_).supports for a in ACCELERATORS}
    for method in METHODS:
        for accelerator in ACCELERATORS:
            would = support.refusal(method, methods[method], accelerator, accelerators[accelerator], "m",
                                    "UNet2DConditionModel", "latent", True)
            if scope == "axes" and "none" not in (method, accelerator):
                (refused if would else skipped).append((method, accelerator))
                continue
            run_dir = root / "sample" / f"{method}-{accelerator}"
            extra = [f"ckpt_path={ckpts[method]}"] if method in ckpts else []
            cfg = compose(["model=diffusers", f"model.path={folder}", f"method={method}", f"accelerator={accelerator}",
                           "sample.prompt=a picture of the number 3", "sample.guidance_scale=3",
                           "sample.num_samples=2", "sampler.num_steps=3", *FAST, *extra], run_dir)
            try:
                metrics = run.run(cfg)
            except Unsupported as e:
                assert would is not None and "is not supported: " in str(e)  # the declarations said so
                assert "\n" not in str(e) and not (run_dir / "metrics.json").exists()
                refused.append((method, accelerator))
                continue
            assert would is None, (method, accelerator)
            assert metrics["num_samples"] == 2 and metrics["unet_passes_per_image"] == 2 * metrics["nfe_per_image"]
            ran.append((method, accelerator))
    ran += skipped  # supported by their declarations (run by the slow scope)
    # PaGoDA takes no text: every one of its pairs is refused by its declaration; so is every accelerator that does
    # not drive a UNet2DConditionModel (diffusers' transformer cache hooks); everything else runs
    no_unet = {a for a in ACCELERATORS if "UNet2DConditionModel" not in get_class(
        compose([f"accelerator={a}"]).accelerator._target_).supports.unets}
    assert "cache" in no_unet and "deepcache" not in no_unet
    # DemoFusion's views refuse the accelerators that keep state from call to call (step and block caches)
    views = {("demofusion", a) for a in ACCELERATORS if a not in no_unet and get_class(
        compose([f"accelerator={a}"]).accelerator._target_).supports.level in ("steps", "blocks")}
    assert ("demofusion", "deepcache") in views and ("demofusion", "adaptive") in views
    assert sorted(refused) == sorted({("pagoda", a) for a in ACCELERATORS} | {(m, a) for m in METHODS for a in no_unet}
                                     | views)
    assert len(ran) == (len(METHODS) - 1) * (len(ACCELERATORS) - len(no_unet)) - len(views), family


def test_pagoda_refusal_on_a_text_model_says_why(tiny_sd_dir, tmp_path):
    cfg = compose(["model=diffusers", f"model.path={tiny_sd_dir}", "method=pagoda"], tmp_path / "r")
    with pytest.raises(Unsupported, match="method=pagoda does not take text conditioning .*is a text-to-image model"):
        support.check(cfg, "pagoda", "none")


@pytest.mark.parametrize("name,family", [("selfcascade-sdxl", "sdxl"), ("selfcascade-sd21", "sd"),
                                         ("adaptive-sdxl", "sdxl"), ("attnsf-sd21", "sd"), ("lora-sd21", "sd"),
                                         ("finetune-sd21", "sd"), ("demofusion-sdxl", "sdxl"),
                                         ("hidiffusion-sd21", "sd")])
def test_fullscale_text_settings_run_end_to_end_on_the_tiny_folders(name, family, tiny_sd_dir, tiny_sdxl_dir,
                                                                    tmp_path):
    """The paper settings as composed, with only what a CPU test must change: the tiny folder for the weights,
    a few steps at 32 px, one CPU process. On a GPU cluster the real weights are all that is missing."""
    folder = tiny_sdxl_dir if family == "sdxl" else tiny_sd_dir
    data = captioned_folder(tmp_path / "data")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    scale = ["model.path=" + str(folder), "model.resolution=null", f"data.root={data}", "data.resolution=32",
             "trainer=cpu", "trainer.precision=32-true", "trainer.accelerator=cpu", "trainer.devices=1",
             "sampler.num_steps=4", "metrics=none", *FAST[:2]]
    if name.startswith("demofusion"):  # the paper's 64-pixel stride is wider than a tiny folder's latent windows
        scale.append("method.stride=null")
    ckpt = []
    if name.startswith(("selfcascade", "lora", "finetune")):  # the rows that train first
        cascade = ["method.pivot_steps=3"] if name.startswith("selfcascade") else []
        train_cfg = compose([f"experiment=fullscale/{name}", "task=train", "trainer.max_steps=2", "data.batch_size=2",
                             "train.grid_every=0", *cascade, *scale], tmp_path / "train")
        assert train_cfg.method.get("mode", "tuned") == "tuned"
        run.run(train_cfg)
        ckpt = [f"ckpt_path={tmp_path / 'train'}"]
    cfg = compose([f"experiment=fullscale/{name}", "task=sample", f"prompts={tmp_path / 'prompts.txt'}",
                   "sample.num_samples=2", "sample.batch_size=2", *scale, *ckpt], tmp_path / "sample")
    metrics = run.run(cfg)
    assert metrics["num_samples"] == 2 and metrics["resolution"] == 32
    released = {"selfcascade-sdxl": 7.5, "selfcascade-sd21": 7.5, "adaptive-sdxl": 5.0, "attnsf-sd21": 7.5,
                "lora-sd21": 7.5, "finetune-sd21": 7.5, "demofusion-sdxl": 7.5, "hidiffusion-sd21": 7.5}
    assert metrics["protocol"]["text"]["guidance_scale"] == released[name]
    assert (metrics["protocol"]["text"]["negative_prompt"] is None) == (name in ("adaptive-sdxl", "demofusion-sdxl"))
    if name == "adaptive-sdxl":
        assert metrics["nfe_per_image"] <= 4
    if name == "attnsf-sd21":
        assert metrics["method"] == "attnsf"
    if name == "demofusion-sdxl":  # 16 -> 32 px: 4 base-size steps, then 9 windows and up to 4 sub-grids per step
        assert 4 + 4 * 9 < metrics["nfe_per_image"] <= 4 + 4 * 13


def test_calibrate_on_a_text_model_keys_the_guidance(tiny_sd_dir, tmp_path):
    """`hiresrun calibrate` samples the run's prompts under its guidance, and the file is refused for another
    guidance scale (the delta is valid for the setting it was found under only)."""
    common = ["model=diffusers", f"model.path={tiny_sd_dir}", "accelerator=adaptive", "sample.prompt=a cat",
              "data.resolution=16", "sampler.num_steps=12", "calibrate.seeds=1000-1001",
              "calibrate.deltas=[0.0005,0.002]", *FAST[:2]]
    record = run.run(compose(common + ["task=calibrate", "target.psnr=10", "sample.guidance_scale=3"],
                             tmp_path / "cal"))
    assert record["key"]["guidance"] == {"guidance_scale": 3.0} and record["delta"] > 0
    path = tmp_path / "cal" / "calibration.json"
    ok = compose(common + ["sample.guidance_scale=3", f"accelerator.calibration={path}", "sample.num_samples=2"],
                 tmp_path / "s1")
    assert run.run(ok)["num_samples"] == 2
    other = compose(common + ["sample.guidance_scale=5", f"accelerator.calibration={path}", "sample.num_samples=2"],
                    tmp_path / "s2")
    with pytest.raises(Exception, match="calibrated for guidance .*3.*, this run has .*5"):  # via Hydra's wrapper
        run.run(other)
