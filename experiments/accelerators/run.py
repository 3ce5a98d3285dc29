"""Training-free accelerators side by side: which setting is fastest at a required fidelity, per model.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/accelerators/run.py [--models pixel16 pixel32 tinysd16]
        [--seeds 1000-1063] [--n-fid 500] [--out /tmp/hiresrun-accelerators] [--tables]

For each model, one `hiresrun calibrate` with `calibrate.families` (the product's own search, hiresrun/tune.py):
every point of each family's knob grid on the calibration seeds against the 50-step DDIM outputs of the same seeds,
the settings taking turns batch by batch in one process (wall-clock measured side by side), cost per image in full
network evaluations (DeepCache's partial calls at their FLOP share), PSNR / SSIM / LPIPS-alex to the full-step
images. Families: fewer steps of DDIM, DPM-Solver++ and Euler (the peers' "fewer steps" arm, 50 steps included),
DeepCache alone (the peer), stepskip, AdaptiveDiffusion, the compositions adaptive-deepcache and
stepskip-deepcache, and on tinysd16 ToMe (tomesd's token merging: the pixel UNet2DModel has no transformer block to
merge in). Then, for the full run and each family's fastest setting meeting the target (PSNR >= 32 dB and
LPIPS <= 0.05), `hiresrun sample` with that setting's overrides on seeds 0..n-1 with `metrics=default` (FID/KID
against the held-out digits). Writes results.json, one plot per model (PSNR against wall speed-up, each family's
front) and the README tables between their markers. Every step is a printed `hiresrun` command; a folder that
already holds its front.json / metrics.json is reused (delete it to rerun).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hiresrun.outputs import write_block
from hiresrun.tune import pareto

HERE = Path(__file__).resolve().parent
HIRESRUN = str(Path(sys.executable).with_name("hiresrun"))
QUIET = ["trainer.enable_progress_bar=false", "logger=csv"]
MODELS = {"pixel16": ["data.resolution=16"],                    # tiny-mnist at its own 16 px
          "pixel32": ["data.resolution=32"],                    # tiny-mnist sampled directly at 32 px
          "tinysd16": ["experiment=tinysd/sample16"]}           # the latent text-to-image base, guidance 3
FAMILIES = ["steps", "steps:dpmsolver", "steps:euler", "deepcache", "stepskip", "adaptive", "adaptive-deepcache",
            "stepskip-deepcache"]
# Joint families (hiresrun/tune.py): every step count of a sampler with every setting of a reuse accelerator, as
# DeepCache's and AdaptiveDiffusion's papers combine fewer steps with their reuse.
JOINT = ["steps x deepcache", "steps x adaptive", "steps:dpmsolver x deepcache", "steps:dpmsolver x adaptive"]
EXTRA = {"tinysd16": ["tome"]}  # families only a UNet2DConditionModel serves (ToMe through tomesd)
PEERS = ("steps", "steps:dpmsolver", "steps:euler", "deepcache")  # what a user has without hiresrun
GRID = ["calibrate.grid.steps.num_steps=[50,30,20,15,10,8,6,5,4]", "calibrate.grid.adaptive.delta=[0.01,0.02,0.05,0.1]",
        "calibrate.grid.deepcache.interval=[2,3,4,6]", "calibrate.grid.stepskip.every=[2,3]",
        "calibrate.grid.adaptive-deepcache.adaptive.delta=[0.01,0.05,0.2]",
        "calibrate.grid.adaptive-deepcache.deepcache.interval=[2,3]",
        "calibrate.grid.stepskip-deepcache.stepskip.every=[2]",
        "calibrate.grid.stepskip-deepcache.deepcache.interval=[2,3]", "calibrate.grid.tome.ratio=[0.3,0.5,0.7]"]
PSNR, LPIPS = 32.0, 0.05                    # the issue's fidelity target
GOAL_PEER, GOAL_DDIM = 1.3, 3.0             # hiresrun's best vs the best peer, and vs 50-step DDIM (wall)
GOAL_JOINT = 1.3                            # the best joint setting vs the best single family (wall)
FID_COLUMNS = ("fid", "kid", "digit_acc", "prompt_acc", "nfe_per_image", "cost_per_image")


def families(model: str, chosen: list[str] | None = None) -> list[str]:
    return chosen or FAMILIES + EXTRA.get(model, []) + JOINT


def joint(family: str) -> bool:
    return " x " in family


def hiresrun(*args: str) -> None:
    print("$ hiresrun", " ".join(args), flush=True)
    subprocess.run([HIRESRUN, *args], check=True)


def same_run(run_dir: Path, command: list[str]) -> bool:
    """A finished run folder made by this very command (Hydra's overrides.yaml; `+group=` is recorded plain)."""
    record = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "metrics.json").is_file() or not record.is_file():
        return False
    from omegaconf import OmegaConf

    done = [str(o) for o in OmegaConf.load(record) if not str(o).startswith("task=")]
    return done == [c.lstrip("+") for c in command]


def ok(p: dict) -> bool:
    return p["psnr_to_ref"] >= PSNR and p["lpips_to_ref"] <= LPIPS


