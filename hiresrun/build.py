"""The pieces every verb builds from a config, in data-flow order (docs/ARCHITECTURE.md, "Data flow"): seeds, the
logger and trainer, the conditioning, the sampler's scheduler, the net to sample with its trained weights, the
Sampler. `run.py` (the verbs) and `tune.py` (`hiresrun calibrate`) both build from here, so neither imports the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from hiresrun import checkpoint, outputs, sampling
from hiresrun.errors import UsageError
from hiresrun.validate import parse_seeds  # noqa: F401 (the verbs' seed parser, one definition)


def calibration_overlap(cfg: DictConfig, seeds: list[int]) -> None:
    """Refuse a sample run that uses `accelerator.calibration=<file>` on seeds the file was calibrated on: a delta
    tuned on the images it is then scored on flatters the result."""
    path = cfg.accelerator.get("calibration") if "accelerator" in cfg else None
    if not path or not Path(str(path)).expanduser().is_file():
        return  # a missing file is refused by the accelerator itself, in its own line
    try:
        tuned = set(parse_seeds(json.loads(Path(str(path)).expanduser().read_text())["seeds"], 0))
    except (ValueError, KeyError, TypeError, UsageError):
        return  # not a calibration file: the accelerator refuses it, naming the file
    shared = sorted(tuned & set(seeds))
    if shared:
        raise UsageError(f"accelerator.calibration={path} was calibrated on seeds {outputs.seed_ranges(shared)}, which "
                         f"this run samples; report on other seeds, or calibrate on seeds no run reports "
                         f"(calibrate.seeds' default)")


def choice(cfg: DictConfig, group: str) -> str:
    """The option picked for a config group (`none`, `ddim`, ...), from Hydra when it runs; an accelerator list is its
    members joined in their applied order (`adaptive-deepcache`)."""
    from hydra.core.hydra_config import HydraConfig

    if group == "accelerator" and member_nodes(cfg.accelerator):
        return "-".join(ordered(member_nodes(cfg.accelerator)))
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group))
    # composed outside Hydra's run (tests, scripts): the option file with this target (the sampler: its step rule)
    from importlib.resources import files

    key = "scheduler" if group == "sampler" else "_target_"  # a sampler's whole node (the flow ones share a target)
    target = OmegaConf.select(cfg, f"{group}.{key}")
    folder = files("hiresrun.conf").joinpath(group)
    for f in sorted((p for p in folder.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name):
        if target is not None and OmegaConf.select(OmegaConf.create(f.read_text()), key) == target:
            return f.name[:-len(".yaml")]
    return str(cfg[group].get("_target_", "?")).rsplit(".", 1)[-1]


CHAIN = "hiresrun.accelerators.Chain"


def member_nodes(node: DictConfig) -> dict[str, DictConfig]:
    """An accelerator list's members as the config holds them (`accelerator=chain`: one node per member, under its
    option name, hiresrun/cli.py's `list_selection`); {} for a single accelerator."""
    if node is None or str(node.get("_target_")) != CHAIN:
        return {}
    return {str(k): v for k, v in node.items() if isinstance(v, DictConfig) and "_target_" in v}


def ordered(members: dict) -> dict:
    """Members in the declared level order (support.LEVELS: steps, blocks, features), whatever the list's order."""
    from hydra.utils import get_class

    from hiresrun.support import LEVELS

    order = list(LEVELS)
    level = lambda name: get_class(members[name]._target_).supports.level  # noqa: E731
    return {n: members[n] for n in sorted(members, key=lambda n: order.index(level(n)) if level(n) in order
                                          else len(order))}


def accelerator_members(node: DictConfig) -> dict[str, DictConfig]:
    """The members of an accelerator list in their applied order, refused in one line when their declarations
    (`declared`, read from each member's own node) say they cannot compose; {} for a single accelerator."""
    from hydra.utils import get_class

    from hiresrun.errors import Unsupported
    from hiresrun.support import chain_refusal

    members = member_nodes(node)
    if not members:
        if node is not None and str(node.get("_target_")) == CHAIN:
            raise UsageError("accelerator=chain has no members: write the list, +accelerator=[adaptive,deepcache]")
        return {}
    reason = chain_refusal(list(members), [get_class(m._target_).declared(m) for m in members.values()])
    if reason:
        raise Unsupported(reason)
    return ordered(members)


def build_accelerator(cfg: DictConfig, **overrides):
    """The run's accelerator: the option's class, or for a list `accelerators.Chain` of its members in the declared
    level order (steps, blocks, features). `overrides` go to an option that takes them (a single accelerator)."""
    return accelerator_from(cfg.accelerator, **overrides)


