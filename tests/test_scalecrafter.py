"""method=scalecrafter (hiresrun/methods/scalecrafter.py): a re-dilated convolution against F.conv2d with dilation d
(and, for a fractional factor, the resize around it written out), the neutral settings as `none` bit for bit, the
re-dilated window, the authors' presets against the SD UNet's layer names, the progressive decay, one-line refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hiresrun
from hiresrun.methods.scalecrafter import PRESETS, ScaleCrafter, redilate, redilated_conv


@pytest.mark.parametrize("stride", [1, 2])
def test_an_integer_factor_is_conv2d_with_that_dilation_and_matching_padding(stride):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, stride=stride, padding=1)
    x = torch.randn(2, 3, 16, 16)
    expected = F.conv2d(x, conv.weight, conv.bias, stride, 2, 2)
    assert torch.allclose(redilated_conv(conv, 2.0, x), expected, atol=1e-6)
    assert redilated_conv(conv, 2.0, x).shape == conv(x).shape


def test_a_fractional_factor_resizes_around_the_next_integer_dilation():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 12, 12)
    up = F.interpolate(x, size=(16, 16), mode="bilinear")  # d = 2 = ceil(1.5): 12 * 2 / 1.5 = 16
    expected = F.interpolate(F.conv2d(up, conv.weight, conv.bias, 1, 2, 2), size=(12, 12), mode="bilinear")
    assert torch.allclose(redilated_conv(conv, 1.5, x), expected, atol=1e-6)


def test_redilate_leaves_the_class_forward_when_done():
    unet = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
    x = torch.randn(1, 1, 8, 8)
    plain = unet(x)
    with redilate(unet, {"0": 2.0}):
        assert not torch.equal(unet(x), plain)
    assert "forward" not in unet[0].__dict__ and torch.equal(unet(x), plain)


def test_neutral_settings_are_none_bit_for_bit_and_the_default_differs():
    seeds, common = [0, 1], {"data__resolution": 32, "sampler__num_steps": 4}
    plain = hiresrun.load("+method=none", **common)(seeds)
    for neutral in ({"method__dilation": 1.0}, {"method__share": 0.0}):
        assert torch.equal(hiresrun.load("+method=scalecrafter", **common, **neutral)(seeds), plain)
    sampler = hiresrun.load("+method=scalecrafter", **common)
    assert not torch.equal(sampler(seeds), plain)
    assert all("forward" not in m.__dict__ for m in sampler.method.base.unet.modules())


def test_the_first_share_of_the_steps_is_redilated_at_the_scale(monkeypatch):
    from hiresrun.methods import scalecrafter

    seen = []
    real = scalecrafter.redilate

    def spy(unet, layers, mode="bilinear"):
        seen.append(sorted(set(layers.values())))
        return real(unet, layers, mode)

    monkeypatch.setattr(scalecrafter, "redilate", spy)
    sampler = hiresrun.load("+method=scalecrafter", method__share=0.5, data__resolution=32, sampler__num_steps=6)
    sampler([0])
    assert seen == [[2.0]] * 3  # 3 of 6 steps, at 32 / 16
    layers = sampler.method.layers(sampler.method.base.unet)
    assert layers and all(n.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0.")) for n in layers)


def test_the_presets_name_the_sd_unets_convolutions_and_decay_as_the_authors_do():
    from diffusers import UNet2DConditionModel

    sd_layout = UNet2DConditionModel(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, cross_attention_dim=8,
                                     attention_head_dim=2, layers_per_block=2, sample_size=8)  # SD 1.5/2.1's layout
    xl_layout = UNet2DConditionModel(  # SDXL's: three levels, the first without attention
        block_out_channels=(8, 8, 8), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        layers_per_block=2, sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    for name, preset in PRESETS.items():
        method = ScaleCrafter(64, preset=name)
        assert method.layers(xl_layout if name.startswith("sdxl") else sd_layout) == preset["layers"], name
    # the authors' files: 39 layers at 2 for SD 1.5 / 2.1 at 1024 px (30 and 20 of 50 steps), 40 at 2-4 for SD 2.1
    # at 2048 px, and of SDXL's 2048 px file the 11 layers SDXL has
    assert [len(PRESETS[p]["layers"]) for p in ("sd15-1024", "sd21-1024", "sd21-2048", "sdxl-2048")] == [39, 39, 40, 11]
    assert [round(PRESETS[p]["share"] * 50) for p in ("sd15-1024", "sd21-1024", "sd21-2048", "sdxl-2048")] == [
        30, 20, 37, 30]
    progressive = ScaleCrafter(64, preset="sd21-2048")
    n = round(37 / 50 * 50)
    assert [progressive.factor_at(4, i, n) for i in (0, 10, 20, 30, 36)] == [
        max(math.ceil(4 * (n - i) / n), 2) for i in (0, 10, 20, 30, 36)] == [4, 3, 2, 2, 2]
    assert ScaleCrafter(64, preset="sd15-1024").factor_at(2, 20, 30) == 2  # not progressive


@pytest.mark.parametrize("override, says", [
    ("method.dilation=0.5", "method.dilation=0.5: a factor of at least 1"),
    ("method.share=1.5", r"method.share=1.5: the share of the steps re-dilated, in \[0, 1\]"),
    ("method.preset=sdxl", "method.preset=sdxl: choose one of sd15-1024, sd21-1024, sd21-2048, sdxl-2048"),
    ("method.preset=sd21-2048", "method.preset=sd21-2048 names convolutions this UNet2DModel lacks"),
])
def test_nonsense_is_one_line(override, says):
    with pytest.raises(hiresrun.HiresrunError, match=says):
        hiresrun.load("+method=scalecrafter", override, data__resolution=32)


TEST_PRESET = {"share": 0.5, "progressive": False,  # the authors' form, on the tiny SD folder's two levels
               "layers": {"down_blocks.1.resnets.0.conv1": 2, "up_blocks.0.resnets.0.conv1": 2,
                          "up_blocks.1.resnets.0.conv1": 2},
               "ndcfg": {"share": 0.5, "without": ("up_blocks.1.",)}}


def test_noise_damped_guidance_is_the_authors_formula_with_three_counted_passes(tiny_sd_dir, monkeypatch):
    """eps = eps_u' + w (eps_c - eps_u) in the damped share of the steps, eps_u' from the unconditional input under
    the preset's ndcfg layers, written out here with direct UNet calls inside a plain sampling loop."""
    from hiresrun import sampling
    from hiresrun.methods import scalecrafter
    from hiresrun.models import unet_kwargs

    monkeypatch.setitem(scalecrafter.PRESETS, "test-nd", TEST_PRESET)
    sampler = hiresrun.load("model=diffusers", f"model.path={tiny_sd_dir}", "+method=scalecrafter",
                            "method.preset=test-nd", "sample.prompt=a cat", "sample.guidance_scale=3",
                            data__resolution=32, sampler__num_steps=4)
    assert sampler.method.ndcfg
    counter = sampling.Counter()
    loop = sampler.loop([0, 1], counter, torch.device("cpu"))
    with torch.no_grad():
        ours = sampler.method.sample(sampler.net, loop.gens, loop)
    assert counter.evals == 2 * (2 * 3 + 2 * 1)  # per image: 3 calls in the 2 damped steps, 1 guided call after

    unet, base = sampler.method.base.unet, sampler.method.base
    main = {k: float(v) for k, v in TEST_PRESET["layers"].items()}
    damped = {k: v for k, v in main.items() if not k.startswith("up_blocks.1.")}
    cond, w = loop.cond, float(loop.cond["guidance_scale"])

    def wrap(f, step):
        def call(x, t, c):
            x = sampler.scheduler.scale_model_input(x, t)
            if step.full_step >= 2:
                return f(x, t, c)
            with redilate(unet, main):
                text = unet(x, t, **unet_kwargs(c)).sample
                uncond = unet(x, t, **c["negative"]).sample
            with redilate(unet, damped):
                uncond_damped = unet(x, t, **c["negative"]).sample
            return uncond_damped + w * (text - uncond)
        return call

    from hiresrun.models import model_fn

    gens = sampling.generators([0, 1])
    x_T = sampling.noise(gens, sampler.method.latent_shape(32))
    with torch.no_grad():
        ref = base.decode(sampling.sample(lambda x, t, c: model_fn(unet)(x, t, c), x_T, sampler.scheduler, 4,
                                          gens=gens, cond=cond,
                                          wrap=lambda f, step: wrap(lambda x, t, c: f(x, t, c), step)))
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_noise_damped_guidance_refuses_stateful_accelerators_and_needs_its_preset(tiny_sd_dir, monkeypatch):
    from hiresrun.methods import scalecrafter

    monkeypatch.setitem(scalecrafter.PRESETS, "test-nd", TEST_PRESET)
    common = ["model=diffusers", f"model.path={tiny_sd_dir}", "+method=scalecrafter", "sample.prompt=a cat"]
    with pytest.raises(hiresrun.HiresrunError, match="calls the model several times per sampler step"):
        hiresrun.load(*common, "method.preset=test-nd", "+accelerator=adaptive", data__resolution=32)
    hiresrun.load(*common, "method.preset=test-nd", "method.ndcfg=false", "+accelerator=adaptive",
                  data__resolution=32)  # without damping the pair runs
    with pytest.raises(hiresrun.HiresrunError, match="method.ndcfg=true needs a preset"):
        hiresrun.load(*common, "method.ndcfg=true", data__resolution=32)
    assert PRESETS["sd21-2048"]["ndcfg"]["share"] == 37 / 50
    sd_layers = PRESETS["sd21-2048"]["layers"]
    assert len({k for k in sd_layers if not k.startswith("up_blocks.3.")}) == 34  # the authors' ndcfg file


def test_damped_guidance_with_the_main_layers_is_plain_guidance(tiny_sd_dir, monkeypatch):
    """ndcfg's neutral setting: damped layers equal to the main ones make eps_u' = eps_u, i.e. ScaleCrafter without
    damping (to float rounding: the unconditional pass runs alone instead of in the doubled batch)."""
    from hiresrun.methods import scalecrafter

    same = {**TEST_PRESET, "ndcfg": {"share": 0.5, "without": ()}}
    monkeypatch.setitem(scalecrafter.PRESETS, "test-same", same)
    common = ["model=diffusers", f"model.path={tiny_sd_dir}", "+method=scalecrafter", "method.preset=test-same",
              "sample.prompt=a cat", "sample.guidance_scale=3"]
    damped = hiresrun.load(*common, data__resolution=32, sampler__num_steps=4)
    plain = hiresrun.load(*common, "method.ndcfg=false", data__resolution=32, sampler__num_steps=4)
    assert damped.method.ndcfg and not plain.method.ndcfg
    a, b = damped.generate([0, 1]), plain.generate([0, 1])
    assert (a["images"].int() - b["images"].int()).abs().max() <= 1
    assert a["evals"] > b["evals"]  # the damped steps' extra calls are counted
