"""Studies on the embedded latent text-to-image base `model=tiny-sd-mnist` (what only a text model with a VAE can
measure). This file runs the first, classifier-free guidance at the base size:

    OMP_NUM_THREADS=1 python experiments/tinysd/run.py guidance [--n 500]

Each arm is one `hiresrun sample model=tiny-sd-mnist` (printed before it runs): seeds 0..n-1, the model's own digit
prompts (image i asks for digit i mod 10, assets/prompts/digits.txt), DDIM 50, 16 px, `metrics=default` against the
1,000 held-out MNIST digits at 16 px (Inception pool3 with clean-fid's resize; the shipped digit classifier for
prompt_acc, digit_acc and fd_digits). An arm whose folder has its metrics.json is reused (delete it to rerun).
Writes experiments/tinysd/results.json, the README's table and guidance.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hiresrun.outputs import write_block

HERE = Path(__file__).resolve().parent
HIRESRUN = str(Path(sys.executable).with_name("hiresrun"))
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
SCALES = (1.0, 1.5, 2.0, 3.0, 5.0, 7.5)
COLUMNS = ("prompt_acc", "digit_acc", "fid", "kid", "fd_digits", "nfe_per_image", "unet_passes_per_image",
           "sec_per_image")


def hiresrun(*args: str) -> None:
    print("$ hiresrun", " ".join(args), flush=True)
    subprocess.run([HIRESRUN, *args], check=True)


def table(results: dict, n: int) -> str:
    head = "| guidance scale | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    fmt = lambda c, v: "—" if v is None else f"{v:.0f}" if c.endswith("per_image") and c != "sec_per_image" else (
        f"{v:.4f}" if c == "sec_per_image" else f"{v:.3f}")
    rows = [f"| {w} | " + " | ".join(fmt(c, m.get(c)) for c in COLUMNS) + " |" for w, m in results.items()]
    return head + "\n".join(rows) + (f"\n\nn = {n} per arm (seeds 0-{n - 1}, digit i mod 10), 16 px, DDIM 50, "
                                     f"2-core CPU; FID floor (real vs real at this n) is in results.json.")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [float(k) for k in results]
    fig, left = plt.subplots(figsize=(5, 3.2), dpi=120)
    left.plot(w, [m["prompt_acc"] for m in results.values()], "o-", color="tab:blue", label="prompt_acc")
    left.set_xlabel("guidance scale")
    left.set_ylabel("prompt_acc", color="tab:blue")
    right = left.twinx()
    right.plot(w, [m["fid"] for m in results.values()], "s--", color="tab:red", label="FID")
    right.set_ylabel("FID (16 px, n = 500)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path)


def guidance(args) -> None:
    out = Path(args.out) / "guidance"
    results, floors = {}, {}
    for w in SCALES:
        folder = out / f"w{w:g}"
        if not (folder / "metrics.json").is_file():
            hiresrun("sample", "model=tiny-sd-mnist", "data.resolution=16", f"sample.num_samples={args.n}",
                     f"sample.guidance_scale={w}", "sampler.num_steps=50", "metrics=default",
                     "metrics.patch_fid=false", f"hydra.run.dir={folder}", *QUIET)
        m = json.loads((folder / "metrics.json").read_text())
        results[f"{w:g}"] = {k: m.get(k) for k in COLUMNS}
        floors[f"{w:g}"] = m.get("fid_floor")
    record = {"n": args.n, "arms": results, "fid_floor": floors,
              "protocol": "model=tiny-sd-mnist, seeds 0..n-1, prompt i mod 50 of assets/prompts/digits.txt (digit "
                          "i mod 10), DDIM 50, 16 px; FID/KID Inception pool3 (clean resize) vs the 1,000 held-out "
                          "MNIST digits at 16 px; prompt_acc = the shipped digit classifier's top-1 equals the "
                          "prompt's digit; 2-core CPU"}
    path = HERE / "results.json"
    every = json.loads(path.read_text()) if path.is_file() else {}
    every["guidance"] = record
    path.write_text(json.dumps(every, indent=2, sort_keys=True) + "\n")
    write_block(HERE / "README.md", "guidance", table(results, args.n))
    plot(results, HERE / "guidance.png")
    print(table(results, args.n))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("study", choices=["guidance"])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default="runs/tinysd")
    args = p.parse_args()
    guidance(args)


if __name__ == "__main__":
    main()
