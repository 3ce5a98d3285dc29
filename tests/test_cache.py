"""accelerator=cache: diffusers' own cache hooks on a DiT base. Each kind's neutral setting is no accelerator bit for
bit (and First Block Cache at threshold 0 with its hooks on, too); a skipping setting changes the images, costs less
than a full call per step, leaves no hook behind and no state between sampling calls; the config objects are
diffusers' own; a run records cost_per_image; a UNet base and bad settings are refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, compose
from diffusers import DDIMScheduler, DiTTransformer2DModel

from hiresrun import run as task
from hiresrun import sampling
from hiresrun.accelerators.cache import DIT_MODULES, DiffusersCache, hook_names
from hiresrun.errors import UsageError
from hiresrun.hooks import hooks_removed_after

SKIPPING = {"first_block": {"threshold": 0.3}, "taylorseer": {"interval": 3}, "pab": {"interval": 2},
            "magcache": {"threshold": 0.3, "options": {"mag_ratios": [1.0] * 10}}}
NEUTRAL = {"first_block": {"threshold": 0.0}, "taylorseer": {"interval": 1}, "pab": {"interval": 1},
           "magcache": {"threshold": 0.0, "options": {"calibrate": True}}}


@pytest.fixture(scope="module")
def dit(tiny_dit_dir):
    return DiTTransformer2DModel.from_pretrained(tiny_dit_dir / "transformer").eval(), \
        DDIMScheduler.from_pretrained(tiny_dit_dir / "scheduler")


def run(dit, acc, steps: int = 10):
    transformer, scheduler = dit
    labels = torch.tensor([1, 2])

    def fn(x, t, cond):
        return transformer(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample[:, :4]

    gens = sampling.generators([0, 1])
    wrap = (lambda f, step: acc.wrap(f, step)) if acc else (lambda f, step: f)
    with torch.no_grad(), hooks_removed_after(acc.attach(transformer) if acc else []):
        return sampling.sample(fn, sampling.noise(gens, (4, 8, 8)), scheduler, steps, gens=gens, wrap=wrap)


@pytest.mark.parametrize("kind", list(NEUTRAL))
def test_the_neutral_setting_is_no_accelerator_bit_for_bit(kind, dit):
    base = run(dit, None)
    acc = DiffusersCache(kind, **NEUTRAL[kind])
    assert torch.equal(run(dit, acc), base)
    assert not hook_names(dit[0])


def test_first_block_cache_hooks_at_threshold_zero_compute_everything_bit_for_bit(dit):
    """The seam itself changes nothing: diffusers' hooks on every block, a context per call, nothing skipped."""
    base = run(dit, None)
    acc = DiffusersCache("first_block", threshold=0.0, options={"threshold": 0.0})  # options: not the shortcut
    assert not acc.neutral
    assert torch.equal(run(dit, acc), base)
    record = acc.records[-1]
    assert record["calls"] == 10 and record["partial"] == 0 and record["cost"] == pytest.approx(10)


@pytest.mark.parametrize("kind", list(SKIPPING))
def test_a_skipping_setting_costs_less_and_leaves_nothing_behind(kind, dit):
    before = {k: v.clone() for k, v in dit[0].state_dict().items()}
    base = run(dit, None)
    acc = DiffusersCache(kind, **SKIPPING[kind])
    first, again = run(dit, acc), run(dit, acc)
    assert not torch.equal(first, base) and torch.equal(first, again)  # it skipped; no state carried over
    record = acc.records[-1]
    assert record["calls"] == 10 and 0 < record["partial"] < 10 and 1 < record["cost"] < 10
    assert not hook_names(dit[0]) and all(torch.equal(v, dit[0].state_dict()[k]) for k, v in before.items())
    assert torch.equal(run(dit, None), base)


