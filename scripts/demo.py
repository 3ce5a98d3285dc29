"""`make demo`: sample the embedded 16x16 MNIST model at 32x32 with method none and upsample, then print
one table row per method (NFE per image, seconds per image, output folder)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("none", "upsample")


def main() -> int:
    hiresrun = Path(sys.executable).with_name("hiresrun")
    root = Path("outputs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    rows = []
    for method in METHODS:
        run_dir = root / method
        cmd = [str(hiresrun), "sample", "experiment=demo", f"+method={method}", f"hydra.run.dir={run_dir}"]
        print("$", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd).returncode:
            return 1
        m = json.loads((run_dir / "metrics.json").read_text())
        rows.append((method, m["nfe_per_image"], m["sec_per_image"], str(run_dir)))
    print(f"\n{'method':<10} {'NFE/image':>9} {'s/image':>8}  output folder")
    for method, nfe, sec, folder in rows:
        print(f"{method:<10} {nfe:>9.1f} {sec:>8.3f}  {folder}")
    print(f"\nEach folder holds samples/<seed>.png, grid.png, metrics.json, manifest.json; see {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
