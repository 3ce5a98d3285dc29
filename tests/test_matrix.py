"""The method x accelerator matrix: every pair composes; supported pairs build and attach on the embedded model,
unsupported ones are refused with one line naming both and the reason (before anything loads, and in a sweep as a
status.json); the full-scale paper configs compose; the whole matrix runs (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONF, accelerator_options, cli, compose
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from hiresrun import build, support
from hiresrun.accelerators import Accelerator
from hiresrun.build import build_accelerator
from hiresrun.errors import Unsupported, UsageError
from hiresrun.models import describe

METHODS = sorted(f.stem for f in (CONF / "method").glob("*.yaml"))
ACCELERATORS = accelerator_options()
ONE_STEP = "samples with one network evaluation"


def declared(group: str, name: str) -> support.Support:
    return get_class(OmegaConf.load(CONF / group / f"{name}.yaml")._target_).supports


def expected_refusal(method: str, accelerator: str) -> str | None:
    """What the declarations must say on the embedded model (a pixel UNet2DModel), derived from them: a one-step
    method with an accelerator that acts between steps, a method calling the model on views with an accelerator that
    keeps state across calls, then whichever of the two does not drive a UNet2DModel."""
    m, a = declared("method", method), declared("accelerator", accelerator)
    if m.one_step and a.needs_steps:
        return ONE_STEP
    if m.views and a.level in ("steps", "blocks"):
        return "calls the model several times per sampler step"
    for kind, name, s in (("method", method, m), ("accelerator", accelerator, a)):
        if "UNet2DModel" not in s.unets:
            return f"{kind}={name} needs a {' or '.join(s.unets)}"
    return None


def test_every_option_is_documented_and_its_file_names_its_class():
    """Derived from the tree: each method / accelerator option is the file conf/<group>/<name>.yaml, which opens
    with the comment that documents it (what it does, its source) and names its class: adding one touches its own
    .py, .yaml and tests, no inventory elsewhere."""
    for group, names in (("method", METHODS), ("accelerator", ACCELERATORS)):
        for name in names:
            text = (CONF / group / f"{name}.yaml").read_text()
            lead = [line for line in text.splitlines() if line.startswith("#")][:1]
            assert text.startswith("# ") and len(lead[0]) > 20, f"conf/{group}/{name}.yaml: open with what it does"
            target = OmegaConf.load(CONF / group / f"{name}.yaml")._target_
            assert isinstance(get_class(target), type), target


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_pair_is_built_or_refused_with_one_line(method, accelerator, tmp_path):
    cfg = compose([f"method={method}", f"accelerator={accelerator}", "data.resolution=32"], tmp_path / "r")  # 16 -> 32
    expected = expected_refusal(method, accelerator)
    if expected:
        with pytest.raises(Unsupported) as refused:
            support.check(cfg, method, accelerator)
        line = str(refused.value)
        assert "\n" not in line and expected in line
        assert line.startswith(f"method={method} with accelerator={accelerator} is not supported: ")
        return
    support.check(cfg, method, accelerator)  # passes
    # supported: the objects build, the method wraps the embedded model, and the accelerator attaches to that net
    m, a = instantiate(cfg.method), build_accelerator(cfg)
    net = m.wrap(instantiate(cfg.model))
    handles = a.attach(net)
    for h in handles:
        h.remove()
    hooks = type(a).attach is not Accelerator.attach  # module-level accelerators (Skip-Tuning, DeepCache) attach
    assert (len(handles) > 0) == hooks, accelerator


@pytest.mark.parametrize("accelerator",
                         [a for a in ACCELERATORS if "UNet2DModel" not in declared("accelerator", a).unets])
def test_a_declared_unet_restriction_is_what_attaching_would_say(accelerator, tmp_path):
    """The declaration matches the code: an accelerator that declares no UNet2DModel fails to attach to the
    embedded UNet2DModel with its own error (FreeU: diffusers' enable_freeu)."""
    cfg = compose([f"accelerator={accelerator}"], tmp_path / "r")
    with pytest.raises((UsageError, AttributeError)):
        build_accelerator(cfg).attach(instantiate(cfg.model).unet)


def test_model_facts_come_from_config_files_and_latent_models_refuse_pagoda(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "vae").mkdir()
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "sd" / "vae" / "config.json").write_text("{}")
    assert describe(str(tmp_path / "sd")) == ("UNet2DConditionModel", "latent")
    assert describe("tiny-mnist") == ("UNet2DModel", "pixel")
    assert describe("no-such-org/no-such-model") == (None, None)  # a hub id not in the cache: nothing known
    common = ["model=diffusers", f"model.path={tmp_path / 'sd'}"]
    support.check(compose(common + ["method=selfcascade", "accelerator=freeu"], tmp_path / "r"), "selfcascade", "freeu")
    with pytest.raises(Unsupported, match="method=pagoda works on pixel models only .*; model.path=.* is latent"):
        support.check(compose(common + ["method=pagoda"], tmp_path / "r"), "pagoda", "none")
    with pytest.raises(Unsupported, match="^method=pagoda is not supported"):  # train: no accelerator
        support.check(compose(common + ["method=pagoda"], tmp_path / "r"), "pagoda", None)


