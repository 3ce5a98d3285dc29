"""The Python API: the verbs as functions, for notebooks and scripts.

    import hiresrun
    result = hiresrun.sample("+method=selfcascade", "data.resolution=32", sampler__num_steps=20)
    result.metrics["nfe_per_image"], result.images.shape, result.run_dir

Each verb takes the command line's overrides, as strings (`"sampler.num_steps=20"`, `"+method=selfcascade"`) and/or
as keyword arguments, where `__` stands for the dot (`sampler__num_steps=20`, `method="selfcascade"`); `run_dir=`
places the run folder (the command line's `hydra.run.dir=`). The run goes through Hydra's own job runner, as the
command line does (the run folder, its `.hydra/` record, the same task functions in hiresrun/run.py), but leaves the
caller's logging alone. A refusal or failure raises `HiresrunError` whose message is the command line's one line;
nothing is composed from `sys.argv`, so it can be called any number of times in one process.

`load(...)` returns a `sampling.Sampler` built from the same overrides, which makes images for seeds in memory and
writes no run folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from hiresrun.errors import DataError, UsageError
from hiresrun.naming import register as register_folder_names

register_folder_names()  # the resolvers conf/config.yaml's run and sweep folder names call

CONFIG_MODULE = "hiresrun.conf"


@dataclass
class Result:
    """What a verb made: its run folder, its metrics (metrics.json's content; calibrate: the calibration record), and
    for sample runs the images of samples/ (uint8, loaded when first asked for)."""

    run_dir: Path
    metrics: dict = field(default_factory=dict)

    @cached_property
    def seeds(self) -> list[int]:
        return sorted(int(p.stem) for p in (self.run_dir / "samples").glob("*.png") if p.stem.isdigit())

    @cached_property
    def images(self):
        """uint8 tensor (N, C, H, W), one image per seed in seed order."""
        from hiresrun import outputs

        if not self.seeds:
            raise DataError(f"{self.run_dir} has no samples/ images (a sample run with sample.save_images=true "
                            f"keeps them)")
        return outputs.load_images(self._png(s) for s in self.seeds)

    def pil(self) -> list:
        """The images as PIL images, in seed order."""
        from PIL import Image

        return [Image.open(self._png(s)).copy() for s in self.seeds]

    def _png(self, seed: int) -> Path:
        from hiresrun.store import SAMPLES, png_name

        return self.run_dir / SAMPLES / png_name(seed)

    @property
    def checkpoint(self) -> Path | None:
        """A training run's last checkpoint (what `ckpt_path=` takes), if it wrote one."""
        path = self.run_dir / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None


def overrides(args: Sequence[str] = (), options: dict | None = None, verb: str | None = None) -> list[str]:
    """Override strings from positional strings and keyword arguments (`a__b=v` -> `a.b=v`), in the command line's
    forms: `+method=` as `method=`, a verb's short forms (eval's `gen=`, merge's `gen=`), values in Hydra's grammar."""
    from hiresrun import cli

    for a in args:
        if not isinstance(a, str) or "=" not in a:
            raise UsageError(f"{a!r}: overrides are 'key=value' strings (or keyword arguments key=value)")
    given = list(args) + [f"{k.replace('__', '.')}={hydra_value(v)}" for k, v in (options or {}).items()]
    given = cli.verb_forms(verb, given) if verb else given
    return cli.list_selection([a[1:] if any(a.startswith(f"+{g}=") for g in cli.ADDABLE) else a for a in given])


def hydra_value(value) -> str:
    """A Python value as Hydra's override grammar reads it back: None -> null, bools lower-case, lists bracketed,
    strings quoted where the grammar could not read them bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, (dict, DictConfig)):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides([f"k={text}"])[0].value()
        if isinstance(parsed, str) and parsed == text:
            return text
    except OverrideParseException:
        pass
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def config(verb: str = "sample", *args: str, **options) -> DictConfig:
    """The config `hiresrun <verb> <overrides>` runs with (Hydra's node included), composed as the command line
    composes it before the run (the grammar, unknown keys and options are refused); values are checked when it runs.
    Nothing is built or written, and nothing heavy is imported."""
    from hydra import initialize_config_module

    from hiresrun import cli

    if verb not in cli.VERBS:
        raise UsageError(f"unknown verb '{verb}'; use one of: {', '.join(cli.VERBS)}")
    given = overrides(args, options, verb) + [f"task={verb}"]
    cli.check_grammar(given)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return cli.compose(given)


def _run(verb: str, args: Sequence[str], options: dict) -> Result:
    from hydra import initialize_config_module
    from hydra._internal.callbacks import Callbacks  # what Hydra.run hands run_job (hydra.callbacks)
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobStatus, run_job
    from hydra.types import HydraContext

    from hiresrun import cli, outputs, run

    run_dir = options.pop("run_dir", None)
    given = overrides(args, options, verb) + ([f"hydra.run.dir={hydra_value(str(run_dir))}"] if run_dir else [])
    given.append(f"task={verb}")
    cli.check_grammar(given)
    folder: list[Path] = []

    def task(cfg: DictConfig):
        folder.append(Path(cfg.paths.run_dir))
        try:
            return run.run(cfg)
        except Exception as e:
            ours = cli.as_error(e)
            if isinstance(ours, UsageError):
                cli._clean_failed_run()  # a refusal leaves no run folder behind (nothing was written but .hydra/)
            raise ours from e

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = cli.compose(given)
        if run.several_processes(cfg.trainer):
            raise UsageError(f"trainer: {trainer_line(cfg.trainer)} starts several processes, which Lightning launches "
                             f"by running the command that started this one again; run it from the command line: "
                             f"hiresrun {verb} ...")
        cli.check_run_dir(str(cfg.hydra.run.dir))
        outputs.API_COMMAND = [verb, *given[:-1]]  # the manifest's command line: the verb and its overrides
        try:
            # Hydra's runner as the command line uses it, minus its log configuration; a failed job's exception is
            # read from the JobReturn directly (its `return_value` property also prints Hydra's banner to stderr)
            job = run_job(hydra_context=HydraContext(GlobalHydra.instance().config_loader(), Callbacks(cfg)),
                          task_function=task, config=_with_mode(cfg), job_dir_key="hydra.run.dir",
                          job_subdir_key=None, configure_logging=False)
        finally:
            outputs.API_COMMAND = None
    if job.status == JobStatus.FAILED:
        raise job._return_value
    out = Path(folder[0])
    value = job._return_value
    if isinstance(value, dict):
        metrics = value
    else:
        saved = out / "metrics.json"
        metrics = json.loads(saved.read_text()) if saved.is_file() else {}
    return Result(out, metrics)


def trainer_line(trainer: DictConfig) -> str:
    return " ".join(f"trainer.{k}={trainer.get(k)}" for k in ("devices", "num_nodes", "strategy") if k in trainer)


def _with_mode(cfg: DictConfig) -> DictConfig:
    """A composed config marked as a single run, as Hydra's own `run` marks it."""
    from hydra.types import RunMode

    with open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
    return cfg


def sample(*args: str, **options) -> Result:
    """`hiresrun sample`: images into a run folder, scored once (docs/ for the knobs). Returns the folder, the
    metrics and the images."""
    return _run("sample", args, options)


def train(*args: str, **options) -> Result:
    """`hiresrun train`: train what the method trains; `result.checkpoint` is what `ckpt_path=` takes."""
    return _run("train", args, options)


def pretrain(*args: str, **options) -> Result:
    """`hiresrun pretrain`: train a base model from scratch at its own resolution."""
    return _run("pretrain", args, options)


def calibrate(*args: str, **options) -> Result:
    """`hiresrun calibrate`: AdaptiveDiffusion's delta for a fidelity target, or a cost-fidelity front."""
    return _run("calibrate", args, options)


def evaluate(*args: str, **options) -> Result:
    """`hiresrun eval`: score a folder of images (`gen=`) against real images (`ref=`, default the data's set)."""
    return _run("eval", args, options)


def merge(*args: str, **options) -> Result:
    """`hiresrun merge gen=<folder>`: score the shards of one sample run over their union."""
    return _run("merge", args, options)


def command(argv: Sequence[str]) -> Result:
    """A command line's verb and overrides (`["sample", "+method=upsample", "hydra.run.dir=out"]`), run as the
    function of its verb: the in-process form of `hiresrun <argv>` for plain runs (no `-m` sweep or Hydra flag)."""
    from hiresrun import cli

    if not argv or argv[0] not in cli.VERBS:
        raise UsageError(f"command: start with a verb, one of {', '.join(cli.VERBS)}")
    bad = [a for a in argv[1:] if a.startswith("-")]
    if bad:
        raise UsageError(f"command: {bad[0]} is a flag of the hiresrun command line; run it there")
    return _run(argv[0], argv[1:], {})


def load(*args: str, device: str | None = None, **options):
    """A `sampling.Sampler` built from sample overrides (model, method and checkpoint, accelerator, sampler, steps,
    prompts and guidance), checked as `hiresrun sample` checks them, on `device` (default: the trainer config's one
    device, else the CPU) with the trainer's mixed precision. `sampler(seeds)` -> uint8 images; `generate(seeds)` adds
    their costs. Writes nothing."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    from hiresrun import build, cli, run, support, validate

    cfg = config("sample", *args, "paths.run_dir=null", **options)
    hydra, previous = HydraConfig.instance(), HydraConfig.instance().cfg
    hydra.set_config(cfg)  # the option names (method=, accelerator=) in refusals, as in a run; restored below
    with read_write(cfg), open_dict(cfg):
        cfg.pop("hydra")
    try:  # what run.run checks before the sample verb builds anything
        validate.default_resolution(cfg)
        validate.check_values(cfg)
        OmegaConf.resolve(cfg)
        support.check(cfg, build.choice(cfg, "method"), build.choice(cfg, "accelerator"))
        sampler, _ = build.build_sampler(cfg)
    except Exception as e:
        raise cli.as_error(e) from e
    finally:
        hydra.cfg = previous
    target = torch.device(device) if device is not None else run.one_device(cfg) or torch.device("cpu")
    sampler.net.to(target).eval()
    sampler.autocast = run.MIXED.get(str(cfg.trainer.precision))
    return sampler