# "Fastest" is the cost speed-up (full network evaluations per image, DeepCache's partial calls at their FLOP share):
# it does not move with the machine's load. The wall-clock speed-up is reported beside it.
KEY = "speedup_cost"


def best_per_family(points: list[dict]) -> dict[str, dict]:
    """Each family's fastest setting (KEY) that meets the target."""
    out = {}
    for p in points:
        if ok(p) and (p["family"] not in out or p[KEY] > out[p["family"]][KEY]):
            out[p["family"]] = p
    return out


def summarize(points: list[dict]) -> tuple[dict, dict | None]:
    """(each family's best, the goals' ratios): hiresrun's best vs the best peer and vs 50-step DDIM, the best joint
    setting vs the best single family."""
    best = best_per_family(points)
    top = lambda keep: max((p for f, p in best.items() if keep(f)), key=lambda p: p[KEY], default=None)
    ours, peer = top(lambda f: f not in PEERS), top(lambda f: f in PEERS)
    if not (ours and peer):
        return best, None
    goal = {"hiresrun": ours["family"], "peer": peer["family"], "vs_peer": ours[KEY] / peer[KEY],
            "vs_ddim50": ours[KEY], "measure": KEY}
    joint_best, single_best = top(joint), top(lambda f: not joint(f))
    if joint_best and single_best:
        goal.update(joint=joint_best["family"], single=single_best["family"],
                    joint_vs_single=joint_best[KEY] / single_best[KEY])
    return best, goal


def study(name: str, args, out: Path, previous: dict | None = None) -> dict:
    """One model's front, then FID for each family's fastest setting meeting the target. An arm whose exact command
    (family and overrides) `previous` (results.json's entry, same FID protocol) already scored is not sampled again:
    CPU sampling is deterministic per seed, so its numbers are the ones a rerun would give."""
    model = MODELS[name]
    protocol = fid_protocol(args)
    known = (previous or {}).get("fid", {}) if (previous or {}).get("protocol", {}).get("fid") == protocol else {}
    folder = out / name
    front_dir = folder / "front"
    if not (front_dir / "front.json").is_file():
        hiresrun("calibrate", *model, *QUIET, "sampler=ddim", "sampler.num_steps=50", f"target.psnr={PSNR}",
                 f"calibrate.families=[{','.join(families(name, args.families))}]", *grid(args),
                 f"calibrate.seeds={args.seeds}",
                 f"sample.batch_size={args.batch}", f"hydra.run.dir={front_dir}")
    front = json.loads((front_dir / "front.json").read_text())
    points = front["points"]
    best = best_per_family(points)
    fid = {}
    arms = {"DDIM 50 (full)": ["sampler=ddim", "sampler.num_steps=50"]}
    arms.update({f"{fam}: {' '.join(p['overrides'])}": p["overrides"] for fam, p in best.items()})
    for arm, overrides in arms.items():
        if arm in known and not args.no_reuse:
            print(f"reused from results.json: {arm}", flush=True)
            fid[arm] = known[arm]
            continue
        name = arm.split(": ")[0]  # the family (steps:dpmsolver keeps its sampler) or the full run
        run_dir = folder / "fid" / name.replace(" ", "_").replace("(", "").replace(")", "").replace(":", "_")
        base = [] if overrides[0].startswith("sampler") else ["sampler=ddim", "sampler.num_steps=50"]
        command = [*model, *QUIET, *base, *overrides, "metrics=default", "metrics.patch_fid=false",
                   f"sample.num_samples={args.n_fid}", "sample.save_images=false"]
        if args.fronts_only and not same_run(run_dir, command):  # FID only where results.json or a folder has it
            print(f"not scored (--fronts-only): {arm}", flush=True)
            continue
        if not same_run(run_dir, command):
            if run_dir.exists():  # another setting of this family ran here before: keep it aside
                run_dir.rename(run_dir.with_name(f"{run_dir.name}-old-{len(list(run_dir.parent.glob('*-old-*')))}"))
            hiresrun("sample", *command, f"hydra.run.dir={run_dir}")
        m = json.loads((run_dir / "metrics.json").read_text())
        fid[arm] = {k: m[k] for k in FID_COLUMNS if k in m}
    goal = summarize(points)[1]
    return {"front": str(front_dir / "front.json"), "full": front["full"], "hardware": front["hardware"],
            "seeds": front["seeds"], "points": points, "best": best, "fid": fid, "goal": goal,
            "wall_front": [points[i] for i in pareto([{**p, "cost_per_image": 1 / p["speedup_wall"]} for p in points],
                                                     "psnr_to_ref", True)]}


def grid(args) -> list[str]:
    """GRID, with --steps replacing the step counts of every steps family (joint ones included)."""
    if not args.steps:
        return GRID
    return [f"calibrate.grid.steps.num_steps=[{','.join(map(str, args.steps))}]" if g.startswith(
        "calibrate.grid.steps.") else g for g in GRID]


def fid_protocol(args) -> str:
    return (f"n = {args.n_fid}, seeds 0..{args.n_fid - 1}, Inception pool3, clean resize, vs the 1,000 held-out digits "
            f"at the model's size")


