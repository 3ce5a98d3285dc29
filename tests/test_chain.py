"""Accelerator lists (`+accelerator=[adaptive,deepcache]`, accelerators.Chain): the declared level order whatever
the list says; a neutral member leaves the other alone bit for bit; a step AdaptiveDiffusion reuses never reaches
DeepCache, whose schedule runs over the computed steps; DeepCache's non-uniform schedule is the official one;
refusals are one line; the run's record carries both members' facts and the combined cost."""

from __future__ import annotations

import json
import warnings
from itertools import combinations

import numpy as np
import pytest
import torch
from conftest import CONF, SCHED, accelerator_options, cli, compose, tiny_unet
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from hydra.utils import get_class
from omegaconf import OmegaConf

from hiresrun import sampling, support
from hiresrun.accelerators import Accelerator, Chain
from hiresrun.accelerators.adaptive import AdaptiveDiffusion
from hiresrun.accelerators.deepcache import DeepCache, full_steps
from hiresrun.build import accelerator_from, accelerator_members, build_accelerator, choice
from hiresrun.errors import Unsupported, UsageError
from hiresrun.hooks import hooks_removed_after
from hiresrun.models import model_fn

SEEDS = [0, 1, 2]
ACCELERATORS = accelerator_options()


def run(acc, steps: int = 12, scheduler=None):
    unet, counter = tiny_unet().eval(), sampling.Counter()
    gens = sampling.generators(SEEDS)
    wrap = (lambda f, step: acc.wrap(counter(f), step)) if acc else (lambda f, step: counter(f))
    with torch.no_grad(), hooks_removed_after(acc.attach(unet) if acc else []):
        x = sampling.sample(model_fn(unet), sampling.noise(gens, (1, 8, 8)),
                            scheduler or DDIMScheduler.from_config(SCHED), steps, gens=gens, wrap=wrap)
    return x, counter.evals // len(SEEDS)


def adaptive(delta: float) -> AdaptiveDiffusion:
    return AdaptiveDiffusion(delta=delta, decision_scope="batch", cap="strict", c_max=2)


def test_a_list_is_applied_in_the_declared_order_whatever_its_own():
    for listed in ("[deepcache,adaptive]", "[adaptive,deepcache]"):
        cfg = compose([f"accelerator={listed}", "accelerator.adaptive.decision_scope=batch",
                       "accelerator.deepcache.interval=2"])
        assert list(accelerator_members(cfg.accelerator)) == ["adaptive", "deepcache"]  # steps, then blocks
        assert choice(cfg, "accelerator") == "adaptive-deepcache"
        chain = build_accelerator(cfg)
        assert isinstance(chain, Chain) and chain.members["deepcache"].interval == 2
        assert chain.members["adaptive"].decision_scope == "batch"
    single = compose(["accelerator=deepcache"])
    assert isinstance(build_accelerator(single), DeepCache) and not accelerator_members(single.accelerator)
    assert compose(["accelerator=[deepcache]"]).accelerator == single.accelerator  # a list of one is that option
    assert compose(["accelerator=[none,deepcache]"]).accelerator == single.accelerator  # none adds nothing


@pytest.mark.parametrize("neutral, other", [(lambda: adaptive(0.0), lambda: DeepCache(interval=3)),
                                            (lambda: DeepCache(interval=1), lambda: adaptive(0.2))])
def test_a_neutral_member_leaves_the_other_alone_bit_for_bit(neutral, other):
    alone, nfe_alone = run(other())
    members = {"adaptive": None, "deepcache": None}
    for acc in (neutral(), other()):
        members["adaptive" if isinstance(acc, AdaptiveDiffusion) else "deepcache"] = acc
    both, nfe_both = run(Chain(members))
    assert torch.equal(both, alone) and nfe_both == nfe_alone


def test_a_reused_step_never_reaches_deepcache_and_its_schedule_counts_computed_steps():
    first, cache = adaptive(0.2), DeepCache(interval=3)
    _, nfe = run(Chain({"adaptive": first, "deepcache": cache}), steps=20)
    computed = sum(first.last_masks[0])
    record = cache.records[-1]
    assert nfe == computed < 20  # adaptive reused something, and only the computed steps called the UNet
    assert record["full"] + record["partial"] == computed
    assert record["full"] == len(full_steps(computed, 3))  # computed steps 0, 3, 6, ... ran the whole UNet


