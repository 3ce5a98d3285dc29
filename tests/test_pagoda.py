"""PaGoDA: the VE view's numbers, inversion round trips (an exact Gaussian denoiser, so a wrong sigma <-> t shows),
the resumable latent cache, generator identities at init, growing (copied weights, what trains), NFE 1, the CLI."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SCHED, cli, tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from hiresrun import sampling
from hiresrun.errors import UsageError
from hiresrun.lit import LitModule
from hiresrun.methods import Method
from hiresrun.methods.pagoda import PaGoDA
from hiresrun.methods.pagoda.cache import LatentCache, encode_dataset, fingerprint, lookup
from hiresrun.methods.pagoda.nets import Generator, freeze_for_growing, up_path_units
from hiresrun.methods.pagoda.ode import VEView, c_in, ddim_grid, ddim_invert, heun, heun_invert, karras_sigmas
from hiresrun.models import BaseModel, model_fn
from hiresrun.sampling import Sampler


def base(unet=None, resolution=8):
    unet = (unet or tiny_unet()).eval()
    return BaseModel(unet=unet, scheduler_config=SCHED, resolution=resolution, channels=1, weights_hash="t",
                     source="t")


class GaussianDenoiser(nn.Module):
    """The exact eps-prediction for data ~ N(0, s^2 I) on the discrete schedule (abar interpolated in t):
    E[eps | x_t] = sqrt(1 - abar) x_t / (abar s^2 + 1 - abar). Counts its calls."""

    def __init__(self, s: float = 0.5):
        super().__init__()
        self.s, self.calls = s, 0
        self.abar = DDPMScheduler.from_config(SCHED).alphas_cumprod.double().numpy()

    def forward(self, x, t, **kw):
        self.calls += 1
        t = torch.as_tensor(t).double().reshape(-1)[:1].item()
        a = float(np.interp(t, np.arange(len(self.abar)), self.abar))
        return SimpleNamespace(sample=((1 - a) ** 0.5 * x.double() / (a * self.s ** 2 + 1 - a)).to(x.dtype))


def psnr(a, b):
    return float(10 * torch.log10(4 / ((a.clamp(-1, 1) - b) ** 2).mean()))


def ddim_decode(unet, view, z, steps):
    """The base's own deterministic sampler (diffusers DDIM on sampling.sample) from a VE-scale latent."""
    scheduler = DDIMScheduler.from_config(ddim_grid(view, SCHED, steps, 80.0))
    return sampling.sample(model_fn(unet), z * scheduler.alphas_cumprod[round(view.t(80.0))] ** 0.5, scheduler, steps)


def test_ve_view_numbers_and_karras_grid():
    view = VEView(SCHED)
    assert view.t(80.0) == pytest.approx(991.0, abs=0.1)  # sigma_max = 80 falls at t ~ 991
    assert view.sigma(999) == pytest.approx(2.03e4, rel=0.01)
    assert c_in(80.0, sigma_data=0.5) == pytest.approx(1 / 6400.25 ** 0.5, rel=1e-12)
    s = karras_sigmas()
    assert len(s) == 41 and s[0] == 80.0 and s[39] == pytest.approx(0.002) and s[40] == 0
    assert (s[1:40] < s[:39]).all()
    unet = GaussianDenoiser()
    heun_invert(view, unet, torch.zeros(1, 1, 2, 2), 40, 80.0)
    assert unet.calls == 78  # 39 Heun steps up the reversed grid, no extra evaluation


