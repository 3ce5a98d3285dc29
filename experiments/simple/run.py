"""SD-1 on the embedded model: does the shifted log-SNR schedule beat the unshifted one for a 16 -> 32 fine-tune?

Two `hiresrun train +method=simple` runs at equal steps that differ only in noise_d (16 = shifted by 2 ln(16/32);
32 = unshifted), then `hiresrun sample` of each with metrics=default on seeds 0..N-1, DDIM 50 steps.
Merges its numbers into experiments/simple/results.json under "<steps>steps_bs<batch>_n<n>", one entry per arm, so
arms may run as separate processes (`--arms shifted` and `--arms unshifted`). Run folders go under --out/<key>.

    nice -n 10 .venv/bin/python experiments/simple/run.py [--steps 500] [--n 500] [--arms shifted unshifted]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HIRESRUN = str(Path(sys.executable).with_name("hiresrun"))
ARMS = {"shifted": ["method.noise_d=16"], "unshifted": ["method.noise_d=32"]}  # noise_d == image_d: no shift
# the protocol is the presets conf/experiment/simple/{train32,sample32}.yaml; the arms add method.noise_d
TRAIN, SAMPLE = "experiment=simple/train32", "experiment=simple/sample32"
QUIET = ["trainer.enable_progress_bar=false"]


def hiresrun(*args: str) -> float:
    """Run one hiresrun command at low priority; return its wall seconds."""
    start = time.perf_counter()
    cmd = ["nice", "-n", "10", HIRESRUN, *args]
    print("$", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="/tmp/simple")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = p.parse_args()
    key = f"{args.steps}steps_bs{args.batch_size}_n{args.n}"
    out, results = Path(args.out) / key, {}
    for arm in args.arms:
        overrides = ARMS[arm]
        tr, sa = out / f"train-{arm}", out / f"sample-{arm}"
        train_s = hiresrun("train", TRAIN, *overrides, *QUIET, f"trainer.max_steps={args.steps}",
                           f"data.batch_size={args.batch_size}", f"train.checkpoint_every={args.steps}",
                           f"hydra.run.dir={tr}")
        sample_s = hiresrun("sample", SAMPLE, f"ckpt_path={tr}", *QUIET, f"sample.seeds=0-{args.n - 1}",
                            f"hydra.run.dir={sa}")
        m = json.loads((sa / "metrics.json").read_text())
        results[arm] = {"overrides": overrides, "train_steps": args.steps, "train_wall_s": round(train_s, 1),
                        "sample_wall_s": round(sample_s, 1),
                        **{k: m[k] for k in ("fid", "kid", "kid_std", "patch_fid", "swd", "digit_acc", "digit_conf",
                                             "fd_digits", "num_samples", "nfe_per_image", "sec_per_image") if k in m}}
        print(arm, json.dumps(results[arm]), flush=True)
    protocol = {"base": "tiny-mnist (16px)", "target": 32, "data": "mnist (embedded)",
                "method": "simple, init=pretrained, v-prediction, eps_mse, multiscale=false",
                "batch_size": args.batch_size, "sampler": "ddim", "num_steps": 50,
                "seeds": f"0-{args.n - 1}", "metrics": "default", "presets": [TRAIN, SAMPLE]}
    path = HERE / "results.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    everything[key] = {**everything.get(key, {}), **results, "protocol": protocol}
    path.write_text(json.dumps(everything, indent=2) + "\n")
    print(json.dumps(everything[key], indent=2))


if __name__ == "__main__":
    main()
