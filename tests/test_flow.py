"""Flow-matching transformers (hiresrun/flow.py): SD3 and FLUX image for image equal to diffusers' pipelines, the
schedule rule (FLUX's resolution-dependent shift), positions above the native size, the methods and accelerators
that run on them or are refused by their declarations, and the bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import accelerator_options, compose
from hydra.errors import InstantiationException

from hiresrun import flow, run, support
from hiresrun.errors import Unsupported, UsageError
from hiresrun.outputs import load_images

ONE_LINE = (UsageError, InstantiationException)
PROMPTS = ["a photo of 7", "a drawing of 3"]


def sample(folder, run_dir, *extra, n=2, resolution=16, steps=4):
    cfg = compose(["model=diffusers", f"model.path={folder}", "sampler=flow_euler", f"data.resolution={resolution}",
                   f"sampler.num_steps={steps}", f"sample.num_samples={n}", "logger=none",
                   "trainer.enable_progress_bar=false", *extra], run_dir)
    return run.run(cfg), load_images(run_dir / "samples")


def pipeline_images(pipe, folder, resolution, steps, seeds, **kwargs):
    """The pipeline's images for `seeds`, each from the seed's own unpacked noise (packed as FluxPipeline packs)."""
    from hiresrun.models import load_model

    channels = load_model(str(folder)).latent_channels
    images = []
    for i, seed in enumerate(seeds):
        side = resolution // 2
        noise = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(seed))
        latents = flow.pack(noise) if type(pipe).__name__ == "FluxPipeline" else noise
        out = pipe(PROMPTS[i % len(PROMPTS)], height=resolution, width=resolution, num_inference_steps=steps,
                   latents=latents, output_type="pt", **kwargs).images
        images.append(out)
    return torch.cat(images) * 255


def write_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.mark.parametrize("guidance, resolution", [("distilled", 16), ("true_cfg", 32), ("distilled", 32)])
def test_flux_equals_the_flux_pipeline_image_for_image(guidance, resolution, tiny_flux_dir, tmp_path):
    """Embedded guidance 2.5 (one pass), or true CFG 3.0 against a negative prompt (two), at the native 16 px and at
    2x: within 1/255 of FluxPipeline given each seed's noise (the resolution-dependent shift included)."""
    from diffusers import FluxPipeline

    extra = ["sample.guidance_scale=2.5", "sample.max_sequence_length=24"]
    kwargs = {"guidance_scale": 2.5, "max_sequence_length": 24}
    if guidance == "true_cfg":
        extra += ["sample.true_cfg_scale=3.0", "sample.negative_prompt=blurry"]
        kwargs.update(true_cfg_scale=3.0, negative_prompt="blurry")
    metrics, ours = sample(tiny_flux_dir, tmp_path / "run", f"prompts={write_prompts(tmp_path)}", *extra,
                           resolution=resolution)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipeline_images(pipe, tiny_flux_dir, resolution, 4, [0, 1], **kwargs)
    assert ours.shape == ref.shape == (2, 3, resolution, resolution)
    assert (ours.float() - ref).abs().max() <= 1.0
    assert metrics["unet_passes_per_image"] == (8 if guidance == "true_cfg" else 4)


@pytest.mark.parametrize("scale, resolution", [(1.0, 16), (5.0, 32)])
def test_sd3_equals_the_sd3_pipeline_image_for_image(scale, resolution, tiny_sd3_dir, tmp_path):
    """Unguided at the native size, guided against a negative prompt at 2x: within 1/255 of the pipeline."""
    from diffusers import StableDiffusion3Pipeline

    extra = [f"sample.guidance_scale={scale}", "sample.max_sequence_length=24", "sample.negative_prompt=blurry"]
    metrics, ours = sample(tiny_sd3_dir, tmp_path / "run", f"prompts={write_prompts(tmp_path)}", *extra,
                           resolution=resolution)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipeline_images(pipe, tiny_sd3_dir, resolution, 4, [0, 1], guidance_scale=scale, max_sequence_length=24,
                          negative_prompt="blurry")
    assert (ours.float() - ref).abs().max() <= 1.0
    assert metrics["unet_passes_per_image"] == (8 if scale > 1 else 4)