def test_inversion_round_trips_and_latent_scale():
    view, unet = VEView(SCHED), GaussianDenoiser(0.5)
    x = (0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    z_heun = heun_invert(view, unet, x, 40, 80.0)
    z_ddim = ddim_invert(view, unet, x, 50, 80.0, SCHED)
    for z in (z_heun, z_ddim):  # VE scale: the exact flow scales N(0, s^2) data by sqrt(s^2 + sigma_max^2) / s
        assert z.std().item() == pytest.approx(x.std().item() * (0.25 + 80.0 ** 2) ** 0.5 / 0.5, rel=0.05)
    assert psnr(heun(lambda v, s: view.denoise(unet, v, s), z_heun, karras_sigmas()[:-1]), x) > 60
    # 50 first-order DDIM steps back from either encoder: measured 40.7 / 41.9 dB here
    assert psnr(ddim_decode(unet, view, z_heun, 50), x) > 35  # Heun encoder -> the base's own DDIM sampler
    assert psnr(ddim_decode(unet, view, z_ddim, 50), x) > 35


def test_ve_denoiser_is_the_posterior_mean():
    """D(x; sigma) of the VP model read through the VE view = s^2 x / (s^2 + sigma^2) for N(0, s^2) data: a wrong
    sigma <-> t conversion or input scaling moves it."""
    view, unet, x = VEView(SCHED), GaussianDenoiser(0.5), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for sigma in (0.05, 0.5, 3.0, 80.0):
        assert torch.allclose(view.denoise(unet, x, sigma), 0.25 * x / (0.25 + sigma ** 2), rtol=2e-3, atol=1e-6)
    view.log_sigmas = view.log_sigmas + 0.1
    assert not torch.allclose(view.denoise(unet, x, 3.0), 0.25 * x / (0.25 + 9.0), rtol=2e-2)


def test_ddim_grid_ends_at_t_of_sigma_max_and_rejects_impossible_steps():
    view = VEView(SCHED)
    cfg = ddim_grid(view, SCHED, 40, 80.0)
    scheduler = DDIMScheduler.from_config(cfg)
    scheduler.set_timesteps(40)
    assert int(scheduler.timesteps[0]) == 991 and not cfg["clip_sample"]
    with pytest.raises(UsageError, match="method.inv_steps=1000"):
        ddim_grid(view, SCHED, 1000, 80.0)


def test_encode_cache_resumes_by_chunk_and_rekeys(tmp_path):
    data = [{"base": torch.full((1, 2, 2), float(i)) + torch.arange(4.0).reshape(1, 2, 2), "label": -1}
            for i in range(5)]
    calls = []

    def encoder(x, labels):
        calls.append(len(x))
        return x * 10

    cache = LatentCache(tmp_path, {"weights_sha256": "a", "solver": "heun", "steps": 40})
    assert encode_dataset(encoder, data, cache, [0, 1], 2, log=lambda s: None)["encoded"] == 10
    assert calls == [2, 2, 1] * 2 and len(list(cache.folder.glob("*.pt"))) == 6
    calls.clear()
    cache.path(1, 2).unlink()  # as if killed before this chunk was written
    stats = encode_dataset(encoder, data, cache, [0, 1], 2, log=lambda s: None)
    assert calls == [2] and stats == {"encoded": 2, "reused": 8, "cache": str(cache.folder)}

    def dies(x, labels):  # a kill mid-way leaves whole chunks only, which the rerun keeps
        if calls:
            raise KeyboardInterrupt
        calls.append(len(x))
        return x

    other = LatentCache(tmp_path, {"weights_sha256": "a", "solver": "heun", "steps": 20})
    assert other.folder != cache.folder
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(dies, data, other, [0], 2, log=lambda s: None)
    assert [p.name for p in other.folder.iterdir() if p.suffix != ".json"] == ["f0_00000000.pt"]
    calls.clear()
    assert encode_dataset(encoder, data, other, [0], 2, log=lambda s: None)["reused"] == 2 and calls == [2, 1]
    latents = cache.load()
    got = lookup(latents, torch.tensor([3, 3]), torch.tensor([0, 1]), torch.stack([data[3]["base"]] * 2))
    assert torch.equal(got[0], data[3]["base"] * 10) and torch.equal(got[1], data[3]["base"].flip(-1) * 10)
    assert latents[(3, 0)][1] == fingerprint(data[3]["base"])
    with pytest.raises(UsageError, match="different image"):
        lookup(latents, torch.tensor([3]), torch.tensor([0]), data[4]["base"][None])
    with pytest.raises(UsageError, match="method.stage=encode"):
        lookup(latents, torch.tensor([7]), torch.tensor([0]), data[4]["base"][None])


def test_base_stage_without_encoded_latents_says_encode_first(tmp_path):
    method = PaGoDA(8, cache_dir=str(tmp_path))
    net = method.wrap(base())
    batch = {"image": torch.zeros(2, 1, 8, 8), "base": torch.zeros(2, 1, 8, 8), "label": torch.tensor([-1, -1]),
             "index": torch.tensor([0, 1])}
    with pytest.raises(UsageError, match="method.stage=encode"):
        method.loss(net, batch)


def test_generator_at_init_is_the_base_at_sigma_max():
    b = base()
    z = 80.0 * torch.randn(2, 1, 8, 8)
    view = VEView(SCHED)
    net = PaGoDA(8, g_output="x0").wrap(b)
    assert all(torch.equal(p, q) for p, q in zip(net.gen.unet.parameters(), b.unet.parameters()))
    with torch.no_grad():  # both in eval mode: train mode takes another attention kernel (last-bit differences)
        assert torch.equal(net.gen.eval()(z), view.denoise(b.unet, z, 80.0))  # the base's one-step x0 at sigma_max
        raw = PaGoDA(8, g_output="raw").wrap(b).gen.eval()(z)
        assert torch.equal(raw, b.unet(c_in(80.0) * z, torch.full((2,), view.t(80.0))).sample)


def previous_run(tmp_path, b, method):
    """A stage=base run folder as `hiresrun train` writes it (checkpoint of what trains, EMA off)."""
    net = method.wrap(b)
    with torch.no_grad():
        for p in net.gen.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "base_run"
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "base": {"weights_sha256": "t"}}, folder / "checkpoints" / "last.ckpt")
    return net, folder


