"""PaGoDA on any base: the EDM view (encoder, teacher, generator) is EDM's preconditioning and k-diffusion's Heun;
g_output=auto starts G image-like for eps, v, x0 and EDM bases; fullscale/pagoda-imagenet runs end to end on a tiny
class-conditional EDM folder with a labelled tree."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, tiny_unet
from test_edm import class_edm_and_tree, k_sampling, tiny_edm_net

from hiresrun import edm, run
from hiresrun.errors import UsageError
from hiresrun.methods.pagoda import PaGoDA
from hiresrun.methods.pagoda.ode import EDMView, VEView, heun, heun_invert, karras_sigmas, view_of
from hiresrun.models import BaseModel

EDM = edm.scheduler_config()
VP = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def test_edm_view_is_edm_table_1():
    net, x, sigma = tiny_edm_net(), torch.randn(2, 1, 8, 8), 3.7
    view = view_of(EDM)
    assert isinstance(view, EDMView) and isinstance(view_of(VP), VEView) and view.t(sigma) == math.log(sigma) / 4
    c_skip, c_out, c_in, c_noise = edm.coefficients(torch.tensor(sigma, dtype=torch.float64), 0.5)
    with torch.no_grad():
        expected = float(c_skip) * x + float(c_out) * net(float(c_in) * x, torch.full((2,), float(c_noise))).sample
        assert torch.allclose(view.denoise(net, x, sigma), expected, atol=1e-6)


def test_teacher_heun_on_an_edm_net_is_k_diffusions_sample_heun():
    """ode.heun on positive Karras points (PaGoDA's teacher and, reversed, its encoder) = k-diffusion's Heun."""
    ks, net, view = k_sampling(), tiny_edm_net(), EDMView(EDM)
    sigmas = karras_sigmas(6)[:-1]
    x = 80.0 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def denoiser(v, s):
        return view.denoise(net, v, float(s.reshape(-1)[0]))

    with torch.no_grad():
        ours = heun(lambda v, s: view.denoise(net, v, s), x, sigmas)
        ref = ks.sample_heun(denoiser, x, sigmas.float(), disable=True)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4)


class GaussianEDM(torch.nn.Module):
    """The exact EDM network F for data ~ N(0, s^2 I): D(x; sigma) = s^2 / (s^2 + sigma^2) x, so
    F = (D - c_skip x) / c_out, read back from its inputs (c_in x, ln(sigma) / 4)."""

    def __init__(self, s: float = 0.5, sigma_data: float = 0.5):
        super().__init__()
        self.s, self.sd = s, sigma_data

    def forward(self, x_in, c_noise, **kw):
        sigma = float(torch.as_tensor(c_noise).reshape(-1)[0].double().mul(4).exp())
        total = sigma ** 2 + self.sd ** 2
        x = x_in.double() * total ** 0.5
        d = self.s ** 2 / (self.s ** 2 + sigma ** 2) * x
        f = (d - self.sd ** 2 / total * x) / (sigma * self.sd / total ** 0.5)
        return SimpleNamespace(sample=f.to(x_in.dtype))


def test_heun_encoder_on_an_edm_base_round_trips():
    view, net = EDMView(EDM), GaussianEDM()
    x0 = 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = heun_invert(view, net, x0, 40, 80.0)
    back = heun(lambda v, s: view.denoise(net, v, s), z, karras_sigmas(40)[:-1])
    assert z.std() > 40  # VE scale: the latent of a Gaussian is ~ sigma_max times its whitened image
    assert float(10 * torch.log10(4 / ((back - x0) ** 2).mean())) > 60


def point_oracle(kind: str, target: torch.Tensor, scheduler_config: dict):
    """A network that predicts the one data point `target` exactly, in each parametrisation."""
    view = view_of(scheduler_config)

    def forward(x_in, t, **kw):
        t = float(torch.as_tensor(t).reshape(-1)[0])
        sigma = math.exp(4 * t) if kind == "edm" else view.sigma(t)
        x = x_in / view.c_in(sigma)  # back to VE scale
        if kind == "edm":
            total = sigma ** 2 + 0.25
            return SimpleNamespace(sample=(target - 0.25 / total * x) / (sigma * 0.5 / total ** 0.5))
        a, s = 1 / (1 + sigma ** 2) ** 0.5, sigma / (1 + sigma ** 2) ** 0.5
        eps = (x_in - a * target) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * target, "sample": target.expand_as(x_in)}[kind]
        return SimpleNamespace(sample=out)

    return forward


def cosine(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "edm"])
def test_default_generator_output_starts_image_like_for_every_parametrisation(kind):
    """G(sigma_max eps) at init with method.g_output's default is (a multiple of) the image an ideal base would
    give; raw would be the noise for eps and a sign-flipped image for v."""
    target = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    config = EDM if kind == "edm" else {**VP, "prediction_type": kind}
    unet = tiny_unet()
    unet.forward = point_oracle(kind, target, config)
    b = BaseModel(unet=unet, scheduler_config=config, resolution=8, channels=1, weights_hash="t", source="t",
                  parametrization="edm" if kind == "edm" else "standard")
    z = 80.0 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        g = PaGoDA(8).wrap(b).gen(z)
        raw = PaGoDA(8, g_output="raw").wrap(b).gen(z)
    assert all(cosine(g[i], target) > 0.99 for i in range(3))
    expected_raw = {"epsilon": 0.2, "v_prediction": -0.99}.get(kind)
    if expected_raw is not None:  # what the old raw default started from
        assert all(cosine(raw[i], target) < expected_raw for i in range(3))


def test_ddim_inverse_encoder_is_refused_on_an_edm_base():
    b = BaseModel(unet=tiny_unet(), scheduler_config=EDM, resolution=8, channels=1, weights_hash="t", source="t",
                  parametrization="edm")
    with pytest.raises(UsageError, match="method.inv_solver=heun"):
        PaGoDA(8, inv_solver="ddim_inverse").encoder(b)


def test_fullscale_pagoda_imagenet_runs_end_to_end_on_a_tiny_class_edm_folder(tmp_path, monkeypatch):
    """The paper setting as composed (encode -> base -> grow 2x -> one-step sample), on a tiny random
    class-conditional EDM UNet and a labelled tree: only the converted checkpoint and ImageNet are missing.
    The one-step sample gives each seed the class that method=none gives it (labels drawn before the noise)."""
    from diffusers import UNet2DModel

    class_edm_and_tree(tmp_path, 16)
    common = ["experiment=fullscale/pagoda-imagenet", f"model.path={tmp_path / 'edm'}",
              f"data.root={tmp_path / 'imgs'}", "data.resolution=16", "data.batch_size=3",
              "trainer=cpu", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
              "logger=none", "trainer.enable_progress_bar=false", "metrics=none", "train.grid_every=0",
              "method.inv_steps=3", "method.encode_chunk=3", "method.rec_loss=l2_pyramid",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    record = lambda name: json.loads((tmp_path / name / "metrics.json").read_text())
    run.run(compose([*common, "task=train", "method.stage=encode"], tmp_path / "enc"))
    assert record("enc")["encoded"] == 12  # 6 images x flips [0, 1]
    run.run(compose([*common, "task=train", "method.stage=base", "trainer.max_steps=2"], tmp_path / "base"))
    assert record("base")["resolution"] == 8
    run.run(compose([*common, "task=train", "method.stage=grow", f"method.previous={tmp_path / 'base'}",
                     "trainer.max_steps=2"], tmp_path / "grow"))
    assert record("grow")["resolution"] == 16
    seen, forward = [], UNet2DModel.forward

    def spy(self, sample, timestep, class_labels=None, **kw):
        seen.append(class_labels.tolist())
        return forward(self, sample, timestep, class_labels=class_labels, **kw)

    monkeypatch.setattr(UNet2DModel, "forward", spy)
    out = run.run(compose([*common, "method.stage=grow", f"method.previous={tmp_path / 'base'}",
                           f"ckpt_path={tmp_path / 'grow'}", "sample.num_samples=8", "sample.batch_size=8"],
                          tmp_path / "sample"))
    assert out["nfe_per_image"] == 1 and out["num_samples"] == 8 and len(seen) == 1
    pagoda_labels = seen.pop()
    assert pagoda_labels == out["protocol"]["class"]["labels_per_image"] and len(set(pagoda_labels)) > 1
    run.run(compose(["model=diffusers", f"model.path={tmp_path / 'edm'}", "model.parametrization=edm",
                     "model.conditioning=class", "sampler=edm_heun", "sampler.num_steps=2", "data.resolution=16",
                     "logger=none", "trainer.enable_progress_bar=false", "sample.num_samples=8", "sample.batch_size=8"],
                    tmp_path / "none"))
    assert seen[0] == pagoda_labels