def test_a_named_models_declared_facts_stand_in_for_absent_files_and_the_files_win(tmp_path, tiny_sd_dir):
    """model=sdxl without its files on this machine: the option file's denoiser / space / conditioning are what the
    checks read (cache needs a transformer: refused up front); model.path= to real files reads those instead."""
    sdxl = compose(["model=sdxl"], tmp_path / "r").model
    assert support.model_facts(sdxl) == ("UNet2DConditionModel", "latent", True, False)
    with pytest.raises(Unsupported, match="accelerator=cache needs a DiTTransformer2DModel"):
        support.check(compose(["model=sdxl", "accelerator=cache"], tmp_path / "r"), "none", "cache")
    dit = compose(["model=dit"], tmp_path / "r").model
    assert support.model_facts(dit) == ("DiTTransformer2DModel", "latent", False, False)
    pointed = compose(["model=tiny-mnist", f"model.path={tiny_sd_dir}"], tmp_path / "r").model
    assert support.model_facts(pointed)[:2] == ("UNet2DConditionModel", "latent")  # not tiny-mnist's declaration


def test_a_method_that_trains_is_refused_before_the_model_loads(tmp_path):
    cfg = compose(["method=simple", "model=diffusers", "model.path=/no/such/model"], tmp_path / "r")
    with pytest.raises(UsageError, match="samples with trained weights: pass ckpt_path"):
        build.sampling_net(cfg)


def test_matrix_experiment_names_each_methods_checkpoint(tmp_path):
    def cfg(method):
        return compose(["experiment=matrix", f"method={method}"], tmp_path / "r")

    root = str(tmp_path / "matrix")
    assert cfg("none").ckpt_path is None and cfg("upsample").ckpt_path is None
    assert cfg("finetune").ckpt_path == f"{root}/finetune"
    assert cfg("selfcascade").ckpt_path == f"{root}/selfcascade" and cfg("simple").ckpt_path == f"{root}/simple"
    pagoda = cfg("pagoda")
    assert pagoda.ckpt_path == f"{root}/pagoda" and pagoda.method.stage == "grow"
    assert pagoda.method.previous == f"{root}/pagoda-base"
    c = cfg("none")
    assert (c.data.resolution, c.sampler.num_steps, c.sample.num_samples, c.sample.seeds) == (32, 50, 500, None)
    given = compose(["experiment=matrix", "method=pagoda", "ckpt_path=elsewhere"], tmp_path / "r")
    assert given.ckpt_path == "elsewhere"  # the command line still wins


