"""bench: AdaptiveDiffusion on the embedded model against the full-step run and fixed schedules at equal NFE.

    nice -n 5 .venv/bin/python bench/adaptive.py [--n 64] [--quick] [--delta 0.01] [--c-max 4]

For tiny-mnist at 16x16 and 32x32 (method none) and 32x32 with Self-Cascade (tuning-free: the pivot loop at
16x16 and the truncated loop at 32x32 both wrapped), DDIM / DPM-Solver++ / Euler, 50 steps: NFE and wall-clock
speed-up against the full run of the same seeds, fidelity to the full-step outputs (PSNR on uint8 values,
SSIM, LPIPS-alex when its weights resolve offline: the official protocol), the per-seed NFE spread, the
estimator's overhead (delta = 0, same NFE as the full run), and at equal NFE (i) the sampler run with fewer
steps, (ii) reuse every other step, (iii) periodic reuse (a call every k steps). Variants run interleaved, batch
by batch, so that load from other processes on a shared machine falls on all of them alike; batch 1 by default
(the official scripts' setting). Then the delta x c_max sweep (16x16, DDIM) beside DDIM with fewer steps,
drawn to bench/results/adaptive_sweep.png. Results go to bench/results/adaptive.json.

A run written to bench/results/adaptive.json (not --quick) also rewrites the tables of experiments/adaptive/README.md
between its `<!-- table:... -->` markers: the matrix and the sweep from that JSON, the calibration curve from
experiments/adaptive/calibration-32px-ddim.json. `--tables` does only that, from the JSON files as they are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import torch

from hiresrun import outputs, sampling
from hiresrun.accelerators import Accelerator
from hiresrun.accelerators.adaptive import AdaptiveDiffusion
from hiresrun.calibrate import fidelity
from hiresrun.errors import UsageError
from hiresrun.lit import to_uint8
from hiresrun.methods.none import NoneMethod
from hiresrun.methods.selfcascade import SelfCascade
from hiresrun.metrics.lpips import LPIPS
from hiresrun.models import load_model

SAMPLERS = ("ddim", "dpmsolver", "euler")
SETTINGS = ((16, "none"), (32, "none"), (32, "selfcascade"))
OUT = Path(__file__).parent / "results" / "adaptive.json"
README = Path(__file__).resolve().parents[1] / "experiments" / "adaptive" / "README.md"
CALIBRATION = README.with_name("calibration-32px-ddim.json")
NAMES = {"ddim": "DDIM", "dpmsolver": "DPM-Solver++", "euler": "Euler"}
GOAL_WALL, GOAL_PSNR, GOAL_GAP = 2.5, 32.0, 2.0      # the issue's goal: >= 2.5x wall at >= 32 dB, >= 2 dB at equal NFE


class FixedSchedule(Accelerator):
    """A fixed skip mask over the steps of a first-order sampler: call the model where mask[i], else reuse the
    previous raw output (uniform / DeepCache-style periodic baselines)."""

    def __init__(self, mask: list[bool]):
        self.mask = mask

    def wrap(self, model_fn, step=None):
        state = {"i": 0, "cache": None}

        def fixed(x, t, cond):
            i, state["i"] = state["i"], state["i"] + 1
            if self.mask[i] or state["cache"] is None:
                state["cache"] = model_fn(x, t, cond)
            return state["cache"]

        return fixed


def scheduler_factory(name: str):
    """The scheduler `hiresrun sample sampler=<name>` builds (conf/sampler/<name>.yaml), as a from_config partial."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        return instantiate(compose("config", overrides=[f"sampler={name}"]).sampler.scheduler)


def build(base, size: int, method: str):
    """(net, method) as `hiresrun sample +method=<method> data.resolution=<size>` builds them."""
    m = SelfCascade(size, mode="tuning_free") if method == "selfcascade" else NoneMethod(size)
    return m.wrap(base), m


