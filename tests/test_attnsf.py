"""method=attnsf (hiresrun/methods/attnsf.py): Attn-SF's logit scale against its closed form, the hooked attention
against softmax(lambda q.k / sqrt(d)) v written out, the base resolution as `none` bit for bit, cross-attention left
alone, hooks gone after sampling, and a model without self-attention refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SCHED

import hiresrun
from hiresrun.methods.attnsf import attention_scale, scale_queries, self_attention_layers


def test_the_scale_is_sqrt_of_log_n_over_log_n_base():
    assert attention_scale(64, 4.0) == pytest.approx(math.sqrt(math.log(64) / math.log(16)))  # 8x8 from 4x4
    assert attention_scale(1024, 4.0) == pytest.approx(math.sqrt(5 / 4))  # log_256 1024 = 10/8
    assert attention_scale(64, 1.0) == 1.0 and attention_scale(4, 4.0) == 1.0  # same size; one base token
    assert attention_scale(16, 0.25) < 1  # smaller than the base: the logits soften


@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_a_hooked_layer_computes_softmax_of_lambda_times_the_logits(qk_norm):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    layer = Attention(query_dim=8, heads=2, dim_head=4, qk_norm=qk_norm).eval()
    x = torch.randn(3, 36, 8)  # 36 tokens: a 6x6 map, 2x the side of a 3x3 base map
    lam = attention_scale(36, 4.0)
    with torch.no_grad():
        plain = layer(x)
        handles = scale_queries(layer, 4.0)
        scaled = layer(x)
        for h in handles:
            h.remove()
        after = layer(x)
        heads = lambda t: t.view(3, 36, 2, 4).transpose(1, 2)  # noqa: E731
        q, k, v = heads(layer.to_q(x)), heads(layer.to_k(x)), heads(layer.to_v(x))
        if qk_norm:
            q, k = layer.norm_q(q), layer.norm_k(k)
        weights = torch.softmax(lam * q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
        expected = layer.to_out[0]((weights @ v).transpose(1, 2).reshape(3, 36, 8))
    assert lam > 1 and torch.allclose(scaled, expected, atol=1e-5)
    assert not torch.allclose(scaled, plain, atol=1e-4) and torch.equal(after, plain)  # removed: as before


def test_at_the_base_size_it_is_none_bit_for_bit_and_above_it_differs_and_leaves_no_hook():
    seeds = [0, 1, 2]
    attnsf = hiresrun.load("+method=attnsf", sampler__num_steps=4)
    assert torch.equal(attnsf(seeds), hiresrun.load("+method=none", sampler__num_steps=4)(seeds))
    big = hiresrun.load("+method=attnsf", data__resolution=32, sampler__num_steps=4)
    images = big(seeds)
    assert not torch.equal(images, hiresrun.load("+method=none", data__resolution=32, sampler__num_steps=4)(seeds))
    unet = big.method.base.unet
    assert all(not m._forward_hooks for m in unet.modules())  # removed after the call
    from diffusers.models.attention_processor import Attention

    assert len(self_attention_layers(unet)) == sum(isinstance(m, Attention) for m in unet.modules()) == 4


def test_on_a_text_model_only_self_attention_is_scaled(tiny_sd_dir):
    sampler = hiresrun.load("+method=attnsf", model="diffusers", model__path=str(tiny_sd_dir), data__resolution=32,
                            sampler__num_steps=2, sample__guidance_scale=1.0, sample__prompt="a digit")
    unet = sampler.method.base.unet
    layers = self_attention_layers(unet)
    assert layers and all(name.endswith("attn1") for name, m in unet.named_modules() if m in layers)
    handles = scale_queries(unet, 4.0)
    assert len(handles) == len(layers)
    for h in handles:
        h.remove()
    assert sampler([0, 1]).shape[-1] == 32


def test_a_model_without_self_attention_is_refused_in_one_line(tmp_path):
    from diffusers import UNet2DModel

    from hiresrun.models import save_pipeline

    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False)
    save_pipeline(unet, SCHED, tmp_path / "conv")
    with pytest.raises(hiresrun.HiresrunError, match=r"method=attnsf scales self-attention logits and the "
                                                    r"UNet2DModel at .* has no self-attention layer"):
        hiresrun.load("+method=attnsf", model="diffusers", model__path=str(tmp_path / "conv"), data__resolution=32)
