"""How long the tool takes before it does anything: `hiresrun --help`, `--cfg job`, refusals of a mistyped key and of
a bad value, and a one-image sample, each against `python -c "import torch, diffusers"` (what any diffusers script
pays before its first line), measured side by side: the commands take turns, round after round, so load from other
jobs falls on all of them alike. Medians of wall seconds; prints the ratios and writes bench/results/startup.json.

    .venv/bin/python bench/startup.py            # 5 rounds, ~2 min on the 2-core CPU
    .venv/bin/python bench/startup.py --rounds 2

Goals (issue #27): --help, --cfg job and a config error within 1.5 s; a one-image sample within 1.2x of the import.
The one-image sample is also compared with importing the UNet and scheduler classes (`x UNet import`): diffusers
loads its model modules on first use, so `import torch, diffusers` alone stops short of what any sampling script
pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXE = str(Path(sys.executable).with_name("hiresrun"))
ONE_IMAGE = ["sample", "sample.num_samples=1", "sampler.num_steps=10", "trainer.enable_progress_bar=false"]

COMMANDS = {  # name -> (argv, expected exit code, goal: seconds or a ratio to the import)
    "import torch, diffusers": ([sys.executable, "-c", "import torch, diffusers"], 0, None),
    # what a diffusers script pays before it can sample: diffusers imports its model classes lazily, and the UNet's
    # modules pull transformers and torch._dynamo in (the baseline above loads none of them)
    "import torch; from diffusers import UNet2DModel, DDIMScheduler": (
        [sys.executable, "-c", "import torch; from diffusers import UNet2DModel, DDIMScheduler"], 0, None),
    "hiresrun --help": ([EXE, "--help"], 0, ("seconds", 1.5)),
    "hiresrun sample --cfg job": ([EXE, "sample", "--cfg", "job"], 0, ("seconds", 1.5)),
    "mistyped key": ([EXE, "sample", "sampler.num_step=10"], 2, ("seconds", 1.5)),
    "unknown option": ([EXE, "sample", "+method=selfcascades"], 2, ("seconds", 1.5)),
    "bad value": ([EXE, "sample", "sample.batch_size=0"], 2, ("seconds", 1.5)),
    "one-image sample (logger=none)": ([EXE, *ONE_IMAGE, "logger=none"], 0, ("ratio", 1.2)),
    "one-image sample (default wandb logger)": ([EXE, *ONE_IMAGE], 0, ("ratio", 1.2)),
}


def timed(argv: list[str], code: int, cwd: Path) -> float:
    env = {**os.environ, "HIRESRUN_OUTPUTS": str(cwd / "outputs"), "WANDB_SILENT": "true"}
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != code:
        raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}, expected {code}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "startup.json")
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        for argv, code, _ in COMMANDS.values():  # warm the file cache once, untimed
            timed(argv, code, Path(tmp))
        for _ in range(args.rounds):
            for name, (argv, code, _) in COMMANDS.items():
                times[name].append(timed(argv, code, Path(tmp)))
    base = statistics.median(times["import torch, diffusers"])
    model = statistics.median(times["import torch; from diffusers import UNet2DModel, DDIMScheduler"])
    rows = []
    for name, (argv, _, goal) in COMMANDS.items():
        median = statistics.median(times[name])
        ratio = median / base
        met = None if goal is None else (median <= goal[1] if goal[0] == "seconds" else ratio <= goal[1])
        shown = ["hiresrun", *argv[1:]] if argv[0] == EXE else ["python", *argv[1:]]
        rows.append({"command": name, "argv": shown, "median_s": round(median, 3),
                     "ratio_to_import": round(ratio, 3), "ratio_to_model_import": round(median / model, 3),
                     "goal": None if goal is None else
                     (f"<= {goal[1]} s" if goal[0] == "seconds" else f"<= {goal[1]}x the import"), "met": met,
                     "runs_s": [round(t, 3) for t in times[name]]})
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  median s  x import  x UNet import  goal")
    for r in rows:
        print(f"{r['command']:<{width}}  {r['median_s']:8.2f}  {r['ratio_to_import']:8.2f}  "
              f"{r['ratio_to_model_import']:13.2f}  "
              f"{r['goal'] or '-'}{'' if r['met'] is None else ' met' if r['met'] else ' MISSED'}")
    result = {"rows": rows, "protocol": {
        "rounds": args.rounds, "statistic": "median wall seconds of a subprocess, commands taking turns each round "
                                            "after one untimed warm-up run each",
        "one_image_sample": " ".join(ONE_IMAGE) + " (model tiny-mnist, 16 px, DDIM)",
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