def test_defaults_are_the_pipelines(tiny_flux_dir, tiny_schnell_dir, tiny_sd3_dir):
    """Guidance defaults (FLUX.1-dev's embedded 3.5, schnell none, SD3 7.0), T5 lengths (512, 256), native sizes from
    the folder, FLUX's divisibility (VAE factor x 2x2 packing) and its unpacked latent channels."""
    from hiresrun.models import load_model

    flux_base, schnell, sd3 = (load_model(str(d)) for d in (tiny_flux_dir, tiny_schnell_dir, tiny_sd3_dir))
    assert (flux_base.flow, sd3.flow) == ("flux", "sd3")
    assert (flux_base.default_guidance, schnell.default_guidance, sd3.default_guidance) == (3.5, 1.0, 7.0)
    assert (flux_base.text.max_sequence_length, sd3.text.max_sequence_length) == (512, 256)
    assert flux_base.resolution == sd3.resolution == 16
    assert flux_base.latent_channels == 4 and flux_base.unet.config.in_channels == 16
    assert flux_base.downsample_factor * flux_base.latent_factor == 4  # the released VAE: 2 x 8 = 16


def test_flux_shift_is_linear_in_the_token_count_as_the_pipeline_computes_it():
    """mu = base_shift + (max_shift - base_shift) (n - 256) / (4096 - 256) for n packed tokens; the loop's grid for a
    latent of side s uses n = (s / 2)^2 and FLUX's sigmas linspace(1, 1/N, N) time-shifted by exp(mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    for n in (256, 1024, 4096, 16384):
        assert flow.mu(config, n) == pytest.approx(0.5 + 0.65 * (n - 256) / 3840)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **config)
    flow.set_timesteps(scheduler, 4, torch.zeros(1, 16, 128, 128))  # 4096 tokens: mu = 1.15
    s = torch.tensor([1.0, 0.75, 0.5, 0.25])
    expected = math.exp(1.15) / (math.exp(1.15) + (1 / s - 1))
    assert torch.allclose(scheduler.sigmas[:-1], expected, atol=1e-6)
    assert torch.allclose(scheduler.timesteps, 1000 * expected, atol=1e-3)


def test_positions_are_the_identity_at_the_native_size_and_differ_above(tiny_flux_dir, tmp_path):
    """model.positions=interpolate / ntk change nothing at the native size (bit for bit) and change the images at 2x;
    interpolate's ids are the native range's; ntk's RoPE base is theta s^(d / (d - 2))."""
    from hiresrun.models import load_model

    common = ["sample.prompt=a 7", "sample.max_sequence_length=16"]
    native = {m: sample(tiny_flux_dir, tmp_path / f"n-{m}", *common, f"model.positions={m}")[1]
              for m in flow.POSITIONS}
    assert torch.equal(native["extrapolate"], native["interpolate"])
    assert torch.equal(native["extrapolate"], native["ntk"])
    double = {m: sample(tiny_flux_dir, tmp_path / f"d-{m}", *common, f"model.positions={m}", resolution=32)[1]
              for m in flow.POSITIONS}
    assert not torch.equal(double["extrapolate"], double["interpolate"])
    assert not torch.equal(double["extrapolate"], double["ntk"])
    net = load_model(str(tiny_flux_dir), positions="interpolate").unet
    ids = flow._image_ids(net, 8, 8, "cpu", torch.float32)  # a 2x grid: 8 x 8 tokens, native 4 x 4
    assert ids[:, 1].max() == pytest.approx(7 / 2) and ids[:, 2].unique().numel() == 8
    net = load_model(str(tiny_flux_dir), positions="ntk").unet
    d = net.config.axes_dims_rope[-1]
    assert flow._ntk_theta(net, 8, 8) == pytest.approx(10000 * 2 ** (d / (d - 2)))
    assert flow._ntk_theta(net, 4, 4) is None


