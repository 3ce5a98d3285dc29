"""PaGoDA on the embedded model: a one-step generator grown 16 -> 32 (-> 64), beside the multi-step methods.

    OMP_NUM_THREADS=1 python experiments/pagoda/run.py [--n 500] [--base-steps 3000] [--grow-steps 2000]
    OMP_NUM_THREADS=1 python experiments/pagoda/run.py --sweep       # the g_output x g_lr choice (PG-0)

Encodes the 4,000 training digits once (78 NFE each, cached), trains G at 16 px (L_rec + adaptive hinge GAN), grows it
to 32 px with and without the GAN term (the ablation), grows the adversarial one on to 64 px, samples every stage on
seeds 0..n-1 with `metrics=default`, times 50-step DDIM `none` and tuning-free `selfcascade` at 32 px under the
same load, and measures the consistency ||avgpool2(G_32(z)) - G_16(z)|| from the saved samples (same seed, same
z). Writes experiments/pagoda/results.json and grids.png and rewrites the tables in its README. Every run
is a plain `hiresrun` command, printed before it runs; run folders go under --out; an arm whose folder already
has its metrics.json is reused (delete the folder to rerun it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hiresrun.outputs import load_images, side_by_side, write_block

HERE = Path(__file__).resolve().parent
HIRESRUN = str(Path(sys.executable).with_name("hiresrun"))
QUIET = ["trainer.enable_progress_bar=false"]
# the protocol of each stage is a preset: conf/experiment/pagoda/{encode,train16,train32,train64,sample16,...}.yaml
COLUMNS = ("fid", "fid_floor", "kid", "swd", "digit_acc", "fd_digits", "nfe_per_image", "sec_per_image")


def hiresrun(*args: str) -> None:
    print("$ hiresrun", " ".join(args), flush=True)
    subprocess.run([HIRESRUN, *args], check=True)


def arms(base_steps: int, grow_steps: int, grow64_steps: int) -> list[dict]:
    """name, resolution (the presets train<res>/sample<res>), the knobs the study adds, steps, previous arm (grow).
    Both 32 px arms grow from the same G16, so the L_rec-only ablation differs from G32 only in the grow loss."""
    return [
        dict(name="G16", res=16, method=[], steps=base_steps),
        dict(name="G32", res=32, method=[], steps=grow_steps, previous="G16"),
        dict(name="G32 L_rec only", res=32, method=["method.adv_weight=0"], steps=grow_steps, previous="G16"),
        dict(name="G64", res=64, method=[], steps=grow64_steps, previous="G32"),
    ]


def sweep_arms(steps: int) -> list[dict]:
    """The generator's output parametrisation x its learning rate, at stage base (16 px), equal steps."""
    return [dict(name=f"g_output={g}, g_lr={lr}", res=16, steps=steps, method=[f"method.g_output={g}",
                                                                                f"method.g_lr={lr}"])
            for g, lr in (("x0", "1e-4"), ("raw", "1e-4"), ("x0", "8e-6"), ("raw", "8e-6"))]


def folder(out: Path, name: str) -> Path:
    return out / name.replace(" ", "_").replace(",", "").replace("=", "-")


def run_arm(arm: dict, out: Path, done: dict, n: int, batch_size: int) -> dict:
    """Train (unless its last.ckpt exists) and sample one arm; return its metrics.json."""
    tr, sa = folder(out, arm["name"]) / "train", folder(out, arm["name"]) / "sample"
    previous = [f"method.previous={done[arm['previous']]}"] if arm.get("previous") else []
    if not (tr / "checkpoints" / "last.ckpt").is_file():
        hiresrun("train", f"experiment=pagoda/train{arm['res']}", *arm["method"], *previous, *QUIET,
                 f"trainer.max_steps={arm['steps']}", f"train.checkpoint_every={arm['steps']}",
                 f"data.batch_size={batch_size}", f"hydra.run.dir={tr}")
    done[arm["name"]] = str(tr)
    if not (sa / "metrics.json").is_file():
        hiresrun("sample", f"experiment=pagoda/sample{arm['res']}", *arm["method"], *previous, f"ckpt_path={tr}",
                 *QUIET, f"sample.num_samples={n}", f"hydra.run.dir={sa}")
    m = json.loads((sa / "metrics.json").read_text())
    train = json.loads((tr / "metrics.json").read_text())
    return {"presets": [f"pagoda/train{arm['res']}", f"pagoda/sample{arm['res']}"], "overrides": arm["method"],
            "train_steps": arm["steps"], "train_seconds": train.get("train_seconds"),
            "trainable_params": train.get("trainable_params"), "run": str(sa),
            **{k: m[k] for k in COLUMNS if k in m}}


def multistep_timing(out: Path, n: int) -> dict:
    """sec_per_image of 50-step DDIM at 32 px (`none`, tuning-free `selfcascade`) under this run's load."""
    rows = {}
    for name, method in (("none, DDIM 50", ["+method=none"]),
                         ("selfcascade tuning-free, DDIM 50", ["+method=selfcascade", "method.mode=tuning_free"])):
        sa = folder(out, "timing " + name)
        if not (sa / "metrics.json").is_file():
            hiresrun("sample", *method, "data.resolution=32", "sampler=ddim", "sampler.num_steps=50", *QUIET,
                     "logger=csv", "metrics=none", f"sample.seeds=0-{n - 1}", "sample.save_images=false",
                     f"hydra.run.dir={sa}")
        m = json.loads((sa / "metrics.json").read_text())
        rows[name] = {k: m[k] for k in ("nfe_per_image", "sec_per_image", "num_samples")}
    return rows


