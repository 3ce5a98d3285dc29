"""bench: rank 0's peak resident memory while sampling N images, for N = 64, 256, 1024 (ratios side by side).

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py [--sizes 64 256 1024] [--resolution 64] [--steps 1]

Each N is one `hiresrun sample model=tiny-mnist metrics=none` in a process of its own, at 64 px (the embedded UNet
is convolutional, so a large side makes each image's bytes visible against the ~1 GB of a loaded torch process),
DDIM with few steps (memory, not quality), batch 32. `peak_memory_mb` is the run's own measure (metrics.json: the
resident-set high-water mark from a reset at the start of sampling, largest over the batches). Since images go to
disk batch by batch (hiresrun/store.py) nothing grows with N while sampling; the table shows that beside what
holding the images in memory would add (N x C x H x W bytes as uint8, x4 as the float32 the network returns).
Results: bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "results" / "memory.json"
HIRESRUN = str(Path(sys.executable).with_name("hiresrun"))


def one(n: int, args, folder: Path) -> dict:
    run = folder / f"n{n}"
    cmd = [HIRESRUN, "sample", "model=tiny-mnist", f"data.resolution={args.resolution}", f"sample.num_samples={n}",
           f"sampler.num_steps={args.steps}", "sample.batch_size=32", "metrics=none", "logger=none",
           "trainer.enable_progress_bar=false", "sample.save_images=false", f"hydra.run.dir={run}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    m = json.loads((run / "metrics.json").read_text())
    image_mb = n * args.resolution ** 2 / 2**20
    return {"n": n, "peak_memory_mb": m["peak_memory_mb"], "sec_per_image": m["sec_per_image"],
            "images_uint8_mb": round(image_mb, 1), "images_float32_mb": round(4 * image_mb, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(n, args, Path(tmp)) for n in args.sizes]
    first = rows[0]
    print(f"{'N':>6} {'peak MB':>9} {'x vs N=' + str(first['n']):>10} {'N ratio':>8} {'images f32 MB':>14}")
    for r in rows:
        r["peak_ratio"] = r["peak_memory_mb"] / first["peak_memory_mb"]
        r["n_ratio"] = r["n"] / first["n"]
        print(f"{r['n']:>6} {r['peak_memory_mb']:>9.1f} {r['peak_ratio']:>10.3f} {r['n_ratio']:>8.0f} "
              f"{r['images_float32_mb']:>14.1f}")
    a, b = rows[-2], rows[-1]  # growth between the two largest N (the smallest carries the start-up noise)
    slope = (b["peak_memory_mb"] - a["peak_memory_mb"]) / (b["n"] - a["n"])
    record = {"protocol": {"model": "tiny-mnist", "resolution": args.resolution, "steps": args.steps,
                           "batch_size": 32, "measure": "metrics.json peak_memory_mb (rank 0, one process, CPU)",
                           "hardware": "2-core CPU, shared with other jobs"},
              "rows": rows, "mb_per_1024_images": slope * 1024,
              "sub_linear": rows[-1]["peak_ratio"] < 0.5 * rows[-1]["n_ratio"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"growth from N={a['n']} to {b['n']}: {slope * 1024:+.1f} MB per 1,024 images (holding them as float32 "
          f"would add {4 * args.resolution ** 2 / 2**10:.0f} MB per 1,024); -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