def test_grow_copies_weights_starts_as_nearest_upsampling_and_freezes(tmp_path):
    b = base()
    old, folder = previous_run(tmp_path, b, PaGoDA(8))
    grow = PaGoDA(16, stage="grow", previous=str(folder))
    net = grow.wrap(b)
    assert len(net.gen.levels) == 1 and grow.resolution == 16
    old_state, new_state = old.gen.state_dict(), net.gen.state_dict()
    assert set(old_state) <= set(new_state)
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)  # every old tensor copied
    seen = []
    net.gen.unet.up_blocks[-1].register_forward_hook(lambda m, a, o: seen.append(o))  # after the growing hook
    feats = []
    old.gen.unet.up_blocks[-1].register_forward_hook(lambda m, a, o: feats.append(o))
    z = 80.0 * torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert net.gen(z).shape == (2, 1, 16, 16)
        old.gen(z)
    assert torch.allclose(seen[0], F.interpolate(feats[0], scale_factor=2, mode="nearest"), atol=1e-6)
    clone = copy.deepcopy(net.gen).eval()  # what the EMA callback does: the growing hook must follow the copy
    with torch.no_grad():
        before = clone(z)
        for p in net.gen.levels.parameters():
            p.add_(0.1)
        assert torch.equal(clone(z), before) and not torch.equal(net.gen.eval()(z), before)
        for p in net.gen.levels.parameters():
            p.sub_(0.1)
    # what trains: the last round(7/16 * 4) = 2 decoder units (up_blocks[1]'s resnets), new levels, out layers
    trainable = {n.split(".")[0] if n.startswith("levels") else n.rsplit(".", 1)[0]
                 for n, p in net.gen.named_parameters() if p.requires_grad}
    expect = {"levels", "unet.conv_norm_out", "unet.conv_out", "unet.up_blocks.1.resnets.0.norm1"}
    assert expect <= trainable and not any(".up_blocks.0." in n or "down_blocks" in n or "mid_block" in n
                                           or "time_embedding" in n for n in trainable)
    batch = {"image": torch.rand(2, 1, 16, 16) * 2 - 1, "label": torch.tensor([-1, -1])}
    batch["base"] = F.avg_pool2d(batch["image"], 2)
    grow.rec_loss = "l2_pyramid"
    grow.reconstruction(net.gen(z), grow._real(batch, torch.tensor([0, 1]))).backward()
    for n, p in net.gen.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_freezing_rule_on_the_embedded_layout_and_grow_errors(tmp_path):
    from diffusers import UNet2DModel

    from hiresrun.models import ASSETS

    unet = UNet2DModel.from_config(UNet2DModel.load_config(ASSETS / "tiny-mnist" / "unet"))
    gen = Generator(unet, SCHED, levels=1)
    assert len(up_path_units(unet)) == 6
    freeze_for_growing(gen, 0.4375)  # up_blocks[1].resnets[1] (+ its upsampler) and up_blocks[2]
    blocks = {"".join(n.split(".")[2:5]) for n, p in gen.named_parameters()
              if p.requires_grad and n.startswith("unet.up_blocks")}
    assert blocks == {"1resnets1", "1upsamplers0", "2resnets0", "2resnets1"}
    with pytest.raises(UsageError, match="method.previous"):
        PaGoDA(16, stage="grow").wrap(base())
    with pytest.raises(UsageError, match="power-of-two multiple"):
        PaGoDA(24, stage="grow", previous="x").wrap(base())
    with pytest.raises(UsageError, match="no checkpoint there"):
        PaGoDA(16, stage="grow", previous=str(tmp_path / "nothing")).wrap(base())
    with pytest.raises(UsageError, match="method.stage=train"):
        PaGoDA(16, stage="train")


