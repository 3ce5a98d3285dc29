"""accelerator=deepcache: interval 1 is no accelerator bit for bit; a partial step equals the UNet with its deep blocks'
outputs replaced by those of the last full step (torch hooks as the reference); hooks leave no trace; the FLOP share
and cost_per_image follow their closed forms; UNet2DConditionModel under guidance; bad settings are one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SCHED, cli, tiny_unet
from diffusers import DDIMScheduler

from hiresrun import sampling
from hiresrun.accelerators.deepcache import DeepCache
from hiresrun.errors import UsageError
from hiresrun.hooks import hooks_removed_after
from hiresrun.models import model_fn

SEEDS = [0, 1]


def run(unet, steps: int, acc: DeepCache | None):
    gens = sampling.generators(SEEDS)
    wrap = (lambda f, step: acc.wrap(f, step)) if acc else (lambda f, step: f)
    with torch.no_grad(), hooks_removed_after(acc.attach(unet) if acc else []):
        return sampling.sample(model_fn(unet), sampling.noise(gens, (1, 8, 8)), DDIMScheduler.from_config(SCHED),
                               steps, gens=gens, wrap=wrap)


def test_interval_one_is_no_accelerator_and_hooks_leave_no_trace():
    unet = tiny_unet().eval()
    base = run(unet, 6, None)
    assert torch.equal(run(unet, 6, DeepCache(interval=1)), base)
    cached = run(unet, 6, DeepCache(interval=2))
    assert not torch.equal(cached, base)  # it did reuse something
    assert torch.equal(run(unet, 6, None), base)  # and the UNet is itself again
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in unet.modules())


def test_a_partial_step_is_the_unet_with_deep_outputs_from_the_last_full_step():
    unet = tiny_unet().eval()  # 2 down blocks, mid, 2 up blocks: branch 1 caches down[1], mid, up[0]
    deep = [unet.down_blocks[1], unet.mid_block, unet.up_blocks[0]]
    x0, x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).chunk(2)
    t0, t1 = torch.tensor(900), torch.tensor(700)
    with torch.no_grad():  # the reference: record the deep outputs at step 0, substitute them at step 1
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in deep]
        unet(x0, t0)
        for h in hooks:
            h.remove()
        hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen[k]) for k, b in enumerate(deep)]
        reference = unet(x1, t1).sample
        for h in hooks:
            h.remove()
        acc = DeepCache(interval=2, branch=1)
        step = sampling.Step(timesteps=torch.tensor([900, 700]), order=1)
        with hooks_removed_after(acc.attach(unet)):
            fn = acc.wrap(lambda x, t, c: unet(x, t).sample, step)
            fn(x0, t0, {})
            step.index = 1
            partial = fn(x1, t1, {})
    assert torch.equal(partial, reference)
    record = acc.records[-1]
    assert (record["full"], record["partial"]) == (1, 1)
    assert 0 < record["flops"]["partial"] < record["flops"]["full"]


def test_cost_per_image_is_full_plus_partial_times_the_flop_share(tiny_model_dir, tmp_path):
    out = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none",
              "trainer.enable_progress_bar=false", "sampler.num_steps=10", "sample.num_samples=3",
              "+accelerator=deepcache", "accelerator.interval=3", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["nfe_per_image"] == 10 and m["partial_per_image"] == 6  # full at steps 0, 3, 6, 9
    assert 0 < m["partial_flops_share"] < 1
    assert m["cost_per_image"] == pytest.approx(4 + 6 * m["partial_flops_share"])


def test_a_text_unet_under_guidance(tiny_sd_dir, tmp_path):
    common = ["sample", "model=diffusers", f"model.path={tiny_sd_dir}", "sample.prompt=a cat",
              "sample.guidance_scale=3", "logger=none", "trainer.enable_progress_bar=false", "sampler.num_steps=6",
              "sample.num_samples=2"]
    one = cli(*common, "+accelerator=deepcache", "accelerator.interval=1", "hydra.run.dir=one", cwd=tmp_path)
    none = cli(*common, "hydra.run.dir=none", cwd=tmp_path)
    two = cli(*common, "+accelerator=deepcache", "accelerator.interval=2", "hydra.run.dir=two", cwd=tmp_path)
    assert one.returncode == none.returncode == two.returncode == 0, two.stderr
    png = lambda d: [p.read_bytes() for p in sorted((tmp_path / d / "samples").glob("*.png"))]
    assert png("one") == png("none") and png("two") != png("none")
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["partial_per_image"] == 3 and m["unet_passes_per_image"] == 12  # guided: 2 passes per call


def test_bad_settings_are_one_line():
    with pytest.raises(UsageError, match="accelerator.interval=0"):
        DeepCache(interval=0)
    with pytest.raises(UsageError, match="accelerator.branch=2: this UNet has 2 down blocks"):
        DeepCache(interval=2, branch=2).attach(tiny_unet())


def test_each_sampling_loop_starts_with_a_full_step(tiny_model_dir, tmp_path):
    """Self-Cascade runs two loops per batch (the pivot at the base size, then the truncated 2x loop): each starts
    with a full step and counts its partial steps from there. (Tuned Self-Cascade, whose low-resolution pass runs the
    same blocks inside the 2x call, is covered by tests/test_text_matrix.py: cache entries are kept per input size.)"""
    out = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none",
              "trainer.enable_progress_bar=false", "sampler.num_steps=10", "sample.num_samples=2",
              "+method=selfcascade", "method.mode=tuning_free", "method.strength=0.5", "+accelerator=deepcache",
              "accelerator.interval=3", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # pivot loop: 10 steps, full at 0, 3, 6, 9; 2x loop from the middle: 5 steps, full at its 0 and 3
    assert m["nfe_per_image"] == 15 and m["partial_per_image"] == 6 + 3


@pytest.fixture(scope="module")
def three_level_sd(tmp_path_factory, tiny_sd_dir):
    """A tiny SD folder whose UNet has SD's shape in small: three levels of two layers each, cross-attention in the
    first two, so every official branch id names a different cut."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    config = {**pipe.unet.config, "block_out_channels": [8, 16, 16], "layers_per_block": 2,
              "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(config)
    folder = tmp_path_factory.mktemp("sd3") / "sd"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("branch_id", [0, 1, 2, 5])
