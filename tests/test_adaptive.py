"""AdaptiveDiffusion: the skip rule and cap on scripted magnitudes, identity at delta = 0, the official loop
replayed, per-sample independence, Heun per full step, no state between calls, run outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SCHED, compose, tiny_overrides, tiny_unet
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
)

from hiresrun import sampling
from hiresrun.accelerators.adaptive import AdaptiveDiffusion
from hiresrun.errors import UsageError
from hiresrun.models import load_model, model_fn


@pytest.fixture(scope="module")
def mnist():
    """The embedded 16x16 model: smooth trajectories, so delta = 0.01 really skips (and per seed differently)."""
    base = load_model("tiny-mnist")
    return model_fn(base.unet.eval()), base.scheduler_config


def scripted(acc, ms_per_image, calls=None):
    """Drive the wrapper with latents whose mean |z_k - z_{k-1}| is exactly m_k (dyadic values, exact in fp32).
    Call k sees z_{k-1} (call 0 the initial noise). Returns the masks as strings and the model's batch sizes."""
    ms = torch.tensor(ms_per_image, dtype=torch.float32)               # [B, K]: m_1 .. m_K
    z = torch.cat([torch.zeros(len(ms), 1), ms.cumsum(1)], 1)          # z_0 = 0, z_k = z_{k-1} + m_k
    sizes = []
    f = acc.wrap(lambda x, t, c: (sizes.append(x.shape[0]), torch.zeros_like(x))[1])
    noise = torch.full((len(ms), 1, 2, 2), 100.0)
    for k in range(calls or z.shape[1] + 1):
        x = noise if k == 0 else z[:, k - 1].view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
        f(x, torch.tensor(999 - k), {})
    return ["".join("1" if c else "0" for c in m) for m in acc.last_masks], sizes


# hand-computed with delta = 0.25, c_max = 4 (step k reads m_{k-1}, m_{k-2}, m_{k-3}):
#  4: |(1+1)/2 - 1| = 0       <= 0.25        reuse     5: |(1.5+1)/2 - 1| = 0.25 <= 0.25   reuse (boundary)
#  6: |(3+1)/2 - 1.5| = 0.5    > 0.375       compute   7: |(6.25+1.5)/2 - 3| = 0.875 > 0.75 compute
#  8-11: arithmetic m, 2nd difference 0      reuse     12: last 4 decisions all reuse      compute (cap)
#  13, 14: reuse (13 magnitudes: the wrapper sees z_0 .. z_13 at calls 1 .. 14, so 15 steps)
RAMP = [1, 1, 1, 1.5, 3, 6.25, 9.5, 12.75, 16, 19.25, 22.5, 25.75, 29]


def test_rule_and_cap_on_scripted_magnitudes():
    masks, _ = scripted(AdaptiveDiffusion(delta=0.25, c_max=4), [RAMP])
    assert masks == ["111100110000100"]
    # constant m: the rule always reuses, so only warm-up and the cap compute; the official cap waits for > 4
    # decisions (steps 4-8 all reuse), the strict one does not
    flat = [[1.0] * 13]
    assert scripted(AdaptiveDiffusion(delta=0.25), flat)[0] == ["111100000100001"]
    assert scripted(AdaptiveDiffusion(delta=0.25, cap="strict"), flat)[0] == ["111100001000010"]
    # official quirk with c_max > 5: before c_max decisions exist, "the last c_max" means all of them
    assert scripted(AdaptiveDiffusion(delta=0.25, c_max=6), flat)[0] == ["111100000100000"]


def test_sample_scope_calls_only_the_images_that_need_it():
    masks, sizes = scripted(AdaptiveDiffusion(delta=0.25), [RAMP, [1.0] * 13])
    assert masks == ["111100110000100", "111100000100001"]
    assert sizes == [sum(m[k] == "1" for m in masks) for k in range(15) if any(m[k] == "1" for m in masks)]
    # batch scope (official): one decision from the magnitudes of the whole batch
    batch, _ = scripted(AdaptiveDiffusion(delta=0.25, decision_scope="batch"), [RAMP, [1.0] * 13])
    assert batch[0] == batch[1] and batch[0] != masks[0]  # image 0 is decided by its batch-mate


