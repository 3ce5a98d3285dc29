"""bench: AdaptiveDiffusion on the embedded model against the full-step run and fixed schedules at equal NFE.

    .venv/bin/python bench/adaptive.py [--n 64] [--quick] [--delta 0.01] [--c-max 4]

For tiny-mnist at 16x16 and 32x32 (method none), DDIM / DPM-Solver++ / Euler, 50 steps: NFE and wall-clock
speed-up against the full run of the same seeds, fidelity to the full-step outputs (PSNR on uint8 values,
SSIM, LPIPS-alex when its weights resolve offline: the official protocol), the per-seed NFE spread, the
estimator's overhead (delta = 0, same NFE as the full run), and at equal NFE (i) the sampler run with fewer
steps, (ii) reuse every other step, (iii) periodic reuse (a call every k steps). Timings are side by side in
one process; results go to bench/results/adaptive.json. Euler: the accelerator measures latent changes on the
model input scale_model_input(z) (see hiresrun/accelerators/adaptive.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from hiresrun import outputs, sampling
from hiresrun.accelerators import Accelerator
from hiresrun.accelerators.adaptive import AdaptiveDiffusion
from hiresrun.errors import UsageError
from hiresrun.lit import to_uint8
from hiresrun.metrics.lpips import LPIPS, fidelity
from hiresrun.models import load_model, model_fn

SAMPLERS = ("ddim", "dpmsolver", "euler")
OUT = Path(__file__).parent / "results" / "adaptive.json"


class FixedSchedule(Accelerator):
    """A fixed skip mask over the steps of a first-order sampler: call the model where mask[i], else reuse the
    previous raw output (uniform / DeepCache-style periodic baselines)."""

    def __init__(self, mask: list[bool]):
        self.mask = mask

    def wrap(self, model_fn):
        state = {"i": 0, "cache": None}

        def fixed(x, t):
            i, state["i"] = state["i"], state["i"] + 1
            if self.mask[i] or state["cache"] is None:
                state["cache"] = model_fn(x, t)
            return state["cache"]

        return fixed


def scheduler_factory(name: str):
    """The scheduler `hiresrun sample sampler=<name>` builds (conf/sampler/<name>.yaml), as a from_config partial."""
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        return instantiate(compose("config", overrides=[f"sampler={name}"]).sampler.scheduler)


def generate(fn, make_scheduler, seeds, size, steps, acc, batch) -> dict:
    """uint8 images for `seeds` in batches, with NFE per image, wall seconds and (adaptive) per-image masks."""
    images, evals, masks, seconds = [], [], [], 0.0
    for i in range(0, len(seeds), batch):
        chunk, counter = seeds[i:i + batch], sampling.Counter()
        gens = sampling.generators(chunk)
        x_T = sampling.noise(gens, (1, size, size))
        wrap = (lambda f, c=counter: acc.wrap(c(f))) if acc else counter
        start = time.perf_counter()
        with torch.no_grad():
            x = sampling.sample(fn, x_T, make_scheduler(), steps, gens=gens, wrap=wrap)
        seconds += time.perf_counter() - start
        images.append(to_uint8(x))
        evals.append(counter.evals)
        if isinstance(acc, AdaptiveDiffusion):
            masks += acc.last_masks
    nfe = [sum(m) for m in masks]
    return {"images": torch.cat(images), "nfe": sum(evals) / len(seeds), "sec": seconds, "masks": masks,
            "nfe_per_seed": nfe}


def score(run: dict, full: dict, lpips) -> dict:
    """Fidelity to the full-step images of the same seeds, plus NFE and seconds."""
    out = {"nfe": run["nfe"], "sec": run["sec"]}
    if lpips is not None:
        out.update(fidelity(run["images"], full["images"], lpips))
    else:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        a, b = run["images"].double() / 255, full["images"].double() / 255
        out["psnr_to_ref"] = float(peak_signal_noise_ratio(a, b, data_range=1.0, dim=(1, 2, 3),
                                                           reduction="none").mean())
        out["ssim_to_ref"] = float(structural_similarity_index_measure(a, b, data_range=1.0).mean())
    return out


def one_setting(fn, sampler: str, size: int, args, lpips) -> dict:
    """Every variant for one (resolution, sampler), side by side on the same seeds."""
    make, seeds, N = scheduler_factory(sampler), list(range(args.n)), args.steps
    make_scheduler = lambda: make(args.scheduler_config)
    run = lambda steps, acc=None: generate(fn, make_scheduler, seeds, size, steps, acc, args.batch)
    run(N)  # warm-up (allocator, kernels), untimed
    full = run(N)
    identity = run(N, AdaptiveDiffusion(delta=0))
    adaptive = run(N, AdaptiveDiffusion(delta=args.delta, c_max=args.c_max, decision_scope=args.scope))
    n_eq = max(1, round(adaptive["nfe"]))
    k = max(2, round(N / adaptive["nfe"]))
    row = {"resolution": size, "sampler": sampler, "steps": N, "n": args.n,
           "full": {"nfe": full["nfe"], "sec": full["sec"]},
           "adaptive": score(adaptive, full, lpips),
           "fewer_steps": {"steps": n_eq, **score(run(n_eq), full, lpips)},
           "every_other": score(run(N, FixedSchedule([i % 2 == 0 for i in range(N)])), full, lpips),
           "periodic": {"k": k, **score(run(N, FixedSchedule([i % k == 0 for i in range(N)])), full, lpips)}}
    nfe = adaptive["nfe_per_seed"]
    row["adaptive"].update(speedup_nfe=full["nfe"] / adaptive["nfe"], speedup_wall=full["sec"] / adaptive["sec"],
                           nfe_min=min(nfe), nfe_median=statistics.median(nfe), nfe_max=max(nfe),
                           masks=["".join("1" if c else "0" for c in m) for m in adaptive["masks"]])
    row["estimator_overhead"] = identity["sec"] / full["sec"]  # same NFE: the cost of the bookkeeping
    row["identity_exact"] = bool(torch.equal(identity["images"], full["images"]))
    return row


def print_row(r: dict) -> None:
    a, f, e, p = r["adaptive"], r["fewer_steps"], r["every_other"], r["periodic"]
    lp = f" {a['lpips_to_ref']:.3f}" if "lpips_to_ref" in a else ""
    print(f"{r['resolution']:>3}px {r['sampler']:<9} NFE {r['full']['nfe']:.0f}->{a['nfe']:5.1f} "
          f"[{a['nfe_min']}-{a['nfe_max']}] x{a['speedup_nfe']:.2f} wall x{a['speedup_wall']:.2f} | "
          f"PSNR {a['psnr_to_ref']:5.2f} SSIM {a['ssim_to_ref']:.3f}{lp} | fewer({f['steps']}) {f['psnr_to_ref']:5.2f} "
          f"| every-other({e['nfe']:.0f}) {e['psnr_to_ref']:5.2f} | periodic k={p['k']}({p['nfe']:.0f}) "
          f"{p['psnr_to_ref']:5.2f} | overhead x{r['estimator_overhead']:.3f}"
          + ("" if r["identity_exact"] else " (delta=0 NOT exact)"), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="seeds 0..n-1")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 seeds, batch 4")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--delta", type=float, default=0.01)
    ap.add_argument("--c-max", type=int, default=4)
    ap.add_argument("--scope", default="sample", choices=("sample", "batch"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.batch = 4, 4
    torch.set_num_threads(args.threads)
    base = load_model("tiny-mnist")
    args.scheduler_config = base.scheduler_config
    fn = model_fn(base.unet.eval())
    try:
        lpips = LPIPS(download=False)
    except UsageError as e:  # no offline LPIPS trunk: PSNR and SSIM only
        print(f"bench: LPIPS unavailable ({e}); PSNR and SSIM only", file=sys.stderr)
        lpips = None
    rows = []
    for size in args.resolutions:
        for sampler in args.samplers:
            rows.append(one_setting(fn, sampler, size, args, lpips))
            print_row(rows[-1])
    protocol = {"model": "tiny-mnist", "model_weights_sha256": base.weights_hash, "method": "none",
                "seeds": f"0-{args.n - 1}", "batch": args.batch, "delta": args.delta, "c_max": args.c_max,
                "decision_scope": args.scope, "threads": args.threads, "device": "cpu", "quick": args.quick,
                "reference": f"full {args.steps}-step outputs of the same seeds and sampler",
                "fidelity": "PSNR (data range 1 on uint8 values) and SSIM per image, torchmetrics; LPIPS-alex v0.1",
                "speedup_wall": "wall seconds of the full run / of the adaptive run, same batches, one process",
                "packages": outputs.manifest(base.weights_hash, base.source)["packages"]}
    outputs.write_json(args.out, {"protocol": protocol, "results": rows})
    print(f"bench: {len(rows)} settings -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
