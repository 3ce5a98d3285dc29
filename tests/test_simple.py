"""simple diffusion: closed forms of the shifted/interpolated log-SNR schedule, its discretisation into trained_betas,
v/eps/x0 conversions, the multiscale loss, dropout placement, patch/DWT transforms, and the schedule travelling in
the checkpoint through `hiresrun train` -> `hiresrun sample`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, SCHED, cli, compose, tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler
from hydra.utils import instantiate

from hiresrun.build import load_net_weights, sampler_scheduler
from hiresrun.errors import UsageError
from hiresrun.methods.simple import (
    DWT,
    Patch,
    Simple,
    alpha_sigma,
    eps_from_v,
    logsnr_cosine,
    logsnr_schedule,
    multiscale_mse,
    place_dropout,
    scheduler_config,
    trained_betas,
    v_target,
    x0_from_v,
)
from hiresrun.models import BaseModel, load_model
from hiresrun.sampling import Sampler

t = torch.linspace(0, 1, 101, dtype=torch.float64)


def base():
    unet = tiny_unet().eval()
    return BaseModel(unet=unet, scheduler_config=SCHED, resolution=8, channels=1, weights_hash="t", source="t")


def test_cosine_closed_forms():
    lam = logsnr_cosine(torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(lam, torch.tensor([15.0, 1.7613, 0.0, -15.0], dtype=torch.float64), atol=1e-4)
    assert abs(float(lam[2])) < 1e-12
    alpha, sigma = alpha_sigma(logsnr_schedule(t, "shifted", 16, 64))
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), atol=1e-12)


@pytest.mark.parametrize("noise_d, image_d, shift", [(16, 32, -1.386294), (16, 64, -2.772589), (8, 32, -2.772589),
                                                      (64, 512, -4.158883)])
def test_shift_is_constant_at_every_t(noise_d, image_d, shift):
    diff = logsnr_schedule(t, "shifted", noise_d, image_d) - logsnr_cosine(t)
    assert torch.allclose(diff, torch.full_like(t, shift), atol=1e-6)


def test_identity_and_clamped_end_points():
    for clamp in (False, True):
        assert torch.equal(logsnr_schedule(t, "shifted", 32, 32, shift_clamp_range=clamp), logsnr_cosine(t))
    clamped = logsnr_schedule(t, "shifted", 16, 64, shift_clamp_range=True)
    assert torch.allclose(clamped[[0, -1]], torch.tensor([15.0, -15.0], dtype=torch.float64), atol=1e-9)
    assert not torch.allclose(clamped, logsnr_schedule(t, "shifted", 16, 64), atol=1e-3)


def test_interpolated_end_points_by_direction():
    low, high = logsnr_schedule(t, "shifted", 32, 512), logsnr_schedule(t, "shifted", 256, 512)
    eq6 = logsnr_schedule(t, "interpolated", 32, 512, noise_d_high=256, interp_direction="eq6")
    pseudo = logsnr_schedule(t, "interpolated", 32, 512, noise_d_high=256, interp_direction="pseudocode")
    assert torch.allclose(eq6[[0, -1]], torch.stack([low[0], high[-1]]))
    assert torch.allclose(pseudo[[0, -1]], torch.stack([high[0], low[-1]]))
    assert torch.allclose(eq6[50], (low[50] + high[50]) / 2)


def test_interpolated_default_is_the_papers_code_by_hand():
    """32 -> 512 with noise_d_high = 512 (no shift): lambda(0.75) = 0.75 (cos(0.75) + 2 ln(32/512)) + 0.25 cos(0.75),
    with cos(t) = -2 ln tan(t_min + t (t_max - t_min)), t_min = atan(e^-7.5), t_max = atan(e^7.5)."""
    import math

    t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    cos = -2 * math.log(math.tan(t_min + 0.75 * (t_max - t_min)))
    by_hand = 0.75 * (cos + 2 * math.log(32 / 512)) + 0.25 * cos
    ours = logsnr_schedule(torch.tensor([0.75], dtype=torch.float64), "interpolated", 32, 512, noise_d_high=512)
    assert float(ours) == pytest.approx(by_hand, abs=1e-9) and by_hand == pytest.approx(cos - 4.1589, abs=1e-3)
    method = Simple(512, schedule="interpolated", noise_d=32)
    assert method.settings["interp_direction"] == "pseudocode"


def test_discretised_betas_reproduce_alpha_bar_in_diffusers():
    lam = lambda s: logsnr_schedule(s, "shifted", 16, 32)
    grid = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(torch.cumprod(1 - trained_betas(lam), 0), torch.sigmoid(lam(grid)), atol=1e-12)
    schedule = {"schedule": "shifted", "noise_d": 16, "image_d": 32, "prediction_type": "v_prediction"}
    sched = DDPMScheduler.from_config(scheduler_config(SCHED, schedule))
    assert sched.config.prediction_type == "v_prediction"
    assert torch.allclose(sched.alphas_cumprod.double(), torch.sigmoid(lam(grid)), atol=1e-6)


def test_v_eps_x0_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 8, 8, generator=g,
                                                                                  dtype=torch.float64)
    alpha, sigma = alpha_sigma(torch.tensor([-5.0, 0.0, 2.0, 9.0], dtype=torch.float64)[:, None, None, None])
    z, v = alpha * x0 + sigma * eps, v_target(x0, eps, alpha, sigma)
    assert torch.allclose(eps_from_v(z, v, alpha, sigma), eps, atol=1e-12)
    assert torch.allclose(x0_from_v(z, v, alpha, sigma), x0, atol=1e-12)
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)  # eps-MSE = alpha^2 v-MSE
    eps_err = (eps_from_v(z, v_hat, alpha, sigma) - eps).square().mean(dim=(1, 2, 3))
    assert torch.allclose(eps_err, alpha.flatten() ** 2 * (v_hat - v).square().mean(dim=(1, 2, 3)))


def test_multiscale_loss_single_scale_is_plain_and_weights_low_scales():
    a, b = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    assert torch.allclose(multiscale_mse(a, b, [32]), (a - b).square().mean(dim=(1, 2, 3)))
    pooled = lambda s: F.avg_pool2d(a - b, 32 // s).square().mean(dim=(1, 2, 3))
    expect = (pooled(32) / 32 + pooled(16) / 16 + pooled(8) / 8) / (1 / 32 + 1 / 16 + 1 / 8)
    assert torch.allclose(multiscale_mse(a, b, [32, 16, 8]), expect)
    assert torch.allclose(multiscale_mse(a, b, [32, 16], "uniform"), (pooled(32) + pooled(16)) / 2)
    method = Simple(32, noise_d=8, multiscale=True)
    method.wrap(base())
    assert method.scales(32, 8) == [32, 16, 8]
    same = [Simple(16, multiscale=m, multiscale_min=16, dropout=0.0) for m in (False, True)]
    batch = {"image": torch.rand(2, 1, 16, 16) * 2 - 1, "label": torch.tensor([-1, -1])}
    losses = []
    for method in same:
        net = method.wrap(base())
        torch.manual_seed(0)
        losses.append(method.loss(net, batch)["loss"])
    assert torch.equal(losses[0], losses[1])


def test_dropout_only_on_low_resolution_feature_maps():
    unet = load_model("tiny-mnist").unet  # 3 levels: 32, 16, 8 at a 32px target
    assert place_dropout(unet, 0.1, 8, 32) == [8]
    p = {side: {r.dropout.p for blk in unet.down_blocks[j:j + 1] for r in blk.resnets} for j, side in
         enumerate((32, 16, 8))}
    assert p == {32: {0.0}, 16: {0.0}, 8: {0.1}} and {r.dropout.p for r in unet.mid_block.resnets} == {0.1}
    assert [{r.dropout.p for r in blk.resnets} for blk in unet.up_blocks] == [{0.1}, {0.0}, {0.0}]
    net = Simple(32).wrap(load_model("tiny-mnist"))
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 1_112_801  # every UNet weight


def test_patch_and_dwt_invert_and_dwt_matches_pywavelets():
    import pywt

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for tr in (Patch(2), Patch(4), DWT(1), DWT(2)):
        y = tr(x)
        assert y.shape[1] * y.shape[-1] ** 2 == 3 * 16 * 16 and torch.allclose(tr.inverse(y), x, atol=1e-12)
    ll = pywt.dwt2(x[0, 0].numpy(), "bior2.2", mode="periodization")[0]
    assert torch.allclose(torch.from_numpy(ll), DWT(1)(x)[0, 0].roll((-1, -1), (0, 1)), atol=1e-12)


def test_pretrained_patch_net_starts_as_the_base_at_half_size():
    b = base()
    half = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = b.unet(half, torch.tensor(300)).sample
        net = Simple(16, downsample="patch").wrap(b).eval()
        out = net(F.interpolate(half, scale_factor=2, mode="nearest"), torch.tensor(300)).sample
    assert out.shape == (2, 1, 16, 16)
    assert torch.allclose(out, F.interpolate(ref, scale_factor=2, mode="nearest"), atol=1e-5)


def test_bad_settings_name_the_fix():
    with pytest.raises(UsageError, match="method.schedule=cosine: choose shifted or interpolated"):
        Simple(32, schedule="cosine")
    with pytest.raises(UsageError, match="method.downsample_factor=3"):
        Simple(32, downsample="patch", downsample_factor=3)
    with pytest.raises(UsageError, match="divisible"):
        Simple(16, downsample="patch", downsample_factor=16).wrap(base())


def test_every_sampler_runs_on_the_simple_schedule():
    method = Simple(16)
    net = method.wrap(base())
    names = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml") if not p.stem.startswith(("edm_", "flow_")))
    assert {"ddim", "ddpm", "dpmsolver", "euler", "heun", "unipc"} <= set(names)
    for name in names:
        cfg = compose([f"sampler={name}"])
        sched = sampler_scheduler(cfg, method.base, method)
        assert sched.config.prediction_type == "v_prediction" and sched.config.trained_betas is not None, name
        images = Sampler(net.eval(), method, sched, num_steps=3).generate([0, 1])["images"]
        assert images.shape == (2, 1, 16, 16), name


def test_train_then_sample_rebuilds_the_schedule_from_the_checkpoint(tiny_model_dir: Path, tmp_path):
    common = ["model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none"]
    proc = cli("train", "+method=simple", "method.noise_d=4", "trainer.max_steps=2", "data.batch_size=4",
               "train.grid_every=0", "hydra.run.dir=tr", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(tmp_path / "tr" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["net._extra_state"]["noise_d"] == 4
    proc = cli("sample", "+method=simple", "ckpt_path=tr", "sampler.num_steps=3", "sample.num_samples=2",
               "hydra.run.dir=sa", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # what `hiresrun sample` built: the default noise_d (8) is overridden by the checkpoint's (4)
    cfg = compose(["method=simple", *common])
    b, method = instantiate(cfg.model), instantiate(cfg.method)
    net = method.wrap(b)
    default = sampler_scheduler(cfg, b, method).alphas_cumprod
    load_net_weights(net, str(tmp_path / "tr" / "checkpoints" / "last.ckpt"), b)
    sched = sampler_scheduler(cfg, b, method)
    assert isinstance(sched, DDIMScheduler) and sched.config.prediction_type == "v_prediction"
    grid = torch.arange(1, 1001, dtype=torch.float64) / 1000
    expect = torch.sigmoid(logsnr_cosine(grid, shift=2 * math.log(4 / 16)))
    assert torch.allclose(sched.alphas_cumprod.double(), expect, atol=1e-6)
    assert not torch.allclose(default.double(), expect, atol=1e-3)
