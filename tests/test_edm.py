"""EDM-preconditioned bases: sampler=edm_heun is EDM's Algorithm 1 (k-diffusion's sample_heun on
get_sigmas_karras, float tolerance, 2n - 1 NFE); diffusers' EDM schedulers run; identities; mismatches refused."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from conftest import PLAIN_BLOCKS, accelerator_options, compose, tiny_unet

from hiresrun import run, sampling
from hiresrun.edm import EDMHeunScheduler, coefficients, karras_sigmas
from hiresrun.errors import UsageError
from hiresrun.models import model_fn, save_pipeline
from hiresrun.outputs import load_images


def k_sampling():
    """k-diffusion's sampling module alone (its package __init__ imports training code with heavy dependencies)."""
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        package = types.ModuleType("k_diffusion")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling")


def tiny_edm_net():
    return tiny_unet().eval()


@pytest.fixture(scope="module")
def edm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edm") / "model"
    save_pipeline(tiny_edm_net(), {"num_train_timesteps": 1000}, folder)
    return folder


def test_karras_grid_equals_k_diffusion():
    ks = k_sampling()
    ours = karras_sigmas(10, 0.002, 80.0, 7.0)
    ref = ks.get_sigmas_karras(10, 0.002, 80.0, rho=7.0, device="cpu").double()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0) and ours[-1] == 0 and len(ours) == 11


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_edm_heun_is_k_diffusions_sample_heun(steps):
    ks, net = k_sampling(), tiny_edm_net()
    sigma_data = 0.5

    def denoiser(x, sigma):  # D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
        c_skip, c_out, c_in, c_noise = coefficients(sigma.double(), sigma_data)
        f = net(x * c_in.float().view(-1, 1, 1, 1), c_noise.float()).sample
        return c_skip.float().view(-1, 1, 1, 1) * x + c_out.float().view(-1, 1, 1, 1) * f

    noise = sampling.noise(sampling.generators([0, 1, 2]), (1, 8, 8))
    sigmas = ks.get_sigmas_karras(steps, 0.002, 80.0, rho=7.0)
    with torch.no_grad():
        ref = ks.sample_heun(denoiser, noise * sigmas[0], sigmas, disable=True)
        counter = sampling.Counter()
        ours = sampling.sample(model_fn(net), noise, EDMHeunScheduler(sigma_data=sigma_data), steps,
                               wrap=lambda f, step: counter(f))
    # float tolerance: k-diffusion computes the grid and coefficients in float32, hiresrun in float64
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    assert counter.evals == 3 * (2 * steps - 1)  # 2n - 1 evaluations per image


def sample(folder, run_dir, *extra, n=3):
    cfg = compose(["model=diffusers", f"model.path={folder}", "model.parametrization=edm", "data.resolution=8",
                   "sample.num_samples=" + str(n), "logger=none",
                   "trainer.enable_progress_bar=false", *extra], run_dir)
    return run.run(cfg), load_images(run_dir / "samples")


def test_the_verbs_run_every_edm_sampler(edm_dir, tmp_path):
    metrics, _ = sample(edm_dir, tmp_path / "heun", "sampler=edm_heun", "sampler.num_steps=10")
    assert metrics["nfe_per_image"] == 19  # Skip-Tuning's headline budget: Heun 10 steps = 19 NFE
    for sampler in ("edm_euler", "edm_dpmsolver"):
        metrics, images = sample(edm_dir, tmp_path / sampler, f"sampler={sampler}", "sampler.num_steps=5")
        assert metrics["nfe_per_image"] == 5 and images.shape == (3, 1, 8, 8)


def test_identities_hold_on_the_edm_path(edm_dir, tmp_path):
    common = ["sampler=edm_heun", "sampler.num_steps=8"]
    _, none = sample(edm_dir, tmp_path / "none", *common)
    _, adaptive = sample(edm_dir, tmp_path / "ad", *common, "accelerator=adaptive", "accelerator.delta=0")
    _, skip = sample(edm_dir, tmp_path / "st", *common, "accelerator=skiptuning", "accelerator.rho=1")
    assert torch.equal(none, adaptive) and torch.equal(none, skip)
    _, none16 = sample(edm_dir, tmp_path / "none16", *common, "data.resolution=16")
    _, cascade = sample(edm_dir, tmp_path / "sc", *common, "method=selfcascade", "method.mode=tuning_free",
                        "method.strength=1", "data.resolution=16")
    assert torch.equal(none16, cascade)
    metrics, _ = sample(edm_dir, tmp_path / "sc2", "sampler=edm_heun", "sampler.num_steps=8", "method=selfcascade",
                        "method.mode=tuning_free", "method.strength=0.5", "data.resolution=16")
    assert metrics["nfe_per_image"] == 15 + 7  # the pivot's 8 steps (15 calls), then 4 steps from sigma_4 (7)


def test_sampler_and_parametrization_must_agree(edm_dir, tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="model.parametrization=edm needs an EDM sampler"):
        sample(edm_dir, tmp_path / "a", "sampler=ddim")
    cfg = compose(["model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "sampler=edm_heun",
                   "logger=none", "sample.num_samples=1"], tmp_path / "b")
    with pytest.raises(UsageError, match="integrates an EDM-preconditioned network"):
        run.run(cfg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "metrics.json").exists()