def test_the_configs_are_diffusers_own(dit):
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    acc = DiffusersCache("taylorseer", interval=4, options={"max_order": 2})
    acc.transformer = dit[0]
    cfg = acc.config(20, {"t": 0})
    assert isinstance(cfg, TaylorSeerCacheConfig) and (cfg.cache_interval, cfg.max_order) == (4, 2)
    assert cfg.cache_identifiers == DIT_MODULES  # DiT's attn1 / ff: diffusers' default patterns miss them
    assert isinstance(DiffusersCache("first_block", threshold=0.1).config(20, {}), FirstBlockCacheConfig)
    mag = DiffusersCache("magcache", options={"mag_ratios": [1.0] * 20}).config(20, {})
    assert isinstance(mag, MagCacheConfig) and mag.num_inference_steps == 20
    t = {"t": 123.0}
    pab = DiffusersCache("pab", interval=3).config(20, t)
    assert isinstance(pab, PyramidAttentionBroadcastConfig) and pab.spatial_attention_block_skip_range == 3
    assert pab.current_timestep_callback() == 123.0


def test_a_dit_run_records_its_cost_and_a_unet_is_refused(tiny_dit_dir, tiny_model_dir, tmp_path):
    cfg = compose(["model=diffusers", f"model.path={tiny_dit_dir}", "data.resolution=16", "sampler.num_steps=8",
                   "sample.num_samples=2", "logger=none", "trainer.enable_progress_bar=false", "accelerator=cache",
                   "accelerator.kind=first_block", "accelerator.threshold=0.3"], tmp_path / "run")
    metrics = task.run(cfg)
    assert metrics["nfe_per_image"] == 8 and 1 < metrics["cost_per_image"] < 8
    per = json.loads((tmp_path / "run" / "skip_masks.json").read_text())
    assert set(per) == {"0", "1"} and per["0"]["calls"] == 8
    out = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16",
              "+accelerator=cache", cwd=tmp_path)
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "accelerator=cache needs a DiTTransformer2DModel or Transformer2DModel" in line


def test_bad_settings_are_one_line():
    with pytest.raises(UsageError, match="accelerator.kind=banana: choose first_block"):
        DiffusersCache("banana")
    with pytest.raises(UsageError, match="needs the model's magnitude ratios"):
        DiffusersCache("magcache")
    with pytest.raises(UsageError, match="accelerator.options for kind=first_block"):
        DiffusersCache("first_block", options={"banana": 1}).config(10, {})


def test_counting_flops_changes_no_image(dit):
    """count_flops only measures: the same images with it off, and no cost record."""
    counted, plain = DiffusersCache("first_block", threshold=0.3), DiffusersCache("first_block", threshold=0.3,
                                                                                  count_flops=False)
    assert torch.equal(run(dit, counted), run(dit, plain))
    assert plain.per_image(0, [0, 1]) is None and counted.per_image(0, [0, 1])["0"]["calls"] == 10


@pytest.mark.parametrize("kind", list(SKIPPING))
def test_the_cost_of_each_call_is_torchs_flop_count_with_the_counter_run_once_per_loop(kind, dit, monkeypatch):
    """The cost record equals counting every call with torch's FLOP counter (call FLOPs / the first call's), while
    the counter itself runs on one call per sampling loop only (counting is several times a tiny call's time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hiresrun import accelerators

    reference = DiffusersCache(kind, **SKIPPING[kind], count_flops=False)
    per_call = []
    transformer, _ = dit
    real_attach = reference.attach

    def attach(net):  # count every call inside the accelerator's own wrapping, as the cost used to be measured
        handles = real_attach(net)
        wrap = reference.wrap

        def counting(f):
            def call(x, t, c):
                out, flops = accelerators.counted(f, x, t, c)
                per_call.append(flops)
                return out
            return call

        reference.wrap = lambda f, step: wrap(counting(f), step)
        return handles

    reference.attach = attach
    images = run(dit, reference)
    expected = sum(f / per_call[0] for f in per_call)
    entered = []
    real_enter = FlopCounterMode.__enter__
    monkeypatch.setattr(FlopCounterMode, "__enter__", lambda self: entered.append(1) or real_enter(self))
    acc = DiffusersCache(kind, **SKIPPING[kind])
    assert torch.equal(run(dit, acc), images)
    assert acc.records[-1]["cost"] == pytest.approx(expected, rel=1e-9)
    assert acc.records[-1]["cost"] < 10 and len(entered) == 1
    run(dit, acc)
    assert len(entered) == 2 and acc.records[-1]["cost"] == pytest.approx(expected, rel=1e-9)
    assert not any(m._forward_pre_hooks for m in transformer.modules())  # the meter's hooks are gone
