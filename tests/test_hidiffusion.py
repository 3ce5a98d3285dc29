"""method=hidiffusion (hiresrun/methods/hidiffusion.py): RAU-Net against the authors' mechanism on SD's layout (their
strided downsampler with diffusers' forwarded upsample sizes, which they switch on), the pooled level's sizes on
SDXL's layout, windowed attention against attention masked to the shifted windows, the switching schedule of the
authors' shares, the neutral settings as `none` bit for bit, one-line refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hiresrun
from hiresrun.methods.hidiffusion import HiDiffusion, strided_conv, window_partition, window_reverse


def _sd_layout_unet(**kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, layers_per_block=2, sample_size=8, **kw).eval()


def _method(unet, resolution=32, base=16, **kw):
    m = HiDiffusion(resolution, **kw)
    m.base = type("Base", (), {"resolution": base, "unet": unet})()
    return m


def _authors_windows(x, window, shift, H, W):  # their window_partition (Swin's), transcribed
    B, N, C = x.shape
    x = x.view(B, H, W, C)
    if shift[0] > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(B, 2, window[0], 2, window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window[0] * window[1], C)


def test_the_strided_downsampler_is_a_dilated_stride_4_convolution():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(1, 3, 16, 16)
    out = strided_conv(conv, x)
    assert out.shape[-2:] == (4, 4)
    assert torch.equal(out, F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2))


def test_rau_net_on_sds_layout_is_the_authors_strided_downsampler_with_forwarded_upsample_sizes():
    """The authors switch level 0's downsampler to stride 4 and make the UNet forward every upsampler's output size
    (`num_upsamplers += 12`); hiresrun's hooks must give the same output."""
    unet = _sd_layout_unet()
    x, t, text = torch.randn(2, 4, 32, 32), torch.tensor(500), torch.randn(2, 3, 8)
    method = _method(unet)
    with torch.no_grad():
        plain = unet(x, t, text).sample
        with method.rau(unet, strided=True, pooled=False):
            ours = unet(x, t, text).sample
        conv = unet.down_blocks[0].downsamplers[0].conv
        conv.forward = lambda h: F.conv2d(h, conv.weight, conv.bias, 4, 2, 2)
        unet.num_upsamplers += 12
        try:
            theirs = unet(x, t, text).sample
        finally:
            del conv.forward
            unet.num_upsamplers -= 12
        assert torch.allclose(ours, theirs, atol=1e-6) and not torch.allclose(ours, plain, atol=1e-3)
        assert torch.equal(unet(x, t, text).sample, plain)  # nothing left behind


def test_the_pooled_level_runs_at_half_size_and_is_restored_before_its_mirrors_last_pair():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SDXL's layout: three levels, the first without attention
        block_out_channels=(8, 8, 8), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        layers_per_block=2, sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")).eval()
    method = _method(unet)
    assert method.layout_of(unet) == "sdxl"
    seen = {}
    names = ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "up_blocks.0.upsamplers.0",
             "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    modules = dict(unet.named_modules())
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad(), method.rau(unet, strided=False, pooled=True):
        spies = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, tuple(  # after the method's
            (o[0] if isinstance(o, tuple) else o).shape[-2:]))) for n in names]
        out = unet(x, torch.tensor(10), torch.randn(1, 3, 8)).sample
    for s in spies:
        s.remove()
    # level 1 is 16 x 16; pooled after its first pair, restored after its mirror's second
    assert seen == {"down_blocks.1.attentions.0": (8, 8), "down_blocks.1.attentions.1": (8, 8),
                    "up_blocks.0.upsamplers.0": (8, 8), "up_blocks.1.attentions.1": (16, 16),
                    "up_blocks.1.attentions.2": (16, 16)}
    assert out.shape == x.shape


@pytest.mark.parametrize("shift", [(0, 0), (2, 2), (4, 4), (6, 6)])
def test_windowed_attention_is_attention_masked_to_the_shifted_windows(shift):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4).eval()
    h = w = 16
    x = torch.randn(2, h * w, 8)
    windows = window_partition(x, (h, w), shift)
    assert torch.equal(windows, _authors_windows(x, (8, 8), shift, h, w))
    assert torch.equal(window_reverse(windows, (h, w), shift), x)
    with torch.no_grad():
        ours = window_reverse(attn(windows), (h, w), shift)
        # the same with one attention over all tokens, each query allowed the keys of its own (rolled) window
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        window_id = (((rows - shift[0]) % h) // (h // 2)) * 2 + ((cols - shift[1]) % w) // (w // 2)
        window_id = window_id.flatten()
        mask = torch.where(window_id[:, None] == window_id[None, :], 0.0, float("-inf"))
        masked = attn(x, attention_mask=mask[None].expand(2, -1, -1))
    assert torch.allclose(ours, masked, atol=1e-5)


def test_the_switches_follow_the_authors_shares():
    unet = _sd_layout_unet()
    sd = _method(unet)  # 2x: t1 = 0.4, t2 = 0
    assert [sd.switches(unet, i, 50) for i in (0, 19, 20)] == [(True, False), (True, False), (False, False)]
    large = _method(unet, resolution=64)  # 4x: t1 = 0.7 strided, t2 = 0.3 pooled
    assert [large.switches(unet, i, 50) for i in (14, 15, 34, 35)] == [
        (True, True), (True, False), (True, False), (False, False)]
    xl = _method(unet, layout="sdxl")  # 2x, aggressive: strided for 8 of 50 steps, then pooled to step 20
    assert [xl.switches(unet, i, 50) for i in (7, 8, 19, 20)] == [
        (True, False), (False, True), (False, True), (False, False)]
    assert _method(unet, raunet=False).switches(unet, 0, 50) == (False, False)


@pytest.mark.parametrize("model", ["tiny-mnist", "tiny-sd-mnist"])
def test_neutral_settings_are_none_bit_for_bit_and_the_default_differs(model):
    seeds, common = [0, 1], {"data__resolution": 32, "sampler__num_steps": 5}
    plain = hiresrun.load(f"model={model}", "+method=none", **common)(seeds)
    for neutral in (["method.raunet=false", "method.window_attn=false"],
                    ["method.t1=0", "method.t2=0", "method.aggressive=false", "method.window_attn=false"]):
        assert torch.equal(hiresrun.load(f"model={model}", "+method=hidiffusion", *neutral, **common)(seeds), plain)
    sampler = hiresrun.load(f"model={model}", "+method=hidiffusion", **common)
    assert not torch.equal(sampler(seeds), plain)
    unet = sampler.method.base.unet
    assert all("forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
               for m in unet.modules())


@pytest.mark.parametrize("override, says", [
    ("method.layout=flux", "method.layout=flux: choose sd"),
    ("method.t1=1.5", r"method.t1=1.5: a share of the steps, in \[0, 1\]"),
])
def test_nonsense_is_one_line(override, says):
    with pytest.raises(hiresrun.HiresrunError, match=says):
        hiresrun.load("+method=hidiffusion", override, data__resolution=32)


def test_a_layout_the_unet_lacks_is_one_line():
    with pytest.raises(hiresrun.HiresrunError, match="sdxl layout halves level 1 and this UNet2DConditionModel has 2"):
        hiresrun.load("model=tiny-sd-mnist", "+method=hidiffusion", "method.layout=sdxl", data__resolution=32)
