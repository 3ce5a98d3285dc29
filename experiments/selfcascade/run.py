"""Self-Cascade on the embedded model, 16 -> 32: one table of every arm under one protocol.

    python experiments/selfcascade/run.py [--n 500] [--steps 500] [--out /tmp/selfcascade]

Trains the tuned arms (Self-Cascade `light` and `resblock` upsamplers for N steps, `finetune` of all weights
for N and 5N steps), samples every arm on seeds 0..n-1 with `metrics=default`, and writes
experiments/selfcascade/results.json and the results table of its README (rewritten in place).
Every run is a plain `hiresrun` command, printed before it runs; run folders go under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hiresrun.outputs import side_by_side, write_block

HERE = Path(__file__).resolve().parent
HIRESRUN = str(Path(sys.executable).with_name("hiresrun"))
# the protocol is the presets conf/experiment/selfcascade/{sample32,train32}.yaml; the arms add their knobs
SAMPLE, TRAIN = "experiment=selfcascade/sample32", "experiment=selfcascade/train32"
QUIET = ["trainer.enable_progress_bar=false"]
COLUMNS = ("fid", "fid_floor", "kid", "digit_acc", "fd_digits", "swd", "nfe_per_image", "sec_per_image")


def hiresrun(*args: str) -> None:
    print("$ hiresrun", " ".join(args), flush=True)
    subprocess.run([HIRESRUN, *args], check=True)


def arms(n_steps: int) -> list[dict]:
    """(name, training overrides or None, sampling overrides)."""
    tuned = ["+method=selfcascade", "optimizer.lr=1e-3"]
    rows = [dict(name="none", sample=["+method=none"]),
            dict(name="upsample (bicubic)", sample=["+method=upsample"])]
    rows += [dict(name=f"tuning-free, strength {s}", sample=["+method=selfcascade", "method.mode=tuning_free",
                                                               f"method.strength={s}"])
             for s in (0.1, 0.3, 0.5, 0.7)]
    rows += [dict(name=f"tuned {u}, {n_steps} steps", train=[*tuned, f"method.upsampler={u}"],
                  sample=["+method=selfcascade", f"method.upsampler={u}"]) for u in ("light", "resblock")]
    # the tuned upsamplers sampled at a lower strength: a sweep of the method's own knob, same checkpoints
    rows += [dict(name=f"tuned {u}, {n_steps} steps, strength 0.3", reuse=f"tuned {u}, {n_steps} steps",
                  sample=["+method=selfcascade", f"method.upsampler={u}", "method.strength=0.3"])
             for u in ("light", "resblock")]
    rows += [dict(name=f"finetune (all weights), {k * n_steps} steps",
                  train=["+method=finetune", f"trainer.max_steps={k * n_steps}"], sample=["+method=finetune"])
             for k in (1, 5)]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="samples per arm (seeds 0..n-1)")
    p.add_argument("--steps", type=int, default=300, help="N: training steps of the tuned arms")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="/tmp/selfcascade")
    p.add_argument("--only", nargs="*", help="arm names (prefix match) to (re)run; by default arms whose run folder "
                   "already holds metrics.json are read back, the rest run")
    args = p.parse_args()
    out = Path(args.out)
    results = []
    for arm in arms(args.steps):
        run, train = out / slug(arm['name']), out / f"{slug(arm.get('reuse', arm['name']))}-train"
        todo = any(arm["name"].startswith(o) for o in args.only) if args.only else not (run / "metrics.json").exists()
        ckpt = [f"ckpt_path={train}"] if "reuse" in arm else []
        if "train" in arm:
            steps = [o for o in arm["train"] if o.startswith("trainer.max_steps=")] or \
                [f"trainer.max_steps={args.steps}"]
            if todo and (args.only or not (train / "metrics.json").exists()):
                hiresrun("train", TRAIN, *arm["train"], *steps, *QUIET, f"data.batch_size={args.batch_size}",
                         f"train.checkpoint_every={args.steps}", f"hydra.run.dir={train}")
            ckpt = [f"ckpt_path={train}"]
        if todo:
            hiresrun("sample", SAMPLE, *arm["sample"], *ckpt, *QUIET, f"sample.num_samples={args.n}",
                     f"hydra.run.dir={run}")
        if not (run / "metrics.json").exists():
            print(f"missing: {arm['name']} ({run})")
            continue
        m = json.loads((run / "metrics.json").read_text())
        t = json.loads((train / "metrics.json").read_text()) if ckpt else {}
        results.append({"arm": arm["name"], **{k: m.get(k) for k in COLUMNS},
                        "trainable_params": t.get("trainable_params", 0), "train_seconds": t.get("train_seconds", 0),
                        "sample_command": "hiresrun sample " + " ".join([SAMPLE, *arm["sample"], *ckpt]),
                        "protocol": m["protocol"]})
    (HERE / "results.json").write_text(json.dumps({"n": args.n, "train_steps": args.steps, "date": time.strftime(
        "%Y-%m-%d"), "rows": results}, indent=2) + "\n")
    write_block(HERE / "README.md", "results", table(results))
    print(table(results))
    shown = ["none", "upsample (bicubic)", "tuning-free, strength 0.1", f"tuned resblock, {args.steps} steps",
             f"finetune (all weights), {5 * args.steps} steps"]
    grids = [(name.split(",")[0].split(" (")[0] + ("" if "," not in name else "," + name.split(",")[1]),
              out / slug(name) / "grid.png") for name in shown]
    if all(p.exists() for _, p in grids):
        side_by_side(grids, HERE / "grids.png")  # seeds 0..63 of each arm
    return 0


def slug(name: str) -> str:
    return name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")


def table(rows: list[dict]) -> str:
    lines = ["| arm | FID ↓ | KID ×10³ ↓ | digit_acc ↑ | FD digits ↓ | SWD ↓ | NFE/img | s/img | trainable | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['fid']:.2f} | {1e3 * r['kid']:.1f} | {r['digit_acc']:.3f} | "
                     f"{r['fd_digits']:.1f} | {r['swd']:.1f} | {r['nfe_per_image']:.0f} | {r['sec_per_image']:.3f} | "
                     f"{r['trainable_params']:,} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
