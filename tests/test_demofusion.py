"""method=demofusion (hiresrun/methods/demofusion.py): the whole method against a transcription of the authors' loop
(every view stepped by the scheduler, then averaged) on the embedded pixel base with DDIM, the window layout and its
jitter, the Gaussian filter's closed form, the base size as `none` bit for bit, the view count in NFE, one-line
refusals."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import hiresrun
from hiresrun import sampling
from hiresrun.methods.demofusion import gaussian_filter, windows

SEEDS = [0, 1]


def _authors_views(height, width, window, stride):  # the authors' MultiDiffusion windows without jitter
    n_h = int((height - window) / stride - 1e-6) + 2 if height > window else 1
    n_w = int((width - window) / stride - 1e-6) + 2 if width > window else 1
    views = []
    for i in range(n_h * n_w):
        h0, w0 = (i // n_w) * stride, (i % n_w) * stride
        h1, w1 = h0 + window, w0 + window
        if h1 > height:
            h0, h1 = h0 + height - h1, height
        if w1 > width:
            w0, w1 = w0 + width - w1, width
        views.append((h0, h1, w0, w1))
    return views


def _reference(unet, scheduler, x_T, eps, steps, scale=2, window=16, stride=8, s1=3.0, s2=1.0, s3=1.0, sigma=1.0):
    """DemoFusion for one image as the authors write it: each view stepped by the scheduler, the stepped views
    averaged (whole-tensor mean and std: their batch is one image)."""
    def step(out, t, x):
        return scheduler.step(out, t, x).prev_sample

    scheduler.set_timesteps(steps)
    z = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        z = step(unet(scheduler.scale_model_input(z, t), t).sample, t, z)
    anchor_mean, anchor_std = z.mean(), z.std()
    z = F.interpolate(z, size=eps.shape[-2:], mode="bicubic")
    T = scheduler.config.num_train_timesteps
    noised = [scheduler.add_noise(z, eps, t.unsqueeze(0)) for t in scheduler.timesteps]
    lat = noised[0]
    for i, t in enumerate(scheduler.timesteps):
        c = 0.5 * (1 + torch.cos(torch.pi * (T - t) / T)).item()
        c1 = c ** s1
        lat = lat * (1 - c1) + noised[i] * c1
        value_local, count_local = torch.zeros_like(lat), torch.zeros_like(lat)
        for h0, h1, w0, w1 in _authors_views(*lat.shape[-2:], window, stride):
            v = lat[:, :, h0:h1, w0:w1]
            value_local[:, :, h0:h1, w0:w1] += step(unet(scheduler.scale_model_input(v, t), t).sample, t, v)
            count_local[:, :, h0:h1, w0:w1] += 1
        c2 = c ** s2
        value = value_local / count_local * (1 - c2)
        count = torch.ones_like(lat) * (1 - c2)
        c3 = 0.99 * c ** s3 + 1e-2
        k = 2 * scale - 1
        g1 = torch.exp(-(torch.arange(k) - (k - 1) / 2) ** 2 / (2 * (sigma * c3) ** 2))
        g1 = g1 / g1.sum()
        kernel = (g1[:, None] * g1[None, :])[None, None].repeat(lat.shape[1], 1, 1, 1)
        blurred = F.conv2d(lat, kernel, padding=k // 2, groups=lat.shape[1])
        blurred = (blurred - blurred.mean()) / blurred.std() * lat.std() + lat.mean()
        value_global = torch.zeros_like(lat)
        for h in range(scale):
            for w in range(scale):
                v, g = lat[:, :, h::scale, w::scale], blurred[:, :, h::scale, w::scale]
                value_global[:, :, h::scale, w::scale] += step(unet(scheduler.scale_model_input(g, t), t).sample, t, v)
        value = value + value_global * c2
        count = count + torch.ones_like(value_global) * c2
        lat = torch.where(count > 0, value / count, value)
    return (lat - lat.mean()) / lat.std() * anchor_std + anchor_mean


def _float_images(sampler, seeds):
    counter = sampling.Counter()
    loop = sampler.loop(seeds, counter, torch.device("cpu"))
    with torch.no_grad():
        return sampler.method.sample(sampler.net, loop.gens, loop), counter


@pytest.mark.parametrize("knobs", [{}, {"stride": 4, "s1": 1.0, "s2": 2.0, "s3": 0.5, "sigma": 0.6}],
                         ids=["defaults", "other knobs"])
def test_it_equals_the_authors_loop_that_steps_every_view(knobs):
    names = {"stride": "stride", "s1": "cosine_scale_1", "s2": "cosine_scale_2", "s3": "cosine_scale_3",
             "sigma": "sigma"}
    sampler = hiresrun.load("+method=demofusion", "sampler=ddim", data__resolution=32, sampler__num_steps=4,
                            method__jitter=False, **{f"method__{names[k]}": v for k, v in knobs.items()})
    # the embedded base's DDPM config clamps x0 (clip_sample): a step affine in (x, eps) needs it off, as in SD's
    sampler.scheduler = type(sampler.scheduler).from_config(sampler.scheduler.config, clip_sample=False)
    seeds = SEEDS if not knobs else SEEDS[:1]
    ours, _ = _float_images(sampler, seeds)
    unet = sampler.method.base.unet
    for i, seed in enumerate(seeds):
        gens = sampling.generators([seed])
        x_T, eps = sampling.noise(gens, (1, 16, 16)), sampling.noise(gens, (1, 32, 32))
        with torch.no_grad():
            ref = _reference(unet, sampler.scheduler, x_T, eps, steps=4, **knobs)
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-4), (ours[i:i + 1] - ref).abs().max()


def test_each_view_is_a_base_size_call_in_the_nfe():
    sampler = hiresrun.load("+method=demofusion", "sampler=ddim", data__resolution=32, sampler__num_steps=4)
    _, counter = _float_images(sampler, [0])
    sampler.scheduler.set_timesteps(4)
    ts = sampler.scheduler.timesteps.tolist()
    # 4 base-size steps; then per step 9 windows (stride 8 over 32) and, where the cosine factor is above 0, 4 sub-grids
    assert counter.evals == 4 + 9 * 4 + 4 * sum(math.cos(math.pi * (1000 - t) / 1000) > -1 for t in ts)


def test_at_the_base_size_it_is_none_bit_for_bit():
    plain = hiresrun.load("+method=none", sampler__num_steps=4)(SEEDS)
    assert torch.equal(hiresrun.load("+method=demofusion", sampler__num_steps=4)(SEEDS), plain)


def test_the_windows_cover_the_latent_and_jitter_only_outwards_at_the_sides():
    plain = windows(32, 32, 16, 8)
    assert plain == _authors_views(32, 32, 16, 8)
    j = (16 - 8) // 4
    for seed in range(20):
        views = windows(32, 32, 16, 8, random.Random(seed))
        covered = torch.zeros(32 + 2 * j, 32 + 2 * j)
        for (a, b, c, d), (pa, _, pc, _) in zip(views, plain):
            assert b - a == 16 and d - c == 16 and 0 <= a and b <= 32 + 2 * j and 0 <= c and d <= 32 + 2 * j
            assert abs(a - j - pa) <= j and abs(c - j - pc) <= j
            if pa == 0:
                assert a <= j  # the top row moves up into the border or stays
            covered[a:b, c:d] += 1
        assert (covered[j:j + 32, j:j + 32] > 0).all()


def test_the_gaussian_filter_is_the_normalised_separable_kernel():
    x = torch.zeros(1, 2, 9, 9)
    x[:, :, 4, 4] = 1
    out = gaussian_filter(x, 3, 0.8)
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.8 ** 2))
    g = g / g.sum()
    assert torch.allclose(out[0, 0, 3:6, 3:6], g[:, None] * g[None, :], atol=1e-7)
    assert torch.allclose(out.sum(), torch.tensor(2.0))


@pytest.mark.parametrize("override, says", [
    ("data.resolution=24", "data.resolution=24 is not one; use a multiple of 16"),
    ("method.stride=0", "method.stride=0: the local windows' spacing"),
    ("method.stride=17", "method.stride=17: local windows are 16 latent pixels wide"),
    ("method.sigma=0", "method.sigma=0: the Gaussian's standard deviation, above 0"),
    ("method.cosine_scale_1=-1", "method.cosine_scale_1=-1: an exponent of the cosine factor"),
    ("+accelerator=stepskip", "calls the model several times per sampler step"),
    ("+accelerator=deepcache", "calls the model several times per sampler step"),
])
def test_nonsense_is_one_line(override, says):
    with pytest.raises(hiresrun.HiresrunError, match=says):
        hiresrun.load("+method=demofusion", override, **({} if "resolution" in override else
                                                         {"data__resolution": 32}))
