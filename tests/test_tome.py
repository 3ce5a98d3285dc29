"""accelerator=tome (hiresrun/accelerators/tome.py, the authors' tomesd): ratio 0 is the plain sampler bit for bit,
tomesd's block at ratio 0 still computes what diffusers' block does, a ratio merges that share of the tokens before
self-attention, an image does not depend on its batch-mates, the UNet leaves exactly as it came, bad settings and
models without transformer blocks are refused in one line."""

from __future__ import annotations

import pytest
import torch

import hiresrun
from hiresrun.accelerators.tome import ToMe

COMMON = {"model": "tiny-sd-mnist", "sampler__num_steps": 3, "data__resolution": 32}


def test_ratio_zero_is_the_plain_sampler_bit_for_bit_and_sets_nothing():
    seeds = [0, 1, 2]
    plain = hiresrun.load(**COMMON)(seeds)
    assert ToMe(ratio=0).attach(torch.nn.Linear(1, 1)) == []
    assert torch.equal(hiresrun.load("+accelerator=tome", accelerator__ratio=0.0, **COMMON)(seeds), plain)


def test_tomesds_block_at_ratio_zero_computes_what_diffusers_block_does():
    """tomesd re-implements BasicTransformerBlock.forward: at ratio 0 (nothing merged) it must still equal this
    diffusers version's block, or every ratio > 0 would also carry that drift."""
    import tomesd

    sampler = hiresrun.load(**COMMON)
    plain = sampler([0, 1])
    unet = sampler.method.base.unet
    tomesd.apply_patch(unet, ratio=0.0, use_rand=False)
    try:
        patched = sampler([0, 1])
    finally:
        tomesd.remove_patch(unet)
    assert torch.equal(patched, plain)


def test_a_ratio_merges_that_share_of_tokens_before_self_attention_and_leaves_the_unet_as_it_was():
    sampler = hiresrun.load("+accelerator=tome", accelerator__ratio=0.5, **COMMON)
    unet = sampler.method.base.unet
    classes = [type(m) for m in unet.modules()]
    seen = []  # (tokens into the block, tokens into its self-attention)
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    handles = [b.attn1.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[1]), with_kwargs=True)
               for b in blocks]
    images = sampler([0, 1])
    for h in handles:
        h.remove()
    latent = 32 // 2  # tiny-sd-mnist: 16 px images are 8x8 latents; at 32 px 16x16
    full = latent * latent
    assert full - int(full * 0.5) in seen  # the full-resolution blocks (downsample 1) see half the tokens
    assert all(n in (full - int(full * 0.5), full // 4, full // 16) for n in seen)  # deeper blocks: untouched
    assert not torch.equal(images, hiresrun.load(**COMMON)([0, 1]))
    assert [type(m) for m in unet.modules()] == classes  # blocks have their class back
    assert not any("_tome_info" in m.__dict__ or m._forward_pre_hooks for m in unet.modules())


def test_an_image_does_not_depend_on_its_batch_mates():
    sampler = hiresrun.load("+accelerator=tome", accelerator__ratio=0.5, **COMMON)
    together = sampler([3, 4])
    alone = sampler([4])
    assert (together[1].float() - alone[0].float()).abs().max() <= 1  # one grey level: batched float rounding


@pytest.mark.parametrize("override, says", [
    ("accelerator.ratio=1.0", "accelerator.ratio=1.0: the share of tokens merged, in [0, 1)"),
    ("accelerator.ratio=-0.1", "accelerator.ratio=-0.1: the share of tokens merged"),
    ("accelerator.max_downsample=3", "accelerator.max_downsample=3: choose 1, 2, 4 or 8"),
])
def test_bad_settings_are_one_line(override, says):
    with pytest.raises(hiresrun.HiresrunError, match=says.replace("[", r"\[").replace(")", r"\)")):
        hiresrun.load("+accelerator=tome", override, **COMMON)


def test_a_unet_without_transformer_blocks_is_refused_by_its_declaration():
    with pytest.raises(hiresrun.HiresrunError, match="accelerator=tome needs a UNet2DConditionModel .*tomesd merges"):
        hiresrun.load("+accelerator=tome", data__resolution=32)


def test_it_composes_with_a_step_level_and_a_block_level_accelerator():
    for listed in ("[adaptive,tome]", "[deepcache,tome]"):
        sampler = hiresrun.load(f"+accelerator={listed}", accelerator__tome__ratio=0.5,
                                **{**COMMON, "sampler__num_steps": 6})
        assert sampler([0]).shape[-1] == 32
        assert all(type(m).__name__ != "ToMeBlock" for m in sampler.method.base.unet.modules())
