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
from hiresrun.accelerators import hooks_removed_after
from hiresrun.accelerators.deepcache import DeepCache
from hiresrun.errors import UsageError
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
