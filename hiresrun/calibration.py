"""Calibration files: what a delta from `hiresrun calibrate` is valid for (its key) and reading one back for
`accelerator.calibration=<file>` (accelerators/adaptive.py), refusing a file made for another model or setting. Kept
apart from the verb (hiresrun/tune.py) so the accelerator imports no verb module."""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

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
        if not isinstance(saved, dict) or not math.isfinite(delta) or delta < 0:
            raise ValueError
    except (ValueError, KeyError, TypeError, IndexError):
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
