"""method=lora (hiresrun/methods/lora.py, peft): at step 0 the adapted UNet is the base bit for bit, an adapted
projection computes W x + b + (alpha / r) B A x, only the adapters train and only they are checkpointed (with the base's
hash), a trained adapter samples through the command line, and nonsense settings are one line."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

import hiresrun
from hiresrun import run
from hiresrun.methods.lora import ATTENTION, LoRA


def adapted(rank: int = 4, alpha: float | None = None):
    base = hiresrun.load(data__resolution=32, sampler__num_steps=2).method.base
    method = LoRA(32, rank=rank, alpha=alpha)
    return base, method, method.wrap(base)


def test_at_step_zero_the_adapted_unet_is_the_base_bit_for_bit():
    plain = hiresrun.load(data__resolution=32, sampler__num_steps=2).method.base.unet
    _, _, unet = adapted()
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(unet.eval()(x, t).sample, plain.eval()(x, t).sample)


def test_an_adapted_projection_is_w_x_plus_alpha_over_r_b_a_x():
    _, _, unet = adapted(rank=2, alpha=6.0)
    layer = next(m for n, m in unet.named_modules() if n.endswith("to_q") and hasattr(m, "lora_A"))
    torch.manual_seed(1)
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: give it values to see the formula
    x = torch.randn(3, layer.base_layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (6.0 / 2) * x @ a.T @ b.T
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_only_the_adapters_train_and_the_count_is_r_times_in_plus_out():
    _, _, unet = adapted(rank=4)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targeted = [m.base_layer for n, m in unet.named_modules() if hasattr(m, "base_layer")
                and any(n.endswith(t) for t in ATTENTION)]
    assert sum(p.numel() for p in trainable.values()) == sum(4 * (m.in_features + m.out_features) for m in targeted)


def test_training_checkpoints_only_the_adapter_and_the_trained_adapter_samples(tmp_path):
    train = compose(["task=train", "method=lora", "data.resolution=32", "trainer.max_steps=3", "train.grid_every=0",
                     "optimizer.lr=0.05", "data.batch_size=4", "logger=none"], tmp_path / "t")
    run.run(train)
    saved = torch.load(tmp_path / "t" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])
    assert saved["base"]["weights_sha256"] and not (tmp_path / "t" / "model").exists()  # no full-UNet export
    seeds = [0, 1]
    tuned = hiresrun.load("+method=lora", data__resolution=32, sampler__num_steps=3, ckpt_path=str(tmp_path / "t"))
    plain = hiresrun.load("+method=none", data__resolution=32, sampler__num_steps=3)
    assert not torch.equal(tuned(seeds), plain(seeds))


@pytest.mark.parametrize("override, says", [
    ("method.rank=0", "method.rank=0: the adapters' rank, at least 1"),
    ("method.dropout=1.0", "method.dropout=1.0: a probability in"),
    ("method.targets=[to_x]", r"method.targets=\['to_x'\]: no module of the UNet2DModel is named so"),
])
def test_nonsense_is_one_line(override, says, tmp_path):
    with pytest.raises(hiresrun.HiresrunError, match=says):
        hiresrun.train("+method=lora", override, data__resolution=32, trainer__max_steps=1, logger="none",
                       run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