def test_selfcascade_renoises_the_pivot_along_the_flow(tiny_flux_dir, tmp_path):
    """Tuning-free Self-Cascade on FLUX: the upsampled pivot enters the target loop at x = (1 - sigma) x0 + sigma eps
    (the flow's forward process at the kept grid's first sigma); strength 1 is `none` bit for bit."""
    from hiresrun.sampling import sample as loop

    common = ["sample.prompt=a 7", "sample.max_sequence_length=16", "method=selfcascade", "method.mode=tuning_free"]
    _, none = sample(tiny_flux_dir, tmp_path / "none", "sample.prompt=a 7", "sample.max_sequence_length=16",
                     resolution=32, steps=6)
    _, full = sample(tiny_flux_dir, tmp_path / "s1", *common, "method.strength=1", resolution=32, steps=6)
    assert torch.equal(none, full)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    x0, eps, seen = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), []

    def record(x, t, cond):
        seen.append(x.clone())
        return torch.zeros_like(x)

    loop(record, x0, scheduler, 6, start_step=3, renoise=eps)
    sigma = float(scheduler.sigmas[3])
    assert torch.allclose(seen[0], (1 - sigma) * x0 + sigma * eps, atol=1e-6)
    metrics, _ = sample(tiny_flux_dir, tmp_path / "sc", *common, "method.strength=0.5", resolution=32, steps=6)
    assert metrics["nfe_per_image"] == 6 + 3  # the pivot's 6 steps, then the target's last 3


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_pairs_run_or_are_refused_by_their_declarations(family, tiny_flux_dir, tiny_sd3_dir, tmp_path):
    """Every method x accelerator on FLUX and on SD3: refused in one line exactly where the declarations say (a
    UNet-only option by its denoiser list, an option not built for flow models by its `flow` flag), else it runs (each
    runnable method with no accelerator, each runnable accelerator with method=none)."""
    from conftest import CONF
    from hydra.utils import get_class

    folder, denoiser = {"flux": (tiny_flux_dir, "FluxTransformer2DModel"),
                        "sd3": (tiny_sd3_dir, "SD3Transformer2DModel")}[family]
    common = ["model=diffusers", f"model.path={folder}", "sampler=flow_euler", "data.resolution=32",
              "sample.num_samples=1", "sampler.num_steps=3", "logger=none", "sample.prompt=a 7",
              "sample.max_sequence_length=8"]
    methods = {f.stem: ["method.mode=tuning_free"] if f.stem == "selfcascade" else []
               for f in (CONF / "method").glob("*.yaml")}
    nodes = {m: compose([*common, f"method={m}", *extra]).method for m, extra in methods.items()}
    accelerators = {a: compose([f"accelerator={a}"]).accelerator for a in accelerator_options()}
    ran, refused = set(), set()
    for method, node in sorted(nodes.items()):
        m = get_class(node._target_).declared(node)
        for accelerator, anode in accelerators.items():
            a = get_class(anode._target_).declared(anode)
            reason = support.refusal(method, m, accelerator, a, "m", denoiser, "latent", True)
            expect_refused = any(not s.flow or denoiser not in s.unets for s in (m, a)) or (
                m.views and a.level in ("steps", "blocks"))
            assert bool(reason) == expect_refused, (method, accelerator)
            (refused if reason else ran).add((method, accelerator))
            if reason or not (accelerator == "none" or method == "none") or method in ("finetune", "lora"):
                continue  # the trained methods sample with a checkpoint: test_finetune_and_lora_train_on_flux
            cfg = compose([*common, f"method={method}", f"accelerator={accelerator}", *methods[method]],
                          tmp_path / method / accelerator)
            assert run.run(cfg)["num_samples"] == 1
    cfg = compose([*common, "accelerator=deepcache"], tmp_path / "refused")
    with pytest.raises(Unsupported) as err:
        support.check(cfg, "none", "deepcache")  # the run's own check says the same, in one line
    assert "\n" not in str(err.value) and denoiser in str(err.value)
    assert {a for _, a in ran} == {"none", "adaptive", "stepskip"} | ({"cache"} if family == "flux" else set())
    assert {m for m, _ in ran} == {"none", "upsample", "selfcascade", "finetune", "lora"}
    assert ("demofusion", "none") in refused and ("simple", "none") in refused and ("none", "tome") in refused


