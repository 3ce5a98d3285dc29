"""Full-size replicas of released models (hiresrun/replica.py): the recorded architectures build to the released
parameter counts, and a written replica loads in diffusers' pipeline and samples in hiresrun."""

from __future__ import annotations

import json

import pytest
from conftest import cli


@pytest.mark.parametrize("family", ["sd15", "sd21-base", "sdxl", "sd3-medium", "flux-dev", "flux-schnell"])
def test_each_released_config_builds_to_the_recorded_parameter_counts(family):
    """Counted on the meta device (no memory). The UNets of SD 1.5 (859,520,964), SD 2.1 (865,910,724) and SDXL
    (2,567,463,684), SD3-medium's transformer (2,028,328,000), FLUX.1-dev's (11,901,408,320) and T5-XXL's encoder
    (4,762,310,656) are the counts the releases state; a changed key in the recorded configs moves them."""
    from hiresrun import replica

    assert replica.parameter_counts(family) == replica.RELEASED[family]["parameters"]


def test_an_unknown_family_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hiresrun.tiny", "sd9", str(tmp_path / "r"), "--full"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "choose one of sd15, sd21-base, sdxl" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_written_replica_loads_in_diffusers_and_samples_one_step_in_hiresrun(tmp_path):
    """SD 1.5 (1.07 B parameters, 2 GB in bf16): the folder's configs are the recorded ones, diffusers'
    StableDiffusionPipeline loads it, and `hiresrun sample` takes one step at 64 px."""
    from diffusers import StableDiffusionPipeline

    from hiresrun import replica

    folder = replica.write("sd15", tmp_path / "sd15")
    spec = replica.RELEASED["sd15"]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert {k: unet[k] for k in spec["unet"][1]} == {k: v for k, v in spec["unet"][1].items()}
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert sum(p.numel() for p in pipe.unet.parameters()) == spec["parameters"]["unet"]
    proc = cli("sample", "model=diffusers", f"model.path={folder}", "data.resolution=64", "sampler.num_steps=1",
               "sample.num_samples=1", "logger=none", "sample.prompt=a photo", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["nfe_per_image"] == 1 and metrics["estimated_peak_mb"] > 4000  # fp32 weights alone: 4.1 GB


def test_a_folder_saved_in_bf16_loads_in_fp32_and_samples(tiny_sd_dir, tmp_path):
    """Replicas (and many released folders) store bf16 / fp16 weights; hiresrun loads every part in fp32 (mixed
    precision is the sampler's autocast), so the text encoder, UNet and VAE agree on the dtype."""
    import diffusers
    import torch

    from hiresrun.models import load_model

    half = tmp_path / "bf16"
    diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir).to(torch.bfloat16).save_pretrained(half)
    base = load_model(str(half))
    assert {p.dtype for m in (base.unet, base.vae) for p in m.parameters()} == {torch.float32}
    proc = cli("sample", "model=diffusers", f"model.path={half}", "data.resolution=16", "sampler.num_steps=2",
               "sample.num_samples=2", "logger=none", "sample.prompt=a cat", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
