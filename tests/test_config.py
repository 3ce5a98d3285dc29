"""Every option of every config group composes and instantiates; every experiment smoke-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF, PLAIN_BLOCKS, SCHED, compose, tiny_overrides, tiny_unet
from hydra.utils import get_class, instantiate

from hiresrun import run
from hiresrun.build import build_accelerator
from hiresrun.data import load_mnist
from hiresrun.models import BaseModel, save_pipeline

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_a_default_and_is_documented():
    """Derived from the tree: each conf/ group is in config.yaml's defaults list (experiment optionally) and in
    the layout of docs/ARCHITECTURE.md; a new group that is neither fails here."""
    from omegaconf import OmegaConf

    listed = {next(iter(d)).split("@")[0].removeprefix("optional ") for d in OmegaConf.to_container(
        OmegaConf.load(CONF / "config.yaml"))["defaults"] if isinstance(d, dict)}
    layout = (CONF.parent / "docs" / "ARCHITECTURE.md").read_text().split("## Layout")[1].split("## ")[0]
    for group in GROUPS:
        assert group in listed, f"conf/{group}/ is not in config.yaml's defaults list"
        assert f"{group}/" in layout, f"conf/{group}/ is missing from docs/ARCHITECTURE.md's layout"


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] != "experiment"])
def test_option_composes_and_instantiates(group, option, tiny_model_dir, tiny_sd_dir, tiny_sdxl_dir, tiny_dit_dir,
                                         tiny_flux_dir, tiny_schnell_dir, tiny_sd3_dir, tmp_path):
    overrides = [f"{group}={option}"] + {("model", "diffusers"): [f"model.path={tiny_model_dir}"],
                                         ("model", "flux-dev"): [f"model.path={tiny_flux_dir}"],
                                         ("model", "flux-schnell"): [f"model.path={tiny_schnell_dir}"],
                                         ("model", "sd3"): [f"model.path={tiny_sd3_dir}"],
                                         ("model", "sd35"): [f"model.path={tiny_sd3_dir}"],
                                         ("model", "sd15"): [f"model.path={tiny_sd_dir}"],
                                         ("model", "sd21"): [f"model.path={tiny_sd_dir}"],
                                         ("model", "sdxl"): [f"model.path={tiny_sdxl_dir}"],
                                         ("model", "dit"): [f"model.path={tiny_dit_dir}"],
                                         ("data", "folder"): [f"data.root={tmp_path}"]}.get((group, option), [])
    if group == "model":
        overrides.append("model.init=scratch")  # the architecture is enough; weights are tested elsewhere
        if option in ("sd15", "sd21", "sdxl", "dit", "sd3", "sd35", "flux-dev", "flux-schnell"):
            overrides.append("model.resolution=null")  # the preset's native size is not the tiny folder's
    if (group, option) == ("accelerator", "chain"):  # a list's node: the members under their names
        overrides = ["accelerator=[stepskip,deepcache]"]
    cfg = compose(overrides, tmp_path / "run")
    node = cfg[group]
    if group == "trainer" and option == "gpu":
        assert node.accelerator == "gpu" and node.precision == "bf16-mixed"
        if not torch.cuda.is_available():
            return  # instantiating needs a GPU; the `gpu`-marked test below does it where there is one
    if "_target_" not in node and group != "sampler":
        assert group in ("logger", "metrics", "paths"), f"{group}={option} builds nothing"
        return
    if group == "sampler":  # a flow sampler from a flow model's schedule (SD3's: fixed shift), the others a VP one
        folder = tiny_sd3_dir if option.startswith("flow_") else tiny_model_dir
        built = instantiate(node.scheduler)(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    else:  # an accelerator through its one builder (a list: the Chain of its members)
        built = build_accelerator(cfg) if group == "accelerator" else instantiate(node)
    # what was built is what the option names: its class, or (model) what load_model returns
    target = str(node.scheduler._target_).removesuffix(".from_config") if group == "sampler" else str(node._target_)
    flows = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler",
             "dpmsolver": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
    if target == "hiresrun.flow.scheduler_from":  # a factory: the diffusers class of its kind, in flow mode
        target = f"diffusers.{flows[node.scheduler.kind]}"
        assert built.config.get("use_flow_sigmas", True)
    expected = BaseModel if target == "hiresrun.models.load_model" else get_class(target)
    assert isinstance(built, expected), (group, option, type(built))
    if group == "sampler":
        built.set_timesteps(node.num_steps)
        assert len(built.timesteps) >= node.num_steps


NATIVE = {"sd15": 512, "sd21": 512, "sdxl": 1024, "dit": 256, "tiny-sd-mnist": 16, "tiny-mnist": 16,
          "tiny-flux-mnist": 16, "sd3": 1024, "sd35": 1024, "flux-dev": 1024, "flux-schnell": 1024}


def test_every_model_file_states_its_native_size_and_data_resolution_defaults_to_it(tmp_path):
    from conftest import cli
    from omegaconf import OmegaConf

    assert {f.stem for f in (CONF / "model").glob("*.yaml")} == set(NATIVE) | {"diffusers"}
    for model, native in NATIVE.items():  # what `--cfg job` prints: the composed config (one through the CLI)
        cfg = compose([f"model={model}"]) if model != "sdxl" else \
            OmegaConf.create(cli("sample", "model=sdxl", "--cfg", "job", cwd=tmp_path).stdout)
        assert cfg.model.resolution == cfg.data.resolution == native, model
        assert cfg.method.resolution == native  # methods target the same size unless told otherwise


def test_a_model_default_size_is_checked_and_a_real_image_model_is_not_scored_against_mnist(tiny_sdxl_dir,
                                                                                          tiny_model_dir, tmp_path):
    from conftest import cli
    from hydra.errors import InstantiationException

    proc = cli("sample", "model=sdxl", "sample.prompt=cat", "metrics=default", cwd=tmp_path,
               env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and not list((tmp_path / "outputs").glob("sample/*/*"))  # no run folder left
    (line,) = proc.stderr.strip().splitlines()
    assert line == ("hiresrun: error: metrics= would score a model trained on laion against MNIST digits; give its "
                    "real images: data=folder data.root=<folder of images>")
    with pytest.raises(InstantiationException, match=r"model.resolution=1024, but the weights at .* are 16 px; set "
                                         r"model.resolution=16"):
        run.run(compose(["model=sdxl", f"model.path={tiny_sdxl_dir}", "sample.prompt=cat", "logger=none"],
                        tmp_path / "x"))
    # model=diffusers states no size: the folder's own (8 px UNet sample_size, no VAE) is the default target
    cfg = compose(["model=diffusers", f"model.path={tiny_model_dir}", "logger=none", "sample.num_samples=1",
                   "sampler.num_steps=2"], tmp_path / "d")
    assert cfg.data.resolution is None and run.run(cfg)["resolution"] == 8


@pytest.mark.gpu
def test_gpu_trainer_instantiates():
    cfg = compose(["trainer=gpu"])
    assert instantiate(cfg.trainer, default_root_dir="/tmp").precision == "bf16-mixed"


@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm", "cluster"])
def test_submitit_launchers_compose(launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    if launcher == "cluster":  # the example cluster: SLURM, requeue on timeout, USR2 ahead of the limit
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.signal_delay_s > 0


@pytest.mark.parametrize("name", sorted(f.stem for f in (CONF / "experiment").glob("*.yaml")))
def test_experiment_smoke_runs(name, tiny_model_dir, tmp_path):
    cfg = compose([f"experiment={name}"] + tiny_overrides(tiny_model_dir) + ["sample.num_samples=2"], tmp_path / "r")
    metrics = run.run(cfg)
    if cfg.task == "sample":
        assert metrics["num_samples"] == 2 and (tmp_path / "r" / "metrics.json").is_file()


STUDIES = sorted({f.parent.name for f in (CONF / "experiment").glob("*/*.yaml")} - {"fullscale", "parts"})
SPEED = {"sample": ["sample.num_samples=2", "sampler.num_steps=2", "metrics.num_reference=6",
                    "metrics.kid_subset_size=2", "logger=none", "trainer.enable_progress_bar=false"],
         "train": ["trainer.max_steps=1", "logger=none", "trainer.enable_progress_bar=false"]}


def preset_order(f: Path) -> tuple:
    """encode (PaGoDA's latents) before training, training before sampling, smaller resolutions first."""
    return ({"encode": 0, "train": 1}.get(f.stem.rstrip("0123456789"), 2), f.stem)


# End to end, every study's presets take 2-20 s each (PaGoDA's encode the whole embedded set first): the fast suite
# runs one study's presets end to end (Self-Cascade's: train, then sample what it trained) and, for every other
# study, composes each preset and builds its method (below); `slow` runs them all. The studies' own code paths run
# in their method tests (tests/test_pagoda.py runs PaGoDA's stages through the command line on a small set).
LONG = set(STUDIES) - {"selfcascade"}


@pytest.mark.parametrize("study", [pytest.param(s, marks=pytest.mark.slow) if s in LONG else s for s in STUDIES])
def test_study_presets_run_with_only_speed_knobs_changed(study, tmp_path):
    """Every study preset (conf/experiment/<study>/<arm>.yaml: the protocol of a reported number) runs as it is,
    with the number of images, steps and reference images cut (and PaGoDA's encoder to 2 Karras points): encode and
    training presets first (one step; a preset that leaves the method to its study gets finetune), then sampling.
    sample<N> samples what train<N> trained (else the last run of its method); a grow stage's method.previous (its
    study's to set) is the training run before it. A preset whose model is a folder its study builds (model.path
    ???) trains a tiny class-conditional UNet, and samples what the study's training preset exported."""
    from omegaconf import OmegaConf

    presets = sorted((CONF / "experiment" / study).glob("*.yaml"), key=preset_order)
    trained, previous = {}, {}
    for f in presets:
        name = f"{study}/{f.stem}"
        task = "sample" if preset_order(f)[0] == 2 else "train"
        arm = f.stem.removeprefix("train").removeprefix("sample")
        folder = tmp_path / f.stem
        overrides = [f"experiment={name}", f"task={task}", *SPEED[task], f"paths.cache_dir={tmp_path / 'cache'}"]
        cfg = compose(overrides, folder)
        if "inv_steps" in cfg.method:
            overrides.append("method.inv_steps=2")
        if OmegaConf.is_missing(cfg.model, "path"):
            built = tmp_path / "class-model"
            if task == "train":
                save_pipeline(tiny_unet(**PLAIN_BLOCKS, num_class_embeds=11), SCHED, built)
            overrides.append(f"model.path={built if task == 'train' else trained['model'] / 'model'}")
        if cfg.method.get("stage") == "grow" and not cfg.method.previous:
            previous[arm] = previous.get(arm, trained["model"])
            overrides.append(f"method.previous={previous[arm]}")
        cfg = compose(overrides, folder)
        if task == "train" and cfg.method._target_.endswith("NoneMethod"):
            cfg = compose([*overrides, "method=finetune"], folder)
        if task == "sample" and instantiate(cfg.method).trains:
            cfg = compose([*overrides, f"ckpt_path={trained.get(arm) or trained[str(cfg.method._target_)]}"], folder)
        result = run.run(cfg)
        record = json.loads((folder / "metrics.json").read_text())
        assert record["task"] == task, name
        if cfg.method.get("stage") == "encode":
            assert record["encoded"] == len(load_mnist()[0]) - 10 * cfg.data.ref_per_class, name
        elif task == "train":
            assert record["steps"] == 1 and (folder / "checkpoints" / "last.ckpt").is_file(), name
            trained[arm] = trained[str(cfg.method._target_)] = trained["model"] = folder
        else:
            quality = "fid" if cfg.metrics.fid else "digit_acc"  # a digit-metrics-only preset computes no FID
            assert result["num_samples"] == 2 and quality in result, name


@pytest.mark.parametrize("group", ["method", "accelerator"])
def test_yaml_writes_only_what_differs_from_the_constructor_and_says_why(group):
    """One source per default: a method's or accelerator's YAML holds `_target_`, interpolations and
    deliberate changes (each with a comment on its line), never a copy of a constructor default, never a key the
    constructor does not take; the composed config still holds every keyword, at the constructor's value."""
    from omegaconf import OmegaConf

    from hiresrun.schema import options, signature_defaults

    for name, own in options(group).items():
        defaults = signature_defaults(own["_target_"])
        lines = (CONF / group / f"{name}.yaml").read_text().splitlines()
        for key, value in own.items():
            if key in ("_target_", "_recursive_", "defaults"):
                continue
            assert key in defaults or key == "resolution", f"{group}/{name}.yaml: {key} is no constructor keyword"
            if key in defaults and not (isinstance(value, str) and value.startswith("${")):
                assert value != defaults[key], f"{group}/{name}.yaml repeats the default {key}: {value!r}"
                line = next(ln for ln in lines if ln.startswith(f"{key}:"))
                assert "#" in line, f"{group}/{name}.yaml changes {key} without saying why on its line"
        composed = OmegaConf.to_container(compose([f"{group}={name}"])[group])
        for key, value in defaults.items():  # the schema fills in what the file leaves out
            assert composed[key] == own.get(key, value), f"{group}={name}: {key}"


@pytest.mark.parametrize("group", ["method", "accelerator"])
def test_the_schema_read_from_source_equals_the_constructor_signature(group):
    """schema.source_defaults (the constructors' defaults parsed from their files, no import) equals what
    inspect.signature reads from the imported class, for every option, inherited constructors included."""
    from hiresrun.schema import options, signature_defaults, source_defaults

    for name, own in options(group).items():
        assert source_defaults(own["_target_"]) == signature_defaults(own["_target_"]), name


def test_a_knob_the_yaml_leaves_out_is_still_set_from_the_command_line():
    cfg = compose(["method=selfcascade", "method.strength=0.3", "accelerator=adaptive", "accelerator.c_max=2"])
    assert cfg.method.strength == 0.3 and cfg.method.mode == "tuned" and cfg.accelerator.c_max == 2
    with pytest.raises(Exception, match="strenght"):
        compose(["method=selfcascade", "method.strenght=0.3"])  # a typo is still refused (struct mode)


@pytest.mark.parametrize("study", sorted(LONG))
def test_long_study_presets_compose_and_build_their_method(study, tmp_path):
    """The fast stand-in for a `slow` study's end-to-end presets: each composes with its task and builds its method
    (what a wrong key, value or class in the preset breaks first)."""
    presets = sorted((CONF / "experiment" / study).glob("*.yaml"), key=preset_order)
    assert presets
    for f in presets:
        task = "sample" if preset_order(f)[0] == 2 else "train"
        cfg = compose([f"experiment={study}/{f.stem}", f"task={task}", *SPEED[task]],
                      tmp_path / f.stem)
        method = instantiate(cfg.method)
        assert type(method).__module__.startswith("hiresrun.methods"), f.stem