def test_heun_calls_of_one_step_share_its_kind():
    cache = DeepCache(interval=2)
    _, nfe = run(cache, steps=6, scheduler=HeunDiscreteScheduler.from_config(SCHED))
    r = cache.records[-1]
    assert nfe == 11 and r["full"] == 2 + 2 + 2 and r["partial"] == 2 + 2 + 1  # full steps 0, 2, 4; the last has 1 call


def official_quad_center(total: int, n: int, center: int, power: float) -> list[int]:
    """DeepCache's `sample_from_quad_center` as its SD pipeline writes it (Python's complex root of a negative float,
    numpy's int32 of a complex array): the reference for our real-valued rewrite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while power > 1:
            x = np.linspace((-center) ** (1 / power), (total - center) ** (1 / power), n + 1)
            picked = [0] + [int(v) + center for v in np.unique(np.int32(x ** power))[1:-1]]
            if len(picked) == n:
                return picked
            power -= 0.02
    raise ValueError


@pytest.mark.parametrize("total, interval, center, power", [(50, 5, 15, 1.4), (50, 3, 15, 1.4), (25, 4, 10, 1.4),
                                                            (100, 10, 30, 1.2)])
def test_the_quadratic_schedule_is_the_official_one(total, interval, center, power):
    n = -(-total // interval)
    picked = full_steps(total, interval, "quadratic", center, power)
    assert picked == official_quad_center(total, n, center, power)
    gaps = np.diff(picked)
    assert len(set(picked)) == n and picked[0] == 0 and gaps.min() < gaps.max()  # non-uniform
    assert full_steps(total, 1, "quadratic", center, power) == list(range(total))  # interval 1: every step


def test_the_quadratic_schedule_runs_full_where_it_says():
    cache = DeepCache(interval=5, schedule="quadratic", center=4)
    run(cache, steps=20)
    assert cache.records[-1]["full"] == len(full_steps(20, 5, "quadratic", 4)) == 4
    with pytest.raises(UsageError, match="accelerator.schedule=cubic"):
        DeepCache(schedule="cubic")


def test_refusals_are_one_line():
    with pytest.raises(Unsupported, match=r"stepskip and adaptive both decide which steps call the model"):
        build_accelerator(compose(["accelerator=[stepskip,adaptive]"]))
    with pytest.raises(Unsupported, match=r"set accelerator.adaptive.decision_scope=batch"):
        build_accelerator(compose(["accelerator=[adaptive,deepcache]"]))  # per-image decisions: sub-batches
    # two members may take a knob of the same name: each sets its own in its own node
    both = OmegaConf.create({"_target_": "hiresrun.accelerators.Chain",
                             "stepskip": {"_target_": "hiresrun.accelerators.stepskip.StepSkip", "every": 2},
                             "features": {"_target_": "test_chain.EveryFeature", "every": 5}})
    chain = accelerator_from(both)
    assert chain.members["stepskip"].every == 2 and chain.members["features"].every == 5
    with pytest.raises(UsageError, match=r"accelerator.delta=0.1: with accelerator=\[adaptive,deepcache\] each member "
                                         r"has its own node; set accelerator.<member>.delta"):
        compose(["accelerator=[adaptive,deepcache]", "accelerator.delta=0.1"])
    with pytest.raises(UsageError, match="accelerator=chain has no members"):
        build_accelerator(compose(["accelerator=chain"]))


def test_a_list_is_checked_from_its_declarations_without_building_a_member(monkeypatch):
    """support.check refuses adaptive's per-image decisions beside a whole-batch cache from the config alone (the
    members' `declared`), and passes a composable list without constructing anything (a calibration file is read
    when the run builds its accelerator, not in the check)."""
    import functools

    from hiresrun.accelerators.adaptive import AdaptiveDiffusion
    from hiresrun.accelerators.deepcache import DeepCache

    for cls in (AdaptiveDiffusion, DeepCache):
        @functools.wraps(cls.__init__)  # the signature stays readable: the declarations read their defaults from it
        def refuse_building(*args, **kwargs):
            raise AssertionError("the check built an accelerator")

        monkeypatch.setattr(cls, "__init__", refuse_building)
    cfg = compose(["accelerator=[adaptive,deepcache]"])
    with pytest.raises(Unsupported, match="set accelerator.adaptive.decision_scope=batch"):
        support.check(cfg, "none", choice(cfg, "accelerator"))
    cfg = compose(["accelerator=[adaptive,deepcache]", "accelerator.adaptive.decision_scope=batch",
                   "accelerator.adaptive.calibration=/no/such/calibration.json"])
    support.check(cfg, "none", choice(cfg, "accelerator"))
    assert AdaptiveDiffusion.declared({"decision_scope": "sample", "delta": 0.0}).sub_batches is False  # identity


class EveryFeature(Accelerator):
    """A features-level accelerator whose knob has stepskip's name (the clash a list cannot resolve)."""

    supports = support.Support(level="features")

    def __init__(self, every: int = 1):
        self.every = every