def test_identities_hold_on_flux(tiny_flux_dir, tmp_path):
    """The neutral setting of each accelerator that runs on FLUX is `none` bit for bit."""
    common = ["sample.prompt=a 7", "sample.max_sequence_length=16"]
    _, none = sample(tiny_flux_dir, tmp_path / "none", *common, steps=8)
    for name, knobs in {"adaptive": ["accelerator.delta=0"], "stepskip": ["accelerator.every=1"],
                        "cache": ["accelerator.threshold=0"]}.items():
        _, out = sample(tiny_flux_dir, tmp_path / name, *common, f"accelerator={name}", *knobs, steps=8)
        assert torch.equal(none, out), name
    metrics, _ = sample(tiny_flux_dir, tmp_path / "skip", *common, "accelerator=stepskip", "accelerator.every=2",
                        steps=8)
    assert metrics["nfe_per_image"] == 4


@pytest.mark.parametrize("case, extra, match", [
    ("resolution", ["data.resolution=18"], "not divisible by 4"),
    ("true_cfg", ["sample.true_cfg_scale=3"], "needs a negative prompt"),
    ("t5", ["sample.max_sequence_length=600"], "takes 1 .. 512 tokens"),
    ("vp sampler", ["sampler=ddim"], "use sampler=flow_euler"),
    ("heun", ["sampler=flow_heun"], "no resolution-dependent shift"),
])
def test_bad_flux_inputs_are_one_line(case, extra, match, tiny_flux_dir, tmp_path):
    with pytest.raises(ONE_LINE, match=match) as err:
        sample(tiny_flux_dir, tmp_path / "run", "sample.prompt=a 7", *extra)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "samples").exists()


def test_bad_flow_inputs_elsewhere_are_one_line(tiny_schnell_dir, tiny_sd3_dir, tiny_sd_dir, tmp_path):
    with pytest.raises(ONE_LINE, match="has no guidance input"):
        sample(tiny_schnell_dir, tmp_path / "a", "sample.prompt=a 7", "sample.guidance_scale=3.5")
    with pytest.raises(ONE_LINE, match="true classifier-free guidance"):
        sample(tiny_sd3_dir, tmp_path / "b", "sample.prompt=a 7", "sample.true_cfg_scale=2")
    with pytest.raises(ONE_LINE, match="covers 32x32 patches"):
        sample(tiny_sd3_dir, tmp_path / "c", "sample.prompt=a 7", resolution=160)
    with pytest.raises(ONE_LINE, match="only model.positions=extrapolate"):
        sample(tiny_sd3_dir, tmp_path / "d", "sample.prompt=a 7", "model.positions=ntk")
    with pytest.raises(ONE_LINE, match="integrates a flow-matching model"):
        sample(tiny_sd_dir, tmp_path / "e", "sample.prompt=a 7")
    with pytest.raises(ONE_LINE, match="has no T5 encoder"):
        sample(tiny_sd_dir, tmp_path / "f", "sample.prompt=a 7", "sampler=ddim", "sample.max_sequence_length=8")
    metrics, _ = sample(tiny_schnell_dir, tmp_path / "g", "sample.prompt=a 7", "sample.max_sequence_length=8")
    assert metrics["unet_passes_per_image"] == 4  # schnell: one pass per step, no guidance


