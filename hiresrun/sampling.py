"""THE sampling loop: one function over `model_fn(x_t, t, cond)` and a diffusers scheduler.

Methods call it (twice, or from a mid-schedule start); they never copy it. Accelerators reach it only
by wrapping `model_fn` (the `wrap` argument), and the wrapped function receives the scheduler's latent x_t
(`scale_model_input` happens inside it) and the per-image conditioning `cond` (models.py), which the loop passes
through unchanged at every step. NFE and time are counted by `Counter`, around the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from hiresrun import flow
from hiresrun.models import ModelFn, guided
from hiresrun.validate import TRAINING_SEEDS  # training draws' seed space (validate.py says why)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: image i's randomness depends on seed i only (docs/ARCHITECTURE.md, "Contracts":
    "Seeds")."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]




def training_generators(indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per training image (index < 2^31), in a seed space disjoint from every sampling seed."""
    return generators([TRAINING_SEEDS + int(i) % TRAINING_SEEDS for i in indices])


def noise(gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise of `shape` (without the batch axis) per generator, stacked, then moved."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)


@dataclass
class Step:
    """What the loop tells a step-level accelerator about the schedule it wraps (instead of it inferring the call
    pattern): the timesteps of the model calls this loop makes, the model calls per full step (the scheduler's
    `order`: 2 for Heun and KDPM2, whose corrector call repeats the next timestep), and the index of the call now
    running (set by the loop before each call)."""

    timesteps: Tensor
    order: int
    index: int = 0
    sigma_max: float | None = None   # EDM schedulers: timesteps are c_noise = ln(sigma) / 4; else None

    def time(self, t) -> float:
        """The current call's time in the schedule's own unit: sigma for EDM schedulers, t otherwise."""
        value = float(torch.as_tensor(t).flatten()[0])
        return float(torch.tensor(4 * value).exp()) if self.sigma_max is not None else value

    @property
    def full_step(self) -> int:
        return self.index // self.order


Wrap = Callable[[ModelFn, Step], ModelFn]


def sample(model_fn: ModelFn, x: Tensor, scheduler, num_steps: int, start_step: int = 0,
           gens: Sequence[torch.Generator] | None = None, wrap: Wrap = lambda f, step: f,
           callback: Callable[[int, Tensor, Tensor], None] | None = None, renoise: Tensor | None = None,
           cond: dict | None = None, prepare: Callable[[int, Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Integrate from `x` down to t = 0. `x` is pure noise when start_step = 0; otherwise a latent already
    noised to the start step's level, or, with `renoise` (an eps of x's shape), a clean sample the loop noises
    to the first kept timestep with the scheduler's own `add_noise` (SDEdit-style starts: Self-Cascade).
    `callback(i, t, x)` observes each step; it must not change `x`. `cond`: the rows of conditioning every model
    call gets (text embeddings, class labels, guidance settings, a method's per-image tensors). `prepare(i, t, x)`:
    the latent step i starts from instead of x (DemoFusion's skip residual mixes a noised low-resolution sample in);
    None keeps x."""
    cond = {} if cond is None else cond
    flow.set_timesteps(scheduler, num_steps, x)  # FLUX's shift depends on x's size (hiresrun/flow.py)
    timesteps = scheduler.timesteps[start_step * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):  # multistep/Karras schedulers index their state from here
        scheduler.set_begin_index(start_step * scheduler.order)
    if start_step == 0:
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at sigma 1
    elif renoise is not None and len(timesteps):  # flow matching: x = (1 - sigma) x0 + sigma eps (scale_noise)
        x = scheduler.add_noise(x, renoise, timesteps[:1]) if hasattr(scheduler, "add_noise") else \
            scheduler.scale_noise(x, timesteps[:1], renoise)
    # The accelerator sees the scheduler's own latent x_t: Euler-type samplers rescale the model input
    # (x_t / sqrt(sigma^2 + 1)), and a step-level accelerator must measure x_t, not that.
    edm = type(scheduler).__name__.startswith("EDM")
    step = Step(timesteps=timesteps, order=int(getattr(scheduler, "order", 1)),
                sigma_max=float(scheduler.config.sigma_max) if edm else None)
    scale = getattr(scheduler, "scale_model_input", lambda z, t: z)  # flow-matching schedulers scale nothing
    f = wrap(lambda z, t, c: model_fn(scale(z, t), t, c), step)
    extra = {"generator": list(gens)} if gens is not None and _takes_generator(scheduler) else {}
    for i, t in enumerate(timesteps):
        step.index = i
        if prepare is not None:
            x = prepare(i, t, x)
        out = f(x, t, cond)
        x = scheduler.step(out, t, x, **extra).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x


@dataclass
class Loop:
    """`sample` with what a sampling call fixes bound: the scheduler, steps, per-image generators, the accelerator's
    wrapping and the batch's conditioning. A method calls it (`loop(model_fn, x, start_step=..., renoise=...)`),
    reads `num_steps` and `cond`, and asks `at(resolution)` for the loop of a base-size or intermediate pass, whose
    conditioning is the one the base model gets at that size (SDXL's time ids: conditioning.Conditioner.at)."""

    scheduler: object
    num_steps: int
    gens: Sequence[torch.Generator] | None = None
    wrap: Wrap = lambda f, step: f
    cond: dict | None = None
    resize: Callable[[dict, int], dict] = lambda cond, resolution: cond   # cond at another resolution (pixels)

    def __call__(self, model_fn: ModelFn, x: Tensor, start_step: int = 0, renoise: Tensor | None = None,
                 cond: dict | None = None, callback: Callable[[int, Tensor, Tensor], None] | None = None,
                 prepare: Callable[[int, Tensor, Tensor], Tensor] | None = None) -> Tensor:
        return sample(model_fn, x, self.scheduler, self.num_steps, start_step=start_step, gens=self.gens,
                      wrap=self.wrap, callback=callback, renoise=renoise, cond=self.cond if cond is None else cond,
                      prepare=prepare)

    def at(self, resolution: int) -> Loop:
        """The same loop, its conditioning built for a pass at `resolution` pixels."""
        return replace(self, cond=self.resize(self.cond or {}, int(resolution)))


def _takes_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


class Counter:
    """Wraps the network call: counts image evaluations (NFE: denoiser calls per image, what the accelerator
    papers count), UNet passes (two per image under classifier-free guidance) and the seconds in the network."""

    def __init__(self):
        self.evals, self.passes, self.seconds = 0, 0, 0.0

    def __call__(self, model_fn: ModelFn, step: Step | None = None) -> ModelFn:
        def counted(x: Tensor, t: Tensor, cond: dict) -> Tensor:
            start = time.perf_counter()
            out = model_fn(x, t, cond)
            self.seconds += time.perf_counter() - start
            self.evals += x.shape[0]
            self.passes += x.shape[0] * (2 if guided(cond) else 1)
            return out

        return counted


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 [0, 255], rounded as diffusers' pipelines do."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass
class Sink:
    """Where a sample run's batches go as soon as they exist (hiresrun/store.py): `writer.write(seeds, images,
    facts)` saves the images and the batch record and returns the PNGs' hashes; `facts(seeds)` adds per-image facts
    (prompt, label); `featurize(seeds, images, hashes, device)` caches the batch's Inception rows
    (metrics/generated.py); `progress(n)` is told each batch. Any of them may be None.

    `background=True` hands each batch to one writer thread (`put`) and returns at once, so PNG encoding, hashing,
    the record and the features of batch k overlap the sampling of batch k+1 (PNG's zlib and the networks release
    the GIL). At most `depth` batches wait; `flush()` waits for all of them and raises what the thread raised. The
    order on disk is the same as without it: a batch's PNGs, then its record, batch after batch."""

    writer: object = None
    facts: Callable[[list[int]], dict] | None = None
    featurize: Callable | None = None
    progress: Callable[[int], None] | None = None
    background: bool = False
    depth: int = 2
    _queue: object = field(default=None, init=False, repr=False, compare=False)
    _thread: object = field(default=None, init=False, repr=False, compare=False)
    _error: BaseException | None = field(default=None, init=False, repr=False, compare=False)  # not yet raised
    _failed: bool = field(default=False, init=False, repr=False, compare=False)  # sticky: nothing more is written

    def handle(self, seeds: list[int], images: Tensor, facts: dict, device) -> None:
        """Write one batch, cache its features, report it (in the caller's thread)."""
        hashes = self.writer.write(seeds, images, facts)
        if self.featurize is not None:
            self.featurize(seeds, images, hashes, device)
        if self.progress is not None:
            self.progress(len(seeds))

    def put(self, seeds: list[int], images: Tensor, facts: dict, device) -> None:
        if not self.background:
            return self.handle(seeds, images, facts, device)
        import queue
        import threading

        if self._queue is None:
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._work, name="hiresrun-writer", daemon=True)
            self._thread.start()
        self._raise()
        self._queue.put((seeds, images, facts, device))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is not None and not self._failed:  # after a failure nothing more is written
                    self.handle(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the sampling thread by flush / put
                self._error, self._failed = e, True
            finally:
                self._queue.task_done()
            if item is None:
                return

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def flush(self) -> None:
        """Every batch handed over is on disk (or its error raised here)."""
        if self._queue is not None:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        """flush, then end the thread."""
        if self._queue is not None:
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
            self._queue = None
        self._raise()


class Sampler:
    """The sampling core: images for seeds from a net, a method, a scheduler and step count, an accelerator and the
    per-image conditioning, built once. `generate(seeds)` returns the images and what they cost; `batch(seeds)`
    also hands them to the sink. `hiresrun sample` (on its own or under Lightning's test loop for several devices),
    training's validation grids, `hiresrun calibrate`, the study scripts and `bench/` all call this one object.

    Image i depends on seed i only (its generator), whatever batch it is in."""

    def __init__(self, net, method, scheduler, num_steps: int, accelerator=None, conditioner=None,
                 sink: Sink | None = None, autocast: torch.dtype | None = None):
        from hiresrun.accelerators import Accelerator

        if conditioner is None:  # the base's own conditioning: drawn labels, its default prompts, no guidance change
            from hiresrun.conditioning import Conditioner

            conditioner = Conditioner(method.base)
        self.net, self.method, self.scheduler, self.num_steps = net, method, scheduler, int(num_steps)
        self.accelerator = accelerator if accelerator is not None else Accelerator()
        self.conditioner, self.sink = conditioner, sink or Sink()
        self.autocast = autocast  # mixed precision (bf16 / fp16 autocast, as Lightning's mixed plugins); None: off

    @property
    def device(self) -> torch.device:
        first = next(iter(self.net.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def loop(self, seeds: Sequence[int], counter: Counter, device) -> Loop:
        """The sampling loop of one batch: its generators, its conditioning (drawn before any noise: labels depend on
        the seed only), the accelerator's wrapping around the counted network."""
        gens = generators(seeds)
        cond = self.conditioner(list(seeds), gens, device)
        wrap = lambda f, step: self.accelerator.wrap(counter(f), step)
        return Loop(self.scheduler, self.num_steps, gens, wrap, cond, self.conditioner.at)

    @torch.no_grad()
    def generate(self, seeds: Sequence[int]) -> dict:
        """{"seeds", "images" (uint8, on the CPU), "evals", "passes" (network evaluations and UNet passes),
        "seconds" (wall time of the method's sampling)} for one batch of seeds."""
        from hiresrun.hooks import hooks_removed_after

        seeds, counter = [int(s) for s in seeds], Counter()
        loop = self.loop(seeds, counter, self.device)
        start = time.perf_counter()
        mixed = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()
        with hooks_removed_after(self.accelerator.attach(self.net)), mixed:
            x = self.method.sample(self.net, loop.gens, loop)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - start
        return {"seeds": torch.tensor(seeds), "images": to_uint8(x).cpu(), "evals": torch.tensor(counter.evals),
                "passes": torch.tensor(counter.passes), "seconds": torch.tensor(seconds, dtype=torch.float64)}

    def __call__(self, seeds: Sequence[int]) -> Tensor:
        """uint8 images (N, C, H, W) for `seeds`."""
        return self.generate(seeds)["images"]

    def batch(self, seeds: Sequence[int], rank: int = 0, world_size: int = 1) -> dict:
        """Generate one batch and hand it to the sink: images and record to the writer (with the costs, the
        accelerator's per-image facts and the sink's facts), then features and progress."""
        from hiresrun.outputs import peak_memory_mb

        seeds = [int(s) for s in seeds]
        mark = self.accelerator.mark()
        out = self.generate(seeds)
        sink, device = self.sink, self.device
        if sink.writer is None:
            return out
        facts = {"evals": int(out["evals"]), "passes": int(out["passes"]), "seconds": float(out["seconds"]),
                 "rank": rank, "world_size": world_size, "device": str(device),
                 "peak_memory_mb": peak_memory_mb(device), **(sink.facts(seeds) if sink.facts else {})}
        per_image = self.accelerator.per_image(mark, seeds)
        if per_image is not None:
            facts["accelerator"] = per_image
        sink.put(seeds, out["images"], facts, device)
        return out