def generate(net, method, make_scheduler, chunk: list[int], steps: int, acc) -> dict:
    """uint8 images for one batch of seeds, its NFE and wall seconds, and per image its NFE and skip masks."""
    counter, gens = sampling.Counter(), sampling.generators(chunk)
    wrap = (lambda f, step: acc.wrap(counter(f), step)) if acc else counter
    loop = partial(sampling.sample, scheduler=make_scheduler(), num_steps=steps, gens=gens, wrap=wrap)
    before = len(acc.records) if isinstance(acc, AdaptiveDiffusion) else 0
    start = time.perf_counter()
    with torch.no_grad():
        x = method.sample(net, gens, loop)
    out = {"images": to_uint8(x), "evals": counter.evals, "sec": time.perf_counter() - start,
           "nfe": [counter.evals / len(chunk)] * len(chunk), "masks": []}
    if isinstance(acc, AdaptiveDiffusion):  # every loop of this batch (Self-Cascade: pivot, then the 2x pass)
        from hiresrun.accelerators.adaptive import masks

        recs = acc.records[before:]
        out["nfe"] = [sum(int(c[i]) for r in recs for c in r["called"]) for i in range(len(chunk))]
        out["masks"] = ["|".join("".join("1" if c else "0" for c in masks(r)[i]) for r in recs)
                        for i in range(len(chunk))]
    return out


def interleaved(variants: dict, net, method, make_scheduler, seeds: list[int], batch: int) -> dict:
    """Each variant (name -> (steps, accelerator or None)) on every batch of seeds, the variants taking turns
    batch by batch: a load change on a shared machine then hits them all alike."""
    acc_ = {name: {"images": [], "evals": 0, "sec": 0.0, "nfe": [], "masks": []} for name in variants}
    for i in range(0, len(seeds), batch):
        for name, (steps, acc) in variants.items():
            r, a = generate(net, method, make_scheduler, seeds[i:i + batch], steps, acc), acc_[name]
            a["images"].append(r["images"])
            a["evals"], a["sec"] = a["evals"] + r["evals"], a["sec"] + r["sec"]
            a["nfe"] += r["nfe"]
            a["masks"] += r["masks"]
    for a in acc_.values():
        a["images"], a["nfe_mean"] = torch.cat(a["images"]), a["evals"] / len(seeds)
    return acc_


def score(run: dict, full: dict, lpips) -> dict:
    """Fidelity to the full-step images of the same seeds (PSNR capped for identical images), NFE and seconds."""
    same = int((run["images"] == full["images"]).flatten(1).all(1).sum())
    return {"nfe": run["nfe_mean"], "sec": run["sec"], "n_identical": same,
            **fidelity(run["images"], full["images"], lpips)}


def one_setting(base, size: int, method_name: str, sampler: str, args, lpips) -> dict:
    """Every variant for one (resolution, method, sampler), side by side on the same seeds."""
    net, method = build(base, size, method_name)
    make, seeds, N = scheduler_factory(sampler), list(range(args.n)), args.steps
    go = lambda variants, s=seeds: interleaved(variants, net, method, lambda: make(base.scheduler_config), s,
                                               args.batch)
    go({"warm-up": (N, None)}, seeds[:2])  # allocator, kernels; untimed
    first = {"full": (N, None),
             "adaptive": (N, AdaptiveDiffusion(delta=args.delta, c_max=args.c_max, decision_scope=args.scope))}
    overhead = method_name == "none" and sampler == "ddim"
    if overhead:  # delta = 0: same NFE as the full run, so the time ratio is the estimator's bookkeeping
        first["identity"] = (N, AdaptiveDiffusion(delta=0))
    a = go(first)
    full, adaptive = a["full"], a["adaptive"]
    n_eq = max(1, round(N * adaptive["nfe_mean"] / full["nfe_mean"]))
    k = max(2, round(full["nfe_mean"] / adaptive["nfe_mean"]))
    baselines = {"fewer_steps": (n_eq, None), "every_other": (N, FixedSchedule([i % 2 == 0 for i in range(N)]))}
    if k != 2:  # k = 2 is reuse every other step
        baselines["periodic"] = (N, FixedSchedule([i % k == 0 for i in range(N)]))
    b = go(baselines)
    b.setdefault("periodic", b["every_other"])
    nfe = adaptive["nfe"]
    row = {"resolution": size, "method": method_name, "sampler": sampler, "steps": N, "n": args.n,
           "full": {"nfe": full["nfe_mean"], "sec": full["sec"]},
           "adaptive": {**score(adaptive, full, lpips), "speedup_nfe": full["nfe_mean"] / adaptive["nfe_mean"],
                        "speedup_wall": full["sec"] / adaptive["sec"], "nfe_min": min(nfe),
                        "nfe_median": statistics.median(nfe), "nfe_max": max(nfe), "masks": adaptive["masks"]},
           "fewer_steps": {"steps": n_eq, **score(b["fewer_steps"], full, lpips)},
           "every_other": score(b["every_other"], full, lpips),
           "periodic": {"k": k, **score(b["periodic"], full, lpips)}}
    if overhead:
        row["estimator_overhead"] = a["identity"]["sec"] / full["sec"]
        row["identity_exact"] = bool(torch.equal(a["identity"]["images"], full["images"]))
    return row


