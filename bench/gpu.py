"""bench: hiresrun at the released sizes on one GPU, every number in one run, ratios side by side.

    .venv/bin/python bench/gpu.py [--replicas /data/replicas] [--out bench/results/gpu.json]    # a CUDA GPU, < 8 min
    .venv/bin/python bench/gpu.py --smoke                                                      # CPU, tiny replicas
    .venv/bin/python bench/gpu.py --rows pipeline vae        # a part (pipeline execution selfcascade vae accelerators)

On a GPU it builds (once, into --replicas) full-size replicas of SDXL base and SD 1.5 (hiresrun/replica.py: the
released architectures, random weights: the same compute and memory as the real models) and measures, bf16:

    pipeline     SDXL at 1024 px (SD 1.5 at 512 px), DDIM 20 steps, guidance 5 (7.5), batch 1 and 4: hiresrun's
                 Sampler (fp32 weights under bf16 autocast, trainer.precision=bf16-mixed) against diffusers'
                 pipeline twice: loaded in fp32 and run under the same autocast (the same numbers: images compared
                 pixel for pixel) and loaded in bf16 (how most users run it); images/s and CUDA peak memory
    execution    SDXL batch 1 with model.channels_last and model.compile (torch.compile, in place), each alone and
                 together, against plain hiresrun
    selfcascade  Self-Cascade tuning-free 1024 -> 2048 px (seconds per image, peak memory)
    vae          the VAE decode of one latent at 2048 and 4096 px, untiled and tiled (model.vae_tile_above), seconds
                 and peak memory beside hiresrun/memory.py's estimate
    accelerators DeepCache and AdaptiveDiffusion at their default settings against the full 20... 50 steps: wall
                 speed-up and cost per image (full-evaluation units)

A row that runs out of memory is recorded as such. `--smoke` runs every row on the CPU with tiny replicas at 16-64 px
and 2 steps: the same code path, for the test suite (tests/test_bench.py). Writes JSON and a markdown table (--table:
into bench/README.md between its gpu markers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "gpu.json"


class Rig:
    """Sizes and the device: the real ones, or the smoke run's."""

    def __init__(self, smoke: bool, replicas: Path):
        self.smoke, self.replicas = smoke, replicas
        self.device = torch.device("cpu" if smoke else "cuda")
        self.steps = 2 if smoke else 20
        self.repeats = 1 if smoke else 3
        self.scale = 1 / 64 if smoke else 1  # 1024 px -> 16 px in the smoke run

    def px(self, side: int) -> int:
        return max(16, int(side * self.scale))

    def folder(self, family: str) -> Path:
        """The replica folder (written once); tiny ones for the smoke run."""
        from hiresrun import replica, tiny

        path = self.replicas / (family + ("-tiny" if self.smoke else ""))
        if not (path / "model_index.json").is_file():
            print(f"writing the {family} replica to {path}", flush=True)
            if self.smoke:
                tiny.build(path, "sdxl" if family == "sdxl" else "sd", sample_size=8)
            else:
                replica.write(family, path)
        return path

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset(self) -> None:
        from hiresrun.outputs import reset_peak_memory

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak_memory(self.device)

    def peak(self) -> float:
        from hiresrun.outputs import peak_memory_mb

        return peak_memory_mb(self.device)


def timed(rig: Rig, fn, repeats: int | None = None) -> tuple[float, float, object]:
    """(median seconds, peak MB, last output) of fn() after one warm-up call."""
    out = fn()
    times = []
    rig.reset()
    for _ in range(repeats or rig.repeats):
        rig.sync()
        start = time.perf_counter()
        out = fn()
        rig.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), rig.peak(), out


def guarded(name: str, fn) -> dict:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"row": name, "error": f"out of memory: {str(e).splitlines()[0]}"}


def hiresrun_sampler(rig: Rig, family: str, side: int, guidance: float, *extra: str):
    import hiresrun

    return hiresrun.load("model=diffusers", f"model.path={rig.folder(family)}", f"data.resolution={side}",
                         "sampler=ddim", f"sampler.num_steps={rig.steps}", f"sample.guidance_scale={guidance}",
                         "sample.prompt=a photograph of a lighthouse at dusk", *extra,
                         "trainer.precision=" + ("32-true" if rig.smoke else "bf16-mixed"), device=str(rig.device))


