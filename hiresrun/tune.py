"""`hiresrun calibrate`: the largest AdaptiveDiffusion delta that keeps a fidelity target, and its file; or, with
`calibrate.families`, every listed training-free setting's cost against its fidelity, the Pareto front, and the
cheapest setting that keeps the target (`front`).

Fidelity is measured as in the paper's protocol: each image against the full-step output of the same
seed, model, method, sampler and step count. Search: an ascending grid of delta (`calibrate.deltas`), stopped at
the first value that misses the target; the answer is the last value that met it, or 0 (the full run). fidelity(
delta) is only roughly monotone, so stopping at the first miss never returns a delta beyond a dip below the target.
The file's key names what the delta is valid for; `accelerator.calibration=<file>` refuses any other setting.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from hiresrun import outputs
from hiresrun.calibration import SEARCH, key
from hiresrun.errors import UsageError


# -- fidelity to the full-step outputs ----------------------------------------------------------
def fidelity(images: Tensor, reference: Tensor, lpips=None) -> dict:
    """Mean PSNR and SSIM (the definitions of hiresrun/metrics/lpips.py, as in sample runs) and, given an LPIPS
    module, LPIPS of `images` to `reference`."""
    from hiresrun.metrics.lpips import psnr, ssim

    out = {"psnr_to_ref": float(psnr(images, reference).mean()), "ssim_to_ref": float(ssim(images, reference).mean())}
    if lpips is not None:
        out["lpips_to_ref"] = float(torch.cat([lpips(images[i:i + 32], reference[i:i + 32])
                                               for i in range(0, len(images), 32)]).mean())
    return out


def parse_target(target: DictConfig) -> tuple[str, float]:
    """Exactly one of target.psnr (mean dB, at least) and target.lpips (mean, at most)."""
    given = [(k, float(v)) for k, v in target.items() if v is not None]
    if len(given) != 1 or given[0][0] not in ("psnr", "lpips"):
        raise UsageError(f"hiresrun calibrate needs one fidelity target, got {dict(given) or 'none'}; "
                         f"pass target.psnr=30 (dB, at least) or target.lpips=0.05 (at most)")
    name, value = given[0]
    if value <= 0:
        raise UsageError(f"target.{name}={value}: must be positive")
    return name, value


def meets(point: dict, target: tuple[str, float]) -> bool:
    name, value = target
    return point["psnr_to_ref"] >= value if name == "psnr" else point["lpips_to_ref"] <= value


# -- the verb ---------------------------------------------------------------------------------------------
def calibrate(cfg: DictConfig) -> dict:
    """Full-step outputs of the calibration seeds, then the delta grid in ascending order until the target is
    missed; writes calibration.json (key, delta, the curve) to the run folder and prints its path."""
    from hiresrun.build import (
        build_accelerator,
        build_conditioner,
        choice,
        member_nodes,
        parse_seeds,
        sampler_scheduler,
        sampling_net,
    )
    from hiresrun.metrics.lpips import LPIPS
    from hiresrun.sampling import Sampler

    if cfg.calibrate.get("families"):
        return front(cfg)
    target = parse_target(cfg.target)
    if member_nodes(cfg.accelerator):  # a list: its delta would be valid for the composition only
        family = choice(cfg, "accelerator")
        raise UsageError(f"hiresrun calibrate searches AdaptiveDiffusion's delta alone; for the list "
                         f"accelerator=[{family.replace('-', ',')}] use calibrate.families=[{family}] (its grid: "
                         f"calibrate.grid.{family})")
    if "delta" not in cfg.accelerator:
        raise UsageError("hiresrun calibrate tunes the adaptive accelerator's delta: add +accelerator=adaptive")
    deltas = [float(d) for d in cfg.calibrate.deltas]
    if not deltas or min(deltas) <= 0 or deltas != sorted(set(deltas)):
        raise UsageError(f"calibrate.deltas={list(deltas)}: give positive values in ascending order, e.g. "
                         f"[0.002,0.005,0.01,0.02]")
    seeds = parse_seeds(cfg.calibrate.seeds, 0)
    base, method, net, _ = sampling_net(cfg)
    conditioner = build_conditioner(cfg, base)  # text models: the run's prompts and guidance
    device = "cuda" if cfg.trainer.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    lpips = LPIPS(cache_dir=cfg.paths.cache_dir).to(device) if target[0] == "lpips" else None

    net.to(device)

    def run(acc=None) -> dict:
        sampler = Sampler(net, method, sampler_scheduler(cfg, base, method), cfg.sampler.num_steps, acc, conditioner)
        parts = [sampler.generate(seeds[i:i + cfg.sample.batch_size])
                 for i in range(0, len(seeds), cfg.sample.batch_size)]
        return {"images": torch.cat([p["images"] for p in parts]), "evals": sum(int(p["evals"]) for p in parts)}

    full, curve, chosen = run(), [], 0.0
    print(f"hiresrun: calibrate: full-step outputs of {len(seeds)} seeds made; trying up to {len(deltas)} deltas",
          flush=True)
    for delta in deltas:
        acc = build_accelerator(cfg, delta=delta, calibration=None)
        r = run(acc)
        point = {"delta": delta, "nfe_per_image": r["evals"] / len(seeds), "speedup_nfe": full["evals"] / r["evals"],
                 **fidelity(r["images"], full["images"], lpips)}
        point["meets"] = meets(point, target)
        curve.append(point)
        shown = f"PSNR {point['psnr_to_ref']:.2f} dB" if target[0] == "psnr" else f"LPIPS {point['lpips_to_ref']:.4f}"
        print(f"hiresrun: calibrate delta={delta:g}: {shown}, {point['speedup_nfe']:.2f}x fewer model calls, "
              f"{'meets' if point['meets'] else 'misses'} the target", flush=True)
        if not point["meets"]:
            break
        chosen = delta
    record = {"key": key(cfg.accelerator.setting, base.weights_hash, acc.rule), "delta": chosen,
              "target": {target[0]: target[1]}, "search": SEARCH, "seeds": outputs.seed_ranges(seeds),
              "full": {"nfe_per_image": full["evals"] / len(seeds)}, "curve": curve, "model_source": base.source,
              "grid_exhausted": chosen == deltas[-1]}
    path = Path(cfg.paths.run_dir) / "calibration.json"
    outputs.write_json(path, record)
    outputs.write_json(path.with_name("manifest.json"), outputs.manifest(base.weights_hash, base.source))
    at = next((p for p in curve if p["delta"] == chosen), None)
    outputs.write_metrics(path.parent, "calibrate", {**(at or {}), "delta": chosen, "calibration": str(path),
                                                      "protocol": {"target": record["target"], "seeds": record["seeds"],
                                                                   "search": SEARCH}})
    how = (f"{at['speedup_nfe']:.2f}x fewer model calls" if at else "no grid delta meets it: the full run")
    print(f"hiresrun: delta={chosen:g} for {target[0]} {'>=' if target[0] == 'psnr' else '<='} {target[1]:g} on "
          f"{len(seeds)} seeds ({how}) -> {path}  (use: accelerator.calibration={path})")
    return record


# -- across accelerators: the cost-fidelity front ---------------------------------------------------------
FRONT_SEARCH = ("every point of each family's grid (calibrate.grid) on the calibration seeds; cost in full "
                "network evaluations per image; fidelity to the full-step outputs of the run's own sampler and steps")


JOINT = " x "  # `steps:dpmsolver x deepcache`: every step count of the sampler with every setting of the accelerator


def parts(family: str) -> tuple[str | None, str | None]:
    """(the `steps[:<sampler>]` part or None, the accelerator part or None) of a family; a joint family has both."""
    names = " ".join(family.split()).split(JOINT)  # the word x between spaces joins; names never hold spaces
    steps = [n for n in names if n.split(":")[0] == "steps"]
    rest = [n for n in names if n.split(":")[0] != "steps"]
    if len(names) > 2 or len(steps) > 1 or len(rest) > 1:
        raise UsageError(f"calibrate.families has '{family}': a joint family is one steps[:<sampler>] and one "
                         f"accelerator (or list a-b), e.g. 'steps:dpmsolver x deepcache'")
    return (steps[0] if steps else None), (rest[0] if rest else None)


def family_points(family: str, grid: dict) -> list[dict]:
    """The knob settings of one family: the product of its grid's lists (`steps:<sampler>` uses the `steps` grid; a
    joint family `steps:<sampler> x <accelerator>` the product of both grids: {num_steps, <accelerator knobs>})."""
    from itertools import product

    steps, acc = parts(family)
    if steps and acc:
        return [{**a, **b} for a in family_points(steps, grid) for b in family_points(acc, grid)]
    own = grid.get(family.split(":")[0])
    if own is None:
        raise UsageError(f"calibrate.families has {family} but calibrate.grid has no {family.split(':')[0]} entry; "
                         f"add calibrate.grid.{family.split(':')[0]}={{<knob>: [values]}}")
    if "-" in family:  # a list: each member's knobs under its name -> {"<member>.<knob>": values}
        if not all(isinstance(v, dict) for v in own.values()):
            member = family.split("-")[0]
            raise UsageError(f"calibrate.grid.{family}: a list's grid names each member, e.g. "
                             f"{{{member}: {{<knob>: [values]}}, ...}}")
        own = {f"{k}.{j}": w for k, v in own.items() for j, w in v.items()}
    keys = list(own)
    return [dict(zip(keys, values)) for values in product(*(list(own[k]) for k in keys))]


def build_setting(family: str, knobs: dict, cfg: DictConfig):
    """(accelerator or None, sampler config node) for one point: `steps[:<sampler>]` changes the sampler and its step
    count, any other family names accelerator options (`a-b` a list of them) built with these knobs."""
    from importlib.resources import files

    from hiresrun.build import CHAIN, accelerator_from
    from hiresrun.schema import options

    steps, acc = parts(family)
    if steps and acc:  # the sampler and step count of the steps part, the accelerator of the other
        _, sampler = build_setting(steps, {"num_steps": knobs["num_steps"]}, cfg)
        built, _ = build_setting(acc, {k: v for k, v in knobs.items() if k != "num_steps"}, cfg)
        return built, sampler
    if family.split(":")[0] == "steps":
        sampler = cfg.sampler
        if ":" in family:
            f = files("hiresrun.conf").joinpath("sampler", f"{family.split(':')[1]}.yaml")
            if not f.is_file():
                raise UsageError(f"calibrate.families has {family}: no sampler option {family.split(':')[1]}")
            sampler = OmegaConf.create(f.read_text())
        sampler = OmegaConf.merge(sampler, {"num_steps": int(knobs["num_steps"])})
        return None, sampler
    known = options("accelerator")
    for name in family.split("-"):
        if name not in known:
            raise UsageError(f"calibrate.families has {family}: {name} is not an accelerator option "
                             f"({', '.join(sorted(known))}) or steps[:<sampler>]")
    names = family.split("-")
    if len(names) == 1:
        return accelerator_from(OmegaConf.create({"_target_": known[names[0]]["_target_"], **knobs})), cfg.sampler
    for knob in knobs:  # a list's grid names each knob's member: {adaptive.delta: [...], deepcache.interval: [...]}
        if knob.split(".")[0] not in names or "." not in knob:
            raise UsageError(f"calibrate.grid.{family} has {knob}: a list's knobs are <member>.<knob>, e.g. "
                             f"{names[0]}.{knob.split('.')[-1]}")
    node = {"_target_": CHAIN, **{n: {"_target_": known[n]["_target_"]} for n in names}}
    for knob, value in knobs.items():
        member, key = knob.split(".", 1)
        node[member][key] = value
    return accelerator_from(OmegaConf.create(node)), cfg.sampler  # as `+accelerator=[...]` with these knobs


def pareto(points: list[dict], fidelity_key: str, higher_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and fidelity, cheapest first."""
    sign = 1 if higher_better else -1
    keep = []
    for i, p in enumerate(points):
        dominated = any(q["cost_per_image"] <= p["cost_per_image"] and sign * q[fidelity_key] >= sign * p[fidelity_key]
                        and (q["cost_per_image"], q[fidelity_key]) != (p["cost_per_image"], p[fidelity_key])
                        for q in points)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i]["cost_per_image"])