def test_refused_alone_is_an_error_and_in_a_sweep_a_status_file(tmp_path):
    proc = cli("sample", "+method=pagoda", "+accelerator=adaptive", cwd=tmp_path)
    assert proc.returncode == 2 and not list((tmp_path / "outputs").glob("sample/*/*"))  # no run folder left
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("hiresrun: error: method=pagoda with accelerator=adaptive is not supported")
    assert ONE_STEP in line
    proc = cli("sample", "-m", "+method=none", "+accelerator=freeu,none", "sample.num_samples=2", "sampler.num_steps=2",
               "logger=none", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted((tmp_path / "outputs" / "multirun" / "sample").glob("*/*/[0-9]*"))
    assert [j.name for j in jobs] == ["0-accelerator=freeu", "1-accelerator=none"]  # job number, the varied override
    status = json.loads((jobs[0] / "status.json").read_text())
    assert status["status"] == "refused" and expected_refusal("none", "freeu") in status["reason"]
    assert (status["method"], status["accelerator"], status["task"]) == ("none", "freeu", "sample")
    assert not (jobs[0] / "metrics.json").exists() and (jobs[1] / "metrics.json").is_file()
    assert not (jobs[1] / "status.json").exists()


# -- full-scale paper settings: composed here, run on GPU clusters -----------------------------------------------
FULLSCALE = {  # experiment -> (model.path, data.resolution, method, accelerator, sampler, steps)
    "selfcascade-sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 2048, "selfcascade", "none", "euler", 50),
    "selfcascade-sd21": ("stabilityai/stable-diffusion-2-1-base", 1024, "selfcascade", "none", "ddim", 50),
    "pagoda-imagenet": (None, 128, "pagoda", "none", "edm_heun", 18),
    "simple-imagenet": ("openai/diffusers-cd_imagenet64_l2", 256, "simple", "none", "ddim", 256),
    "adaptive-sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 1024, "none", "adaptive", "ddim", 50),
    "skiptuning-edm64": (None, 64, "none", "skiptuning", "edm_heun", 10),
    "attnsf-sd21": ("stabilityai/stable-diffusion-2-1-base", 1024, "attnsf", "none", "ddim", 50),
    "lora-sd21": ("stabilityai/stable-diffusion-2-1-base", 1024, "lora", "none", "ddim", 50),
    "finetune-sd21": ("stabilityai/stable-diffusion-2-1-base", 1024, "finetune", "none", "ddim", 50),
    "scalecrafter-sd21": ("stabilityai/stable-diffusion-2-1-base", 1024, "scalecrafter", "none", "ddim", 50),
    "demofusion-sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 2048, "demofusion", "none", "euler", 50),
    "demofusion-sd21": ("stabilityai/stable-diffusion-2-1-base", 1024, "demofusion", "none", "ddim", 50),
    "hidiffusion-sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 2048, "hidiffusion", "none", "ddim", 50),
    "hidiffusion-sd21": ("stabilityai/stable-diffusion-2-1-base", 1024, "hidiffusion", "none", "ddim", 50),
    "scalecrafter-sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 2048, "scalecrafter", "none", "ddim", 50),
}


NEGATIVE = "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"  # Self-Cascade's released SDXL driver
GUIDANCE = {  # experiment -> (sample.guidance_scale, sample.negative_prompt) of the paper's own driver
    "selfcascade-sdxl": (7.5, NEGATIVE), "selfcascade-sd21": (7.5, NEGATIVE), "adaptive-sdxl": (5.0, None),
    "attnsf-sd21": (7.5, NEGATIVE), "lora-sd21": (7.5, NEGATIVE), "finetune-sd21": (7.5, NEGATIVE),
    "scalecrafter-sd21": (7.5, NEGATIVE), "demofusion-sdxl": (7.5, None), "demofusion-sd21": (7.5, NEGATIVE),
    "hidiffusion-sdxl": (7.5, "blurry, ugly, duplicate, poorly drawn face, deformed, mosaic, artifacts, bad limbs"),
    "hidiffusion-sd21": (7.5, NEGATIVE), "scalecrafter-sdxl": (5.0, None),
    "pagoda-imagenet": (None, None), "simple-imagenet": (None, None), "skiptuning-edm64": (1.0, None),
}


def test_every_fullscale_config_is_listed():
    assert {f.stem for f in (CONF / "experiment" / "fullscale").glob("*.yaml")} == set(FULLSCALE)


@pytest.mark.parametrize("name", sorted(FULLSCALE))
def test_fullscale_config_composes_with_the_papers_values(name):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"experiment=fullscale/{name}"], return_hydra_config=True)
    path, resolution, method, accelerator, sampler, steps = FULLSCALE[name]
    choices = cfg.hydra.runtime.choices
    assert (choices.method, choices.accelerator, choices.sampler) == (method, accelerator, sampler)
    assert OmegaConf.is_missing(cfg.model, "path") if path is None else cfg.model.path == path
    assert (cfg.data.resolution, cfg.sampler.num_steps) == (resolution, steps)
    assert (cfg.sample.guidance_scale, cfg.sample.negative_prompt) == GUIDANCE[name]  # None: the model's own (1)
    assert OmegaConf.is_missing(cfg.data, "root") and cfg.metrics._target_ == "hiresrun.metrics.Metrics"
    assert "NOT RUN HERE" in (CONF / "experiment" / "fullscale" / f"{name}.yaml").read_text()
    if path is not None:  # the pair itself is supported (model facts unknown offline: not downloaded)
        support.check(cfg, method, accelerator)
    if name == "selfcascade-sdxl":
        assert (cfg.method.mode, cfg.method.strength, cfg.method.pivot_source) == ("tuned", 0.7, "generated")
        assert (cfg.optimizer.lr, cfg.trainer.max_steps, cfg.trainer.devices) == (5e-5, 12000, 4)
    if name == "pagoda-imagenet":
        assert (cfg.model.parametrization, cfg.data.labels, cfg.method.inv_solver) == ("edm", "subfolders", "heun")
    if name == "skiptuning-edm64":
        assert (cfg.accelerator.rho, cfg.sample.num_samples) == (0.78, 50000)
    if name == "adaptive-sdxl":
        assert (cfg.accelerator.delta, cfg.accelerator.c_max, cfg.accelerator.decision_scope) == (0.01, 4, "batch")


