"""`hiresrun calibrate`: the largest AdaptiveDiffusion delta that keeps a fidelity target, and its file.

Fidelity is measured as in the paper's protocol (spec §7): each image against the full-step output of the same
seed, model, method, sampler and step count. Search: an ascending grid of delta (`calibrate.deltas`), stopped at
the first value that misses the target; the answer is the last value that met it, or 0 (the full run). fidelity(
delta) is only roughly monotone, so stopping at the first miss never returns a delta beyond a dip below the target.
The file's key names what the delta is valid for; `accelerator.calibration=<file>` refuses any other setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from hiresrun import outputs
from hiresrun.errors import UsageError

KEY = ("model_weights_sha256", "resolution", "sampler", "num_steps", "method", "rule")
SEARCH = "ascending delta grid (calibrate.deltas), stopped at the first delta that misses the target"


# -- the key: what a calibrated delta is valid for --------------------------------------------------------
def key(setting: dict, model_weights_sha256: str, rule: dict) -> dict:
    """(model weights, resolution, sampler, steps), plus the method and every other accelerator setting, and for
    text models a set guidance scale / negative prompt, as JSON reads them back. `setting` is
    conf/accelerator/adaptive.yaml's `setting` node: the run's own config."""
    setting = OmegaConf.to_container(setting, resolve=True) if OmegaConf.is_config(setting) else dict(setting)
    sampler = {k: v for k, v in setting["sampler"].items() if k != "_partial_"}
    guidance = {k: setting[k] for k in ("guidance_scale", "negative_prompt") if setting.get(k) is not None}
    return json.loads(json.dumps({"model_weights_sha256": model_weights_sha256, "resolution": setting["resolution"],
                                  "sampler": sampler, "num_steps": setting["num_steps"], "method": setting["method"],
                                  "rule": rule, **({"guidance": guidance} if guidance else {})}, sort_keys=True))


def model_sha256(path: str, revision: str | None = None) -> str:
    """The base's identity as `load_model` computes it: sha256 over the UNet folder's weight files."""
    from hiresrun.models import _fetch, _resolve, denoiser_dir, weights_hash

    root = _resolve(path) or _fetch(path, revision)
    return weights_hash(denoiser_dir(root))


def load(path: str, setting: dict | None, rule: dict) -> float:
    """The delta in a calibration file, once its key matches this run (else one line naming the difference)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"accelerator.calibration={path}: no such file; pass the calibration.json that "
                         f"`hiresrun calibrate` printed")
    try:
        record = json.loads(p.read_text())
        saved, delta = record["key"], float(record["delta"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"accelerator.calibration={path}: not a `hiresrun calibrate` file (no key and delta); "
                         f"pass the calibration.json it printed") from None
    if setting is None:
        raise UsageError("accelerator.calibration needs accelerator.setting (conf/accelerator/adaptive.yaml fills it "
                         "from the run's config); construct AdaptiveDiffusion with delta= instead")
    here = key(setting, model_sha256(setting["model"], setting.get("revision")), rule)
    for name in (*KEY, "guidance"):
        if saved.get(name) != here.get(name):
            raise UsageError(f"accelerator.calibration={path} was calibrated for {name} {_short(saved.get(name))}, "
                             f"this run has {_short(here.get(name))}; run `hiresrun calibrate` with this run's "
                             f"settings")
    return delta


def _short(value) -> str:
    text = value[:12] if isinstance(value, str) and len(value) == 64 else json.dumps(value, sort_keys=True)
    return text if len(text) <= 100 else text[:97] + "..."


# -- fidelity to the full-step outputs (spec §7) ----------------------------------------------------------
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
    from hiresrun.build import build_accelerator, build_conditioner, parse_seeds, sampler_scheduler, sampling_net
    from hiresrun.lit import LitModule
    from hiresrun.metrics.lpips import LPIPS

    target = parse_target(cfg.target)
    if "delta" not in cfg.accelerator:
        raise UsageError("hiresrun calibrate tunes the adaptive accelerator's delta: add +accelerator=adaptive")
    deltas = [float(d) for d in cfg.calibrate.deltas]
    if not deltas or min(deltas) <= 0 or deltas != sorted(set(deltas)):
        raise UsageError(f"calibrate.deltas={list(deltas)}: give positive values in ascending order, e.g. "
                         f"[0.002,0.005,0.01,0.02]")
    seeds = parse_seeds(cfg.calibrate.seeds, 0)
    base, method, net = sampling_net(cfg)
    conditioner = build_conditioner(cfg, base)  # text models: the run's prompts and guidance
    device = "cuda" if cfg.trainer.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    lpips = LPIPS(cache_dir=cfg.paths.cache_dir).to(device) if target[0] == "lpips" else None

    def run(acc=None) -> dict:
        lit = LitModule(net, method, sampler_scheduler(cfg, base, method), cfg.sampler.num_steps, acc,
                        conditioner=conditioner).to(device)
        parts = [lit.generate(seeds[i:i + cfg.sample.batch_size])
                 for i in range(0, len(seeds), cfg.sample.batch_size)]
        return {"images": torch.cat([p["images"] for p in parts]), "evals": sum(int(p["evals"]) for p in parts)}

    full, curve, chosen = run(), [], 0.0
    for delta in deltas:
        acc = build_accelerator(cfg, delta=delta, calibration=None)
        r = run(acc)
        point = {"delta": delta, "nfe_per_image": r["evals"] / len(seeds), "speedup_nfe": full["evals"] / r["evals"],
                 **fidelity(r["images"], full["images"], lpips)}
        point["meets"] = meets(point, target)
        curve.append(point)
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
