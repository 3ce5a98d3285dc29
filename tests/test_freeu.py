"""FreeU arm: diffusers' enable_freeu switched on by attach, bit-exact restore on detach, clear refusal elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DConditionModel

from hiresrun.accelerators.freeu import KEYS, FreeU
from hiresrun.build import build_accelerator
from hiresrun.errors import UsageError


def cond_unet():
    """A tiny UNet2DConditionModel: two up stages at resolution_idx 0 and 1, where FreeU acts."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=8, attention_head_dim=2).eval()


def forward(unet):
    torch.manual_seed(1)
    x, ehs = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8)
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=ehs).sample


def test_attach_changes_the_output_and_detach_restores_bit_exactly():
    unet = cond_unet()
    base = forward(unet)
    handles = FreeU().attach(unet)
    assert all(b.b1 == 1.5 and b.s2 == 0.2 for b in unet.up_blocks)
    assert not torch.equal(forward(unet), base)
    for h in handles:
        h.remove()
    assert torch.equal(forward(unet), base)
    assert not any(hasattr(b, k) for b in unet.up_blocks for k in KEYS)  # as found: no leftover attributes


def test_neutral_factors_are_the_identity():
    """b = s = 1 multiplies by one and filters with scale 1: the same numbers (FFT round trip aside)."""
    unet = cond_unet()
    base = forward(unet)
    handles = FreeU(b1=1.0, b2=1.0, s1=1.0, s2=1.0).attach(unet)
    assert torch.allclose(forward(unet), base, atol=1e-5)
    for h in handles:
        h.remove()


def test_detach_restores_settings_made_before_attach():
    unet = cond_unet()
    unet.enable_freeu(s1=0.5, s2=0.5, b1=1.1, b2=1.1)
    before = forward(unet)
    for h in FreeU().attach(unet):
        h.remove()
    assert all(b.s1 == 0.5 and b.b2 == 1.1 for b in unet.up_blocks)
    assert torch.equal(forward(unet), before)


def test_a_unet_without_enable_freeu_is_refused_in_one_line():
    with pytest.raises(UsageError, match="UNet2DModel has none: use accelerator=skiptuning"):
        FreeU().attach(tiny_unet())


def test_config_builds_the_accelerator_with_sd15_defaults():
    from conftest import compose

    acc = build_accelerator(compose(["accelerator=freeu", "accelerator.b2=1.4"]))
    assert isinstance(acc, FreeU) and (acc.b1, acc.b2, acc.s1, acc.s2) == (None, 1.4, None, None)
    from diffusers import UNet2DConditionModel

    sd1 = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=768,
                               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1)
    assert acc.factors(sd1) == {"b1": 1.5, "b2": 1.4, "s1": 0.9, "s2": 0.2}  # b2 given, the rest SD 1.5's


def test_defaults_follow_the_model_family(tiny_sd_dir, tiny_sdxl_dir):
    """The FreeU README's values per family: SD 1.5, SD 2.1 (1024-wide cross-attention) and SDXL (text_time)."""
    from diffusers import UNet2DConditionModel

    from hiresrun.accelerators.freeu import family

    sdxl = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    assert family(sdxl) == "sdxl" and FreeU().factors(sdxl) == {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}
    sd2 = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=1024,
                               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1)
    assert family(sd2) == "sd2" and FreeU().factors(sd2) == {"b1": 1.4, "b2": 1.6, "s1": 0.9, "s2": 0.2}
    assert family(UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")) == "sd1"