def overrides_of(point: dict) -> list[str]:
    """The command-line overrides that sample with a point's setting."""
    family, knobs = point["family"], point["knobs"]
    steps, acc = parts(family)
    if steps and acc:
        return (overrides_of({"family": steps, "knobs": {"num_steps": knobs["num_steps"]}})
                + overrides_of({"family": acc, "knobs": {k: v for k, v in knobs.items() if k != "num_steps"}}))
    if family.split(":")[0] == "steps":
        sampler = [f"sampler={family.split(':')[1]}"] if ":" in family else []
        return sampler + [f"sampler.num_steps={knobs['num_steps']}"]
    names = family.split("-")
    head = f"+accelerator={names[0]}" if len(names) == 1 else f"+accelerator=[{','.join(names)}]"
    return [head, *(f"accelerator.{k}={v}" for k, v in knobs.items())]  # a list's knobs: <member>.<knob>


def front(cfg: DictConfig) -> dict:
    """Each family's grid on the calibration seeds, against the full-step outputs: cost per image (full-evaluation
    units: NFE, a cache's partial calls at their FLOP share), wall seconds per image (same process, after a warm-up
    call; the settings take turns batch by batch), PSNR/SSIM/LPIPS-alex; writes front.json (every point, the Pareto
    front, the cheapest point meeting the target) and prints the overrides that sample with it."""
    import time

    from hiresrun.build import build_conditioner, choice, parse_seeds, sampler_scheduler, sampling_net
    from hiresrun.metrics.lpips import LPIPS
    from hiresrun.sampling import Sampler

    target = parse_target(cfg.target)
    families = [str(f) for f in cfg.calibrate.families]
    grid = OmegaConf.to_container(cfg.calibrate.grid, resolve=True)
    plan = [(family, knobs) for family in families for knobs in family_points(family, grid)]
    built = [build_setting(family, knobs, cfg) for family, knobs in plan]  # refused before any image is made
    seeds = parse_seeds(cfg.calibrate.seeds, 0)
    base, method, net, _ = sampling_net(cfg)
    conditioner = build_conditioner(cfg, base)
    device = "cuda" if cfg.trainer.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    lpips = LPIPS(cache_dir=cfg.paths.cache_dir).to(device)  # the front reports PSNR, SSIM and LPIPS
    batch = int(cfg.sample.batch_size)

    net.to(device)

    def module(acc, sampler) -> Sampler:
        own = OmegaConf.create({"sampler": OmegaConf.to_container(sampler, resolve=True)})  # this point's sampler
        return Sampler(net, method, sampler_scheduler(own, base, method), int(sampler.num_steps), acc, conditioner)

    settings = [(None, module(None, cfg.sampler))] + [(p, module(*b)) for p, b in zip(plan, built)]
    runs = [{"images": [], "evals": 0, "seconds": 0.0, "per": {}} for _ in settings]
    for _, sampler in settings:
        sampler.generate(seeds[:1])  # warm-up: the first call pays for allocation and lazy init
    from hiresrun.progress import reporter

    say = reporter(len(seeds) * len(settings), f"calibrate: {len(settings)} settings x {len(seeds)} seeds")
    for i in range(0, len(seeds), batch):  # settings take turns batch by batch: load falls on all of them alike
        chunk = seeds[i:i + batch]
        for (_, sampler), r in zip(settings, runs):
            mark = sampler.accelerator.mark()
            start = time.perf_counter()
            out = sampler.generate(chunk)
            r["seconds"] += time.perf_counter() - start
            r["images"].append(out["images"])
            r["evals"] += int(out["evals"])
            r["per"].update(sampler.accelerator.per_image(mark, chunk) or {})
            say(len(chunk))
    for (_, sampler), r in zip(settings, runs):
        summary = sampler.accelerator.summary(r["per"]) if len(r["per"]) == len(seeds) else None
        r.update(images=torch.cat(r["images"]), nfe_per_image=r["evals"] / len(seeds),
                 cost_per_image=(summary[1] if summary else {}).get("cost_per_image", r["evals"] / len(seeds)),
                 sec_per_image=r["seconds"] / len(seeds))
    keep = ("nfe_per_image", "cost_per_image", "sec_per_image")
    full, points = runs[0], []
    for ((family, knobs), _), r in zip(settings[1:], runs[1:]):
        point = {"family": family, "knobs": knobs, **{k: r[k] for k in keep},
                 "speedup_cost": full["cost_per_image"] / r["cost_per_image"],
                 "speedup_wall": full["sec_per_image"] / r["sec_per_image"],
                 **fidelity(r["images"], full["images"], lpips)}
        point["meets"] = meets(point, target)
        point["overrides"] = overrides_of(point)
        points.append(point)
        print(f"hiresrun: {family} {knobs}: cost {point['cost_per_image']:.2f} / {full['cost_per_image']:.0f}, "
              f"wall {point['speedup_wall']:.2f}x, PSNR {point['psnr_to_ref']:.2f} dB", flush=True)
    key_name = "psnr_to_ref" if target[0] == "psnr" else "lpips_to_ref"
    on_front = pareto(points, key_name, target[0] == "psnr")
    meeting = [p for p in points if p["meets"]]
    best = min(meeting, key=lambda p: (p["cost_per_image"], -p["psnr_to_ref"])) if meeting else None
    record = {"target": {target[0]: target[1]}, "search": FRONT_SEARCH, "seeds": outputs.seed_ranges(seeds),
              "full": {**{k: full[k] for k in keep}, "sampler": choice(cfg, "sampler"),
                       "num_steps": int(cfg.sampler.num_steps)},
              "families": families, "points": points, "front": on_front, "best": best, "model_source": base.source,
              "model_weights_sha256": base.weights_hash,
              "hardware": f"{device}, {torch.get_num_threads()} threads, batch {batch}"}
    path = Path(cfg.paths.run_dir) / "front.json"
    outputs.write_json(path, record)
    outputs.write_metrics(path.parent, "calibrate", {
        **({k: best[k] for k in ("family", "cost_per_image", "speedup_cost", "speedup_wall", "psnr_to_ref")}
           if best else {}), "front": str(path),
        "protocol": {"target": record["target"], "seeds": record["seeds"], "search": FRONT_SEARCH}})
    if best:
        print(f"hiresrun: cheapest setting with {target[0]} {'>=' if target[0] == 'psnr' else '<='} {target[1]:g}: "
              f"{' '.join(best['overrides'])} ({best['speedup_cost']:.2f}x less compute, "
              f"{best['speedup_wall']:.2f}x wall) -> {path}")
    else:
        print(f"hiresrun: no setting meets {target[0]} {target[1]:g}; the front is in {path}")
    return record