def pipeline_rows(rig: Rig, family: str, native: int, guidance: float) -> list[dict]:
    """hiresrun against diffusers' pipeline at the native size, batch 1 and 4."""
    import diffusers

    from hiresrun import sampling

    side = rig.px(native)
    ours = hiresrun_sampler(rig, family, side, guidance)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    dtype = torch.float32 if rig.smoke else torch.bfloat16
    pipes = {"fp32 + autocast": cls.from_pretrained(rig.folder(family), torch_dtype=torch.float32),
             "bf16 weights": cls.from_pretrained(rig.folder(family), torch_dtype=dtype)}
    rows = []
    for batch in (1, 4):
        seeds = list(range(batch))
        latent = side // 8 if not rig.smoke else side // 2
        t, peak, out = timed(rig, lambda seeds=seeds: ours.generate(seeds))
        rows.append({"row": f"{family} {side} px batch {batch}", "who": "hiresrun", "images_per_s": batch / t,
                     "seconds": t, "peak_mb": peak})
        for name, pipe in pipes.items():
            pipe.to(rig.device)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
            autocast = torch.autocast(rig.device.type, dtype=torch.bfloat16,
                                      enabled=name == "fp32 + autocast" and not rig.smoke)

            def call(pipe=pipe, seeds=seeds, latent=latent, autocast=autocast, batch=batch):
                latents = sampling.noise(sampling.generators(seeds), (4, latent, latent)).to(rig.device)
                with autocast:
                    images = pipe(["a photograph of a lighthouse at dusk"] * batch, latents=latents.to(pipe.dtype),
                                  num_inference_steps=rig.steps, guidance_scale=guidance, height=side, width=side,
                                  output_type="pt").images
                return sampling.to_uint8(images * 2 - 1).cpu()

            pt, ppeak, theirs = timed(rig, call)
            pipe.to("cpu")
            row = {"row": f"{family} {side} px batch {batch}", "who": f"pipeline, {name}", "images_per_s": batch / pt,
                   "seconds": pt, "peak_mb": ppeak, "x_hiresrun_speed": (batch / pt) / (batch / t)}
            if name == "fp32 + autocast":
                row["max_abs_diff_uint8"] = int((theirs.int() - out["images"].int()).abs().max())
            rows.append(row)
    return rows


def execution_rows(rig: Rig) -> list[dict]:
    """SDXL at its native size, batch 1: hiresrun plain, with model.channels_last, and (GPU) with model.compile (the
    first call, which compiles, is the untimed warm-up)."""
    side, rows, plain = rig.px(1024), [], None
    variants = [("plain", ()), ("channels_last", ("model.channels_last=true",))]
    if not rig.smoke:  # inductor on the CPU takes minutes for the tiny UNet; the slow test covers the knob
        variants += [("compile", ("model.compile=true",)),
                     ("compile + channels_last", ("model.compile=true", "model.channels_last=true"))]
    for name, extra in variants:
        s = hiresrun_sampler(rig, "sdxl", side, 5.0, *extra)
        t, peak, _ = timed(rig, lambda s=s: s.generate([0]))
        plain = plain or t
        rows.append({"row": f"sdxl {side} px batch 1", "who": f"hiresrun, {name}", "images_per_s": 1 / t,
                     "seconds": t, "peak_mb": peak, "x_plain_speed": plain / t})
    return rows


def selfcascade_row(rig: Rig) -> dict:
    side = rig.px(2048)
    s = hiresrun_sampler(rig, "sdxl", side, 5.0, "+method=selfcascade", "method.mode=tuning_free")
    t, peak, _ = timed(rig, lambda: s.generate([0]), repeats=1 if not rig.smoke else None)
    return {"row": f"Self-Cascade tuning-free {rig.px(1024)} -> {side} px", "who": "hiresrun", "seconds": t,
            "peak_mb": peak}


