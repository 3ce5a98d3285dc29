"""How the denoiser executes when sampling: model.channels_last and model.compile change the speed, not the images
(up to float rounding), and leave the module, its names and its hooks where the accelerators expect them."""

from __future__ import annotations

import pytest
import torch

import hiresrun

SD = ["model=tiny-sd-mnist", "sampler.num_steps=3", "logger=none"]


def images(*extra: str) -> torch.Tensor:
    return hiresrun.load(*SD, *extra)(list(range(4))).int()


def test_channels_last_keeps_the_images_and_the_default_is_untouched():
    base = images()
    assert torch.equal(base, images("model.channels_last=false", "model.compile=false"))  # the neutral setting
    s = hiresrun.load(*SD, "model.channels_last=true")
    conv = next(m for m in s.method.base.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert (s(list(range(4))).int() - base).abs().max() <= 1  # the same float image, rounded to uint8


@pytest.mark.slow
def test_compile_keeps_the_images_and_the_accelerators_hooks():
    """torch.compile (inductor, CPU: about a minute) on the tiny latent model: the images within 1/255 of eager, with
    DeepCache's block hooks on the compiled UNet as well."""
    base = images()
    s = hiresrun.load(*SD, "model.compile=true")
    assert (s(list(range(4))).int() - base).abs().max() <= 1
    cached = hiresrun.load(*SD, "+accelerator=deepcache", "accelerator.interval=2")(list(range(4))).int()
    compiled = hiresrun.load(*SD, "+accelerator=deepcache", "accelerator.interval=2", "model.compile=true")
    assert (compiled(list(range(4))).int() - cached).abs().max() <= 1
