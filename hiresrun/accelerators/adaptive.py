"""accelerator=adaptive: AdaptiveDiffusion, reuse the previous raw model output where the trajectory is smooth.

Ye et al., "Training-Free Adaptive Diffusion with Bounded Difference Approximation Strategy", NeurIPS 2024
(arXiv 2410.09873). The default is the skip rule of the official code (`estimate_skipping` in sparse_pipeline.py),
which differs from the paper's text; the paper's vector third difference is `estimator=vector3`. Step level only:
`wrap(model_fn)`; all sampling state lives in the call's closure.

The latents z_k are the x the loop hands to the wrapped model_fn: the scheduler's own latent, unscaled
(the loop calls `scheduler.scale_model_input` inside model_fn), as the official code measures it for every
sampler, Euler-type ones included.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch import Tensor

from hiresrun.accelerators import Accelerator
from hiresrun.errors import UsageError
from hiresrun.models import ModelFn, rows
from hiresrun.support import Support

OFFICIAL_CAP_AFTER = 4  # the official cap acts only once more than 4 decisions exist


def magnitude(z: Tensor, prev: Tensor, per_sample: bool) -> Tensor:
    """m_k = mean |z_k - z_{k-1}| in fp32: per image [B] (scope sample) or over the whole batch [1] (official)."""
    d = (z.float() - prev.float()).abs()
    return d.flatten(1).mean(1) if per_sample else d.mean().reshape(1)


def official_reuse(m: list[Tensor], delta: float) -> Tensor:
    """Official rule: reuse iff |(m_k + m_{k-2}) / 2 - m_{k-1}| <= delta m_{k-1}; m oldest first."""
    m2, m1, m0 = m
    return ((m0 + m2) / 2 - m1).abs() <= delta * m1


def vector3_reuse(z: list[Tensor], delta: float, per_sample: bool) -> Tensor:
    """Paper form: compute iff ||z_k - 3 z_{k-1} + 3 z_{k-2} - z_{k-3}|| >= delta ||z_k - z_{k-1}||; z oldest first."""
    z3, z2, z1, z0 = z
    d3, d1 = z0 - 3 * z1 + 3 * z2 - z3, z0 - z1
    norm = (lambda v: v.flatten(1).norm(dim=1)) if per_sample else (lambda v: v.norm().reshape(1))
    return norm(d3) < delta * norm(d1)


def forced(run: Tensor, num_decisions: int, c_max: int, cap: str) -> Tensor:
    """The cap on consecutive reuses (`run` = reuses in a row so far). strict: compute after c_max of them.
    official: only once more than 4 decisions exist, then when the last c_max decisions (all, if fewer) reused."""
    if cap == "strict":
        return run >= c_max
    if num_decisions <= OFFICIAL_CAP_AFTER:
        return torch.zeros_like(run, dtype=torch.bool)
    return (run >= c_max) | (run == num_decisions)


def _same(a, b) -> bool:
    """Equal timesteps (tensors or numbers)."""
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


class AdaptiveDiffusion(Accelerator):
    """Per full step: run the model, or feed the scheduler the previous raw output (its counter and multistep
    history advance as usual). Decided from the last three latent-change magnitudes; first `warmup` steps run."""

    supports = Support(level="steps", needs_steps=True, flow=True,  # reuses an output: any parametrization
                       why="it reuses the last step's output after 4 warm-up steps")

    def __init__(self, delta: float = 0.01,              # threshold of the skip rule; 0 = never reuse (identity)
                 c_max: int = 4,                       # C_max: most reuses in a row (see `cap`)
                 cap: str = "official",                # official (active after > 4 decisions) | strict
                 estimator: str = "official",          # official (scalar 2nd difference) | vector3 (paper's form)
                 decision_scope: str = "sample",       # sample (per image, sub-batched calls) | batch (official)
                 warmup: int = 4,                      # first full steps always computed (the rule needs m_{k-3})
                 calls_per_step: int = 0,              # model calls per full step; 0 infers (Heun 2); KDPM2: 2
                 calibration: str | None = None,       # a `hiresrun calibrate` file: its delta replaces `delta`
                 setting: dict | None = None):         # this run (model, resolution, sampler, ...): the file must match
        if delta < 0:
            raise UsageError(f"accelerator.delta={delta}: must be >= 0 (0 never reuses)")
        if c_max < 1:
            raise UsageError(f"accelerator.c_max={c_max}: must be at least 1")
        for name, value, ok in (("cap", cap, ("official", "strict")), ("estimator", estimator, ("official", "vector3")),
                                ("decision_scope", decision_scope, ("sample", "batch"))):
            if value not in ok:
                raise UsageError(f"accelerator.{name}={value}: choose {' or '.join(ok)}")
        if warmup < 4:
            raise UsageError(f"accelerator.warmup={warmup}: must be at least 4 (the rule needs three magnitudes)")
        if calls_per_step < 0:
            raise UsageError(f"accelerator.calls_per_step={calls_per_step}: 0 (infer), 1, or 2 for Heun/KDPM2")
        self.delta, self.c_max, self.cap, self.estimator = float(delta), int(c_max), cap, estimator
        self.decision_scope, self.warmup, self.calls_per_step = decision_scope, int(warmup), int(calls_per_step)
        if calibration is not None:  # hiresrun/calibration.py: refuses a file made for another model or setting
            from hiresrun.calibration import load

            self.delta = load(calibration, setting, self.rule)
        self.records: list[dict] = []  # one per sampling call: which images called the model at each call
        self.supports = self.declared({"decision_scope": decision_scope, "delta": self.delta})

    @classmethod
    def declared(cls, config) -> Support:
        """Per-image decisions (decision_scope=sample, delta > 0) call the model on the images that compute: a
        sub-batch, which a whole-batch cache in the same list cannot share (support.chain_refusal)."""
        defaults = inspect.signature(cls).parameters  # a key the config leaves out has the constructor's default
        scope = config.get("decision_scope", defaults["decision_scope"].default)
        delta = config.get("delta", defaults["delta"].default)
        return replace(cls.supports, sub_batches=scope == "sample" and float(delta or 0) > 0)

    @property
    def rule(self) -> dict:
        """Every setting but delta: what a calibrated delta is valid for."""
        return {"c_max": self.c_max, "cap": self.cap, "estimator": self.estimator,
                "decision_scope": self.decision_scope, "warmup": self.warmup, "calls_per_step": self.calls_per_step}

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        """`step` (sampling.Step): the loop's calls per full step (Heun's corrector repeats a timestep); without it
        (a caller outside the loop) the call pattern is inferred from the timesteps."""
        order = self.calls_per_step or (step.order if step is not None else 0)
        record = {"called": [], "order": order or 1}
        self.records.append(record)
        steps = _Steps(self, record, order)  # fresh per sampling call: no reset, no leak between calls

        def adaptive(x: Tensor, t: Tensor, cond: dict) -> Tensor:  # x, cond: un-doubled (guidance is inside)
            return steps.evaluate(model_fn, x, t, cond, steps.observe(x, t))

        return adaptive

    @property
    def last_masks(self) -> list[list[bool]]:
        """Per image of the last sampling call: True where the model ran at that full step."""
        return masks(self.records[-1]) if self.records else []

    def per_image(self, mark: int, seeds: list[int]) -> dict | None:
        """Each image's skip masks ("1" = model called), one per sampling loop of its batch (Self-Cascade: the pivot
        loop, then the 2x loop), and its NFE, from the records made since `mark`."""
        recs = self.records[mark:]
        if not recs or any(len(r["called"]) and len(r["called"][0]) != len(seeds) for r in recs):
            return None
        calls = sum(len(r["called"]) for r in recs)  # what every image would cost without reuse
        return {str(seed): {"masks": ["".join("1" if c else "0" for c in masks(r)[i]) for r in recs],
                            "nfe": sum(int(c[i]) for r in recs for c in r["called"]), "calls": calls}
                for i, seed in enumerate(seeds)}

    def summary(self, per_image: dict) -> tuple[dict, dict] | None:
        """skip_masks.json's content and nfe_min / nfe_max / speedup_nfe over the run's images."""
        if not per_image:
            return None
        nfe = [p["nfe"] for p in per_image.values()]
        calls = sum(p["calls"] for p in per_image.values())
        masks_ = {s: {"masks": p["masks"], "nfe": p["nfe"]} for s, p in per_image.items()}
        return masks_, {"nfe_min": min(nfe), "nfe_max": max(nfe), "speedup_nfe": calls / max(sum(nfe), 1)}


def masks(record: dict) -> list[list[bool]]:
    """A record's per-image masks, one entry per full step (the first call of each step decides it)."""
    steps = record["called"][::record["order"]]
    return [[bool(c[i]) for c in steps] for i in range(len(steps[0]) if steps else 0)]


