"""Every option of every config group composes and instantiates; every experiment smoke-runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF, compose, tiny_overrides
from hydra.utils import instantiate

from hiresrun import run

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_groups_are_the_documented_ones():
    assert set(GROUPS) == {"accelerator", "data", "experiment", "logger", "method", "metrics", "model", "paths",
                           "sampler", "trainer"}


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] != "experiment"])
def test_option_composes_and_instantiates(group, option, tiny_model_dir, tiny_sd_dir, tiny_sdxl_dir, tiny_dit_dir,
                                         tmp_path):
    overrides = [f"{group}={option}"] + {("model", "diffusers"): [f"model.path={tiny_model_dir}"],
                                         ("model", "sd15"): [f"model.path={tiny_sd_dir}"],
                                         ("model", "sd21"): [f"model.path={tiny_sd_dir}"],
                                         ("model", "sdxl"): [f"model.path={tiny_sdxl_dir}"],
                                         ("model", "dit"): [f"model.path={tiny_dit_dir}"],
                                         ("data", "folder"): [f"data.root={tmp_path}"]}.get((group, option), [])
    if group == "model":
        overrides.append("model.init=scratch")  # the architecture is enough; weights are tested elsewhere
    cfg = compose(overrides, tmp_path / "run")
    node = cfg[group]
    if group == "trainer" and option == "gpu":
        assert node.accelerator == "gpu" and node.precision == "bf16-mixed"
        if not torch.cuda.is_available():
            return  # instantiating needs a GPU; the `gpu`-marked test below does it where there is one
    if "_target_" not in node and group != "sampler":
        assert group in ("logger", "metrics", "paths"), f"{group}={option} builds nothing"
        return
    built = instantiate(node.scheduler)(json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json")
                                                   .read_text())) if group == "sampler" else instantiate(node)
    assert built is not None
    if group == "sampler":
        built.set_timesteps(node.num_steps)
        assert len(built.timesteps) >= node.num_steps


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