def declared(name: str) -> support.Support:
    return get_class(OmegaConf.load(CONF / "accelerator" / f"{name}.yaml")._target_).supports


@pytest.mark.parametrize("pair", list(combinations([a for a in ACCELERATORS if a != "none"], 2)))
def test_every_pair_composes_or_is_refused_as_the_levels_declare(pair, tmp_path):
    """Derived from the declarations: two accelerators of different levels that both drive the embedded UNet2DModel
    sample together (hooks gone afterwards); the others are refused with one line before anything loads."""
    cfg = compose([f"accelerator=[{','.join(pair)}]", "accelerator.adaptive.decision_scope=batch"]
                  if "adaptive" in pair else [f"accelerator=[{','.join(pair)}]"], tmp_path / "r")
    levels = [declared(a).level for a in pair]
    drives = all("UNet2DModel" in declared(a).unets for a in pair)
    if levels[0] == levels[1] or not drives:
        with pytest.raises(Unsupported) as refused:
            support.check(cfg, "none", choice(cfg, "accelerator"))
        assert "\n" not in str(refused.value)
        return
    support.check(cfg, "none", choice(cfg, "accelerator"))
    chain = build_accelerator(cfg)
    unet = tiny_unet().eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    gens = sampling.generators([0])
    with torch.no_grad(), hooks_removed_after(chain.attach(unet)):
        sampling.sample(model_fn(unet), sampling.noise(gens, (1, 8, 8)), DDIMScheduler.from_config(SCHED), 8,
                        gens=gens, wrap=chain.wrap)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in unet.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_a_sample_run_records_both_members_and_the_combined_cost(tiny_model_dir, tmp_path):
    out = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none",
              "trainer.enable_progress_bar=false", "sampler.num_steps=20", "sample.num_samples=3",
              "+accelerator=[deepcache,adaptive]", "accelerator.adaptive.decision_scope=batch",
              "accelerator.adaptive.delta=0.3", "accelerator.deepcache.interval=3", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    masks = json.loads((tmp_path / "run" / "skip_masks.json").read_text())
    assert m["accelerator"] == "adaptive-deepcache" and set(masks) == {"adaptive", "deepcache"}
    assert m["nfe_per_image"] < 20 and m["speedup_nfe"] == pytest.approx(20 / m["nfe_per_image"])
    full = m["nfe_per_image"] - m["partial_per_image"]
    assert full >= 1 and m["cost_per_image"] == pytest.approx(full + m["partial_per_image"] * m["partial_flops_share"])
    refused = cli("sample", "+accelerator=[adaptive,deepcache]", cwd=tmp_path)
    (line,) = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "decision_scope=batch" in line


def test_a_list_runs_inside_self_cascade(tiny_model_dir, tmp_path):
    """Inside a method's wrapper as single accelerators are: Self-Cascade's pivot loop and its truncated 2x loop are
    each wrapped by the whole list; each loop's DeepCache schedule starts over on its computed steps."""
    out = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none",
              "trainer.enable_progress_bar=false", "sampler.num_steps=10", "sample.num_samples=2",
              "+method=selfcascade", "method.mode=tuning_free", "method.strength=0.5",
              "+accelerator=[adaptive,deepcache]", "accelerator.adaptive.decision_scope=batch",
              "accelerator.adaptive.delta=0", "accelerator.deepcache.interval=3", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # delta 0 computes every step: pivot loop 10 steps (full at 0, 3, 6, 9), 2x loop 5 steps (full at 0, 3)
    assert m["nfe_per_image"] == 15 and m["partial_per_image"] == 6 + 3 and m["accelerator"] == "adaptive-deepcache"