def sweep(base, args, lpips) -> dict:
    """delta x c_max at 16x16, DDIM, method none, beside DDIM with fewer steps: the speed/fidelity frontier."""
    net, method = build(base, 16, "none")
    make, seeds, N = scheduler_factory("ddim"), list(range(args.n)), args.steps
    variants = {"full": (N, None)}
    variants |= {f"{d}/{c}": (N, AdaptiveDiffusion(delta=d, c_max=c, decision_scope=args.scope))
                 for c in args.sweep_c_max for d in args.sweep_delta}
    variants |= {f"steps={n}": (n, None) for n in args.sweep_steps}
    interleaved({"warm-up": (N, None)}, net, method, lambda: make(base.scheduler_config), seeds[:2], args.batch)
    r = interleaved(variants, net, method, lambda: make(base.scheduler_config), seeds, args.batch)
    full = r["full"]
    point = lambda name: {**score(r[name], full, lpips), "speedup_nfe": full["nfe_mean"] / r[name]["nfe_mean"],
                          "speedup_wall": full["sec"] / r[name]["sec"]}
    return {"resolution": 16, "sampler": "ddim", "method": "none", "steps": N, "n": args.n,
            "adaptive": [{"delta": d, "c_max": c, **point(f"{d}/{c}")}
                         for c in args.sweep_c_max for d in args.sweep_delta],
            "fewer_steps": [{"steps_run": n, **point(f"steps={n}")} for n in args.sweep_steps]}