def test_adaptive_weight_clamps():
    method, w = PaGoDA(8), torch.ones(3, requires_grad=True)
    assert method.adaptive_weight((w * 1000).sum(), w.sum(), w) == 10.0
    assert method.adaptive_weight((w * 1e-6).sum(), w.sum(), w) == 0.01
    assert method.adaptive_weight((w * 2).sum(), w.sum(), w) == pytest.approx(2 / (1 + 1e-4 / 3 ** 0.5))
    method.adaptive = False
    assert method.adaptive_weight((w * 1000).sum(), w.sum(), w) == 1.0


def test_one_evaluation_per_image_and_image_depends_on_its_seed_only():
    method = PaGoDA(8)
    sampler = Sampler(method.wrap(base()), method, DDIMScheduler.from_config(SCHED), num_steps=50)
    out = sampler.generate([0, 1, 2])
    assert out["evals"] == 3 and out["images"].shape == (3, 1, 8, 8)
    assert torch.equal(sampler.generate([2])["images"][0], out["images"][2])


def test_encode_base_grow_and_sample_through_the_cli(tiny_model_dir, tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    common = ["model=diffusers", f"model.path={tiny_model_dir}", "data=folder", f"data.root={tmp_path / 'imgs'}",
              "data.resolution=16", "data.channels=1", "data.batch_size=4", "logger=none", "train.grid_every=0",
              "trainer.enable_progress_bar=false", f"paths.cache_dir={tmp_path / 'cache'}", "method.inv_steps=3",
              "method.encode_chunk=4"]
    proc = cli("train", "+method=pagoda", "method.stage=encode", "hydra.run.dir=enc", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "enc" / "metrics.json").read_text())["encoded"] == 8
    assert len(list((tmp_path / "cache" / "pagoda").glob("*/f0_*.pt"))) == 2
    proc = cli("train", "+method=pagoda", "method.stage=base", "trainer.max_steps=2", "hydra.run.dir=base",
               *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(tmp_path / "base" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and {k.split(".")[1] for k in ckpt["state_dict"]} == {"gen", "disc"}
    assert json.loads((tmp_path / "base" / "metrics.json").read_text())["resolution"] == 8  # G's size, not data's
    proc = cli("train", "+method=pagoda", "method.stage=grow", "method.previous=base", "trainer.max_steps=2",
               "method.rec_loss=l2_pyramid", "hydra.run.dir=grow", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "grow" / "metrics.json").read_text())["resolution"] == 16
    proc = cli("sample", "+method=pagoda", "method.stage=grow", "method.previous=base", "ckpt_path=grow",
               "sample.num_samples=2", "hydra.run.dir=sa", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "sa" / "metrics.json").read_text())
    assert metrics["nfe_per_image"] == 1 and metrics["resolution"] == 16


