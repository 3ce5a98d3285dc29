"""Skip-Tuning: identity at rho = 1, removable hooks, skip count and numbering on both UNet classes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import SCHED, tiny_unet
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

from hiresrun import sampling
from hiresrun.accelerators.skiptuning import SkipTuning, num_skips
from hiresrun.errors import UsageError
from hiresrun.models import load_model, model_fn


def run(unet, acc=None, seeds=(0, 1), steps=4):
    gens = sampling.generators(seeds)
    x = sampling.noise(gens, (unet.config.in_channels, 8, 8))
    handles = acc.attach(unet) if acc else []
    try:
        with torch.no_grad():
            return sampling.sample(model_fn(unet), x, DDIMScheduler.from_config(SCHED), steps,
                                   wrap=acc.wrap if acc else (lambda f, step: f))
    finally:
        for h in handles:
            h.remove()


def cond_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=2,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=8, attention_head_dim=2).eval()
    return unet, (lambda x, t: unet(x, t, encoder_hidden_states=torch.zeros(x.shape[0], 1, 8)).sample)


@pytest.mark.parametrize("acc", [SkipTuning(rho=1.0), SkipTuning(mode="linear", rho_bottom=1.0, rho_top=1.0),
                                 SkipTuning(rho=1.0, time_schedule="increasing")])
def test_rho_one_is_bit_exact_and_detaching_restores(acc):
    unet = tiny_unet().eval()
    base = run(unet)
    assert torch.equal(run(unet, acc), base)
    assert not torch.equal(run(unet, SkipTuning(rho=0.8)), base)  # a real change (GroupNorm does not eat it)
    assert torch.equal(run(unet), base)
    assert all(not b._forward_pre_hooks for b in unet.up_blocks)


def record_factors(unet, acc, call):
    """The factor applied to each skip, keyed by its position in down_block_res_samples (conv_in = 0)."""
    seen = {}
    originals = {}

    def capture(module, args, kwargs):
        skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
        originals[id(module)] = skips

    pre = [b.register_forward_pre_hook(capture, with_kwargs=True) for b in unet.up_blocks]  # runs first: raw skips
    handles = acc.attach(unet)
    def after(module, args, kwargs):
        seen[id(module)] = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)

    post = [b.register_forward_pre_hook(after, with_kwargs=True) for b in unet.up_blocks]
    with torch.no_grad():
        call(torch.randn(1, 1, 8, 8), torch.tensor(500))
    for h in pre + handles + post:
        h.remove()
    factors = []
    for b in unet.up_blocks:  # up blocks consume skips from the deepest; within a tuple the last is popped first
        raw, scaled = originals[id(b)], seen[id(b)]
        factors += [float((s.flatten()[:20] / r.flatten()[:20]).median()) for r, s in zip(raw[::-1], scaled[::-1])]
        assert all(torch.equal(r, originals[id(b)][i]) for i, r in enumerate(raw))  # originals untouched
    return factors  # depth order: deepest first


@pytest.mark.parametrize("which", ["UNet2DModel", "UNet2DConditionModel"])
def test_linear_ramp_deepest_gets_bottom_conv_in_gets_top(which):
    if which == "UNet2DModel":
        unet = tiny_unet().eval()
        call = lambda x, t: unet(x, t).sample
    else:
        unet, call = cond_unet()
    K = num_skips(unet)
    factors = record_factors(unet, SkipTuning(mode="linear", rho_bottom=0.5, rho_top=1.0), call)
    assert len(factors) == K
    expected = [0.5 + i * 0.5 / (K - 1) for i in range(K)]
    assert factors == pytest.approx(expected, abs=1e-5)


def test_skip_count_matches_down_block_res_samples():
    assert num_skips(tiny_unet()) == 4  # conv_in + (1 resnet + downsampler) + 1 resnet
    big = UNet2DModel(sample_size=8, layers_per_block=2, block_out_channels=(8, 8, 8, 8), norm_num_groups=8,
                      down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)
    assert num_skips(big) == 12
    assert num_skips(load_model("tiny-mnist").unet) == 6  # the embedded model
    unet, _ = cond_unet()
    assert num_skips(unet) == 1 + (2 + 1) + 2


def test_time_schedules_weight_as_documented():
    inc, dec = SkipTuning(time_schedule="increasing"), SkipTuning(time_schedule="decreasing")
    assert inc.weight(0) == 1.0 and inc.weight(1000) == 0.0 and dec.weight(0) == 0.0 and dec.weight(500) == 0.5
    win = SkipTuning(time_schedule="window", window=(200, 400))
    assert win.weight(300) == 1.0 and win.weight(100) == 0.0


def test_amplifying_and_nonsense_are_refused():
    with pytest.raises(UsageError, match="allow_amplify"):
        SkipTuning(rho=1.2)
    SkipTuning(rho=1.2, allow_amplify=True)
    with pytest.raises(UsageError, match="choose constant or linear"):
        SkipTuning(mode="ramp")
    with pytest.raises(UsageError, match="window"):
        SkipTuning(time_schedule="window")


def sdxl_layout_unet():
    """A tiny UNet2DConditionModel with SDXL's block layout: 3 levels, 2 layers each, no downsampler at the bottom."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=2,
                                block_out_channels=(8, 16, 16), cross_attention_dim=8, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=2).eval()


