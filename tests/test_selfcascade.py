"""Self-Cascade: identities (strength 1 = none, strength 0 = upsample, min_t above all t = tuning-free),
upsampler sizes and init, skips untouched, both UNet classes, gradients only into upsamplers, CLI training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SCHED, cli, tiny_unet
from diffusers import DDIMScheduler, UNet2DConditionModel
from hydra.utils import instantiate

from hiresrun.build import parse_seeds
from hiresrun.errors import UsageError
from hiresrun.methods.none import NoneMethod
from hiresrun.methods.selfcascade import CascadeNet, LightUpsampler, ResBlockUpsampler, SelfCascade, attach_upsamplers
from hiresrun.methods.upsample import Upsample
from hiresrun.models import BaseModel, load_model
from hiresrun.sampling import TRAINING_SEEDS, Sampler


def base(unet=None):
    unet = (unet or tiny_unet()).eval()
    return BaseModel(unet=unet, scheduler_config=SCHED, resolution=8, channels=unet.config.in_channels,
                     weights_hash="t", source="t")


def images(method, seeds=(0, 1, 2), steps=6, b=None):
    b = b or base()
    net = method.wrap(b)
    return Sampler(net, method, DDIMScheduler.from_config(SCHED), num_steps=steps).generate(list(seeds))["images"]


def test_strength_one_is_direct_sampling_and_zero_is_upsample():
    assert torch.equal(images(SelfCascade(16, mode="tuning_free", strength=1.0)), images(NoneMethod(16)))
    assert torch.equal(images(SelfCascade(16, mode="tuning_free", strength=0.0)), images(Upsample(16)))
    mid = images(SelfCascade(16, mode="tuning_free", strength=0.5))
    assert not torch.equal(mid, images(NoneMethod(16))) and not torch.equal(mid, images(Upsample(16)))


def test_two_stages_shapes_and_resolution_check():
    assert images(SelfCascade(32, mode="tuning_free", stages=2)).shape == (3, 1, 32, 32)
    with pytest.raises(UsageError, match="method.stages=1 doubles 8 to 16"):
        SelfCascade(32, mode="tuning_free").wrap(base())


def test_tuned_with_branch_off_equals_tuning_free_and_detach_restores():
    b = base()
    tuned = SelfCascade(16, mode="tuned", strength=0.5, lr_branch_min_t=10_000)
    free = images(SelfCascade(16, mode="tuning_free", strength=0.5), b=b)
    assert torch.equal(images(tuned, b=b), free)
    on = SelfCascade(16, mode="tuned", strength=0.5)  # upsamplers at init inject nearest-upsampled LR features
    assert not torch.equal(images(on, b=b), free)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in b.unet.modules())


def test_upsampler_parameter_counts_and_identity_at_init():
    unet = load_model("tiny-mnist").unet
    widths = list(unet.config.block_out_channels) + [unet.config.block_out_channels[-1]]
    E = unet.time_embedding.linear_2.out_features
    assert E == 128
    count = lambda cls: sum(p.numel() for C in widths for p in cls(C, E).parameters())
    assert count(ResBlockUpsampler) == 2 * sum(18 * C * C + (E + 7) * C for C in widths) == 539_712
    assert count(LightUpsampler) == sum(10 * C + E + 1 for C in widths) == 2_756
    h, emb = torch.randn(2, 64, 4, 4), torch.randn(2, E)
    for cls in (ResBlockUpsampler, LightUpsampler):
        assert torch.equal(cls(64, E)(h, emb), F.interpolate(h, scale_factor=2, mode="nearest"))


def test_skips_untouched_and_no_hook_fires_in_the_lr_pass():
    net = CascadeNet(tiny_unet(), "resblock", 1)
    for p in net.upsamplers.parameters():
        torch.nn.init.normal_(p, std=0.1)  # make every injection non-trivial
    seen = []
    hook = net.unet.down_blocks[0].register_forward_hook(lambda m, a, o: seen.append(o))
    handles, _ = attach_upsamplers(net, 0, torch.randn(1, 1, 8, 8))
    with torch.no_grad():
        net.unet(torch.randn(1, 1, 16, 16), torch.tensor(500))
    for h in handles + [hook]:
        h.remove()
    lr_out, hr_out = seen  # the LR pass (8x8 pivot) ran once, inside the HR call
    assert lr_out[0].shape[-1] == 4 and hr_out[0].shape[-1] == 8
    # down block 0 has a downsampler: its last skip is the block's own hidden state, not the injected one
    raw_hidden = hr_out[1][-1]
    assert raw_hidden.shape == hr_out[0].shape


def test_condition_unet_and_only_upsamplers_get_gradients():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=8, attention_head_dim=2)
    b = base(unet)
    b.cond = {"encoder_hidden_states": torch.zeros(2, 1, 8)}
    method = SelfCascade(16, mode="tuned", upsampler="light")
    net = method.wrap(b)
    loss = method.loss(net, {"image": torch.rand(2, 1, 16, 16) * 2 - 1, "label": torch.tensor([-1, -1])})["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in net.unet.parameters())
    assert all(p.grad is not None for p in net.upsamplers.parameters())


def test_train_then_sample_through_the_cli(tiny_model_dir, tmp_path):
    common = ["model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none"]
    proc = cli("train", "+method=selfcascade", "method.upsampler=light", "trainer.max_steps=2", "data.batch_size=4",
               "train.grid_every=0", "hydra.run.dir=tr", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(tmp_path / "tr" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("net.upsamplers.") for k in ckpt["state_dict"])  # only what trains
    assert ckpt["base"]["weights_sha256"] == load_model(str(tiny_model_dir)).weights_hash
    # light upsamplers after down blocks (8, 16) and the mid block (16), time embedding 32: 10 C + 33 each
    assert json.loads((tmp_path / "tr" / "metrics.json").read_text())["trainable_params"] == 10 * 40 + 3 * 33
    proc = cli("sample", "+method=selfcascade", "ckpt_path=tr", "sample.num_samples=2", *common, cwd=tmp_path)
    assert proc.returncode == 2 and "method.upsampler=light" in proc.stderr  # names the training settings
    proc = cli("sample", "+method=selfcascade", "method.upsampler=light", "ckpt_path=tr", "sampler.num_steps=4",
               "sample.num_samples=2", "hydra.run.dir=sa", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "sa" / "metrics.json").read_text())["num_samples"] == 2
    proc = cli("sample", "+method=selfcascade", "sample.num_samples=2", *common, cwd=tmp_path)
    assert proc.returncode == 2 and "ckpt_path" in proc.stderr


def test_generated_pivots_are_base_samples_from_a_training_seed_space_made_once():
    """Training image i's pivot is the base sample of seed 2^31 + i: never the pivot any sampling seed evaluates
    (seeds >= 2^31 are refused by sample.seeds), so tuned upsamplers cannot reproduce training pairs at test time."""
    b = base()
    method = SelfCascade(16, mode="tuned", upsampler="light", pivot_source="generated", pivot_steps=4)
    net = method.wrap(b)
    calls = []
    net.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    batch = {"image": torch.rand(3, 1, 16, 16) * 2 - 1, "label": torch.tensor([-1] * 3),
             "index": torch.tensor([5, 9, 5])}
    pivots = method.generated_pivots(net.unet, batch)
    # what `method=none` draws at the base size, 4 DDIM steps, for seed 2^31 + index, and not for seed = index
    expected = images(NoneMethod(8), seeds=(TRAINING_SEEDS + 5, TRAINING_SEEDS + 9), steps=4)
    evaluated = images(NoneMethod(8), seeds=(5, 9), steps=4)
    assert pivots.shape == (3, 1, 8, 8)
    assert torch.equal(pivots[0], pivots[2])
    got = ((pivots.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (got[:2].int() - expected.int()).abs().max() <= 1
    assert (got[:2].int() - evaluated.int()).abs().flatten(1).max(1).values.min() > 8
    with pytest.raises(UsageError, match="2\\^31"):
        parse_seeds([TRAINING_SEEDS + 5], 1)
    assert calls == [3] * 4  # 3 images (index 5 twice, generated twice, kept once) x 4 steps
    calls.clear()
    method.generated_pivots(net.unet, {**batch, "index": torch.tensor([9, 5])})
    assert calls == []  # cached: no UNet call
    loss = method.loss(net, batch)["loss"]
    loss.backward()
    assert all(p.grad is not None for p in net.upsamplers.parameters())
    with pytest.raises(UsageError, match="pivot_source=generated"):
        SelfCascade(32, pivot_source="generated", stages=2)


SAMPLERS = Path(__file__).parents[1] / "conf" / "sampler"


@pytest.mark.parametrize("name", sorted(p.stem for p in SAMPLERS.glob("*.yaml") if not p.stem.startswith("flow_")))
def test_every_sampler_strength_one_is_none_and_tuned_runs(name):
    """With every VP and EDM sampler (the flow ones: tests/test_flow.py): strength 1 reproduces method=none (so the
    mid-schedule start is the only change), and tuning-free / tuned at strength 0.5 give images of the target size."""
    from omegaconf import OmegaConf

    from hiresrun import edm

    make = instantiate(OmegaConf.load(SAMPLERS / f"{name}.yaml").scheduler)
    b = base()
    schedule = edm.scheduler_config() if name.startswith("edm_") else SCHED  # EDM samplers: an EDM base
    if name.startswith("edm_"):
        b.parametrization = "edm"

    def run(method, steps=4):
        net = method.wrap(b)
        return Sampler(net, method, make(schedule), num_steps=steps).generate([0, 1])["images"]

    assert torch.equal(run(SelfCascade(16, mode="tuning_free", strength=1.0)), run(NoneMethod(16)))
    for mode in ("tuning_free", "tuned"):
        if mode == "tuned" and name.startswith("edm_"):  # refused: its loss and branch gate live on the VP grid
            with pytest.raises(UsageError, match="does not drive EDM-preconditioned networks"):
                run(SelfCascade(16, mode=mode, strength=0.5))
            continue
        images = run(SelfCascade(16, mode=mode, strength=0.5))
        assert images.shape == (2, 1, 16, 16), (name, mode)


@pytest.mark.parametrize("name", sorted(p.stem for p in SAMPLERS.glob("*.yaml")
                                         if not p.stem.startswith(("edm_", "flow_"))))
def test_the_low_resolution_branch_runs_on_every_call_above_its_gate(name, monkeypatch):
    """Tuned Self-Cascade runs the frozen UNet's low-resolution pass once per high-resolution call whose timestep is
    at or above `lr_branch_min_t`, on every sampler of the parametrization it accepts (VP timesteps; EDM bases are
    refused), and that branch changes the image."""
    from omegaconf import OmegaConf

    from hiresrun.methods import selfcascade

    passes, real = [], selfcascade.lr_features
    monkeypatch.setattr(selfcascade, "lr_features", lambda *a, **k: passes.append(1) or real(*a, **k))
    make = instantiate(OmegaConf.load(SAMPLERS / f"{name}.yaml").scheduler)
    b, steps, min_t = base(), 10, 300
    tuned = SelfCascade(16, mode="tuned", strength=0.6, lr_branch_min_t=min_t)
    from hiresrun.sampling import Loop, generators

    out = tuned.sample(tuned.wrap(b), generators([0]), Loop(make(SCHED), steps, generators([0])))
    scheduler = make(SCHED)
    scheduler.set_timesteps(steps)
    start = steps - int(steps * 0.6)
    kept = scheduler.timesteps[start * scheduler.order:]
    assert len(passes) == int((kept >= min_t).sum()) > 0, name
    free = SelfCascade(16, mode="tuning_free", strength=0.6)
    plain = free.sample(free.wrap(b), generators([0]), Loop(make(SCHED), steps, generators([0])))
    assert (out - plain).abs().max() > 1e-3  # the branch (upsamplers at init: nearest-upsampled features) acts


def test_tuned_selfcascade_on_an_edm_base_is_refused_before_any_work(tmp_path):
    from conftest import compose

    from hiresrun import run
    from hiresrun.errors import Unsupported
    from hiresrun.models import save_pipeline

    save_pipeline(tiny_unet(), {"num_train_timesteps": 1000}, tmp_path / "edm")
    for verb, extra in (("train", []), ("sample", ["ckpt_path=x.ckpt"])):
        cfg = compose([f"task={verb}", "model=diffusers", f"model.path={tmp_path / 'edm'}", "model.parametrization=edm",
                       "sampler=edm_heun", "data.resolution=16", "method=selfcascade", "logger=none", *extra],
                      tmp_path / verb)
        with pytest.raises(Unsupported, match="does not drive EDM-preconditioned networks"):
            run.run(cfg)
        assert not (tmp_path / verb).exists()


def test_tuned_with_per_image_adaptive_skipping_matches_one_image_at_a_time():
    """AdaptiveDiffusion evaluates only the images that need a call; the tuned upsamplers' pivots travel in cond and
    are sliced to those rows (models.rows), so each image equals its batch-of-one run."""
    from hiresrun.accelerators.adaptive import AdaptiveDiffusion

    b = base()
    method = SelfCascade(16, mode="tuned", strength=0.6)
    net = method.wrap(b)
    for up in net.upsamplers.parameters():  # non-zero upsamplers, so a wrong pivot row changes the image
        torch.nn.init.normal_(up, std=0.05)
    seeds = [0, 1, 2, 3]

    def run(seeds):
        acc = AdaptiveDiffusion(delta=0.05)
        out = Sampler(net, method, DDIMScheduler.from_config(SCHED), num_steps=30, accelerator=acc).generate(seeds)
        return out, acc.last_masks

    together, masks = run(seeds)
    assert len({tuple(m) for m in masks}) > 1  # the images took different paths: sub-batched calls happened
    for i, s in enumerate(seeds):
        alone, alone_masks = run([s])
        assert alone_masks[0] == masks[i]
        assert (alone["images"][0].int() - together["images"][i].int()).abs().max() <= 1  # batch-size float noise
    # (taking the first rows of the pivot instead of the called ones fails this: checked by hand)
