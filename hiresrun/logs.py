"""What a run tells its logger besides the numbers, so that a logged run can be found and read without its folder:
the resolved config, a name and tags (verb, model, method, accelerator, sampler), a sweep as one group, the sample
grid with its captions, and a table of samples (seed, prompt or label, image, NFE). wandb gets all of it; TensorBoard
the config, the grids and the table as text; CSV the config (hparams.yaml) beside its metrics. wandb itself prints
nothing: hiresrun says in one line where the run is and how to upload it (`announce`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

TABLE_ROWS = 64  # samples in the logged table (the folder holds all of them)


def quiet_wandb() -> None:
    """No banner, no progress chatter and no colour codes from wandb in the console or the log files; a user's own
    WANDB_SILENT / WANDB_CONSOLE win."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def identity(cfg: DictConfig) -> dict:
    """The run's name (its folder's), tags and sweep group, from Hydra's record of the choices."""
    from hydra.core.hydra_config import HydraConfig

    from hiresrun.naming import accelerator_name, model_name

    choices, group = {}, None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        choices = hc.runtime.choices
        if str(hc.mode) == "RunMode.MULTIRUN":  # the sweep folder: <date>/<time> under the outputs root, or its name
            sweep = Path(str(hc.sweep.dir))
            dated = re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep.parent.name)
            group = f"{sweep.parent.name}/{sweep.name}" if dated else sweep.name
    model = model_name(cfg, choices)
    tags = [str(cfg.task), model, f"method={choices.get('method') or 'none'}",
            f"accelerator={accelerator_name(cfg, choices) or 'none'}" if choices else "accelerator=none",
            f"sampler={choices.get('sampler') or 'ddim'}"]
    return {"name": Path(str(cfg.paths.run_dir)).name, "tags": tags, "group": group, "job_type": str(cfg.task)}


def logger_arguments(cfg: DictConfig) -> dict:
    """Keyword arguments for the configured logger's constructor: wandb's run name, tags, group and job type."""
    target = str(cfg.logger._target_)
    if not target.endswith("WandbLogger"):
        return {}
    quiet_wandb()
    said = identity(cfg)
    given = OmegaConf.to_container(cfg.logger)
    return {k: v for k, v in said.items() if v is not None and given.get(k) is None}


def log_config(logger, cfg: DictConfig) -> None:
    """The resolved config of the keys the verb reads (cli.VERB_KEYS), as the logger keeps hyperparameters (wandb
    config, hparams.yaml, TensorBoard hparams)."""
    from hiresrun.cli import VERB_KEYS

    read = VERB_KEYS.get(str(cfg.task), tuple(cfg))
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False).items() if k in read}
    logger.log_hyperparams(keep)


def _is(logger, name: str) -> bool:
    return type(logger).__name__ == name


def log_grid(logger, key: str, path: Path, caption: str, step: int | None = None) -> None:
    """A saved grid PNG as an image of the run (wandb with its caption; TensorBoard as an image)."""
    if _is(logger, "WandbLogger"):
        logger.log_image(key, [str(path)], step=step, caption=[caption])
    elif _is(logger, "TensorBoardLogger"):
        from PIL import Image

        logger.experiment.add_image(key, np.asarray(Image.open(path).convert("RGB")), global_step=step or 0,
                                    dataformats="HWC")


def log_samples(logger, images, seeds: list[int], nfe: list[float], prompts: list[str] | None,
                labels: list[int] | None) -> None:
    """The first TABLE_ROWS samples as a table: seed, prompt or class label, the image, its network evaluations."""
    n = min(TABLE_ROWS, len(seeds))
    said = prompts if prompts is not None else [str(x) for x in labels] if labels is not None else None
    columns = ["seed", *(["prompt" if prompts is not None else "label"] if said is not None else []), "image", "nfe"]
    if _is(logger, "WandbLogger"):
        import wandb

        rows = [[seeds[i], *([said[i]] if said is not None else []),
                 wandb.Image(images[i].permute(1, 2, 0).squeeze(-1).numpy()), nfe[i]] for i in range(n)]
        logger.log_table("sample/images", columns=columns, data=rows)
    elif _is(logger, "TensorBoardLogger"):
        head = "| " + " | ".join(c for c in columns if c != "image") + " |"
        lines = [head, "|" + "---|" * (len(columns) - 1)]
        lines += ["| " + " | ".join(str(v) for v in [seeds[i], *([said[i]] if said is not None else []), nfe[i]])
                  + " |" for i in range(n)]
        logger.experiment.add_text("sample/images", "\n".join(lines), global_step=0)


def close(logger) -> None:
    """End the run's wandb run (the next run of a sweep in this process starts its own) after one line saying where
    it is and how to upload it (an online one: its page). Other loggers: nothing to do."""
    from lightning.pytorch.utilities import rank_zero_only

    if not _is(logger, "WandbLogger") or rank_zero_only.rank != 0:  # other ranks hold a stand-in experiment
        return
    run = logger.experiment
    folder = Path(run.dir).parent if getattr(run, "dir", None) else None
    if getattr(run.settings, "mode", "") in ("offline", "dryrun") or getattr(run.settings, "_offline", False):
        print(f"hiresrun: wandb run '{run.name}' saved offline in {folder}; upload it with: wandb sync {folder}")
    elif getattr(run, "url", None):
        print(f"hiresrun: wandb run '{run.name}': {run.url}")
    run.finish()