def test_flow_models_pick_the_flow_sampler_and_name_their_transformer():
    """The released-model files override the sampler (a user's sampler= still wins) and declare their denoiser, so
    the support checks refuse UNet-only options before any download."""
    for name, denoiser in (("flux-dev", "FluxTransformer2DModel"), ("flux-schnell", "FluxTransformer2DModel"),
                           ("sd3", "SD3Transformer2DModel"), ("sd35", "SD3Transformer2DModel")):
        cfg = compose([f"model={name}"])
        assert cfg.sampler.scheduler.kind == "euler" and cfg.model.denoiser == denoiser
        assert compose([f"model={name}", "sampler=flow_unipc"]).sampler.scheduler.kind == "unipc"
        with pytest.raises(Unsupported, match=f"has a {denoiser}"):
            support.check(compose([f"model={name}", "accelerator=deepcache"]), "none", "deepcache")


def test_the_training_loss_is_the_rectified_flow_loss():
    """flow.training_loss: sigma at index floor(u T) of the training grid for logit-normal u, x = (1 - sigma) x0 +
    sigma eps, MSE of the velocity against eps - x0; recomputed here from the same global RNG draws."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, calls = torch.randn(3, 4, 8, 8), []

    class Net(torch.nn.Module):  # an SD3-shaped stand-in: records its inputs, returns a fixed function of them
        config = type("C", (), {"in_channels": 4})()

        def forward(self, hidden_states, timestep, return_dict=False, **kwargs):
            calls.append((hidden_states, timestep))
            return (0.5 * hidden_states,)

    Net.__name__ = "SD3Transformer2DModel"
    torch.manual_seed(7)
    loss = flow.training_loss(Net(), scheduler, x0)
    torch.manual_seed(7)
    eps = torch.randn_like(x0)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(3,)))
    index = (u * 1000).long()
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    assert torch.allclose(calls[0][0], x_t) and torch.allclose(calls[0][1], scheduler.timesteps[index])
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(0.5 * x_t, eps - x0).item(), rel=1e-6)


@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_finetune_and_lora_train_on_flux_and_resume_exactly(method, tiny_schnell_dir, tmp_path):
    """Two steps of the rectified-flow loss at 32 px on FLUX, then sampling with the checkpoint; the trained weights
    differ from the base's, and a resume from step 1 reaches step 2's weights exactly."""
    from test_text_matrix import captioned_folder

    from hiresrun.checkpoint import trained_state

    data = captioned_folder(tmp_path / "data")
    common = ["model=diffusers", f"model.path={tiny_schnell_dir}", "sampler=flow_euler", f"method={method}",
              "data=folder", f"data.root={data}", "data.resolution=32", "data.batch_size=2",
              "sample.max_sequence_length=8", "logger=none", "train.grid_every=0", "train.checkpoint_every=1",
              "train.caption_dropout=0.5", "trainer.enable_progress_bar=false"]
    run.run(compose(["task=train", *common, "trainer.max_steps=2"], tmp_path / "a"))
    run.run(compose(["task=train", *common, "trainer.max_steps=1"], tmp_path / "b"))
    run.run(compose(["task=train", *common, "trainer.max_steps=2",
                     f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "b"))
    straight, resumed = (trained_state(str(tmp_path / r / "checkpoints" / "last.ckpt"), None, "net.") for r in "ab")
    assert straight.keys() == resumed.keys() and len(straight) > 0
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    from hiresrun.models import load_model

    base = load_model(str(tiny_schnell_dir)).unet.state_dict()
    changed = [k for k, v in straight.items() if (k in base and not torch.equal(v, base[k])) or
               ("lora_B" in k and v.abs().sum() > 0)]  # LoRA's B starts at zero
    assert changed
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _, images = sample(tiny_schnell_dir, tmp_path / "s", f"method={method}", "sample.prompt=a 7",
                       "sample.max_sequence_length=8", f"ckpt_path={ckpt}", resolution=32)
    assert images.shape == (2, 3, 32, 32)


def test_resolution_shift_multiplies_the_shift_by_the_side_ratio(tiny_sd3_dir, tiny_flux_dir, tmp_path):
    """model.resolution_shift: at the native size the run is bit for bit the plain one; at 2x SD3's grid is its fixed
    shift times alpha = 2 (sigma' = 6 s / (1 + 5 s) on the scheduler's unshifted grid), FLUX's is mu + ln 2; a
    non-flow model or another flow sampler is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    common = ["sample.prompt=a 7", "sample.max_sequence_length=8"]
    _, plain = sample(tiny_sd3_dir, tmp_path / "p", *common)
    _, shifted = sample(tiny_sd3_dir, tmp_path / "s", *common, "model.resolution_shift=true")
    assert torch.equal(plain, shifted)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.hiresrun_native_tokens = 16
    flow.set_timesteps(scheduler, 4, torch.zeros(1, 4, 16, 16))  # 64 tokens: alpha 2
    # the scheduler's grid: linspace(sigma_max, sigma_min) of its 1,000 training sigmas (shifted by 3 at construction)
    s = torch.from_numpy(np.linspace(1.0, 3 * 0.001 / (1 + 2 * 0.001), 4)).float()
    assert torch.allclose(scheduler.sigmas[:-1], 6 * s / (1 + 5 * s), atol=1e-6)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    dynamic.hiresrun_native_tokens = 16
    flow.set_timesteps(dynamic, 4, torch.zeros(1, 4, 16, 16))
    shift = flow.mu(reference.config, 64) + math.log(2)
    reference.set_timesteps(4, sigmas=np.linspace(1.0, 0.25, 4), mu=shift)
    assert torch.allclose(dynamic.sigmas, reference.sigmas)
    _, double = sample(tiny_flux_dir, tmp_path / "f2", *common, "model.resolution_shift=true", resolution=32)
    _, double_plain = sample(tiny_flux_dir, tmp_path / "f1", *common, resolution=32)
    assert not torch.equal(double, double_plain)
    with pytest.raises(ONE_LINE, match="use flow_euler"):
        sample(tiny_sd3_dir, tmp_path / "u", *common, "model.resolution_shift=true", "sampler=flow_unipc")


