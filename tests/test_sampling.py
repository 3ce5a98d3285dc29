"""The sampling loop against diffusers' own pipelines, seed independence and mid-schedule starts."""

from __future__ import annotations

import pytest
import torch
from conftest import SCHED, compose, tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from hydra.utils import instantiate

from hiresrun import sampling
from hiresrun.methods.none import NoneMethod
from hiresrun.models import BaseModel, model_fn
from hiresrun.sampling import Sampler


def base_of(unet) -> BaseModel:
    return BaseModel(unet=unet.eval(), scheduler_config=SCHED, resolution=unet.config.sample_size, channels=1,
                     weights_hash="test", source="test")


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_loop_reproduces_diffusers_pipeline(kind):
    unet = tiny_unet(sample_size=16).eval()
    cls, pipe_cls, steps = {"ddim": (DDIMScheduler, DDIMPipeline, 10), "ddpm": (DDPMScheduler, DDPMPipeline, 20)}[kind]
    pipe = pipe_cls(unet=unet, scheduler=cls.from_config(SCHED))
    with torch.no_grad():
        ref = pipe(batch_size=3, generator=sampling.generators([0, 1, 2]), num_inference_steps=steps,
                   output_type="np").images
        gens = sampling.generators([0, 1, 2])
        x = sampling.sample(model_fn(unet), sampling.noise(gens, (1, 16, 16)), cls.from_config(SCHED), steps,
                            gens=gens)
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_images_do_not_depend_on_batch_size(kind):
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind]
    base, method = base_of(tiny_unet(sample_size=8)), NoneMethod(resolution=16)
    net = method.wrap(base)
    sampler = Sampler(net, method, cls.from_config(SCHED), num_steps=5)
    together = sampler.generate(list(range(7)))["images"]
    alone = torch.cat([sampler.generate([s])["images"] for s in range(7)])
    assert together.shape == (7, 1, 16, 16)
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[1])  # different seeds, different images


def test_mid_schedule_start_continues_the_full_run():
    unet = tiny_unet(sample_size=8).eval()
    gens, seen = sampling.generators([5, 6]), {}
    x_T = sampling.noise(gens, (1, 8, 8))
    with torch.no_grad():
        full = sampling.sample(model_fn(unet), x_T, DDIMScheduler.from_config(SCHED), 10,
                               callback=lambda i, t, x: seen.setdefault(i, x.clone()))
        # x after step index 3 is the state from which step 4 starts
        rest = sampling.sample(model_fn(unet), seen[3], DDIMScheduler.from_config(SCHED), 10, start_step=4)
    assert torch.equal(full, rest)


def test_counter_counts_image_evaluations():
    unet = tiny_unet(sample_size=8).eval()
    counter, gens = sampling.Counter(), sampling.generators(range(4))
    with torch.no_grad():
        sampling.sample(model_fn(unet), sampling.noise(gens, (1, 8, 8)), DDIMScheduler.from_config(SCHED), 6,
                        wrap=counter)
    assert counter.evals == 4 * 6


@pytest.mark.parametrize("name,evals_per_step", [("ddim", 1), ("ddpm", 1), ("dpmsolver", 1), ("euler", 1),
                                                  ("heun", 2), ("unipc", 1)])
def test_every_sampler_option_runs(name, evals_per_step):
    cfg = compose([f"sampler={name}", "sampler.num_steps=4"])
    scheduler = instantiate(cfg.sampler.scheduler)(SCHED)
    unet, counter, gens = tiny_unet(sample_size=8).eval(), sampling.Counter(), sampling.generators([0, 1])
    with torch.no_grad():
        x = sampling.sample(model_fn(unet), sampling.noise(gens, (1, 8, 8)), scheduler, 4, gens=gens, wrap=counter)
    assert torch.isfinite(x).all() and x.shape == (2, 1, 8, 8)
    # Heun evaluates twice per step except the last (its timesteps are 2n - 1 long)
    assert counter.evals == 2 * (4 * evals_per_step - (evals_per_step - 1))


def test_noise_depends_only_on_its_seed():
    a = sampling.noise(sampling.generators([3, 9]), (1, 4, 4))
    b = sampling.noise(sampling.generators([9]), (1, 4, 4))
    assert torch.equal(a[1], b[0])


def test_bf16_precision_switch_samples(tiny_model_dir, tmp_path):
    from conftest import tiny_overrides

    from hiresrun import run

    cfg = compose(tiny_overrides(tiny_model_dir) + ["trainer.precision=bf16-mixed"], tmp_path / "bf16")
    metrics = run.run(cfg)
    assert metrics["protocol"]["precision"] == "bf16-mixed" and metrics["num_samples"] == 3