def accelerator_from(node: DictConfig, **overrides):
    """An accelerator node (a config's `accelerator`, or one `hiresrun calibrate` makes for a grid point) built:
    its one option, or the Chain of its members, each from its own node."""
    from hiresrun.accelerators import Chain

    members = accelerator_members(node)
    if not members:
        return instantiate(node, **{k: v for k, v in overrides.items() if k in node})
    return Chain({name: instantiate(part) for name, part in members.items()})


def build_logger(cfg: DictConfig, resume: bool = False):
    """The configured logger. Training records which run it logged to in <run>/logger.json; a resume in the same
    folder continues that run (wandb: the same id, resume=allow; CSV / TensorBoard: the same version)."""
    if not (cfg.get("logger") and "_target_" in cfg.logger):
        return False
    record = Path(cfg.paths.run_dir) / "logger.json"
    target, extra = str(cfg.logger._target_), {}
    if resume and record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("target") == target:
            extra = ({"id": previous["version"], "resume": "allow"} if target.endswith("WandbLogger")
                     else {"version": previous["version"]})
    from hiresrun import logs

    extra = {**logs.logger_arguments(cfg), **extra}  # wandb: the run's name, tags, sweep group; quiet console
    if target == "lightning.pytorch.loggers.CSVLogger":
        from hiresrun.lit import CSVLogger

        config = {k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items() if k != "_target_"}
        logger = CSVLogger(**{**config, **extra})
    else:
        logger = instantiate(cfg.logger, **extra)
        # Lightning's WandbLogger always hands wandb.init `anonymous` (None unless asked), which current wandb answers
        # with a deprecation warning on every run; the run is the same without the key.
        if getattr(logger, "_wandb_init", {}).get("anonymous", 0) is None:
            logger._wandb_init.pop("anonymous")
    if cfg.task in ("train", "pretrain") and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        record.parent.mkdir(parents=True, exist_ok=True)
        version = logger.experiment.id if target.endswith("WandbLogger") else logger.version  # wandb: starts it
        outputs.write_json(record, {"target": target, "version": version})
    logs.log_config(logger, cfg)
    return logger


def build_trainer(cfg: DictConfig, logger, callbacks=(), **overrides):
    extra = {}
    if cfg.train.grid_every <= 0:  # no validation grids
        extra = {"limit_val_batches": 0, "val_check_interval": 1.0, "check_val_every_n_epoch": 1}
    from hiresrun.lit import AtomicCheckpointIO

    return instantiate(cfg.trainer, logger=logger, callbacks=list(callbacks), plugins=[AtomicCheckpointIO()],
                       **{**extra, **overrides})


def load_net_weights(net: torch.nn.Module, ckpt: str, base) -> None:
    """Weights of `net` from a Lightning checkpoint written by `hiresrun train` (EMA weights when on). Frozen
    base weights are not in it: they come from the model config, which must be the base it was trained on."""
    state = checkpoint.trained_state(ckpt, base.weights_hash, "net.")  # weights_only: nothing in it can run
    try:
        net.load_state_dict({**net.state_dict(), **state})
    except RuntimeError:
        used = Path(ckpt).parents[1] / ".hydra" / "overrides.yaml"
        hint = [o for o in OmegaConf.load(used) if "method" in str(o)] if used.is_file() else []
        raise UsageError(f"ckpt_path={ckpt} does not fit this method's network: sample with the method settings "
                         f"it was trained with{' (' + ' '.join(map(str, hint)) + ')' if hint else ''}") from None


def build_conditioner(cfg: DictConfig, base, for_grids: bool = False):
    """The per-image conditioning of sampling (conditioning.Conditioner): prompts from `prompts=<file>` or
    `sample.prompt`, negative prompt, guidance, SDXL micro-conditioning (default: the target size). Training grids
    of a text model without a prompt use the empty prompt."""
    from hiresrun.conditioning import Conditioner, Prompt, Prompts, read_prompts

    s = cfg.sample
    if cfg.get("prompts") and s.get("prompt") is not None:
        raise UsageError("prompts=<file> and sample.prompt are both given; pick one")
    prompts = None
    if cfg.get("prompts"):
        prompts = Prompts(read_prompts(str(cfg.prompts)))
    elif s.get("prompt") is not None:
        prompts = Prompts([Prompt(str(s.prompt))])
    elif base.default_prompts and base.text is not None:  # the model's own prompt set (model.prompts)
        prompts = Prompts(read_prompts(base.default_prompts))
    elif for_grids and base.text is not None:
        prompts = Prompts([Prompt("")])
    micro = {k: (list(s[k]) if s.get(k) is not None else None)
             for k in ("original_size", "crops_coords_top_left", "target_size")}
    for k, v in micro.items():
        if v is not None and (len(v) != 2 or any(not isinstance(x, int) or x < 0 for x in v)):
            raise UsageError(f"sample.{k}={v}: give two non-negative integers [height, width]")
    labels = s.get("class_labels")
    if labels is not None:
        labels = parse_seeds(labels, 0) if isinstance(labels, (str, int)) else [int(c) for c in labels]
    return Conditioner(base, prompts, s.get("negative_prompt"), s.get("guidance_scale"), s.get("guidance_rescale", 0.0),
                       size=int(cfg.data.resolution), micro=micro, class_labels=labels,
                       true_cfg_scale=s.get("true_cfg_scale", 1.0), max_sequence_length=s.get("max_sequence_length"))


