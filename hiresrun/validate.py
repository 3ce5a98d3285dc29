"""A composed config checked before anything is built or written: every value torch, Lightning or a constructor
would fail on late, or, worse, accept (a NaN skip scale, a fractional step count), refused in one line naming the
key and the fix (docs/ARCHITECTURE.md, "Contracts": "Errors").

Two kinds of checks: the typed knobs of every object a config builds (`model`, `method`, each accelerator of a list,
`metrics`, `data`, `optimizer`), read from the annotations of its `_target_`'s signature (the signature is the
schema, hiresrun/schema.py): a float knob takes a finite number, an integer knob a whole number; and the fixed keys
of the primary config (counts, seeds, step numbers, the trainer). What a constructor checks about its own values it
says in its own line.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from hiresrun.errors import UsageError

PRECISIONS = ("64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
              "transformer-engine", "transformer-engine-float16")
COUNTS = {  # key -> smallest value (whole numbers; None: the model checks the size, naming its own step)
    "sampler.num_steps": 1, "data.batch_size": 1, "sample.batch_size": 1, "train.checkpoint_every": 1,
    "sample.num_samples": 1, "data.resolution": None, "seed": 0, "sample.progress_every": 0, "trainer.max_steps": -1,
    "train.grid_every": 0, "train.grid_seeds": 1, "sample.max_sequence_length": 1,
}
HINTS = {"sampler.num_steps": " (e.g. sampler.num_steps=50)",
         "sample.num_samples": ", or give the images explicitly with sample.seeds=0-99",
         "trainer.max_steps": " (-1: no limit)"}


def whole(key: str, value, least: int | None = None) -> int:
    """`value` as an int when it is a whole number (not a bool, a fraction, NaN or text), at least `least`."""
    ok = isinstance(value, int) and not isinstance(value, bool) or \
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if not ok:
        raise UsageError(f"{key}={value}: must be a whole number{HINTS.get(key, '')}")
    if least is not None and int(value) < least:
        raise UsageError(f"{key}={value}: must be at least {least}{HINTS.get(key, '')}")
    return int(value)


def finite(key: str, value) -> float:
    """`value` as a float when it is a finite number (not a bool, NaN, infinity or text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{key}={value}: must be a finite number")
    return float(value)


def typed_knobs(prefix: str, node: DictConfig) -> None:
    """Each key of `node` that its `_target_`'s signature annotates as float or int takes a finite or whole number
    (a `float | None` knob may be null; a list-typed knob is the constructor's to check)."""
    from hydra.utils import get_method

    try:
        params = inspect.signature(get_method(str(node._target_))).parameters
    except (ImportError, ValueError, TypeError, AttributeError):
        return  # an unknown target is refused where it is built, naming it
    for key, param in params.items():
        if key not in node or param.annotation is inspect.Parameter.empty:
            continue
        annotation = param.annotation if isinstance(param.annotation, str) else str(param.annotation)
        kinds = set(re.findall(r"[A-Za-z_]+", annotation))
        value = OmegaConf.select(node, key, throw_on_missing=False)
        if value is None or isinstance(value, (list, dict, ListConfig, DictConfig)) or "str" in kinds:
            continue
        if isinstance(value, bool) and "bool" in kinds:
            continue
        if "float" in kinds:
            finite(f"{prefix}.{key}", value)
        elif "int" in kinds:
            whole(f"{prefix}.{key}", value)


# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: s and s + 2^32 give the same noise. Seeds
# 2^31 .. 2^32 - 1 are reserved for what training draws per image (Self-Cascade's generated pivots,
# sampling.training_generators); sampling seeds lie below 2^31 (parse_seeds refuses the rest), so no training draw
# ever equals an evaluation draw.
TRAINING_SEEDS = 2 ** 31


def parse_seeds(seeds, num_samples: int) -> list[int]:
    """`null` -> 0..num_samples-1; `[3,7,11]`; `"0-999"` (inclusive); `"0-9,20-29"`; a single int."""
    def seed(s) -> int:  # a whole number, as typed: no bool, fraction or text
        integral = isinstance(s, int) and not isinstance(s, bool) or isinstance(s, float) and s.is_integer()
        if not integral:
            raise UsageError(f"sample.seeds={seeds}: seeds are whole numbers; write a list [3,7,11] or ranges like "
                             f"0-999")
        return int(s)

    if seeds is None:
        out = list(range(int(num_samples)))
    elif isinstance(seeds, (int, float)):
        out = [seed(seeds)]
    elif isinstance(seeds, (list, tuple, ListConfig)):
        out = [seed(s) for s in seeds]
    else:
        out = []
        for part in str(seeds).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
            if not m or (m[2] and int(m[2]) < int(m[1])):
                raise UsageError(f"sample.seeds={seeds}: write a list [3,7,11] or ranges like 0-999")
            out += list(range(int(m[1]), int(m[2] or m[1]) + 1))
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise UsageError(f"sample.seeds={seeds}: seeds must be non-negative, distinct and at least one")
    if max(out) >= TRAINING_SEEDS:
        raise UsageError(f"sample.seeds={str(seeds)[:60]}: seeds must lie below 2^31 (torch's generator reads 32 "
                         f"bits; 2^31 .. 2^32 - 1 are reserved for training draws)")
    return out


def check_values(cfg: DictConfig) -> None:
    """Values torch or Lightning would fail on late (or, worse, accept): one line each, before anything is built or
    written. What a constructor checks itself (method.*, accelerator.*) it says in its own line."""
    check_plain_values(cfg)
    trainer = cfg.get("trainer") or {}
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and not __import__("torch").cuda.is_available():
        raise UsageError("trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu (or run on a GPU "
                         "machine)")
    check_constructed_values(cfg)


def check_plain_values(cfg: DictConfig) -> None:
    """The checks that read the config alone (counts, seeds, rates, devices, precision): the command line runs them
    before Hydra starts the run, so such a mistake is one line without importing torch."""

    def select(key: str):
        return OmegaConf.select(cfg, key, throw_on_missing=False)

    for group, key, choice_ in (("model", "path", "model=diffusers"), ("data", "root", "data=folder")):
        if group in cfg and key in cfg[group].keys() and OmegaConf.is_missing(cfg[group], key):
            raise UsageError(f"{group}.{key} is required with {choice_}: pass {group}.{key}=<folder>")
    for key, least in COUNTS.items():
        value = select(key)
        if value is not None and not (key == "sample.num_samples" and select("sample.seeds") is not None):
            whole(key, value, least)
    if cfg.get("sample") and cfg.task in ("sample", "calibrate"):
        parse_seeds(cfg.sample.get("seeds"), int(cfg.sample.num_samples))
    lr = select("optimizer.lr")
    if cfg.task in ("train", "pretrain") and lr is not None and not (
            isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"optimizer.lr={lr}: must be a positive finite number (e.g. optimizer.lr=2e-4)")
    for key in ("sample.guidance_scale", "sample.guidance_rescale", "sample.true_cfg_scale", "train.ema_decay",
                "train.caption_dropout", "train.label_dropout"):
        if select(key) is not None:
            finite(key, select(key))
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices")
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        raise UsageError(f"trainer.devices={devices}: give a count >= 1, -1 (all) or a list of device indices")
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in PRECISIONS:
        raise UsageError(f"trainer.precision={precision}: choose one of {', '.join(PRECISIONS[:10])}")


def check_constructed_values(cfg: DictConfig) -> None:
    """The checks that read the constructors' signatures (typed knobs), the metrics' own and the reference folder."""
    scored = "_target_" in (cfg.get("metrics") or {})
    for group in ("model", "method", "metrics", "data", "optimizer"):
        if group == "data" and cfg.task in ("sample", "calibrate") and not scored:
            continue  # a sample run reads no data unless it is scored (and hiresrun.data imports Lightning)
        if "_target_" in (cfg.get(group) or {}):
            typed_knobs(group, cfg[group])
    if "_target_" in (cfg.get("metrics") or {}) and cfg.task in ("sample", "merge", "eval"):
        from hydra.utils import instantiate

        # its own value checks, and the weights it will need on this machine; nothing heavy is built until scoring
        instantiate(cfg.metrics).check_weights(lpips=bool(cfg.get("reference")))
    if "_target_" in (cfg.get("accelerator") or {}):
        from hiresrun.build import member_nodes

        members = member_nodes(cfg.accelerator)
        for name, part in (members or {"": cfg.accelerator}).items():
            typed_knobs(f"accelerator.{name}" if name else "accelerator", part)
    reference = cfg.get("reference")
    if reference and cfg.task in ("sample", "merge", "eval") and not Path(str(reference)).expanduser().is_dir():
        raise UsageError(f"reference={reference}: no such folder; give the run folder of a `hiresrun sample` run "
                         f"with the same seeds")


def default_resolution(cfg: DictConfig) -> None:
    """`data.resolution` unset (the model file states no native size): the model's own, read from its config files;
    and a model whose weights learned other data is not scored against the embedded MNIST."""
    if "data" not in cfg or "model" not in cfg or OmegaConf.is_missing(cfg.model, "path"):
        return  # check_values names a missing model.path
    if OmegaConf.select(cfg, "data.resolution") is None and cfg.task in ("sample", "train", "calibrate"):
        from hiresrun.models import native_resolution

        native = native_resolution(str(cfg.model.path), cfg.model.get("revision"), cfg.model.get("vae"))
        if native is None:
            raise UsageError(f"data.resolution is not set and model.path={cfg.model.path} states no native size "
                             f"(no local config); set data.resolution=<image side in px>")
        cfg.data.resolution = native
    trained_on = cfg.model.get("trained_on")
    mnist = str(cfg.data.get("_target_", "")).endswith("MnistDataModule")
    if mnist and trained_on not in (None, "mnist") and "_target_" in (cfg.get("metrics") or {}):
        raise UsageError(f"metrics= would score a model trained on {trained_on} against MNIST digits; give its real "
                         f"images: data=folder data.root=<folder of images>")