def test_branch_id_is_the_official_helpers_cut_image_for_image(branch_id, three_level_sd, tmp_path):
    """hiresrun's DeepCache with accelerator.branch_id=k equals the DeepCache package's own DeepCacheSDHelper
    (cache_branch_id=k, uniform 1:3) on diffusers' StableDiffusionPipeline, same prompts, seeds and DDIM steps,
    under guidance, within 1/255."""
    from conftest import compose
    from DeepCache import DeepCacheSDHelper
    from diffusers import StableDiffusionPipeline

    from hiresrun import run
    from hiresrun.outputs import load_images

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na red dog\n")
    cfg = compose(["model=diffusers", f"model.path={three_level_sd}", "sampler.num_steps=10", "sample.num_samples=2",
                   f"prompts={prompts}", "sample.guidance_scale=7.5", "accelerator=deepcache", "accelerator.interval=3",
                   f"accelerator.branch_id={branch_id}", "logger=none", "trainer.enable_progress_bar=false"],
                  tmp_path / "run")
    metrics = run.run(cfg)
    ours = load_images(tmp_path / "run" / "samples")
    pipe = StableDiffusionPipeline.from_pretrained(three_level_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch_id)
    helper.enable()
    latents = sampling.noise(sampling.generators([0, 1]), (4, 8, 8))
    ref = pipe(["a cat", "a red dog"], latents=latents, num_inference_steps=10, guidance_scale=7.5, height=16,
               width=16, output_type="np").images
    helper.disable()
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 255
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    assert (ours.float() - ref).abs().max() <= 1.0
    assert metrics["partial_per_image"] == 6 and metrics["cost_per_image"] < 10  # steps 0, 3, 6, 9 are full


def test_branch_id_caches_the_official_modules():
    """Id 0 leaves only conv_in, the outermost up block's last resnet / attention and conv_out to recompute; id 3
    (block 1, layer 0) keeps down block 0 and the second up block's last layer; an id past the UNet is refused."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
                                layers_per_block=2, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    keys = lambda i: {k for k, _ in DeepCache(branch_id=i).cached(unet)}  # noqa: E731
    computed_up = lambda i: {f"up2.{n}.{j}" for n in ("resnets", "attentions") for j in range(3)} - keys(i)  # noqa
    assert {"down0", "down1", "down2", "mid", "up0", "up1"} <= keys(0) and "up2" not in keys(0)
    assert computed_up(0) == {"up2.resnets.2", "up2.attentions.2"}
    assert "down0" not in keys(3) and "down0.resnets.0" not in keys(3) and "down1" in keys(3)
    assert "up1.resnets.2" not in keys(3) and "up1.resnets.1" in keys(3) and "up1" not in keys(3)
    assert {"down0.resnets.1", "down0.attentions.1", "down0.downsamplers.0"} <= keys(1) and "down0" not in keys(1)
    with pytest.raises(UsageError, match="accelerator.branch_id=9: this UNet has 3 down blocks, so ids 0..8"):
        DeepCache(branch_id=9).unet(unet)