@pytest.mark.parametrize("steps,c_max,cap,calls", [(50, 4, "official", 13), (50, 6, "official", 10),
                                                   (250, 6, "official", 39), (35, 4, "official", 10),
                                                   (25, 4, "official", 8), (10, 4, "official", 5),
                                                   (14, 4, "official", 5), (14, 4, "strict", 6),
                                                   (50, 4, "strict", 13)])
def test_huge_delta_meets_the_call_bound(steps, c_max, cap, calls):
    """Spec §4: the most skips the rule allows, through the real loop; NFE never exceeds the step count."""
    acc, counter = AdaptiveDiffusion(delta=1e9, c_max=c_max, cap=cap), sampling.Counter()
    gens = sampling.generators([0])
    sampling.sample(lambda x, t, c: 0.1 * x, sampling.noise(gens, (1, 4, 4)), DDIMScheduler.from_config(SCHED), steps,
                    wrap=lambda f, step: acc.wrap(counter(f), step))
    mask = acc.last_masks[0]
    assert counter.evals == calls == sum(mask) and len(mask) == steps and all(mask[:4])
    longest = max(len(r) for r in "".join("1" if c else "0" for c in mask).split("1"))
    assert longest <= (max(5, c_max) if cap == "official" else c_max)


def run(fn, sched_cls, seeds, steps=50, acc=None, shape=(1, 16, 16), config=None):
    counter, gens = sampling.Counter(), sampling.generators(seeds)
    wrap = (lambda f, step: acc.wrap(counter(f), step)) if acc else counter
    with torch.no_grad():
        x = sampling.sample(fn, sampling.noise(gens, shape), sched_cls.from_config(config or SCHED), steps, wrap=wrap)
    return x, counter.evals