def test_calibrate_searches_flow_families_and_caches_count_their_share(tiny_flux_dir, tmp_path):
    """`hiresrun calibrate` with calibrate.families on FLUX: fewer flow-Euler steps, AdaptiveDiffusion and diffusers'
    First Block Cache against the full-step images; a cache that skips blocks costs less than its NFE."""
    import json

    cfg = compose(["task=calibrate", "model=diffusers", f"model.path={tiny_flux_dir}", "sampler=flow_euler",
                   "sampler.num_steps=8", "sample.prompt=a 7", "sample.max_sequence_length=8", "logger=none",
                   "calibrate.seeds=0-1", "sample.batch_size=2", "calibrate.families=[steps,adaptive,cache]",
                   "calibrate.grid.steps.num_steps=[4]", "calibrate.grid.adaptive.delta=[0.05]",
                   "calibrate.grid.cache.threshold=[10]", "target.psnr=10", "trainer.enable_progress_bar=false"],
                  tmp_path / "cal")
    run.run(cfg)
    front = json.loads((tmp_path / "cal" / "front.json").read_text())
    points = {p["family"]: p for p in front["points"]}
    assert set(points) == {"steps", "adaptive", "cache"} and front["full"]["sampler"] == "flow_euler"
    assert points["steps"]["nfe_per_image"] == 4
    assert points["cache"]["cost_per_image"] < points["cache"]["nfe_per_image"]  # the skipped blocks' share
