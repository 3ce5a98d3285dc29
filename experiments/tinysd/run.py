"""Studies on the embedded latent text-to-image base `model=tiny-sd-mnist` (what only a text model with a VAE can
measure):

    OMP_NUM_THREADS=1 python experiments/tinysd/run.py guidance    [--n 500]   # CFG scale at the base size
    OMP_NUM_THREADS=1 python experiments/tinysd/run.py selfcascade [--n 500]   # 16 -> 32 px in latent space
    OMP_NUM_THREADS=1 python experiments/tinysd/run.py adaptive    [--n 500]   # AdaptiveDiffusion under guidance
    OMP_NUM_THREADS=1 python experiments/tinysd/run.py unet        [--n 500]   # FreeU and Skip-Tuning

Each arm is one `hiresrun sample experiment=tinysd/<preset>` plus the knobs the study varies (printed before it
runs); the presets in conf/experiment/tinysd/ hold the protocol: seeds 0..n-1, the model's own digit prompts (image i
asks for digit i mod 10, assets/prompts/digits.txt), DDIM 50, 16 px (32 px for Self-Cascade), `metrics=default`
against the 1,000 held-out MNIST digits at that size (Inception pool3 with clean-fid's resize; the shipped digit
classifier for prompt_acc, digit_acc and fd_digits). An arm whose folder has its metrics.json is reused (delete it to
rerun). The later studies sample under guidance 3, the best FID/adherence balance of the first. Each study writes its
record into experiments/tinysd/results.json and its table into the README (guidance also guidance.png).
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
DEST = {"dir": HERE}  # where results.json and the README's tables go (--record-dir; the smoke tests use a copy)
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
            hiresrun("sample", "experiment=tinysd/guidance", f"sample.num_samples={args.n}",
                     f"sample.guidance_scale={w}", f"hydra.run.dir={folder}", *QUIET)
        m = json.loads((folder / "metrics.json").read_text())
        results[f"{w:g}"] = {k: m.get(k) for k in COLUMNS}
        floors[f"{w:g}"] = m.get("fid_floor")
    record = {"n": args.n, "arms": results, "fid_floor": floors,
              "protocol": "model=tiny-sd-mnist, seeds 0..n-1, prompt i mod 50 of assets/prompts/digits.txt (digit "
                          "i mod 10), DDIM 50, 16 px; FID/KID Inception pool3 (clean resize) vs the 1,000 held-out "
                          "MNIST digits at 16 px; prompt_acc = the shipped digit classifier's top-1 equals the "
                          "prompt's digit; 2-core CPU"}
    save("guidance", record, table(results, args.n))
    plot(results, DEST["dir"] / "guidance.png")


# -- shared by the studies below: one `hiresrun` command per arm, reused when its metrics.json exists -----------
# Each arm is a preset of conf/experiment/tinysd/ (the protocol) plus the knobs the study varies:
SAMPLE16 = ["experiment=tinysd/sample16"]  # 16 px, guidance 3 (the guidance study's best), DDIM 50, batches of 10
SAMPLE32 = ["experiment=tinysd/sample32"]  # the same at 32 px
TRAIN = ["experiment=tinysd/train32", "trainer.enable_progress_bar=false"]  # 300 steps, batch 32, 32 px, captions
SAMPLE_BATCH = 10   # sample.batch_size of sample16/sample32 (AdaptiveDiffusion sub-batches per image)


class NotRun(Exception):
    """--tables-only: an arm whose run folder has no metrics.json yet."""


def arm(folder: Path, verb: str, *overrides: str) -> dict:
    """Run `hiresrun <verb> ... hydra.run.dir=<folder>` unless the folder holds its metrics.json; return that.
    With --tables-only nothing runs: a missing arm raises NotRun and its table row says so."""
    if not (folder / "metrics.json").is_file():
        if DEST.get("tables_only"):
            raise NotRun(str(folder))
        # a training arm stopped part-way (SIGTERM, end of session) left its last.ckpt: continue it, not step 0
        resume = [f"ckpt_path={folder}"] if verb == "train" and (folder / "checkpoints/last.ckpt").is_file() else []
        hiresrun(verb, *overrides, *resume, f"hydra.run.dir={folder}", *([] if verb == "train" else QUIET))
    return json.loads((folder / "metrics.json").read_text())


def save(study: str, record: dict, table_text: str) -> None:
    path = DEST["dir"] / "results.json"
    every = json.loads(path.read_text()) if path.is_file() else {}
    every[study] = record
    path.write_text(json.dumps(every, indent=2, sort_keys=True) + "\n")
    write_block(DEST["dir"] / "README.md", study, table_text)
    print(table_text)


def markdown(head: list[str], rows: list[list]) -> str:
    cell = lambda v: "—" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.3g}" if abs(v) < 0.1 else
                                             f"{v:.2f}") if not isinstance(v, str) else v
    return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|",
                      *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)])


# -- Self-Cascade in latent space, 16 -> 32 px ----------------------------------------------------------------
def selfcascade_arms(steps: int) -> list[dict]:
    """name, sampling overrides, and (for the trained arms) training overrides."""
    tuned = ["+method=selfcascade", "optimizer.lr=1e-3"]
    rows = [dict(name="none (32 px directly)", sample=["+method=none"]),
            dict(name="upsample (16 px, decode, bicubic)", sample=["+method=upsample"])]
    rows += [dict(name=f"tuning-free, strength {s}",
                  sample=["+method=selfcascade", "method.mode=tuning_free", f"method.strength={s}"])
             for s in (0.1, 0.3, 0.5, 0.7)]
    # the comparison rows of the papers (training-free, at the target size)
    rows += [dict(name="Attn-SF (scaled self-attention)", sample=["+method=attnsf"]),
             dict(name="ScaleCrafter (re-dilated lowest blocks, 2x)", sample=["+method=scalecrafter"]),
             dict(name="DemoFusion (16 px, then windows + dilated)", sample=["+method=demofusion"]),
             dict(name="HiDiffusion (RAU-Net + MSW-MSA)", sample=["+method=hidiffusion"])]
    rows += [dict(name=f"tuned {u}, {steps} steps", train=[*tuned, f"method.upsampler={u}"],
                  sample=["+method=selfcascade", f"method.upsampler={u}"]) for u in ("light", "resblock")]
    rows += [dict(name=f"finetune (all weights), {steps} steps", train=["+method=finetune"],
                  sample=["+method=finetune"]),
             dict(name=f"simple (shifted schedule), {steps} steps", train=["+method=simple"],
                  sample=["+method=simple"])]
    rows += [dict(name=f"LoRA r{r}, {steps} steps", train=["+method=lora", f"method.rank={r}", "optimizer.lr=1e-3"],
                  sample=["+method=lora", f"method.rank={r}"]) for r in (4, 32)]
    return rows


SC_COLUMNS = ("fid", "kid", "prompt_acc", "digit_acc", "fd_digits", "nfe_per_image", "sec_per_image")


def recorded(study: str, n: int) -> dict:
    """The arms of `study` already in results.json at this n, by name (kept by --arms runs)."""
    path = DEST["dir"] / "results.json"
    record = json.loads(path.read_text()).get(study, {}) if path.is_file() else {}
    return {a["arm"]: a for a in record.get("arms", [])} if record.get("n") == n else {}


def selfcascade(args) -> None:
    out = Path(args.out) / "selfcascade"
    rows, record = [], []
    done = recorded("selfcascade", args.n)
    for a in selfcascade_arms(args.steps):
        slug = a["name"].split(" (")[0].replace(", ", "-").replace(" ", "_")
        ckpt, t = [], {}
        if args.arms and not any(k.lower() in a["name"].lower() for k in args.arms) and a["name"] in done:
            r = done[a["name"]]  # not selected: its recorded row stands
            rows.append([a["name"], *(r.get(c) for c in SC_COLUMNS), r.get("trainable_params", 0),
                         round(r.get("train_seconds", 0))])
            record.append(r)
            continue
        try:
            if "train" in a:
                t = arm(out / f"{slug}-train", "train", *TRAIN, *a["train"], f"trainer.max_steps={args.steps}",
                        f"train.checkpoint_every={args.steps}")
                ckpt = [f"ckpt_path={out / f'{slug}-train'}"]
            m = arm(out / slug, "sample", *SAMPLE32, f"sample.num_samples={args.n}", *a["sample"], *ckpt)
        except NotRun:
            rows.append([a["name"], *(["not run yet"] + [None] * (len(SC_COLUMNS) + 1))])
            continue
        rows.append([a["name"], *(m.get(c) for c in SC_COLUMNS), t.get("trainable_params", 0),
                     round(t.get("train_seconds", 0))])
        record.append({"arm": a["name"], **{c: m.get(c) for c in SC_COLUMNS}, "fid_floor": m.get("fid_floor"),
                       "trainable_params": t.get("trainable_params", 0), "train_seconds": t.get("train_seconds", 0)})
    head = ["arm", "FID ↓", "KID ↓", "prompt_acc ↑", "digit_acc ↑", "FD digits ↓", "NFE/img", "s/img", "trainable",
            "train s"]
    text = markdown(head, rows) + (f"\n\nn = {args.n} per arm (seeds 0-{args.n - 1}, digit i mod 10), 32 px, guidance "
                                   f"3, DDIM 50, sampling batch {SAMPLE_BATCH}; tuned arms {args.steps} steps at batch "
                                   "32 on the 4,000 training digits with their captions; 2-core CPU.")
    save("selfcascade", {"n": args.n, "train_steps": args.steps, "arms": record,
                         "protocol": "model=tiny-sd-mnist at 32 px (16x16x4 latents), seeds 0..n-1 with the model's "
                                     "digit prompts, guidance 3, DDIM 50; FID/KID Inception pool3 (clean resize) vs "
                                     "the 1,000 held-out MNIST digits at 32 px; 2-core CPU"}, text)


# -- AdaptiveDiffusion under guidance ---------------------------------------------------------------------------
SAMPLERS = ("ddim", "euler", "dpmsolver")
SWEEP_DELTA, SWEEP_CMAX, SWEEP_STEPS = (0.005, 0.01, 0.02, 0.05), (2, 4), (10, 15, 20, 30)


WALL_N = 100  # seeds of the side-by-side wall-clock measurement


def wall_side_by_side(sampler: str, variants: dict[str, tuple[int, object]], n: int, cache: Path) -> dict:
    """Wall seconds per image of each variant (name -> (steps, accelerator or None)) on seeds 0..n-1, in one process,
    the variants taking turns batch by batch (as experiments/adaptive/run.py does), each batch through
    `sampling.Sampler.generate`, the per-batch path of `hiresrun sample`. Cached in `cache` (delete it to remeasure)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from hydra import compose, initialize_config_module

    from hiresrun import build
    from hiresrun.sampling import Sampler

    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*SAMPLE16, f"sampler={sampler}"])
    model, method, net, _ = build.sampling_net(cfg)
    conditioner = build.build_conditioner(cfg, model)
    samplers = {name: Sampler(net, method, build.sampler_scheduler(cfg, model, method), steps, acc,
                              conditioner=conditioner) for name, (steps, acc) in variants.items()}
    seconds = dict.fromkeys(variants, 0.0)
    for name in variants:  # warm-up, untimed
        samplers[name].generate([0])
    for i in range(0, n, SAMPLE_BATCH):
        for name, one in samplers.items():
            seconds[name] += float(one.generate(list(range(i, min(i + SAMPLE_BATCH, n))))["seconds"])
    import torch

    out = {"n": n, "sec_per_image": {k: v / n for k, v in seconds.items()}, "threads": torch.get_num_threads()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


def adaptive(args) -> None:
    """50-step runs of three samplers under guidance 3 at 16 px; AdaptiveDiffusion at its defaults, the same sampler
    at the adaptive run's NFE, and (DDIM) the delta x c_max sweep beside fewer steps, all scored against the
    full-step images of the same seeds (`reference=`)."""
    out = Path(args.out) / "adaptive"
    base = [*SAMPLE16, f"sample.num_samples={args.n}"]
    keep = ("nfe_per_image", "sec_per_image", "psnr_to_ref", "ssim_to_ref", "lpips_to_ref", "fid", "prompt_acc")
    pick = lambda m: {k: m.get(k) for k in keep}
    rows, sweep_rows, record = [], [], {"samplers": {}, "sweep": []}
    for s in SAMPLERS:
        try:
            full = arm(out / f"{s}-full", "sample", *base, f"sampler={s}")
            ref = [f"reference={out / f'{s}-full'}"]
            ad = arm(out / f"{s}-adaptive", "sample", *base, f"sampler={s}", "+accelerator=adaptive", *ref)
            n_eq = max(1, round(50 * ad["nfe_per_image"] / full["nfe_per_image"]))
            few = arm(out / f"{s}-steps{n_eq}", "sample", *base, f"sampler={s}", f"sampler.num_steps={n_eq}", *ref)
        except NotRun:
            rows.append([s, "not run yet", *[None] * 11])
            continue
        from hiresrun.accelerators.adaptive import AdaptiveDiffusion

        wall = wall_side_by_side(s, {"full": (50, None), "adaptive": (50, AdaptiveDiffusion()), "fewer": (n_eq, None)},
                                 min(WALL_N, args.n), out / f"wall-{s}.json") if not DEST.get("tables_only") or \
            (out / f"wall-{s}.json").is_file() else None
        ratio = {k: wall["sec_per_image"]["full"] / wall["sec_per_image"][k] if wall else None
                 for k in ("adaptive", "fewer")}
        rows.append([s, f"{full['nfe_per_image']:.0f} -> {ad['nfe_per_image']:.1f}",
                     full["nfe_per_image"] / ad["nfe_per_image"], ratio["adaptive"], ratio["fewer"],
                     ad["psnr_to_ref"], ad.get("lpips_to_ref"),
                     full["fid"], ad["fid"], ad["prompt_acc"], f"{n_eq}: {few['psnr_to_ref']:.2f}",
                     few.get("lpips_to_ref"), few["fid"]])
        record["samplers"][s] = {"full": pick(full), "adaptive": pick(ad), "fewer_steps": {"steps": n_eq, **pick(few)},
                                 "wall_side_by_side": wall}
    ref = [f"reference={out / 'ddim-full'}"]

    def point(name: str, folder: Path, knobs: dict, *overrides: str) -> None:
        """One sweep row: an arm scored against the 50-step DDIM images, beside its speed-ups over them."""
        try:
            full = arm(out / "ddim-full", "sample", *base, "sampler=ddim")
            m = arm(folder, "sample", *base, "sampler=ddim", *overrides, *ref)
        except NotRun:
            sweep_rows.append([name, "not run yet", *[None] * 4])
            return
        sweep_rows.append([name, full["nfe_per_image"] / m["nfe_per_image"], m["psnr_to_ref"], m.get("lpips_to_ref"),
                           m["fid"], m["prompt_acc"]])
        record["sweep"].append({**knobs, **pick(m)})

    for c in SWEEP_CMAX:
        for d in SWEEP_DELTA:
            point(f"adaptive delta {d:g}, c_max {c}", out / f"ddim-d{d:g}-c{c}", {"delta": d, "c_max": c},
                  "+accelerator=adaptive", f"accelerator.delta={d}", f"accelerator.c_max={c}")
    for n in SWEEP_STEPS:
        point(f"DDIM {n} steps", out / f"ddim-steps{n}", {"steps": n}, f"sampler.num_steps={n}")
    head = ["sampler", "NFE full -> adaptive", "NFE speed-up", "wall speed-up", "wall speed-up, fewer steps", "PSNR",
            "LPIPS", "FID full",
            "FID adaptive", "prompt_acc adaptive", "fewer steps (equal NFE): PSNR", "LPIPS", "FID"]
    proto = (f"n = {args.n} (seeds 0-{args.n - 1}, digit i mod 10), 16 px, guidance 3, 50 steps, sampling batch "
             f"{SAMPLE_BATCH} (decisions per image, sub-batched calls), PSNR/LPIPS-alex to the 50-step images of the "
             "same seeds, FID vs the 1,000 held-out digits; each arm a separate process, 2-core CPU. Wall speed-ups "
             f"over the 50-step run are measured side by side in one process on seeds 0-{min(WALL_N, args.n) - 1} "
             f"(batches of {SAMPLE_BATCH}, the variants taking turns batch by batch, sampling.Sampler.generate); the "
             "arms' own sec_per_image come from separate processes under different load and are not compared.")
    write_block(DEST["dir"] / "README.md", "adaptive-sweep",
                markdown(["DDIM arm", "NFE speed-up", "PSNR", "LPIPS", "FID", "prompt_acc"],
                         sweep_rows))
    record["protocol"] = proto
    save("adaptive", record, markdown(head, rows) + "\n\n" + proto)


# -- FreeU and Skip-Tuning on a UNet2DConditionModel --------------------------------------------------------------
FREEU = ((None, None, None, None), (1.2, 1.4, 0.9, 0.2), (1.1, 1.2, 0.9, 0.2), (1.5, 1.6, 1.0, 1.0),
         (1.0, 1.0, 0.9, 0.2))
RHOS = (0.9, 0.8, 0.7, 0.6)


def unet(args) -> None:
    """FreeU at its SD-1.5 values and a small b/s sweep (DDIM 50), Skip-Tuning's rho at 10 and 20 DDIM steps;
    16 px, guidance 3, FID and prompt_acc beside the same sampler without an accelerator."""
    out = Path(args.out) / "unet"
    base = [*SAMPLE16, f"sample.num_samples={args.n}"]
    cols = ("fid", "kid", "prompt_acc", "digit_acc", "fd_digits", "sec_per_image")
    rows, record = [], []

    def add(name, folder, *overrides):
        try:
            m = arm(folder, "sample", *base, *overrides)
        except NotRun:
            rows.append([name, "not run yet", *[None] * (len(cols) - 1)])
            return
        rows.append([name, *(m.get(c) for c in cols)])
        record.append({"arm": name, **{c: m.get(c) for c in cols}})

    add("DDIM 50, no accelerator", out / "ddim50")
    for b1, b2, s1, s2 in FREEU:
        tag = "SD-1.5 values (1.5, 1.6, 0.9, 0.2)" if b1 is None else f"b {b1:g}, {b2:g}; s {s1:g}, {s2:g}"
        knobs = [] if b1 is None else [f"accelerator.b1={b1}", f"accelerator.b2={b2}", f"accelerator.s1={s1}",
                                       f"accelerator.s2={s2}"]
        add(f"DDIM 50, FreeU {tag}", out / f"freeu-{b1}-{b2}-{s1}-{s2}", "+accelerator=freeu", *knobs)
    for steps in (10, 20):
        add(f"DDIM {steps}, no accelerator", out / f"ddim{steps}", f"sampler.num_steps={steps}")
        for rho in RHOS:
            add(f"DDIM {steps}, Skip-Tuning rho {rho:g}", out / f"skip{steps}-rho{rho:g}",
                f"sampler.num_steps={steps}", "+accelerator=skiptuning", f"accelerator.rho={rho}")
    head = ["arm", "FID ↓", "KID ↓", "prompt_acc ↑", "digit_acc ↑", "FD digits ↓", "s/img"]
    proto = (f"n = {args.n} (seeds 0-{args.n - 1}, digit i mod 10), 16 px, guidance 3, DDIM, sampling batch "
             f"{SAMPLE_BATCH}; FID/KID Inception pool3 (clean resize) vs the 1,000 held-out digits at 16 px; 2-core "
             "CPU.")
    save("unet", {"n": args.n, "arms": record, "protocol": proto}, markdown(head, rows) + "\n\n" + proto)


STUDIES = {"guidance": guidance, "selfcascade": selfcascade, "adaptive": adaptive, "unet": unet}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=300, help="training steps of the tuned Self-Cascade arms")
    p.add_argument("--out", default="runs/tinysd")
    p.add_argument("--record-dir", type=Path, default=HERE, help="folder of the results.json and README.md to update")
    p.add_argument("--tables-only", action="store_true", help="run nothing: tables from the arms already done")
    p.add_argument("--arms", nargs="*", default=[],
                   help="selfcascade: run only the arms whose names contain one of these; the others keep their rows "
                        "in results.json (same n)")
    args = p.parse_args()
    DEST["dir"], DEST["tables_only"] = args.record_dir, args.tables_only
    STUDIES[args.study](args)


if __name__ == "__main__":
    main()