def plot(name: str, r: dict, path: Path) -> None:
    """PSNR to the full run against wall speed-up, each family's own front (its points no other of its points
    beats on both), the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.8), dpi=100)
    for fam in r["protocol"].get("families", families(name)):
        ps = [p for p in r["points"] if p["family"] == fam]
        keep = pareto(ps, "psnr_to_ref", True)
        line = sorted((ps[i] for i in keep), key=lambda p: p[KEY])
        style = "--" if fam in PEERS else ":" if joint(fam) else "-"
        ax.plot([p[KEY] for p in line], [p["psnr_to_ref"] for p in line], "o" + style, label=fam,
                markersize=4)
    ax.axhline(PSNR, color="0.75")
    ax.set_ylim(top=50)  # above: identical images at PSNR's finite cap (the 50-step runs themselves)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up in network evaluations over 50-step DDIM (DeepCache's partial calls at their FLOP share)")
    ax.set_ylabel("PSNR to the 50-step DDIM images (dB)")
    ax.set_title(f"{name}: each family's front, seeds {r['seeds']}, {r['hardware']}", fontsize=9)
    ax.legend(fontsize=6, title="dashed: peers; dotted: joint", title_fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def num(value, digits: int) -> str:
    return "not scored" if value is None else f"{value:.{digits}f}"


def table(name: str, r: dict) -> str:
    lines = [f"**{name}** (front on seeds {r['seeds']}, {r['hardware']}; FID/KID: {r['protocol']['fid']})", "",
             "| family | fastest setting meeting the target (cost) | cost speed-up | wall speed-up | PSNR | LPIPS | "
             "FID | KID |", "|---|---|---|---|---|---|---|---|"]
    full = r["fid"].get("DDIM 50 (full)", {})
    lines.append(f"| DDIM 50 (full) | `sampler=ddim sampler.num_steps=50` | 1.00 | 1.00 | - | - | "
                 f"{full.get('fid', float('nan')):.2f} | {full.get('kid', float('nan')):.4f} |")
    for fam in r["protocol"].get("families", FAMILIES):
        p = r["best"].get(fam)
        if p is None:
            lines.append(f"| {fam} | none meets it | | | | | | |")
            continue
        f = next((v for k, v in r["fid"].items() if k.startswith(f"{fam}: ")), {"fid": None, "kid": None})
        lines.append(f"| {fam}{' (peer)' if fam in PEERS else ''} | `{' '.join(p['overrides'])}` | "
                     f"{p['speedup_cost']:.2f} | {p['speedup_wall']:.2f} | {p['psnr_to_ref']:.1f} | "
                     f"{p['lpips_to_ref']:.3f} | {num(f.get('fid'), 2)} | {num(f.get('kid'), 4)} |")
    g = r["goal"]
    if g:
        lines += ["", f"In network evaluations (the cost speed-up), best hiresrun setting ({g['hiresrun']}) vs the "
                      f"best peer ({g['peer']}): "
                      f"**{g['vs_peer']:.2f}x** (goal {GOAL_PEER}x); vs 50-step DDIM: **{g['vs_ddim50']:.2f}x** "
                      f"(goal {GOAL_DDIM}x)."]
        if "joint" in g:
            lines += ["", f"Best joint setting ({g['joint']}) vs the best single family ({g['single']}): "
                          f"**{g['joint_vs_single']:.2f}x** (goal {GOAL_JOINT}x)."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", default="1000-1031", help="calibration seeds of the fronts (disjoint from 0..n-1)")
    p.add_argument("--batch", type=int, default=16, help="images per batch; settings take turns batch by batch")
    p.add_argument("--n-fid", type=int, default=500, help="images per FID arm (seeds 0..n-1)")
    p.add_argument("--out", default="/tmp/hiresrun-accelerators")
    p.add_argument("--tables", action="store_true", help="only rewrite README tables and plots from results.json")
    p.add_argument("--no-reuse", action="store_true", help="sample every FID arm, even one results.json has scored")
    p.add_argument("--fronts-only", action="store_true", help="score no new FID arm (the fronts and the reused arms)")
    p.add_argument("--families", nargs="+", help="the families of the front (default: all, joint ones included)")
    p.add_argument("--steps", type=int, nargs="+", help="the step counts of the steps families (default: GRID's)")
    p.add_argument("--results", type=Path, default=None, help="the results file (default: results.json here)")
    args = p.parse_args()
    path = args.results or HERE / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if not args.tables:
        for name in args.models:
            results[name] = study(name, args, Path(args.out), results.get(name))
            results[name]["protocol"] = {
                "reference": "50-step DDIM of the same seeds", "target": {"psnr": PSNR, "lpips": LPIPS},
                "fid": fid_protocol(args), "families": families(name, args.families), "grid": grid(args)}
            path.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results.items():
        r["best"], r["goal"] = summarize(r["points"])  # the current criterion, also for results written before it
        plot(name, r, HERE / f"front_{name}.png")
        write_block(HERE / "README.md", name, table(name, r))
        print(table(name, r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