def seed_loader(seeds: list[int], batch_size: int) -> DataLoader:
    return DataLoader(torch.tensor(seeds), batch_size=batch_size, shuffle=False)


def sampler_scheduler(cfg: DictConfig, base, method=None):
    """The sampler's step rule on the schedule the net was trained with: the base's, or the method's own (simple)."""
    config = method.scheduler_config(base) if method is not None else base.scheduler_config
    trained = int(config.get("num_train_timesteps") or 0)
    if base.parametrization != "edm" and trained and int(cfg.sampler.num_steps) > trained:
        raise UsageError(f"sampler.num_steps={cfg.sampler.num_steps}: the model's schedule has {trained} training "
                         f"timesteps; sample with at most {trained} steps")
    from hiresrun import flow

    scheduler = instantiate(cfg.sampler.scheduler)(config)
    if base.flow and not flow.is_flow_scheduler(scheduler):
        raise UsageError(f"sampler={choice(cfg, 'sampler')} integrates a VP (eps/v) model; {type(base.unet).__name__} "
                         f"is a flow-matching model: use sampler=flow_euler, flow_dpmsolver or flow_unipc")
    if base.flow and base.resolution_shift:
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise UsageError(f"model.resolution_shift=true is built on sampler=flow_euler (diffusers' shift there); "
                             f"sampler={choice(cfg, 'sampler')} takes its shift at construction: use flow_euler")
        scheduler.hiresrun_native_tokens = (base.resolution // base.latent_factor // flow.TOKEN_SIDE) ** 2
    edm_sampler = type(scheduler).__name__.startswith("EDM")
    if base.parametrization == "edm" and not edm_sampler:
        raise UsageError(f"model.parametrization=edm needs an EDM sampler (sampler=edm_heun, edm_euler or "
                         f"edm_dpmsolver); sampler={choice(cfg, 'sampler')} integrates a VP eps/v model")
    if edm_sampler and base.parametrization != "edm":
        raise UsageError(f"sampler={choice(cfg, 'sampler')} integrates an EDM-preconditioned network; this model is "
                         f"model.parametrization={base.parametrization}: set model.parametrization=edm if it is one, "
                         f"or pick ddim/euler/heun/dpmsolver")
    return scheduler


def sampling_net(cfg: DictConfig):
    """method -> model -> the net to sample, with trained weights from `ckpt_path` where the method trains
    (a missing checkpoint is refused before the model loads), and the checkpoint's identity: the file `ckpt_path`
    resolved to, what it resolved from and its sha256 (None without a checkpoint)."""
    method = instantiate(cfg.method)
    if method.trains and not cfg.ckpt_path:
        raise UsageError(f"method={choice(cfg, 'method')} samples with trained weights: pass ckpt_path=<a "
                         f"`hiresrun train` run folder, .ckpt or last>, or pick its training-free mode")
    base = instantiate(cfg.model)
    base.check_resolution(cfg.data.resolution)
    net = method.wrap(base)
    ckpt = None
    if cfg.ckpt_path:
        path = checkpoint.resolve(cfg.ckpt_path, cfg.paths.output_root, "train", str(cfg.method._target_))
        ckpt = checkpoint.fingerprint(path)
        load_net_weights(net, path, base)
        checkpoint.unchanged(ckpt)
        ckpt = {"from": str(cfg.ckpt_path), "path": ckpt["path"], "sha256": ckpt["sha256"]}
    return base, method, net, ckpt


def build_sampler(cfg: DictConfig):
    """(sampling.Sampler, checkpoint identity) for a config: the net with its trained weights, the method, the
    sampler's scheduler and steps, the accelerator (its settings checked against the net and the method's loops) and
    the conditioning; what `hiresrun sample` runs and `hiresrun.load` returns. The net stays on the CPU."""
    base, method, net, ckpt = sampling_net(cfg)
    if base.channels_last:  # UNets' convolutions run faster on GPUs in NHWC; images are the same up to rounding
        base.unet.to(memory_format=torch.channels_last)
    if base.compile:  # in place (nn.Module.compile): the module, its names and the accelerators' hooks stay as they are
        base.unet.compile()
    conditioner = build_conditioner(cfg, base)
    accelerator = build_accelerator(cfg)
    accelerator.check(net, method.loop_steps(int(cfg.sampler.num_steps)))
    return sampling.Sampler(net, method, sampler_scheduler(cfg, base, method), int(cfg.sampler.num_steps),
                            accelerator, conditioner), ckpt