def test_skiptuning_reads_sigma_under_edm_samplers():
    from hiresrun.accelerators.skiptuning import SkipTuning

    acc = SkipTuning(rho=0.5, time_schedule="window", window=[1.0, 100.0])
    step = sampling.Step(timesteps=torch.zeros(1), order=2, sigma_max=80.0)
    seen = []
    f = acc.wrap(lambda x, t, c: seen.append(acc._state["t"]), step)
    f(torch.zeros(1), torch.tensor(0.25 * torch.tensor(10.0).log()), {})  # c_noise of sigma 10
    assert seen[0] == pytest.approx(10.0, rel=1e-5) and acc.weight(seen[0]) == 1.0 and acc.weight(0.5) == 0.0


def class_edm_and_tree(tmp_path, size: int) -> None:
    """<tmp>/edm: a tiny random class-conditional (4 classes) RGB UNet2DModel; <tmp>/imgs: a labelled tree of two
    classes, three `size` px images each."""
    import numpy as np
    from PIL import Image

    net = tiny_unet(channels=3, **PLAIN_BLOCKS, num_class_embeds=4)
    save_pipeline(net, {"num_train_timesteps": 1000}, tmp_path / "edm")
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i + 10 * (c == "b")).integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")


def test_fullscale_skiptuning_edm64_runs_end_to_end_on_a_tiny_class_edm_folder(tmp_path):
    """The paper setting as composed, with a tiny random class-conditional EDM UNet, a labelled tree as the FID
    reference, a few images and the CPU: only the converted checkpoint and ImageNet are missing."""
    class_edm_and_tree(tmp_path, 8)
    cfg = compose(["experiment=fullscale/skiptuning-edm64", f"model.path={tmp_path / 'edm'}",
                   f"data.root={tmp_path / 'imgs'}", "data.labels=subfolders", "data.resolution=8",
                   "sample.num_samples=4", "sample.batch_size=4", "trainer=cpu", "trainer.accelerator=cpu",
                   "trainer.precision=32-true", "logger=none", "trainer.enable_progress_bar=false",
                   "metrics.patch_fid=false", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    assert (cfg.sampler.num_steps, cfg.accelerator.rho, cfg.model.parametrization) == (10, 0.78, "edm")
    metrics = run.run(cfg)
    assert metrics["nfe_per_image"] == 19 and "fid" in metrics and metrics["num_samples"] == 4


@pytest.mark.parametrize("scope", ["axes", pytest.param("all", marks=pytest.mark.slow)])
def test_every_pair_on_an_edm_network_runs_or_is_refused_up_front(scope, edm_dir, tmp_path):
    """Sampling methods and accelerators run on EDM networks through the EDM samplers; what trains on the VP grid
    (finetune, simple) is refused by its declaration before anything loads; PaGoDA passes and asks for its ckpt.
    Every pair is checked against the declarations; the fast suite runs the pairs with method=none or
    accelerator=none (each option once, plus Self-Cascade with adaptive), the slow one every supported pair."""
    from conftest import CONF
    from hydra.utils import get_class

    from hiresrun import support
    from hiresrun.errors import Unsupported

    ran, refused, trained = set(), set(), set()
    accelerators = {a: get_class(compose([f"accelerator={a}"]).accelerator._target_).supports
                    for a in accelerator_options()}
    for method in sorted(f.stem for f in (CONF / "method").glob("*.yaml")):
        extra = ["method.mode=tuning_free"] if method == "selfcascade" else []
        node = compose([f"method={method}", *extra]).method
        m = get_class(node._target_).declared(node)
        for accelerator, a in accelerators.items():
            refusal = support.refusal(method, m, accelerator, a, "m", "UNet2DModel", "pixel", False, True)
            if scope == "axes" and "none" not in (method, accelerator) and (method, accelerator) != (
                    "selfcascade", "adaptive"):  # the declarations alone
                if refusal:
                    refused.add((method, accelerator))
                continue
            cfg = compose(["model=diffusers", f"model.path={edm_dir}", "model.parametrization=edm",
                           f"method={method}", f"accelerator={accelerator}", "data.resolution=16", "sampler=edm_heun",
                           "sampler.num_steps=4", "sample.num_samples=2", "logger=none",
                           "trainer.enable_progress_bar=false", *extra], tmp_path / method / accelerator)
            if refusal:
                with pytest.raises(Unsupported):
                    run.run(cfg)
                refused.add((method, accelerator))
                continue
            if method == "pagoda":  # runs on EDM (tests/test_pagoda_edm.py) once trained: sampling needs a ckpt
                with pytest.raises(Exception, match="ckpt_path="):
                    run.run(cfg)
                trained.add((method, accelerator))
                continue
            assert run.run(cfg)["num_samples"] == 2
            ran.add((method, accelerator))
    # DDPM's loss and DemoFusion's t / T cosine factors: not on EDM
    assert {m for m, a in refused if a == "none"} == {"finetune", "lora", "simple", "demofusion"}
    assert {m for m, _ in ran} == {"none", "upsample", "attnsf", "scalecrafter", "hidiffusion",
                                         "selfcascade"}
    assert ("pagoda", "none") in trained
    assert ("none", "freeu") in refused and ("none", "skiptuning") in ran and ("selfcascade", "adaptive") in ran