class _Steps:
    """One sampling call's controller state; `AdaptiveDiffusion.wrap` makes a fresh one per call."""

    def __init__(self, acc: AdaptiveDiffusion, record: dict, order: int):
        self.acc, self.record, self.per_sample = acc, record, acc.decision_scope == "sample"
        self.calls, self.order = 0, order                # order 0: inferred at the third call
        self.prev_t = self.pending = None
        self.latents: list[Tensor] = []                  # last step-start latents z (4 for vector3, else 1)
        self.m: list[Tensor] = []                        # last three magnitudes m_k, oldest first
        self.run: Tensor | None = None                   # reuses in a row, per decision unit
        self.decisions = 0
        self.compute: Tensor | None = None               # this full step's decision, per image
        self.cache: Tensor | None = None                 # the last raw model output, per image

    def observe(self, x: Tensor, t: Tensor) -> Tensor:
        """Which images call the model now (bool [B]); a full step's later calls follow its first call."""
        j = self.calls
        self.calls += 1
        if self.order == 0:  # Heun's timesteps read t0, t1, t1, t2, t2, ...: calls 1 and 2 share t
            if j == 2:
                self.order = self.record["order"] = 2 if _same(t, self.prev_t) else 1
                if self.order == 1:
                    self.push(self.pending)
            self.pending, self.prev_t = (x if j == 1 else self.pending), t
            if j < 2:  # step 0 (warm-up) either way
                self.compute = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
                return self.compute
        if j % self.order:
            return self.compute
        k = j // self.order
        if k >= 1:  # the step-0 input is the initial noise, which the estimator never uses
            self.push(x)
        self.compute = self.decide(k, x)
        return self.compute

    def push(self, z: Tensor) -> None:
        z = z.detach().float().clone()
        if self.latents:
            self.m = (self.m + [magnitude(z, self.latents[-1], self.per_sample)])[-3:]
        self.latents = (self.latents + [z])[-(4 if self.acc.estimator == "vector3" else 1):]

    def decide(self, k: int, x: Tensor) -> Tensor:
        """Step k's decision: warm-up computes; then the cap (checked first), then the skip rule."""
        acc, B = self.acc, x.shape[0]
        if k < acc.warmup or acc.delta == 0:
            return torch.ones(B, dtype=torch.bool, device=x.device)
        if self.run is None:
            self.run = torch.zeros(B if self.per_sample else 1, dtype=torch.long, device=x.device)
        if acc.estimator == "vector3":
            reuse = vector3_reuse(self.latents, acc.delta, self.per_sample)
        else:
            reuse = official_reuse(self.m, acc.delta)
        compute = forced(self.run, self.decisions, acc.c_max, acc.cap) | ~reuse
        self.run = torch.where(compute, torch.zeros_like(self.run), self.run + 1)
        self.decisions += 1
        return compute if self.per_sample else compute.expand(B)

    def evaluate(self, model_fn: ModelFn, x: Tensor, t: Tensor, cond: dict, compute: Tensor) -> Tensor:
        """The model on the images that need it (a sub-batch, with their rows of `cond`), the cached raw output
        for the others."""
        if bool(compute.all()):
            out = model_fn(x, t, cond)
        elif not bool(compute.any()):
            out = self.cache
        else:
            idx = compute.nonzero().squeeze(1)
            sub_t = t[idx] if isinstance(t, Tensor) and t.ndim and t.shape[0] == x.shape[0] else t
            out = self.cache.clone()
            out[idx] = model_fn(x[idx], sub_t, rows(cond, idx))
        self.cache = out
        self.record["called"].append(compute.cpu())
        return out