def up_block_inputs(unet, call, acc=None):
    """Every skip tensor the up blocks receive (after `acc`'s hooks), in down_block_res_samples order."""
    seen = []
    handles = acc.attach(unet) if acc else []
    record = lambda m, a, kw: seen.append(kw.get("res_hidden_states_tuple", a[1] if len(a) > 1 else None))
    post = [b.register_forward_pre_hook(record, with_kwargs=True) for b in unet.up_blocks]
    with torch.no_grad():
        call()
    for h in handles + post:
        h.remove()
    return [d for skips in reversed(seen) for d in skips]  # the first up block takes the deepest (last) skips


def test_scaled_skips_are_all_of_down_block_res_samples_on_sdxl_layout():
    unet = sdxl_layout_unet()
    x, t, ehs = torch.randn(1, 1, 8, 8), torch.tensor(500), torch.randn(1, 1, 8)
    raw = up_block_inputs(unet, lambda: unet(x, t, encoder_hidden_states=ehs))
    scaled = up_block_inputs(unet, lambda: unet(x, t, encoder_hidden_states=ehs), SkipTuning(rho=0.5))
    assert num_skips(unet) == len(raw) == len(scaled) == 9  # SDXL: 1 + (2 + 1) + (2 + 1) + 2
    assert all(torch.allclose(s, 0.5 * r) for r, s in zip(raw, scaled))  # first up block's input is unchanged


@pytest.mark.parametrize("scale_residuals", [True, False])
def test_controlnet_residuals_scaled_or_kept_by_flag(scale_residuals):
    unet, _ = cond_unet()
    x, t, ehs = torch.randn(1, 1, 8, 8), torch.tensor(500), torch.randn(1, 1, 8)
    raw = up_block_inputs(unet, lambda: unet(x, t, encoder_hidden_states=ehs))  # d_q without ControlNet
    torch.manual_seed(1)
    c = tuple(torch.randn_like(d) for d in raw)
    control = {"down_block_additional_residuals": c, "mid_block_additional_residual": torch.zeros(1, 16, 4, 4)}
    acc = SkipTuning(rho=0.5, scale_controlnet_residuals=scale_residuals)
    got = up_block_inputs(unet, lambda: unet(x, t, encoder_hidden_states=ehs, **control), acc)
    want = [0.5 * (d + c_q) if scale_residuals else 0.5 * d + c_q for d, c_q in zip(raw, c)]
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    assert not unet._forward_pre_hooks  # the residual recorder is removed too


def test_composes_with_a_net_that_holds_the_unet():
    unet = tiny_unet().eval()
    holder = torch.nn.ModuleDict({"upsampler": torch.nn.Conv2d(1, 1, 1), "unet": unet})  # like CascadeNet
    handles = SkipTuning(rho=0.8).attach(holder)
    assert len(handles) == len(unet.up_blocks) and all(b._forward_pre_hooks for b in unet.up_blocks)
    for h in handles:
        h.remove()
    with pytest.raises(UsageError, match="up_blocks"):
        SkipTuning().attach(torch.nn.Conv2d(1, 1, 1))


def test_time_schedule_reads_t_from_the_loop():
    """increasing: the hook applies rho at t = 0 and 1 at t = T, with t written by wrap()."""
    unet, x = tiny_unet().eval(), torch.ones(1, 1, 8, 8)
    acc = SkipTuning(rho=0.5, time_schedule="increasing")
    for t, factor in ((torch.tensor(0), 0.5), (torch.tensor(1000), 1.0)):
        raw = up_block_inputs(unet, partial(unet, x, t))
        got = up_block_inputs(unet, partial(acc.wrap(lambda x, t, c: unet(x, t)), x, t, {}), acc)
        assert all(torch.allclose(g, factor * r) for r, g in zip(raw, got))