def test_generator_loss_with_distillation_and_discriminator_loss(tmp_path):
    b = base()
    method = PaGoDA(8, inv_steps=2, flips=[0], distill_weight=1.0, distill_steps=3, rec_loss="l2_pyramid",
                    cache_dir=str(tmp_path))
    net = method.wrap(b)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    data = [{"base": v, "label": -1} for v in images]
    encode_dataset(method.encoder(b), data, method.cache(b), [0], 2, log=lambda s: None)
    batch = {"image": images, "base": images, "label": torch.tensor([-1, -1]), "index": torch.tensor([0, 1])}
    calls = []
    hook = method.teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = method.loss(net, batch)
    hook.remove()
    assert set(out) == {"rec", "adv", "w", "distill", "loss"} and torch.isfinite(out["loss"])
    assert len(calls) == 4  # the teacher sample: Heun over 3 Karras points, 2 steps x 2 evaluations
    out["loss"].backward()
    assert all(p.grad is not None for p in net.gen.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    net.zero_grad(set_to_none=True)
    method.discriminator_loss(net, batch).backward()
    assert all(p.grad is None for p in net.gen.parameters()) and all(p.grad is not None for p in net.disc.parameters())


def test_lit_hands_optimisation_to_the_method_even_steps_g_odd_steps_d(tmp_path):
    from functools import partial

    b = base()
    method = PaGoDA(8, inv_steps=2, flips=[0], rec_loss="l2_pyramid", cache_dir=str(tmp_path))
    net = method.wrap(b)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    encode_dataset(method.encoder(b), [{"base": v, "label": -1} for v in images], method.cache(b), [0], 2,
                   log=lambda s: None)
    batch = {"image": images, "base": images, "label": torch.tensor([-1, -1]), "index": torch.tensor([0, 1])}
    lit = LitModule(net, method, optimizer=partial(torch.optim.SGD, lr=0.1))
    assert not lit.automatic_optimization
    assert LitModule(net, Method(8), optimizer=partial(torch.optim.SGD, lr=0.1)).automatic_optimization
    g_opt, d_opt = lit.configure_optimizers()
    assert g_opt.param_groups[0]["lr"] == method.g_lr and d_opt.param_groups[0]["lr"] == method.d_lr
    fake = SimpleNamespace(net=net, global_step=0, optimizers=lambda: (g_opt, d_opt),
                           manual_backward=lambda loss: loss.backward())
    for step, key, part in ((0, "loss", "gen."), (1, "loss_d", "disc.")):
        fake.global_step, before = step, {k: v.clone() for k, v in net.state_dict().items()}
        assert key in method.training_step(fake, batch)
        changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
        assert changed and all(k.startswith(part) for k in changed)


def test_latent_base_encodes_trains_and_samples_in_its_latent_space(tmp_path):
    """A latent base (4-channel UNet + AutoencoderKL): latents come from the VAE's encoding of the base view, G and D
    work on latents, and a sample is one G call followed by one VAE decode to a 3-channel image."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8).eval().requires_grad_(False)
    b = BaseModel(unet=tiny_unet(sample_size=4, channels=4).eval(), scheduler_config=SCHED, resolution=8, channels=3,
                  weights_hash="t", source="t", vae=vae, vae_scale=0.5)
    method = PaGoDA(8, inv_steps=2, flips=[0], rec_loss="l2_pyramid", cache_dir=str(tmp_path))
    net = method.wrap(b)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    encode_dataset(method.encoder(b), [{"base": v, "label": -1} for v in images], method.cache(b), [0], 2,
                   log=lambda s: None)
    z = lookup(method.latents(), torch.tensor([0, 1]), torch.tensor([0, 0]), images)
    assert z.shape == (2, 4, 4, 4)
    assert torch.allclose(z, heun_invert(method.view, b.unet, b.encode(images), 2, 80.0), atol=1e-4)
    batch = {"image": images, "base": images, "label": torch.tensor([-1, -1]), "index": torch.tensor([0, 1])}
    assert method._real(batch, torch.zeros(2)).shape == (2, 4, 4, 4)  # the loss compares latents
    out = method.loss(net, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in net.gen.parameters())
    assert torch.isfinite(method.discriminator_loss(net, batch))
    decodes = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, a: decodes.append(a[0].shape))
    sampler = Sampler(net, method, DDIMScheduler.from_config(SCHED), num_steps=50)
    out = sampler.generate([0, 1, 2])
    hook.remove()
    assert out["images"].shape == (3, 3, 8, 8) and out["evals"] == 3 and decodes == [(3, 4, 4, 4)]
