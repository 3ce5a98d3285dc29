"""accelerator=stepskip: every=1 is no accelerator bit for bit; every=2 equals a hand-written DDIM loop that calls the
UNet at even steps only; Heun reuses whole steps (both calls); a mask of the wrong length is one line."""

from __future__ import annotations

import pytest
import torch
from conftest import SCHED, tiny_unet
from diffusers import DDIMScheduler, HeunDiscreteScheduler

from hiresrun import sampling
from hiresrun.accelerators.stepskip import StepSkip
from hiresrun.errors import UsageError
from hiresrun.models import model_fn

SEEDS = [0, 1, 2]


def run(scheduler, steps: int, acc: StepSkip | None):
    unet, counter = tiny_unet().eval(), sampling.Counter()
    gens = sampling.generators(SEEDS)
    wrap = (lambda f, step: acc.wrap(counter(f), step)) if acc else (lambda f, step: counter(f))
    with torch.no_grad():
        x = sampling.sample(model_fn(unet), sampling.noise(gens, (1, 8, 8)), scheduler, steps, gens=gens, wrap=wrap)
    return x, counter.evals // len(SEEDS)  # per image


@pytest.mark.parametrize("neutral", [StepSkip(every=1), StepSkip(mask=[1] * 10), StepSkip(mask="1" * 10),
                                     StepSkip(mask=int("1" * 10))])  # the command line makes an int of 1111111111
def test_computing_every_step_is_no_accelerator_bit_for_bit(neutral):
    base, nfe = run(DDIMScheduler.from_config(SCHED), 10, None)
    x, nfe_skip = run(DDIMScheduler.from_config(SCHED), 10, neutral)
    assert torch.equal(x, base) and nfe == nfe_skip == 10


def test_every_second_step_is_ddim_reusing_the_last_eps():
    x, nfe = run(DDIMScheduler.from_config(SCHED), 10, StepSkip(every=2))
    unet, scheduler = tiny_unet().eval(), DDIMScheduler.from_config(SCHED)  # the reference, written out
    scheduler.set_timesteps(10)
    z = sampling.noise(sampling.generators(SEEDS), (1, 8, 8))
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if i % 2 == 0:
                eps = unet(z, t).sample
            z = scheduler.step(eps, t, z).prev_sample
    assert nfe == 5 and torch.allclose(x, z, atol=1e-6)


def test_a_mask_reuses_where_it_says_and_heun_skips_whole_steps():
    _, nfe = run(DDIMScheduler.from_config(SCHED), 6, StepSkip(mask=[1, 0, 0, 1, 1, 0]))
    assert nfe == 3
    _, full = run(HeunDiscreteScheduler.from_config(SCHED), 6, None)
    _, half = run(HeunDiscreteScheduler.from_config(SCHED), 6, StepSkip(every=2))
    assert full == 11 and half == 6  # 2 calls per step except the last: steps 0, 2, 4 computed = 2 + 2 + 2 calls


def test_bad_settings_are_one_line():
    with pytest.raises(UsageError, match="accelerator.every=0"):
        StepSkip(every=0)
    with pytest.raises(UsageError, match="accelerator.mask=102"):
        StepSkip(mask="102")
    with pytest.raises(UsageError, match="has 3 entries but the sampling loop makes 10 steps"):
        run(DDIMScheduler.from_config(SCHED), 10, StepSkip(mask=[1, 0, 1]))