def consistency(small: Path, large: Path) -> dict:
    """RMSE and PSNR (images in [0, 1]) between avgpool2(G_2r(z)) and G_r(z), over the seeds both runs saved."""
    a = load_images(small / "samples").float() / 255
    b = F.avg_pool2d(load_images(large / "samples").float() / 255, 2)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return {"rmse": round(mse.mean().sqrt().item(), 4), "psnr_db": round((-10 * torch.log10(mse)).mean().item(), 2),
            "n": len(a)}


def same_size(grids: list[tuple[str, Path]], folder: Path) -> list[tuple[str, Path]]:
    """Each stage's grid.png scaled (nearest) to the largest one's size, so the figure compares like with like."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = [(name, Image.open(p)) for name, p in grids]
    size = max(im.size for _, im in images)
    for i, (_, im) in enumerate(images):
        im.resize(size, Image.NEAREST).save(folder / f"{i}.png")
    return [(name, folder / f"{i}.png") for i, (name, _) in enumerate(images)]


def table(rows: dict) -> str:
    head = "| arm | steps | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, r in rows.items():
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in COLUMNS]
        lines.append(f"| {name} | {r.get('train_steps', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_and_consistency(main: dict) -> str:
    """The second README table: seconds per image against 50-step DDIM, and the cross-resolution consistency."""
    lines = ["| measure | value |", "|---|---|"]
    g32 = main["arms"]["G32"]
    for name, t in main["multistep_timing"].items():
        lines.append(f"| s/image {name} (n = {t['num_samples']}) vs G32 (1 NFE) | {t['sec_per_image']:.4f} vs "
                     f"{g32['sec_per_image']:.4f}: **{main['speedup_vs_50_step'][name]}x** |")
    for name, c in main["consistency"].items():
        lines.append(f"| consistency {name}: RMSE / PSNR of avgpool2(large) vs small (n = {c['n']}) | "
                     f"{c['rmse']} / {c['psnr_db']} dB |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="samples per arm (seeds 0..n-1)")
    p.add_argument("--n-timing", type=int, default=64, help="images of the 50-step timing runs")
    p.add_argument("--base-steps", type=int, default=3000, help="stage=base steps (G and D steps both count)")
    p.add_argument("--grow-steps", type=int, default=1500, help="steps of each 16 -> 32 grow stage")
    p.add_argument("--grow64-steps", type=int, default=1000, help="steps of the 32 -> 64 grow stage")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sweep", action="store_true", help="run the g_output x g_lr sweep at stage base instead")
    p.add_argument("--sweep-steps", type=int, default=600)
    p.add_argument("--out", default="/tmp/pagoda")
    args = p.parse_args()
    out = Path(args.out)
    hiresrun("train", "experiment=pagoda/encode", *QUIET, f"hydra.run.dir={out / 'encode'}")
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    done: dict[str, str] = {}
    protocol = {"base": "tiny-mnist (16 px)", "data": "mnist (embedded), 4,000 training digits encoded once",
                "encoder": "Heun, 40 Karras points, sigma_max 80 (78 NFE per image)", "n": args.n,
                "seeds": f"0-{args.n - 1}", "metrics": "default, patch_fid off (Inception pool3, clean resize; "
                "1,000 held-out digits resized to the arm's resolution)", "batch_size": args.batch_size,
                "hardware": "2-core CPU shared with other jobs (wall seconds are noisy)"}
    if args.sweep:
        rows = {a["name"]: run_arm(a, out / "sweep", done, args.n, args.batch_size)
                for a in sweep_arms(args.sweep_steps)}
        results["sweep"] = {"arms": rows, "protocol": {**protocol, "stage": "base (16 px)"}}
        write_block(HERE / "README.md", "sweep", table(rows))
        print(table(rows))
    else:
        rows = {a["name"]: run_arm(a, out, done, args.n, args.batch_size)
                for a in arms(args.base_steps, args.grow_steps, args.grow64_steps)}
        timing = multistep_timing(out, args.n_timing)
        g32 = rows["G32"]["sec_per_image"]
        results["main"] = {
            "arms": rows, "multistep_timing": timing,
            "speedup_vs_50_step": {k: round(v["sec_per_image"] / g32, 1) for k, v in timing.items()},
            "consistency": {"G32 vs G16": consistency(Path(rows["G16"]["run"]), Path(rows["G32"]["run"])),
                            "G32 L_rec only vs G16": consistency(Path(rows["G16"]["run"]),
                                                                 Path(rows["G32 L_rec only"]["run"])),
                            "G64 vs G32": consistency(Path(rows["G32"]["run"]), Path(rows["G64"]["run"]))},
            "protocol": protocol}
        side_by_side(same_size([(name, Path(r["run"]) / "grid.png") for name, r in rows.items()], out / "figure"),
                     HERE / "grids.png")
        write_block(HERE / "README.md", "main", table(rows))
        write_block(HERE / "README.md", "speed", speed_and_consistency(results["main"]))
        print(table(rows))
        print(speed_and_consistency(results["main"]))
    path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