# -- the whole matrix at tiny n ---------------------------------------------------------------------------------
def train(tmp_path: Path, *args: str) -> None:
    from PIL import Image

    images = tmp_path / "imgs"
    if not images.is_dir():
        images.mkdir()
        for i in range(8):
            pixels = np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{i}.png")
    common = ["data=folder", f"data.root={images}", "data.resolution=32", "data.channels=1", "data.batch_size=4",
              "logger=none", "train.grid_every=0", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = cli("train", *args, *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_the_full_matrix_runs_at_tiny_n(tmp_path):
    ckpts = "outputs/matrix"  # matrix.checkpoints under HIRESRUN_OUTPUTS=<tmp>/outputs
    train(tmp_path, "+method=selfcascade", f"hydra.run.dir={ckpts}/selfcascade")
    train(tmp_path, "+method=simple", f"hydra.run.dir={ckpts}/simple")
    train(tmp_path, "+method=finetune", f"hydra.run.dir={ckpts}/finetune")
    pagoda = ["+method=pagoda", "method.inv_steps=3", "method.encode_chunk=4"]
    train(tmp_path, *pagoda, "method.stage=encode", f"hydra.run.dir={ckpts}/pagoda-encode")
    train(tmp_path, *pagoda, "method.stage=base", f"hydra.run.dir={ckpts}/pagoda-base")
    train(tmp_path, *pagoda, "method.stage=grow", f"method.previous={ckpts}/pagoda-base", "method.rec_loss=l2_pyramid",
          f"hydra.run.dir={ckpts}/pagoda")
    proc = cli("sample", "-m", "experiment=matrix", f"+method={','.join(METHODS)}",
               f"+accelerator={','.join(ACCELERATORS)}", "sample.num_samples=2", "sample.seeds=null",
               "sampler.num_steps=3", "metrics=none", "trainer.enable_progress_bar=false", cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted((tmp_path / "outputs" / "multirun" / "sample").glob("*/*/[0-9]*"))
    assert len(jobs) == len(METHODS) * len(ACCELERATORS)
    for job in jobs:
        chosen = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        method, accelerator = chosen["method"], chosen["accelerator"]
        expected = expected_refusal(method, accelerator)
        if expected:
            status = json.loads((job / "status.json").read_text())
            assert status["status"] == "refused" and expected in status["reason"], job
            assert not (job / "metrics.json").exists()
        else:
            metrics = json.loads((job / "metrics.json").read_text())
            assert (metrics["method"], metrics["accelerator"], metrics["resolution"]) == (method, accelerator, 32)
            assert metrics["num_samples"] == 2
            assert metrics["nfe_per_image"] == 1 if method == "pagoda" else metrics["nfe_per_image"] >= 3


def test_list_names_every_option_and_says_for_each_pair_what_the_run_would(tiny_model_dir, capsys):
    """`hiresrun list`: every method and accelerator option with its YAML's opening line; `hiresrun list
    model=diffusers model.path=<m>`: for each pair, "supported" exactly when support.check passes it, else its
    refusal reason (the sample verb's words)."""
    from hiresrun.listing import main

    assert main([]) == 0
    shown = capsys.readouterr().out
    for name in METHODS + ACCELERATORS:
        assert f"  {name} " in shown, name
    assert "\n  chain " not in shown  # a list's node is not an option of its own
    assert main(["model=diffusers", f"model.path={tiny_model_dir}"]) == 0
    rows = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip()
            for line in capsys.readouterr().out.splitlines() if " + " in line.split("  ")[0]}
    assert len(rows) == len(METHODS) * len(ACCELERATORS)
    facts = support.model_facts(compose(["model=diffusers", f"model.path={tiny_model_dir}"]).model)
    nodes = {(g, o): compose([f"{g}={o}"])[g] for g, names in (("method", METHODS), ("accelerator", ACCELERATORS))
             for o in names}
    decl = {k: get_class(n._target_).declared(n) for k, n in nodes.items()}  # as support.check reads each node
    for method in METHODS:
        for accelerator in ACCELERATORS:
            verdict = rows[f"{method} + {accelerator}"]
            if "none" in (method, accelerator):  # each option once through the run's own check
                cfg = compose(["model=diffusers", f"model.path={tiny_model_dir}", f"method={method}",
                               f"accelerator={accelerator}"])
                try:
                    support.check(cfg, method, accelerator)
                    reason = None
                except Unsupported as e:
                    reason = str(e).split(" is not supported: ", 1)[1]
            else:  # the other pairs: what the declarations say (support.check's own function)
                reason = support.refusal(method, decl["method", method], accelerator, decl["accelerator", accelerator],
                                         f"model.path={tiny_model_dir}", *facts)
                reason = reason and reason.split(" is not supported: ", 1)[1]
            assert verdict == ("supported" if reason is None else f"refused: {reason}"), (method, accelerator)
    with pytest.raises(UsageError, match="needs model.path"):
        main(["model=diffusers"])
