"""Run folder names a person can tell apart: `<time>-<model>-<method>[-<accelerator>]` for a run, and
`<job number>-<the overrides the sweep varies>` for a sweep's job (conf/config.yaml's `hydra.run.dir` and
`hydra.sweep.subdir` call the two resolvers registered here). `hydra.run.dir=` still names any folder."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

SAFE = re.compile(r"[^A-Za-z0-9._=+,@-]+")
LONGEST = 120  # characters of a folder name past the time / job number; longer ones are cut


def _safe(text: str) -> str:
    return SAFE.sub("_", text).strip("_.")[:LONGEST] or "run"


def accelerator_name(cfg: DictConfig, choices: DictConfig) -> str | None:
    """The accelerator as metrics.json names it: the option, or a list's members in their applied order joined by
    `-`; None for none."""
    chosen = choices.get("accelerator")
    if chosen in (None, "none"):
        return None
    if chosen != "chain":
        return str(chosen)
    from hiresrun.build import member_nodes, ordered

    return "-".join(ordered(member_nodes(cfg.accelerator))) or None


def model_name(cfg: DictConfig, choices: DictConfig) -> str:
    """The model option, or for `model=diffusers` the name of the folder (or hub id) it loads."""
    model = str(choices.get("model") or "model")
    if model == "diffusers":
        path = OmegaConf.select(cfg, "model.path", default=None, throw_on_missing=False)
        model = Path(str(path).rstrip("/")).name if path else model
    return model


def run_name(_root_: DictConfig) -> str:
    """`<model>-<method>[-<accelerator>]` for sample, train and calibrate; the model for pretrain; the scored
    folder's name for eval and merge. A `model=diffusers` run is named by its folder's name."""
    choices = _root_.hydra.runtime.choices
    task = str(_root_.get("task"))
    if task in ("eval", "merge"):
        gen = OmegaConf.select(_root_, f"{task}.gen", default=None, throw_on_missing=False)
        gen = gen[0] if isinstance(gen, (list, tuple)) or OmegaConf.is_list(gen) else gen
        return _safe(Path(str(gen)).name) if gen else task
    model = model_name(_root_, choices)
    if task == "pretrain":
        return _safe(model)
    parts = [model, str(choices.get("method") or "none"), accelerator_name(_root_, choices)]
    return _safe("-".join(p for p in parts if p))


def swept(_root_: DictConfig) -> str:
    """The overrides of this job whose key the sweep varies (`method=upsample,sampler.num_steps=10`), read from the
    sweep's own multirun.yaml (written before any job starts); "" when it is not there."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = _root_.hydra
    saved = Path(str(hydra.sweep.dir)) / "multirun.yaml"
    try:
        sweep = OmegaConf.load(saved).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in sweep])
    except Exception:  # noqa: BLE001 - no sweep file (a launcher that writes none): the number alone
        return ""
    varied = {o.key_or_group for o in parsed if o.is_sweep_override()}
    mine = [str(o) for o in hydra.overrides.task if str(o).split("=", 1)[0].lstrip("+~") in varied]
    return _safe(",".join(o.lstrip("+") for o in mine)) if mine else ""


def job_dir(_root_: DictConfig) -> str:
    """A sweep job's folder name: its number, then the overrides the sweep varies."""
    varied = swept(_root_)
    number = str(_root_.hydra.job.num)
    return f"{number}-{varied}" if varied else number


def register() -> None:
    """The resolvers conf/config.yaml's folder names call; registering twice is harmless."""
    for name, fn in (("hiresrun_run_name", run_name), ("hiresrun_job_dir", job_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def job_number(folder: Path) -> int | None:
    """The job number a sweep job's folder name starts with (`3` or `3-method=upsample`); None for another folder."""
    found = re.match(r"(\d+)(?:-|$)", folder.name)
    return int(found[1]) if found else None
