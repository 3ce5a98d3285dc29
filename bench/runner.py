"""bench: what the runner's per-batch work (PNG writes, sha256, the batch record, per-image Inception rows) costs a
sample run, done in the sampling thread or by the sink's background writer (hiresrun/sampling.py `Sink`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/runner.py [--batches 12] [--batch 16] [--resolution 32] [--steps 20]
        [--rounds 3] [--quick]

Three variants of the same batches (seeds 0..N-1) on the embedded `tiny-mnist` (DDIM, `data.resolution`), taking
turns batch by batch in one process so that load from other jobs falls on all alike:

    generate     `Sampler.generate` only: the images and nothing else (the floor)
    png          `Sampler.batch` with a sink that writes in the sampling thread: PNGs, hashes, the record
    inline       the same plus each batch's Inception pool3 rows (metrics=default's extractor), in the sampling thread
    background   the same sink with `background=True`: batch k is written while batch k+1 samples

The statistic is the wall time of the variant's whole sequence of batches (its writer thread flushed at the end),
median over rounds; the ratio to `generate` is the per-batch work's cost. Torch runs one thread (`--threads`), the
second core is the writer's, as on a GPU machine where the device samples and the CPU cores are free. Writes
bench/results/runner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "runner.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 batches of 4, 1 round (a smoke run)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.quick:
        args.batches, args.batch, args.rounds, args.steps = 2, 4, 1, 4
    import torch

    torch.set_num_threads(args.threads)
    from hydra.utils import instantiate

    import hiresrun
    from hiresrun import sampling, store
    from hiresrun.api import config
    from hiresrun.metrics.generated import BatchFeatures

    overrides = ["model=tiny-mnist", f"data.resolution={args.resolution}", f"sampler.num_steps={args.steps}",
                 f"sample.batch_size={args.batch}", "logger=none"]
    sampler = hiresrun.load(*overrides)
    metrics = config("sample", *overrides, "metrics=default", "paths.run_dir=null").metrics
    plan = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.batches)]
    names = ("generate", "png", "inline", "background")
    times = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            sinks = {}
            for n in names[1:]:
                folder = store.Store(Path(tmp) / f"{n}-{r}")
                features = BatchFeatures(metrics, folder.run_dir)
                features.metrics = instantiate(metrics, device="cpu")  # the extractor loads once, outside the timing
                sinks[n] = sampling.Sink(writer=folder.writer("bench"), featurize=None if n == "png" else features,
                                         background=n == "background")
            spent = dict.fromkeys(names, 0.0)
            for seeds in plan:  # the variants take turns batch by batch
                for n in names:
                    start = time.perf_counter()
                    if n == "generate":
                        with torch.inference_mode():
                            sampler.generate(seeds)
                    else:
                        sampler.sink = sinks[n]
                        with torch.inference_mode():
                            sampler.batch(seeds)
                    spent[n] += time.perf_counter() - start
            for n, sink in sinks.items():  # what the writer still holds belongs to its variant's time
                start = time.perf_counter()
                sink.close()
                spent[n] += time.perf_counter() - start
            for n in names:
                times[n].append(spent[n])
            print(f"round {r + 1}: " + ", ".join(f"{n} {spent[n]:.2f} s" for n in names), flush=True)
        same = all(store.Store(Path(tmp) / f"inline-{r}").done().keys() ==
                   store.Store(Path(tmp) / f"background-{r}").done().keys() for r in range(args.rounds))
    med = {n: statistics.median(v) for n, v in times.items()}
    images = args.batches * args.batch
    rows = {n: {"seconds": med[n], "images_per_s": images / med[n], "x_generate": med[n] / med["generate"]}
            for n in names}
    print(f"{'variant':<11} {'s':>7} {'img/s':>7} {'x generate':>11}")
    for n, row in rows.items():
        print(f"{n:<11} {row['seconds']:>7.2f} {row['images_per_s']:>7.2f} {row['x_generate']:>11.3f}")
    record = {"protocol": {"model": "tiny-mnist", "resolution": args.resolution, "steps": args.steps,
                           "sampler": "ddim", "batch": args.batch, "batches": args.batches, "rounds": args.rounds,
                           "torch_threads": args.threads, "cpus": os.cpu_count(), "features": "Inception pool3 "
                           "(metrics=default), per batch", "statistic": "median over rounds of a variant's total "
                           "wall time, writer flushed"},
              "rows": rows, "same_images_on_disk": same, "goal": "background <= 1.03 x generate"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