def vae_rows(rig: Rig) -> list[dict]:
    from hiresrun import memory
    from hiresrun.models import load_model

    base = load_model(str(rig.folder("sdxl")))
    base.vae.to(rig.device)
    rows = []
    for native in (2048, 4096):
        side = rig.px(native)
        factor = base.latent_factor
        z = torch.randn(1, 4, side // factor, side // factor, device=rig.device)
        for tiled in (False, True):
            base.vae_tile_above = side // 2 if tiled else None
            est = memory.estimate(Path(base.source), side, 1, 1, 4, base.vae_tile_above, None)

            def decode(z=z):
                with torch.inference_mode():
                    return base.decode(z)

            row = guarded(f"VAE decode {side} px", lambda: dict(zip(("seconds", "peak_mb"),
                                                                     timed(rig, decode, repeats=1)[:2])))
            rows.append({"row": f"VAE decode {side} px", "who": "tiled" if tiled else "untiled", **row,
                         "estimated_vae_mb": round(est.vae_mb, 1)})
    return rows


def accelerator_rows(rig: Rig) -> list[dict]:
    """DeepCache and AdaptiveDiffusion at their defaults on SDXL at its native size, 50 DDIM steps as their papers."""
    side, rows = rig.px(1024), []
    steps = "sampler.num_steps=" + ("4" if rig.smoke else "50")
    full = hiresrun_sampler(rig, "sdxl", side, 5.0, steps)
    t0, _, out0 = timed(rig, lambda: full.generate([0]))
    for acc in ("deepcache", "adaptive"):
        s = hiresrun_sampler(rig, "sdxl", side, 5.0, steps, f"+accelerator={acc}")
        t, peak, out = timed(rig, lambda s=s: s.generate([0]))
        mark = s.accelerator.mark()  # the cost of one call (the timed ones came before)
        out = s.generate([0])
        per = s.accelerator.per_image(mark, [0])
        summary = s.accelerator.summary(per) if per else None
        cost = (summary[1] if summary else {}).get("cost_per_image", float(out["evals"]))
        rows.append({"row": f"sdxl {side} px, {steps.split('=')[1]} DDIM steps", "who": acc, "seconds": t,
                     "speedup_wall": t0 / t, "cost_per_image": cost, "speedup_cost": float(out0["evals"]) / cost,
                     "peak_mb": peak})
    return rows


ROWS = {"pipeline": None, "execution": execution_rows, "selfcascade": None, "vae": vae_rows,
        "accelerators": accelerator_rows}


def markdown(record: dict) -> str:
    lines = [f"{record['device']} ({record['when']}, {record['torch']}); `{record['command']}`", "",
             "| measurement | who | images/s | s | peak MB | ratio / note |", "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        note = r.get("error") or ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                                          if k in ("x_hiresrun_speed", "max_abs_diff_uint8", "estimated_vae_mb",
                                                   "x_plain_speed",
                                                   "speedup_wall", "speedup_cost", "cost_per_image"))
        ips = f"{r['images_per_s']:.2f}" if "images_per_s" in r else ""
        sec = f"{r['seconds']:.2f}" if "seconds" in r else ""
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else ""
        lines.append(f"| {r['row']} | {r['who']} | {ips} | {sec} | {peak} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny replicas, 2 steps: the code path only")
    ap.add_argument("--replicas", type=Path, default=None, help="where the replica folders are kept (default: temp)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", action="store_true", help="write the markdown table into bench/README.md")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                    help="which groups of rows to run (default: all); a short GPU budget can take them in parts")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU machine, or --smoke for the CPU code path",
              file=sys.stderr)
        return 2
    out = args.out or (OUT.with_name("gpu-smoke.json") if args.smoke else OUT)
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(args.smoke, args.replicas or Path(tmp))
        start = time.perf_counter()
        rows = []
        for group in args.rows:
            if group == "pipeline":
                for family, native, guidance in (("sdxl", 1024, 5.0), ("sd15", 512, 7.5)):
                    rows += pipeline_rows(rig, family, native, guidance)
            elif group == "selfcascade":
                rows.append(guarded("selfcascade", lambda: selfcascade_row(rig)))
            else:
                rows += ROWS[group](rig)
            print(markdown({"device": "", "when": "", "torch": "", "command": "", "rows": rows}), flush=True)
    device = "CPU (smoke run: tiny replicas)" if args.smoke else torch.cuda.get_device_name(0)
    record = {"device": device, "when": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": "bench/gpu.py" + (" --smoke" if args.smoke else "") + (
                  f" --rows {' '.join(args.rows)}" if args.rows != list(ROWS) else ""),
              "seconds": time.perf_counter() - start, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(record)
    print(table)
    if args.table:
        from hiresrun.outputs import write_block

        write_block(HERE / "README.md", "gpu", table)
    print(f"-> {out} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
