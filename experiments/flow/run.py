"""Studies on the embedded flow-matching base `model=tiny-flux-mnist` (a FLUX.1-shaped pipeline at 16 px):

    OMP_NUM_THREADS=1 python experiments/flow/run.py guidance [--n 500]   # true CFG scale at the base size
    OMP_NUM_THREADS=1 python experiments/flow/run.py highres  [--n 500]   # 16 -> 32 px: positions, methods
    OMP_NUM_THREADS=1 python experiments/flow/run.py caches   [--n-fid 500]  # caches vs fewer steps (calibrate)

Each arm is one `hiresrun` command (printed before it runs) on a preset of conf/experiment/flow/, which holds the
protocol: seeds 0..n-1 with the model's digit prompts (image i asks for digit i mod 10), flow-matching Euler with 28
steps, true CFG 3 against the empty prompt (after the guidance study), metrics=default against the 1,000 held-out
MNIST digits at the sampled size (Inception pool3 with clean-fid's resize; the shipped digit classifier for
prompt_acc). The arm helpers are experiments/tinysd/run.py's (an arm whose folder holds its metrics.json is reused).
Writes experiments/flow/results.json and the README's tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tinysd_run", HERE.parent / "tinysd" / "run.py")
tinysd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tinysd)
arm, markdown, NotRun = tinysd.arm, tinysd.markdown, tinysd.NotRun

SCALES = (1.0, 1.5, 2.0, 3.0, 5.0)
COLUMNS = ("fid", "kid", "prompt_acc", "digit_acc", "nfe_per_image", "unet_passes_per_image", "sec_per_image")
HEAD = ["arm", "FID ↓", "KID ↓", "prompt_acc ↑", "digit_acc ↑", "NFE/img", "passes/img", "s/img"]


def save(study: str, record: dict, text: str) -> None:
    tinysd.DEST["dir"] = HERE
    tinysd.save(study, record, text)


def rows_of(arms: list[tuple[str, Path, list[str]]], verb: str = "sample") -> tuple[list, list]:
    rows, record = [], []
    for name, folder, overrides in arms:
        try:
            m = arm(folder, verb, *overrides)
        except NotRun:
            rows.append([name, "not run yet", *[None] * (len(COLUMNS) - 1)])
            continue
        rows.append([name, *(m.get(c) for c in COLUMNS)])
        record.append({"arm": name, **{c: m.get(c) for c in COLUMNS}, "fid_floor": m.get("fid_floor")})
    return rows, record


def guidance(args) -> None:
    out = Path(args.out) / "guidance"
    arms = [(f"true CFG {w:g}", out / f"w{w:g}", ["experiment=flow/guidance", f"sample.num_samples={args.n}",
                                                   f"sample.true_cfg_scale={w}"]) for w in SCALES]
    rows, record = rows_of(arms)
    proto = (f"n = {args.n} per arm (seeds 0-{args.n - 1}, digit i mod 10), 16 px, flow-matching Euler 28 steps, "
             "true CFG against the empty prompt, sampling batch 32; FID/KID Inception pool3 (clean resize) vs the "
             "1,000 held-out MNIST digits at 16 px; prompt_acc by the shipped digit classifier; 2-core CPU.")
    save("guidance", {"n": args.n, "arms": record, "protocol": proto}, markdown(HEAD, rows) + "\n\n" + proto)


def highres(args) -> None:
    out = Path(args.out) / "highres"
    s32 = ["experiment=flow/sample32", f"sample.num_samples={args.n}"]
    arms = [("none, positions extrapolate (32 px directly)", out / "none", [*s32, "+method=none"]),
            ("none, positions interpolate", out / "interpolate", [*s32, "+method=none", "model.positions=interpolate"]),
            ("none, positions ntk", out / "ntk", [*s32, "+method=none", "model.positions=ntk"]),
            ("none, resolution shift (simple diffusion's schedule shift)", out / "shift",
             [*s32, "+method=none", "model.resolution_shift=true"]),
            ("upsample (16 px, bicubic in latent space)", out / "upsample", [*s32, "+method=upsample"])]
    arms += [(f"Self-Cascade tuning-free, strength {s}", out / f"selfcascade-{s}",
              [*s32, "+method=selfcascade", "method.mode=tuning_free", f"method.strength={s}"])
             for s in (0.3, 0.5, 0.7)]
    rows, record = rows_of(arms)
    try:  # the trained arm: finetune at 32 px with the rectified-flow loss
        train = arm(out / "finetune-train", "train", "experiment=flow/train32", "+method=finetune",
                    f"trainer.max_steps={args.steps}", f"train.checkpoint_every={args.steps}",
                    "trainer.enable_progress_bar=false")
        m = arm(out / "finetune", "sample", *s32, "+method=finetune", f"ckpt_path={out / 'finetune-train'}")
        name = f"finetune (all weights), {args.steps} steps"
        rows.append([name, *(m.get(c) for c in COLUMNS)])
        record.append({"arm": name, **{c: m.get(c) for c in COLUMNS}, "fid_floor": m.get("fid_floor"),
                       "train_seconds": train.get("train_seconds")})
    except NotRun:
        rows.append([f"finetune, {args.steps} steps", "not run yet", *[None] * (len(COLUMNS) - 1)])
    proto = (f"n = {args.n} per arm (seeds 0-{args.n - 1}, digit i mod 10), 32 px (16x16x4 latents, 64 packed tokens; "
             "the native 16 px has 16), flow-matching Euler 28 steps with FLUX's resolution-dependent shift, true CFG "
             "3 against the empty prompt, sampling batch 10; finetune trained at 32 px, batch 32, AdamW 1e-3; FID/KID "
             "Inception pool3 (clean resize) vs the 1,000 held-out MNIST digits at 32 px; 2-core CPU.")
    save("highres", {"n": args.n, "train_steps": args.steps, "arms": record, "protocol": proto},
         markdown(HEAD, rows) + "\n\n" + proto)


FAMILIES = ["steps", "steps:flow_dpmsolver", "stepskip", "adaptive", "cache"]
GRID = ["calibrate.grid.steps.num_steps=[28,20,14,10,8,6,4]", "calibrate.grid.stepskip.every=[2,3]",
        "calibrate.grid.adaptive.delta=[0.005,0.01,0.02,0.05,0.1]",
        "calibrate.grid.cache.threshold=[0.02,0.05,0.1,0.2]"]
PSNR, LPIPS = 32.0, 0.05


def caches(args) -> None:
    """`hiresrun calibrate` with calibrate.families on tiny-flux-mnist at 16 px: each family's grid against the 28-step
    Euler outputs of the calibration seeds; then the fastest setting of each family meeting PSNR >= 32 dB and
    LPIPS <= 0.05 sampled on seeds 0..n-1 with metrics (FID, prompt_acc)."""
    out = Path(args.out) / "caches"
    base = ["experiment=flow/sample16", "sample.batch_size=8"]
    folder = out / "calibrate"
    if not (folder / "front.json").is_file():
        tinysd.hiresrun("calibrate", *base, "metrics=none", f"calibrate.seeds={args.seeds}",
                        f"calibrate.families=[{','.join(FAMILIES)}]", *GRID, f"target.psnr={PSNR}",
                        f"hydra.run.dir={folder}", "logger=none", "trainer.enable_progress_bar=false")
    front = json.loads((folder / "front.json").read_text())
    from hiresrun.tune import overrides_of

    rows, record = [], {"front": front, "best": {}}
    for family in FAMILIES:
        ok = [p for p in front["points"] if p["family"] == family and p["psnr_to_ref"] >= PSNR and
              p["lpips_to_ref"] <= LPIPS]
        if not ok:
            rows.append([family, "none meets the target", None, None, None, None, None, None])
            continue
        best = max(ok, key=lambda p: p["speedup_wall"])
        m = arm(out / f"best-{family.replace(':', '-')}", "sample", *base, f"sample.num_samples={args.n_fid}",
                *overrides_of(best))
        rows.append([family, " ".join(best["overrides"]), best["speedup_wall"], best["cost_per_image"],
                     best["psnr_to_ref"], best["lpips_to_ref"], m.get("fid"), m.get("prompt_acc")])
        record["best"][family] = {"overrides": best["overrides"], "fid": m.get("fid"),
                                  "prompt_acc": m.get("prompt_acc"), **{k: best[k] for k in (
                                      "speedup_wall", "cost_per_image", "psnr_to_ref", "lpips_to_ref")}}
    proto = (f"calibration on seeds {args.seeds} (batch 8) against flow-matching Euler 28 steps of the same seeds, "
             "16 px, true CFG 3; settings take turns batch by batch in one process (wall speed-up over the 28-step "
             f"run); cost in full network evaluations; PSNR/LPIPS-alex to the 28-step images; the fastest point per "
             f"family with PSNR >= {PSNR:g} dB and LPIPS <= {LPIPS:g} then sampled on seeds 0-{args.n_fid - 1} for "
             "FID (vs the 1,000 held-out digits) and prompt_acc; 2-core CPU.")
    head = ["family", "fastest setting at target", "wall speed-up", "cost/img", "PSNR", "LPIPS", "FID", "prompt_acc"]
    save("caches", {**record, "protocol": proto}, markdown(head, rows) + "\n\n" + proto)


STUDIES = {"guidance": guidance, "highres": highres, "caches": caches}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--n-fid", type=int, default=500)
    p.add_argument("--steps", type=int, default=300, help="training steps of the finetune arm")
    p.add_argument("--seeds", default="1000-1031", help="calibration seeds of the caches study")
    p.add_argument("--out", default="runs/flow")
    p.add_argument("--tables-only", action="store_true", help="run nothing: tables from the arms already done")
    args = p.parse_args()
    tinysd.DEST["dir"], tinysd.DEST["tables_only"] = HERE, args.tables_only
    STUDIES[args.study](args)


if __name__ == "__main__":
    main()