def plot(sw: dict, path: Path) -> None:
    """PSNR to the full run against NFE speed-up: one line per c_max (points: delta), and DDIM with fewer steps;
    grey lines mark the goal (>= 2.5x at >= 32 dB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.8), dpi=100)
    lines = [(f"c_max={c}", [p for p in sw["adaptive"] if p["c_max"] == c])
             for c in sorted({p["c_max"] for p in sw["adaptive"]})] + [("DDIM, fewer steps", sw["fewer_steps"])]
    for label, ps in lines:
        ps = sorted(ps, key=lambda p: p["speedup_nfe"])
        ax.plot([p["speedup_nfe"] for p in ps], [p["psnr_to_ref"] for p in ps], "o-", label=label)
        for p in ps:
            ax.annotate(f"{p['delta']:g}" if "delta" in p else str(p["steps_run"]),
                        (p["speedup_nfe"], p["psnr_to_ref"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(2.5, color="0.8")
    ax.axhline(32, color="0.8")
    ax.set_xlabel("NFE speed-up (full NFE / NFE)")
    ax.set_ylabel("PSNR to the full run (dB)")
    ax.set_title(f"AdaptiveDiffusion, tiny-mnist {sw['resolution']}px, {sw['steps']}-step DDIM, n={sw['n']}",
                 fontsize=9)
    ax.legend(fontsize=8, title="labels: delta | steps", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def print_row(r: dict) -> None:
    a, f, e, p = r["adaptive"], r["fewer_steps"], r["every_other"], r["periodic"]
    lp = f" {a['lpips_to_ref']:.3f}" if "lpips_to_ref" in a else ""
    print(f"{r['resolution']:>3}px {r['method']:<11} {r['sampler']:<9} NFE {r['full']['nfe']:.0f}->{a['nfe']:5.1f} "
          f"[{a['nfe_min']}-{a['nfe_max']}] x{a['speedup_nfe']:.2f} wall x{a['speedup_wall']:.2f} | "
          f"PSNR {a['psnr_to_ref']:5.2f} SSIM {a['ssim_to_ref']:.3f}{lp} | fewer({f['steps']}) {f['psnr_to_ref']:5.2f} "
          f"| every-other({e['nfe']:.0f}) {e['psnr_to_ref']:5.2f} | periodic k={p['k']}({p['nfe']:.0f}) "
          f"{p['psnr_to_ref']:5.2f}" + (f" | overhead x{r['estimator_overhead']:.3f}" if "estimator_overhead" in r
                                        else ""), flush=True)


# -- the README's tables (experiments/adaptive/README.md) --------------------------------------------------
def paragraph(text: str) -> str:
    """Wrapped at 114 columns as the README's prose is; in a list after a colon, an item (`; `-separated) is not
    broken across lines."""
    head, colon, tail = text.partition(": ")
    if "; " in tail:
        text = head + colon + "; ".join(part.replace(" ", "\0") for part in tail.split("; "))
    return textwrap.fill(text, width=114, break_on_hyphens=False, break_long_words=False).replace("\0", " ")


def matrix_table(rows: list[dict]) -> str:
    """One line per (setting, sampler): NFE and wall speed-ups, fidelity to the full run, and the equal-NFE
    baselines; the PSNR gap to "fewer steps" in bold where it reaches the goal. Then the estimator's overhead."""
    lines = ["| setting | sampler | NFE full -> adaptive [per-seed range] | NFE speed-up | wall speed-up | PSNR | "
             "SSIM | LPIPS | fewer steps (equal NFE) | every other | periodic k | adaptive minus fewer steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, f, e, k = r["adaptive"], r["fewer_steps"], r["every_other"], r["periodic"]
        setting = f"{r['resolution']}px " + ("Self-Cascade (tuning-free)" if r["method"] == "selfcascade"
                                             else r["method"])
        lp = f"{a['lpips_to_ref']:.3f}" if "lpips_to_ref" in a else "–"
        gap = a["psnr_to_ref"] - f["psnr_to_ref"]
        gap_text = f"{gap:+.2f} dB"
        lines.append(f"| {setting} | {NAMES.get(r['sampler'], r['sampler'])} | {r['full']['nfe']:.0f} -> "
                     f"{a['nfe']:.1f} [{a['nfe_min']}-{a['nfe_max']}] | {a['speedup_nfe']:.2f}x | "
                     f"{a['speedup_wall']:.2f}x | {a['psnr_to_ref']:.2f} | {a['ssim_to_ref']:.3f} | {lp} | "
                     f"{f['steps']}: {f['psnr_to_ref']:.2f} | {e['psnr_to_ref']:.2f} | k={k['k']}: "
                     f"{k['psnr_to_ref']:.2f} | {f'**{gap_text}**' if gap >= GOAL_GAP else gap_text} |")
    over = [r for r in rows if "estimator_overhead" in r]
    if over:
        exact = "bit-identical images" if all(r.get("identity_exact") for r in over) else "images NOT identical"
        at = " and ".join(f"x{r['estimator_overhead']:.3f} at {r['resolution']}px" for r in over)
        samplers = ", ".join(sorted({NAMES.get(r["sampler"], r["sampler"]) for r in over}))
        lines += ["", paragraph(f"The estimator's cost (wall time of delta = 0, {exact}, over the plain run): {at} "
                                f"({samplers}).")]
    return "\n".join(lines)


def sweep_table(sw: dict) -> str:
    """delta rows x c_max columns of `NFE / wall speed-up, PSNR` (bold where the goal is met), then the plain
    sampler with fewer steps at its speed-ups."""
    deltas, cmaxes = sorted({p["delta"] for p in sw["adaptive"]}), sorted({p["c_max"] for p in sw["adaptive"]})
    at = {(p["delta"], p["c_max"]): p for p in sw["adaptive"]}
    head = [f"c_max {c}" + (": NFE / wall speed-up, PSNR" if i == 0 else "") for i, c in enumerate(cmaxes)]
    lines = ["| delta | " + " | ".join(head) + " |", "|---|" + "---|" * len(cmaxes)]
    for d in deltas:
        cells = []
        for c in cmaxes:
            p = at.get((d, c))
            if p is None:
                cells.append("–")
                continue
            tail = f"{p['speedup_wall']:.2f}x, {p['psnr_to_ref']:.2f}"
            goal = p["speedup_wall"] >= GOAL_WALL and p["psnr_to_ref"] >= GOAL_PSNR
            cells.append(f"{p['speedup_nfe']:.2f}x / " + (f"**{tail}**" if goal else tail))
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    plain = "; ".join(f"{p['steps_run']} steps {p['speedup_nfe']:.2f}x {p['psnr_to_ref']:.2f}"
                      for p in sorted(sw["fewer_steps"], key=lambda p: -p["steps_run"]))
    name = NAMES.get(sw["sampler"], sw["sampler"])
    text = f"Plain {name} at the same speed-ups (PSNR to its own {sw['steps']}-step output): {plain}."
    lines += ["", paragraph(text)]
    return "\n".join(lines)


def calibration_table(cal: dict) -> str:
    """The calibration curve of `hiresrun calibrate`: one row per delta tried, the chosen one and where the
    search stopped marked."""
    (name, value), = cal["target"].items()
    target = f"{'PSNR >=' if name == 'psnr' else 'LPIPS <='} {value:g}"
    lines = [f"| delta | NFE per image | NFE speed-up | PSNR | SSIM | {target} |", "|---|---|---|---|---|---|"]
    for i, p in enumerate(cal["curve"]):
        mark = "yes" if p["meets"] else "no"
        if p["meets"] and p["delta"] == cal["delta"]:
            mark += " (chosen)"
        if not p["meets"] and i == len(cal["curve"]) - 1 and not cal.get("grid_exhausted"):
            mark += " (search stops)"
        lines.append(f"| {p['delta']:g} | {p['nfe_per_image']:.1f} | {p['speedup_nfe']:.2f}x | {p['psnr_to_ref']:.2f} "
                     f"| {p['ssim_to_ref']:.4f} | {mark} |")
    return "\n".join(lines)


def readme_tables(bench: dict, calibration: dict) -> dict[str, str]:
    """The README's tables by marker name: matrix and sweep from the bench JSON, calibration from its file."""
    if not bench["results"] or not bench.get("sweep"):
        raise ValueError("the README tables need the full matrix and the sweep (a run without --samplers / "
                         "--sweep-delta cut down)")
    return {"matrix": matrix_table(bench["results"]), "sweep": sweep_table(bench["sweep"]),
            "calibration": calibration_table(calibration)}


def write_readme(bench_json: Path = OUT, calibration_json: Path = CALIBRATION, readme: Path = README) -> None:
    tables = readme_tables(json.loads(bench_json.read_text()), json.loads(calibration_json.read_text()))
    for name, table in tables.items():
        outputs.write_block(readme, name, table)
    print(f"bench: tables of {readme} rewritten from {bench_json} and {calibration_json}")


def merge(parts: list[Path], out: Path) -> int:
    """One result file from parts run in parallel processes (each timed side by side within itself)."""
    loaded = [json.loads(p.read_text()) for p in parts]
    order = {(s, m, x): i for i, (s, m, x) in enumerate((s, m, x) for s, m in SETTINGS for x in SAMPLERS)}
    rows = sorted((r for d in loaded for r in d["results"]), key=lambda r: order[r["resolution"], r["method"],
                                                                                   r["sampler"]])
    protocol = {**loaded[0]["protocol"], "bench_seconds": [d["protocol"]["bench_seconds"] for d in loaded],
                "parts": "parallel processes, one thread each; ratios are taken within a process"}
    sweep_ = next((d["sweep"] for d in loaded if d.get("sweep")), None)
    outputs.write_json(out, {"protocol": protocol, "results": rows, "sweep": sweep_})
    print(f"bench: {len(rows)} settings from {len(parts)} parts -> {out}")
    if out.resolve() == OUT.resolve():
        write_readme(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="seeds 0..n-1")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 seeds, 16px, DDIM, small sweep")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--delta", type=float, default=0.01)
    ap.add_argument("--c-max", type=int, default=4)
    ap.add_argument("--scope", default="sample", choices=("sample", "batch"))
    ap.add_argument("--batch", type=int, default=1, help="1: the official scripts' setting, wall-clock ~ NFE")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--methods", nargs="+", default=["none", "selfcascade"], choices=("none", "selfcascade"))
    ap.add_argument("--samplers", nargs="*", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--sweep-delta", type=float, nargs="*", default=[0.005, 0.01, 0.02, 0.05, 0.1])
    ap.add_argument("--sweep-c-max", type=int, nargs="*", default=[2, 4, 6])
    ap.add_argument("--sweep-steps", type=int, nargs="*", default=[10, 15, 20, 25, 30, 40])
    ap.add_argument("--threads", type=int, default=1, help="1 avoids thread oversubscription on a shared CPU")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="combine these result files into --out")
    ap.add_argument("--tables", action="store_true",
                    help="run nothing: rewrite the README's tables from --out and the calibration file")
    args = ap.parse_args(argv)
    if args.tables:
        write_readme(args.out)
        return 0
    if args.merge:
        return merge(args.merge, args.out)
    if args.quick:
        args.n, args.resolutions, args.methods, args.samplers = 4, [16], ["none"], ["ddim"]
        args.sweep_delta, args.sweep_c_max, args.sweep_steps = [0.01, 0.05], [4], [20]
    torch.set_num_threads(args.threads)
    base = load_model("tiny-mnist")
    base.unet.eval()
    try:
        lpips = LPIPS(download=False)
    except UsageError as e:  # no offline LPIPS trunk: PSNR and SSIM only
        print(f"bench: LPIPS unavailable ({e}); PSNR and SSIM only", file=sys.stderr)
        lpips = None
    start, rows = time.perf_counter(), []
    settings = [(s, m) for s, m in SETTINGS if s in args.resolutions and m in args.methods
                and (m == "none" or s == 2 * base.resolution)]
    for size, method in settings:
        for sampler in args.samplers:
            rows.append(one_setting(base, size, method, sampler, args, lpips))
            print_row(rows[-1])
    sw = sweep(base, args, lpips) if args.sweep_delta and args.sweep_c_max else None
    if sw:
        plot(sw, args.out.with_name(args.out.stem + "_sweep.png"))
        for p in sw["adaptive"] + sw["fewer_steps"]:
            tag = f"delta {p['delta']:<6g} c_max {p['c_max']}" if "delta" in p else f"DDIM {p['steps_run']} steps"
            print(f"sweep {tag:<22} x{p['speedup_nfe']:.2f} (wall x{p['speedup_wall']:.2f}) "
                  f"PSNR {p['psnr_to_ref']:5.2f} SSIM {p['ssim_to_ref']:.3f}", flush=True)
    protocol = {"model": "tiny-mnist", "model_weights_sha256": base.weights_hash,
                "methods": {"none": "base UNet sampled at the target size",
                            "selfcascade": "tuning-free (method.mode=tuning_free): 16px pivot loop, then the "
                                           "truncated 32px loop (strength 0.7); the accelerator wraps both"},
                "seeds": f"0-{args.n - 1}", "batch": args.batch, "delta": args.delta, "c_max": args.c_max,
                "decision_scope": args.scope, "threads": args.threads, "device": "cpu", "quick": args.quick,
                "reference": f"full {args.steps}-step outputs of the same seeds, method and sampler",
                "fidelity": "per image then mean: PSNR on uint8 values (data range 1; identical images count as one "
                            "grey level off in one pixel), SSIM (torchmetrics, 11x11 Gaussian), LPIPS-alex v0.1",
                "speedup_wall": "wall seconds of the full run / of the adaptive run; variants interleaved batch by "
                                "batch in one process",
                "bench_seconds": time.perf_counter() - start,
                "packages": outputs.manifest(base.weights_hash, base.source)["packages"]}
    outputs.write_json(args.out, {"protocol": protocol, "results": rows, "sweep": sw})
    print(f"bench: {len(rows)} settings in {protocol['bench_seconds']:.0f} s -> {args.out}")
    if args.out.resolve() == OUT.resolve() and not args.quick:
        write_readme(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
