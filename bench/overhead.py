"""bench: what the framework costs. hiresrun's Lightning training step against a bare PyTorch loop (goal <= 1.05x);
hiresrun's sampling loop against a hand-written diffusers loop and diffusers' DDIMPipeline (goal <= 1.03x).

    OMP_NUM_THREADS=1 .venv/bin/python bench/overhead.py --threads 1 [--quick]

Training: `+method=finetune` on the embedded model at 32x32 (every UNet weight trains), the training digits in
batches of 16 from hiresrun's own data loader. The Lightning side is `hiresrun train`'s LitModule and Trainer
(conf/trainer/cpu.yaml; no logger, EMA, checkpoints or grids: features, not overhead); the bare loop does the same
loss, per-step seeds and AdamW step on the same batches. Rounds alternate between the two, each from the same
initial weights, so load from other processes falls on both alike; a step's time is the interval between
consecutive step ends (data loading and every hook included); median after warm-up. The two must give the same
losses. Sampling: the base at 16x16 (DDIMPipeline samples at the UNet's own size), DDIM, seeds 0..batch-1; our
side is `sampling.Sampler.generate` (the loop `hiresrun sample` runs per batch: per-seed noise, NFE counter, accelerator
hooks, uint8); the three take turns call by call (rotating order) and must produce the same images. Peak
memory: each variant in a process of its own, the resident set's growth over the state after set-up (CUDA:
max_memory_allocated). Wall and process CPU seconds are both reported. Results: bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hiresrun import outputs, sampling
from hiresrun.lit import LitModule
from hiresrun.sampling import Sampler, to_uint8

OUT = Path(__file__).parent / "results" / "overhead.json"
GOALS = {"training": 1.05, "sampling": 1.03}
VARIANTS = ("train_lightning", "train_bare", "sample_hiresrun", "sample_loop", "sample_pipeline")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def now() -> tuple[float, float]:
    """(wall, this process's CPU seconds). With one thread the CPU clock stops while other jobs hold the core, so
    its ratios are the steadier ones on a shared machine; on CUDA only wall counts."""
    return time.perf_counter(), time.process_time()


def medians(intervals: list[tuple[float, float]]) -> dict:
    return {"wall": statistics.median(i[0] for i in intervals), "cpu": statistics.median(i[1] for i in intervals)}


def ratio(a: dict, b: dict) -> dict:
    return {clock: a[clock] / b[clock] for clock in a}


def context(args) -> dict:
    """Everything both sides share, built as `hiresrun train +method=finetune` / `hiresrun sample` build it."""
    from diffusers import DDIMPipeline, DDIMScheduler
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from hiresrun.build import sampler_scheduler
    from hiresrun.methods.none import NoneMethod

    overrides = ["method=finetune", "data.resolution=32", f"data.batch_size={args.train_batch}", "logger=none",
                 "train.grid_every=0", "train.ema_decay=0", "trainer.enable_progress_bar=false",
                 f"paths.run_dir={tempfile.mkdtemp(prefix='overhead-')}"]
    overrides += ["trainer.accelerator=gpu"] if args.device == "cuda" else []
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    base = instantiate(cfg.model)
    method = instantiate(cfg.method)
    net = method.wrap(base).to(args.device)
    data = instantiate(cfg.data, base_resolution=base.resolution)
    data.setup("fit")
    sample_base = instantiate(cfg.model)  # its own UNet: the training one is in train mode with gradients
    none = NoneMethod(sample_base.resolution)
    sample_net = none.wrap(sample_base).to(args.device)
    pipe = DDIMPipeline(unet=sample_net, scheduler=DDIMScheduler.from_config(sample_base.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return {"cfg": cfg, "net": net, "method": method, "data": data, "initial": {k: v.clone() for k, v in
                                                                              net.state_dict().items()},
            "optimizer": instantiate(cfg.optimizer), "sample_base": sample_base, "pipe": pipe,
            "sampler": Sampler(sample_net, none, sampler_scheduler(cfg, sample_base), args.steps),
            "seeds": list(range(args.sample_batch)), "args": args}


# -- training ---------------------------------------------------------------------------------------------
def train_lightning(ctx: dict, steps: int) -> tuple[list[float], list[float]]:
    """`steps` steps of hiresrun's LitModule under the configured Trainer: (step end times, losses)."""
    import lightning as L

    from hiresrun.build import build_trainer

    device = ctx["args"].device

    class StepEnds(L.Callback):
        def __init__(self):
            self.ends, self.losses = [], []

        def on_train_batch_end(self, trainer, module, out, batch, batch_idx):
            sync(device)
            self.ends.append(now())
            self.losses.append(out["loss"].item())

    ctx["net"].load_state_dict(ctx["initial"])
    lit = LitModule(ctx["net"], ctx["method"], optimizer=ctx["optimizer"], seed=ctx["cfg"].seed)
    timer = StepEnds()
    trainer = build_trainer(ctx["cfg"], False, [timer], max_steps=steps, enable_checkpointing=False)
    trainer.fit(lit, train_dataloaders=ctx["data"].train_dataloader())
    return timer.ends, timer.losses


def train_bare(ctx: dict, steps: int) -> tuple[list[float], list[float]]:
    """The same steps as a plain loop: same batches, same per-step seed (LitModule.on_train_batch_start), AdamW."""
    net, method, seed, device = ctx["net"], ctx["method"], ctx["cfg"].seed, ctx["args"].device
    net.load_state_dict(ctx["initial"])
    net.train()
    opt = ctx["optimizer"]([p for p in net.parameters() if p.requires_grad])
    ends, losses = [], []
    for step, batch in zip(range(steps), ctx["data"].train_dataloader()):
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.manual_seed(seed + 1_000_003 * step)
        loss = method.loss(net, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        ends.append(now())
        losses.append(loss.item())
    return ends, losses


def compare_training(ctx: dict) -> dict:
    """Rounds alternating Lightning and bare, from the same weights; per-step medians after `warmup` steps."""
    args, times, losses = ctx["args"], {"lightning": [], "bare": []}, {}
    for _ in range(args.rounds):
        for name, run in (("lightning", train_lightning), ("bare", train_bare)):
            ends, step_losses = run(ctx, args.train_steps)
            times[name] += [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends[args.warmup:], ends[args.warmup + 1:])]
            losses.setdefault(name, step_losses)
    diff = max(abs(a - b) for a, b in zip(losses["lightning"], losses["bare"]))
    assert len(losses["lightning"]) == len(losses["bare"]) == args.train_steps and diff < 1e-5, (diff, losses)
    sec = {name: medians(t) for name, t in times.items()}
    return {"sec_per_step": sec, "ratio": ratio(sec["lightning"], sec["bare"]), "goal": GOALS["training"],
            "timed_steps_each": len(times["bare"]), "loss_max_abs_diff": diff, "losses": losses["bare"]}


# -- sampling ---------------------------------------------------------------------------------------------
def sample_hiresrun(ctx: dict):
    return ctx["sampler"].generate(ctx["seeds"])["images"]


def sample_loop(ctx: dict):
    """A hand-written DDIM loop over the diffusers UNet and scheduler: the least one can write."""
    unet, steps, device = ctx["pipe"].unet, ctx["args"].steps, ctx["args"].device
    scheduler = ctx["pipe"].scheduler
    size = unet.config.sample_size
    x = sampling.noise(sampling.generators(ctx["seeds"]), (unet.config.in_channels, size, size), device)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return to_uint8(x).cpu()


def sample_pipeline(ctx: dict):
    """diffusers' DDIMPipeline, eta 0, one generator per seed (so the same initial noise as hiresrun's)."""
    out = ctx["pipe"](batch_size=len(ctx["seeds"]), generator=sampling.generators(ctx["seeds"]),
                      num_inference_steps=ctx["args"].steps, eta=0.0, output_type="np").images
    return (torch.from_numpy(out).permute(0, 3, 1, 2) * 255).round().to(torch.uint8)


def compare_sampling(ctx: dict) -> dict:
    """The three loops take turns call by call, in rotating order; median seconds per call after one warm-up call
    each."""
    args, runs = ctx["args"], {"hiresrun": sample_hiresrun, "loop": sample_loop, "pipeline": sample_pipeline}
    images = {name: run(ctx) for name, run in runs.items()}  # warm-up, and the fairness check
    diff = {name: int((images[name].int() - images["hiresrun"].int()).abs().max()) for name in ("loop", "pipeline")}
    assert max(diff.values()) <= 1, diff  # one grey level: [-1, 1] -> uint8 rounding
    times, names = {name: [] for name in runs}, list(runs)
    for i in range(args.repeats):
        for name in names[i % 3:] + names[:i % 3]:  # the order rotates: no loop always follows the same one
            run = runs[name]
            sync(args.device)
            start = now()
            run(ctx)
            sync(args.device)
            end = now()
            times[name].append((end[0] - start[0], end[1] - start[1]))
    sec = {name: medians(t) for name, t in times.items()}
    return {"sec_per_call": sec, "ratio_vs_loop": ratio(sec["hiresrun"], sec["loop"]),
            "ratio_vs_pipeline": ratio(sec["hiresrun"], sec["pipeline"]), "goal": GOALS["sampling"],
            "images_max_abs_diff": diff, "identical_images": {n: bool(torch.equal(images[n], images["hiresrun"]))
                                                              for n in ("loop", "pipeline")}}


# -- memory -----------------------------------------------------------------------------------------------
def rss_growth(fn) -> float:
    """MB the resident set grows above its size before `fn()`, polled every millisecond from a thread (Linux:
    the process's lifetime peak, ru_maxrss, is set by the set-up and cannot be reset)."""
    import gc
    import threading

    gc.collect()
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    before, peak, done = rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        fn()
    finally:
        done.set()
        poller.join()
    return (max(peak[0], rss()) - before) / 2**20


def measure(variant: str, args) -> dict:
    """In this process: set up, then run one variant; its peak memory above the set-up state, in MB."""
    ctx, run = context(args), globals()[variant]
    call = (lambda: run(ctx, 4)) if variant.startswith("train") else (lambda: run(ctx))
    if args.device != "cuda":
        return {"peak_mb": rss_growth(call), "kind": "resident set growth over the set-up state"}
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    return {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20, "kind": "cuda max_memory_allocated"}


def peak_memory(args) -> dict:
    """Each variant in its own process (a process's peak RSS cannot be reset)."""
    flags = ["--threads", str(args.threads), "--device", args.device, "--steps", str(args.steps),
             "--sample-batch", str(args.sample_batch), "--train-batch", str(args.train_batch)]
    result = {}
    for v in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--measure", v, *flags], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory of {v} failed: {proc.stderr.strip().splitlines()[-1:]}")
        result[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared CPU)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=6, help="training: rounds, each side taking a turn per round")
    ap.add_argument("--train-steps", type=int, default=12, help="training steps per round and side")
    ap.add_argument("--warmup", type=int, default=2, help="training steps per round left out of the timing")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per sampling call")
    ap.add_argument("--sample-batch", type=int, default=4, help="images per sampling call (seeds 0..n-1)")
    ap.add_argument("--repeats", type=int, default=25, help="timed sampling calls per loop")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 5 steps, 10 DDIM steps, 3 repeats")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant's memory
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return 0
    if args.quick:
        args.rounds, args.train_steps, args.steps, args.repeats = 2, 5, 10, 3
    start = time.perf_counter()
    ctx = context(args)
    training, sampling_ = compare_training(ctx), compare_sampling(ctx)
    memory = peak_memory(args)
    protocol = {"model": "tiny-mnist", "model_weights_sha256": ctx["sample_base"].weights_hash,
                "device": args.device, "threads": args.threads, "cpu_count": os.cpu_count(),
                "load_average_1_5_15_min": os.getloadavg(),  # other jobs on the machine, at the end
                "training": f"+method=finetune at 32x32, batch {args.train_batch} from MnistDataModule, AdamW "
                            f"lr {ctx['cfg'].optimizer.lr}; {args.rounds} rounds x {args.train_steps} steps per side, "
                            f"first {args.warmup} of each round untimed; Lightning: LitModule + conf/trainer "
                            "(no logger, EMA, checkpoints, grids)",
                "sampling": f"method none at 16x16, DDIM {args.steps} steps, eta 0, seeds 0-{args.sample_batch - 1} "
                            f"in one call; {args.repeats} timed calls per loop after one warm-up, interleaved in "
                            "rotating order",
                "statistic": "median of wall and of process CPU seconds (time.process_time)",
                "memory": "each variant in its own process; peak above the set-up state",
                "bench_seconds": time.perf_counter() - start,
                "packages": outputs.package_versions(("torch", "diffusers", "lightning"))}
    outputs.write_json(args.out, {"protocol": protocol, "training": training, "sampling": sampling_,
                                  "memory_mb": memory})
    show(training, sampling_, memory)
    print(f"bench: {protocol['bench_seconds']:.0f} s -> {args.out}")
    return 0


def show(training: dict, sampling_: dict, memory: dict) -> None:
    t, s, mb = training["sec_per_step"], sampling_["sec_per_call"], {k: v["peak_mb"] for k, v in memory.items()}
    print(f"{'':28}{'wall ms':>9}{'cpu ms':>9}  peak MB")
    rows = [("training step: lightning", t["lightning"], "train_lightning"), ("training step: bare", t["bare"],
                                                                                "train_bare")]
    rows += [(f"sampling call: {n}", s[n], f"sample_{n}") for n in ("hiresrun", "loop", "pipeline")]
    for name, sec, variant in rows:
        print(f"{name:28}{sec['wall'] * 1e3:9.1f}{sec['cpu'] * 1e3:9.1f}  {mb[variant]:7.0f}")
    for name, r, goal in (("lightning / bare", training["ratio"], training["goal"]),
                          ("hiresrun / loop", sampling_["ratio_vs_loop"], sampling_["goal"]),
                          ("hiresrun / pipeline", sampling_["ratio_vs_pipeline"], sampling_["goal"])):
        print(f"{name:28}{r['wall']:9.3f}{r['cpu']:9.3f}  (goal <= {goal})")


if __name__ == "__main__":
    sys.exit(main())