@pytest.mark.parametrize("sched_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                       HeunDiscreteScheduler])
def test_delta_zero_is_the_baseline_bit_for_bit(sched_cls):
    unet = tiny_unet().eval()
    fn = model_fn(unet)
    base, base_evals = run(fn, sched_cls, [0, 1, 2], steps=20, shape=(1, 8, 8))
    same, evals = run(fn, sched_cls, [0, 1, 2], steps=20, acc=AdaptiveDiffusion(delta=0), shape=(1, 8, 8))
    assert torch.equal(same, base) and evals == base_evals
    skipped, evals = run(fn, sched_cls, [0, 1, 2], steps=20, acc=AdaptiveDiffusion(delta=1e9), shape=(1, 8, 8))
    assert evals < base_evals and not torch.equal(skipped, base)


def official_loop(fn, sched_cls, config, seed, steps=50, delta=0.01, max_skip_steps=4):
    """The official pipeline's denoising loop (sparse_pipeline.py / README), batch 1, verbatim in structure."""
    scheduler = sched_cls.from_config(config)
    scheduler.set_timesteps(steps)
    latents = sampling.noise(sampling.generators([seed]), (1, 16, 16)) * scheduler.init_noise_sigma
    prev_latents, mask, diff_list, noise_pred = [], [], [], None
    for t in scheduler.timesteps:
        if len(prev_latents) <= 3:
            noise_pred = fn(scheduler.scale_model_input(latents, t), t, {})
            if len(prev_latents) > 1:
                diff_list.append((prev_latents[-1] - prev_latents[-2]).abs().mean())
        elif mask[-1]:
            noise_pred = fn(scheduler.scale_model_input(latents, t), t, {})
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        if len(prev_latents) >= 3:
            cur = (latents - prev_latents[-1]).abs().mean()
            diff_list.append(cur)
            if len(mask) > 4 and not any(mask[-max_skip_steps:]):
                mask.append(True)
            else:
                mask.append(not abs((cur + diff_list[-3]) / 2 - diff_list[-2]) <= diff_list[-2] * delta)
        prev_latents.append(latents)
    return latents, [True] * 4 + mask[:-1]


@pytest.mark.parametrize("sched_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_matches_the_official_loop_and_multistep_history_survives_reuse(mnist, sched_cls):
    """Same skip path and same image as the official code; for DPM-Solver++ this checks that a reuse hands the
    scheduler the previous raw output (its multistep history then converts it with the current alpha/sigma); for
    Euler, that the estimator measures the unscaled latents as the official code does."""
    fn, config = mnist
    with torch.no_grad():
        for seed in (0,):
            ref, ref_mask = official_loop(fn, sched_cls, config, seed)
            acc = AdaptiveDiffusion(decision_scope="batch")
            ours, evals = run(fn, sched_cls, [seed], acc=acc, config=config)
            assert acc.last_masks[0] == ref_mask and evals == sum(ref_mask) < 40
            assert torch.allclose(ours, ref, atol=1e-5)
            full, _ = run(fn, sched_cls, [seed], config=config)
            assert 10 * torch.log10(4 / (ours.clamp(-1, 1) - full.clamp(-1, 1)).pow(2).mean()) > 20  # dB, [-1, 1]


def test_the_accelerator_sees_the_unscaled_latent_with_euler():
    """Spec §9: the wrapped model_fn receives the scheduler's x_t; the network gets x_t / sqrt(sigma^2 + 1)."""
    seen, net_inputs, states = [], [], []
    fn = lambda x, t, c: (net_inputs.append(x.clone()), 0.1 * x)[1]
    spy = lambda f, step: lambda x, t, c: (seen.append(x.clone()), f(x, t, c))[1]
    x_T = sampling.noise(sampling.generators([0]), (1, 4, 4))
    scheduler = EulerDiscreteScheduler.from_config(SCHED)
    sampling.sample(fn, x_T, scheduler, 6, wrap=spy, callback=lambda i, t, x: states.append(x.clone()))
    assert torch.equal(seen[0], x_T * scheduler.init_noise_sigma)
    assert all(torch.equal(z, x) for z, x in zip(seen[1:], states[:-1]))
    for z, x, sigma in zip(seen, net_inputs, scheduler.sigmas):
        assert torch.allclose(x, z / (sigma ** 2 + 1) ** 0.5) and not torch.allclose(x, z)


def test_an_image_does_not_depend_on_its_batch_mates(mnist):
    fn, config = mnist
    seeds = [0, 1, 2, 3]
    acc = AdaptiveDiffusion()
    together, evals = run(fn, DDIMScheduler, seeds, acc=acc, config=config)
    masks = acc.last_masks
    assert len(set(map(tuple, masks))) > 1 and evals == sum(map(sum, masks)) < 50 * len(seeds)
    for i, s in enumerate(seeds):
        alone_acc = AdaptiveDiffusion()
        alone, _ = run(fn, DDIMScheduler, [s], acc=alone_acc, config=config)
        assert alone_acc.last_masks[0] == masks[i]
        assert torch.equal(lit_uint8(alone[0]), lit_uint8(together[i]))
    batch = AdaptiveDiffusion(decision_scope="batch")
    run(fn, DDIMScheduler, seeds, acc=batch, config=config)
    assert all(m == batch.last_masks[0] for m in batch.last_masks) and batch.last_masks[0] not in masks


def lit_uint8(x):
    from hiresrun.sampling import to_uint8

    return to_uint8(x)


def test_two_consecutive_calls_are_each_like_a_fresh_one(mnist):
    fn, config = mnist
    acc = AdaptiveDiffusion()
    first, _ = run(fn, DDIMScheduler, [0, 1], acc=acc, config=config)
    first_masks = acc.last_masks
    second, _ = run(fn, DDIMScheduler, [2, 3], acc=acc, config=config)
    fresh_acc = AdaptiveDiffusion()
    fresh, _ = run(fn, DDIMScheduler, [2, 3], acc=fresh_acc, config=config)
    assert torch.equal(second, fresh) and acc.last_masks == fresh_acc.last_masks
    again, _ = run(fn, DDIMScheduler, [0, 1], acc=acc, config=config)
    assert torch.equal(again, first) and acc.last_masks == first_masks


@pytest.mark.parametrize("sched_cls,calls_per_step", [(HeunDiscreteScheduler, 0), (HeunDiscreteScheduler, 2),
                                                      (KDPM2DiscreteScheduler, 2)])
def test_second_order_samplers_decide_per_full_step(sched_cls, calls_per_step):
    """14 steps, delta huge: full steps 0-3 and 9 run, both of their calls (predictor and corrector); 10 NFE."""
    called = []
    fn = lambda x, t, c: (called.append(len(called)), 0.1 * x)[1]
    seen = []
    acc = AdaptiveDiffusion(delta=1e9, calls_per_step=calls_per_step)
    wrap = lambda f, step: (lambda g: lambda x, t, c: (seen.append(len(seen)), g(x, t, c))[1])(acc.wrap(f, step))
    gens = sampling.generators([0])
    sampling.sample(fn, sampling.noise(gens, (1, 4, 4)), sched_cls.from_config(SCHED), 14, wrap=wrap)
    assert len(seen) == 27 and len(called) == 10  # 2 * 14 - 1 calls
    assert acc.last_masks[0] == [True] * 4 + [False] * 5 + [True] + [False] * 4
    ran = [i for i, c in enumerate(acc.records[-1]["called"]) if c[0]]
    assert ran == [0, 1, 2, 3, 4, 5, 6, 7, 18, 19]
    wrong = AdaptiveDiffusion(delta=1e9, calls_per_step=1)  # per call: splits predictor from corrector
    sampling.sample(fn, sampling.noise(gens, (1, 4, 4)), sched_cls.from_config(SCHED), 14, wrap=wrong.wrap)
    assert wrong.last_masks[0] != acc.last_masks[0]


def test_sub_batched_calls_get_their_rows_of_cond():
    """Per-image decisions call the model on part of the batch; every tensor in `cond` (nested too) is sliced to
    those rows (models.rows), numbers are kept: each called image sees its own conditioning."""
    labels = torch.arange(3.0)
    acc, seen = AdaptiveDiffusion(delta=0.25), []

    def fn(x, t, c):
        seen.append((c["label"].tolist(), c["nested"]["label"].tolist(), c["guidance_scale"]))
        return x * c["label"].view(-1, 1, 1, 1)

    f = acc.wrap(fn)
    cond = {"label": labels, "nested": {"label": labels + 10}, "guidance_scale": 7.5}
    ms = [[1.0] * 8, [1.0] * 8, [1.0, 1, 1, 1.5, 3, 6.25, 9.5, 12.75]]
    z = torch.cat([torch.zeros(3, 1), torch.tensor(ms).cumsum(1)], 1)
    for k in range(9):
        f(z[:, max(k - 1, 0)].view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), torch.tensor(999 - k), cond)
    partial = [s for s in seen if len(s[0]) < 3]
    assert partial and all(s[0] == [2.0] and s[1] == [12.0] and s[2] == 7.5 for s in partial)  # image 2 alone


def test_bad_values_are_refused():
    for kwargs, match in [({"delta": -1}, "delta"), ({"c_max": 0}, "c_max"), ({"cap": "loose"}, "official or strict"),
                          ({"estimator": "ssim"}, "vector3"), ({"decision_scope": "image"}, "sample or batch"),
                          ({"warmup": 2}, "warmup"), ({"calls_per_step": -1}, "calls_per_step")]:
        with pytest.raises(UsageError, match=match):
            AdaptiveDiffusion(**kwargs)


def test_vector3_is_the_paper_form(mnist):
    fn, config = mnist
    acc = AdaptiveDiffusion(estimator="vector3", delta=0.1)
    _, evals = run(fn, DDIMScheduler, [0], acc=acc, config=config)
    official = AdaptiveDiffusion(delta=0.1)
    run(fn, DDIMScheduler, [0], acc=official, config=config)
    assert 13 <= evals < 50 and acc.last_masks != official.last_masks
    # scripted: z_k = k^3 has third difference 6 and first difference 3k^2 - 3k + 1: reuse iff 6 < 0.1 (3k^2 - 3k + 1),
    # i.e. from z_5 on (step 6); then the official cap at step 10
    cubes = [[float(k ** 3 - (k - 1) ** 3) for k in range(1, 14)]]
    assert scripted(AdaptiveDiffusion(estimator="vector3", delta=0.1), cubes)[0] == ["111111000010000"]


def test_sample_writes_skip_masks_and_nfe_spread(tiny_model_dir, tmp_path):
    from hiresrun import run as task

    cfg = compose(tiny_overrides(tiny_model_dir) + ["accelerator=adaptive", "accelerator.delta=1e9",
                                                   "sampler.num_steps=12", "sample.batch_size=2"], tmp_path / "ad")
    metrics = task.run(cfg)
    masks = json.loads((tmp_path / "ad" / "skip_masks.json").read_text())
    assert masks["0"]["masks"] == ["111100000100"] and masks["0"]["nfe"] == 5 and set(masks) == {"0", "1", "2"}
    assert metrics["nfe_min"] == metrics["nfe_max"] == metrics["nfe_per_image"] == 5
    assert metrics["speedup_nfe"] == pytest.approx(12 / 5)
