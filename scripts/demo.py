"""`make demo`: the main job on the embedded default, 16x16 MNIST model -> 32x32.

1. `hiresrun train +method=selfcascade` trains the time-aware feature upsamplers (base frozen), short schedule;
2. `hiresrun sample` with method none, upsample and the trained selfcascade, 64 images each (seeds 0..63),
   `metrics=default` (FID/KID against the 1,000 held-out MNIST digits at 32x32, digit classifier score);
3. prints one table row per method and writes a side-by-side grid, demo.png.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from hiresrun.outputs import side_by_side

TRAIN = ["+method=selfcascade", "method.upsampler=resblock", "trainer.max_steps=300", "optimizer.lr=1e-3",
         "data.batch_size=32", "train.grid_every=0", "train.checkpoint_every=300"]
QUIET = ["experiment=demo", "trainer.enable_progress_bar=false"]
METRICS = ["metrics=default", "metrics.patch_fid=false"]  # patch-FID adds nothing at 32 px


def hiresrun(*args: str) -> None:
    print("$ hiresrun", " ".join(args), flush=True)
    subprocess.run([str(Path(sys.executable).with_name("hiresrun")), *args], check=True)


def main() -> int:
    root = Path("outputs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    start = time.perf_counter()
    try:
        hiresrun("train", *TRAIN, *QUIET, f"hydra.run.dir={root / 'selfcascade-train'}")
        runs = [("none", ["+method=none"]), ("upsample", ["+method=upsample"]),
                ("selfcascade", ["+method=selfcascade", "method.upsampler=resblock",
                                 f"ckpt_path={root / 'selfcascade-train'}"])]
        for name, args in runs:
            hiresrun("sample", *args, *QUIET, *METRICS, f"hydra.run.dir={root / name}")
    except subprocess.CalledProcessError:
        return 1
    trained = json.loads((root / "selfcascade-train" / "metrics.json").read_text())
    print(f"\nselfcascade: {trained['trainable_params']:,} trainable parameters, {trained['steps']} steps in "
          f"{trained['train_seconds']:.0f} s\n")
    print(f"{'method':<12} {'FID':>7} {'KID':>7} {'digit_acc':>9} {'NFE/image':>9} {'s/image':>8}  output folder")
    for name, _ in runs:
        m = json.loads((root / name / "metrics.json").read_text())
        print(f"{name:<12} {m['fid']:>7.1f} {m['kid']:>7.3f} {m['digit_acc']:>9.3f} {m['nfe_per_image']:>9.1f} "
              f"{m['sec_per_image']:>8.3f}  {root / name}")
    side_by_side([(name, root / name / "grid.png") for name, _ in runs], root / "demo.png")
    n = json.loads((root / "none" / "metrics.json").read_text())["protocol"]
    print(f"\nn = {n.get('n_generated', 64)} samples (seeds 0..63) vs {n.get('n_reference', 1000)} held-out MNIST "
          f"digits at 32x32; FID at this n is biased (fid_floor in metrics.json), digit_acc reads reliably.")
    print("What it shows: the 16 px model asked for 32 px directly (none) draws no digit; bicubic upsample of its "
          "16 px digits is hard to beat on MNIST's FID; Self-Cascade's trained upsamplers repair none at a fraction "
          "of fine-tuning's cost, and pass upsample on the digit metrics only at strength 0.3 in the n = 500 study "
          "(experiments/selfcascade).")
    print(f"Side by side: {root / 'demo.png'}; each folder holds samples/, grid.png, metrics.json, manifest.json. "
          f"Total {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
