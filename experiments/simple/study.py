"""SD-1 gap 32 vs 64, SD-2 multiscale curve, init and head ablations, at one reduced budget (issue #6).

Every arm is one `hiresrun train +method=simple` run from the embedded 16px base at the same budget
(--steps optimiser steps at --batch-size, training seed 0, a checkpoint every --every steps), then
`hiresrun sample` of chosen checkpoints with metrics=default (patch-FID off), DDIM 50, seeds 0..n-1.
Jobs run one at a time in the order given; a job whose numbers are already in results.json (same key) or whose
training run already has its checkpoints is skipped, so the script resumes after an interruption.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/simple/study.py                  # every job, in priority order
    OMP_NUM_THREADS=1 .venv/bin/python experiments/simple/study.py --jobs s32@300 u32@300
    .venv/bin/python experiments/simple/study.py --plot                            # PNGs from results.json

Numbers go to experiments/simple/results.json under "study_<steps>steps_bs<batch>_n<n>"; PNGs beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HIRESRUN = str(Path(sys.executable).with_name("hiresrun"))
REPO = HERE.parents[1]

# arm -> (target resolution, method overrides); everything not named is the shared recipe below
ARMS = {
    "s32": (32, {"method.noise_d": 16}),                                  # shifted 2 ln(16/32) = -1.386
    "u32": (32, {"method.noise_d": 32}),                                  # unshifted cosine
    "s64": (64, {"method.noise_d": 16}),                                  # shifted 2 ln(16/64) = -2.773
    "u64": (64, {"method.noise_d": 64}),                                  # unshifted cosine
    "s32_ms": (32, {"method.noise_d": 16, "method.multiscale": "true"}),  # + multiscale loss, scales {32, 16}
    "s32_eps": (32, {"method.noise_d": 16, "method.prediction_type": "epsilon"}),  # eps head (the base's)
    "s32_scratch": (32, {"method.noise_d": 16, "method.init": "scratch"}),          # random init, v head
}
RECIPE = {"method.multiscale": "false", "method.init": "pretrained", "method.prediction_type": "v_prediction"}
COMMON = ["logger=none", "trainer.enable_progress_bar=false"]
# priority order: the 32/64 gap first, then the multiscale curve, then init and head ablations, then the curves
DEFAULT_JOBS = ["s32@300", "u32@300", "s64@300", "u64@300", "s32_ms@300", "s32_ms@100", "s32_ms@200",
                "s32@100", "s32@200", "s32_scratch@300", "s32_eps@300", "s32_eps@100", "s32_eps@200"]
METRIC_KEYS = ("fid", "fid_floor", "kid", "kid_std", "swd", "digit_acc", "digit_conf", "fd_digits", "num_samples",
               "nfe_per_image", "sec_per_image")


def overrides(arm: str) -> list[str]:
    res, extra = ARMS[arm]
    return [f"data.resolution={res}"] + [f"{k}={v}" for k, v in {**RECIPE, **extra}.items()]


def hiresrun(*args: str) -> float:
    start = time.perf_counter()
    print("$ hiresrun", " ".join(args), flush=True)
    subprocess.run([HIRESRUN, *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def train(arm: str, seed: int, args, out: Path) -> Path:
    """Training seed `seed` (init noise, t, eps, data order); data.seed stays 0, so the train/reference split
    (and with it the FID reference) is the same for every seed."""
    run = out / (f"train-{arm}" if seed == 0 else f"train-{arm}-seed{seed}")
    if (run / "checkpoints" / f"step_{args.steps:07d}.ckpt").is_file():
        return run
    hiresrun("train", "+method=simple", *overrides(arm), *COMMON, f"seed={seed}", "data.seed=0",
             f"trainer.max_steps={args.steps}",
             f"data.batch_size={args.batch_size}", "train.grid_every=0", f"train.checkpoint_every={args.every}",
             f"hydra.run.dir={run}")
    return run


def sample(arm: str, step: int, seed: int, run: Path, args, out: Path) -> dict:
    sa = out / (f"sample-{arm}-{step}" if seed == 0 else f"sample-{arm}-{step}-seed{seed}")
    ckpt = run / "checkpoints" / f"step_{step:07d}.ckpt"
    wall = hiresrun("sample", "+method=simple", f"ckpt_path={ckpt}", *overrides(arm), *COMMON, "metrics=default",
                    "metrics.patch_fid=false", "sampler=ddim", "sampler.num_steps=50",
                    f"sample.seeds=0-{args.n - 1}", "sample.save_images=false", f"hydra.run.dir={sa}")
    m = json.loads((sa / "metrics.json").read_text())
    t = json.loads((run / "metrics.json").read_text())
    return {"arm": arm, "resolution": ARMS[arm][0], "overrides": overrides(arm), "train_seed": seed,
            "train_step": step,
            "train_seconds_full_run": round(t["train_seconds"], 1), "sample_wall_s": round(wall, 1),
            **{k: m[k] for k in METRIC_KEYS if k in m}}


def save(key: str, entry: dict, args) -> None:
    path = HERE / "results.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    block = everything.setdefault(key, {})
    block.setdefault("samples", {}).update(entry)
    block["protocol"] = {
        "base": "tiny-mnist (16px, eps, squaredcos_cap_v2)", "data": "mnist (embedded), 4,000 train / 1,000 ref",
        "recipe": RECIPE, "train_steps": args.steps, "batch_size": args.batch_size,
        "train_seeds": "0 unless the job says arm@step:seed; data.seed=0 always",
        "checkpoint_every": args.every, "optimizer": "AdamW 2e-4, EMA 0.999 with warm-up",
        "sampler": "ddim", "num_steps": 50, "seeds": f"0-{args.n - 1}", "metrics": "default, patch_fid=false",
        "feature_extractor": "clean-fid Inception-v3 pool3, clean resize to 299",
        "hardware": "2-core shared CPU, OMP_NUM_THREADS=1, one job at a time beside another study",
        "arms": {a: overrides(a) for a in ARMS}}
    path.write_text(json.dumps(everything, indent=2) + "\n")


def plot(key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    samples = json.loads((HERE / "results.json").read_text())[key]["samples"]
    curves: dict[str, list] = {}
    for s in samples.values():
        if s.get("train_seed", 0) == 0:  # curves: training seed 0 only
            curves.setdefault(s["arm"], []).append((s["train_step"], s["fid"], s["digit_acc"]))
    labels = {"s32": "shifted, multiscale off", "s32_ms": "shifted, multiscale on (32+16)",
              "s32_eps": "shifted, eps head", "s32_scratch": "shifted, init=scratch", "u32": "unshifted"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, label in labels.items():
        pts = sorted(curves.get(arm, []))
        if pts:
            for ax, col in zip(axes, (1, 2)):
                ax.plot([p[0] for p in pts], [p[col] for p in pts], "o-", label=label)
    axes[0].set(xlabel="optimiser steps (batch 16)", ylabel="FID (n=200) ↓", yscale="log",
                title="16 → 32 px, training seed 0: FID vs steps")
    axes[1].set(xlabel="optimiser steps (batch 16)", ylabel="digit_acc ↑", title="digit classifier")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "fid_vs_steps.png", dpi=120)
    plt.close(fig)

    def final(arm: str, m: str) -> list[float]:
        return [s[m] for s in samples.values() if s["arm"] == arm and s["train_step"] == max_step]

    max_step = max(s["train_step"] for s in samples.values())
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    panels = [("fid", "FID ↓"), ("kid", "KID ↓"), ("swd", "SWD ↓"), ("fd_digits", "fd_digits ↓")]
    for ax, (m, title) in zip(axes, panels):
        for i, res in enumerate((32, 64)):
            u, s = final(f"u{res}", m), final(f"s{res}", m)
            if not (u and s):
                continue
            for j, (vals, color) in enumerate(((u, "tab:gray"), (s, "tab:blue"))):
                ax.bar(3 * i + j, np.mean(vals), color=color, yerr=np.std(vals) if len(vals) > 1 else None)
                ax.plot([3 * i + j] * len(vals), vals, "k.", ms=4)
            ax.text(3 * i + 0.5, max(np.mean(u), np.mean(s)) * 1.05, f"{(np.mean(s) - np.mean(u)) / np.mean(u):+.0%}",
                    ha="center")
        ax.set_xticks([0, 1, 3, 4], ["unshifted\n32", "shifted\n32", "unshifted\n64", "shifted\n64"])
        ax.set_title(title)
    fig.suptitle(f"16 → 32 and 16 → 64, {max_step} steps at batch 16, n=200: shifted vs unshifted "
                 "(bars: mean over training seeds, dots: seeds; label: relative change of the means)", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "gap_32_vs_64.png", dpi=120)
    plt.close(fig)


def table(key: str) -> str:
    """Markdown rows for the README: one row per job, then mean ± std over training seeds per arm and step."""
    import numpy as np

    samples = json.loads((HERE / "results.json").read_text())[key]["samples"]
    lines: list[str] = []
    cols = ("fid", "kid", "swd", "digit_acc", "fd_digits")
    lines.append("| job | res | train seed | FID | KID ×10³ | SWD | digit_acc | fd_digits | train s | s/image |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for job, s in sorted(samples.items(), key=lambda kv: (kv[1]["resolution"], kv[1]["arm"], kv[1]["train_step"],
                                                          kv[1].get("train_seed", 0))):
        lines.append(f"| {job} | {s['resolution']} | {s.get('train_seed', 0)} | {s['fid']:.1f} | "
                     f"{1e3 * s['kid']:.1f} | {s['swd']:.1f} | {s['digit_acc']:.3f} | {s['fd_digits']:.1f} | "
                     f"{s['train_seconds_full_run']:.0f} | {s['sec_per_image']:.2f} |")
    groups: dict[tuple, list] = {}
    for s in samples.values():
        groups.setdefault((s["arm"], s["train_step"]), []).append(s)
    names = {"fid": "FID", "kid": "KID ×10³", "swd": "SWD", "digit_acc": "digit_acc", "fd_digits": "fd_digits"}
    lines.append("\n| arm@step | training seeds | " + " | ".join(names[c] for c in cols) + " (mean ± std) |\n|---|---|"
                 + "---|" * len(cols))
    for (arm, step), ss in sorted(groups.items()):
        if len(ss) > 1:
            cells = []
            for c in cols:
                v = np.array([x[c] for x in ss]) * (1e3 if c == "kid" else 1)
                cells.append(f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if c != "digit_acc" else
                             f"{v.mean():.3f} ± {v.std(ddof=1):.3f}")
            lines.append(f"| {arm}@{step} | {len(ss)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(key: str) -> str:
    """The job tables into the README (between its `table:study-jobs` markers); returns them."""
    from hiresrun.outputs import write_block

    text = table(key)
    write_block(HERE / "README.md", "study-jobs", text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", default="/tmp/simple")
    p.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS, help="arm@step[:training seed], in order")
    p.add_argument("--plot", action="store_true", help="only write the PNGs from results.json")
    p.add_argument("--table", action="store_true", help="only print the README's markdown tables")
    args = p.parse_args()
    key = f"study_{args.steps}steps_bs{args.batch_size}_n{args.n}"
    if args.plot or args.table:
        return plot(key) if args.plot else print(write_table(key))
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1", flush=True)
    out = Path(args.out) / key
    path = HERE / "results.json"
    for job in args.jobs:
        arm, rest = job.split("@")
        step, seed = (rest.split(":") + ["0"])[:2]
        done = json.loads(path.read_text()).get(key, {}).get("samples", {}) if path.is_file() else {}
        if job in done:
            print(f"{job}: done", flush=True)
            continue
        run = train(arm, int(seed), args, out)
        entry = sample(arm, int(step), int(seed), run, args, out)
        save(key, {job: entry}, args)
        print(job, json.dumps(entry), flush=True)
    plot(key)
    write_table(key)


if __name__ == "__main__":
    main()
