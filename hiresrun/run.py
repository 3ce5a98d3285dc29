"""The task functions behind the verbs: instantiate in data-flow order (docs/ARCHITECTURE.md, "Data flow"), nothing
else.

config -> model -> method -> sampler (or Lightning, to train) -> loop -> metrics -> outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from hiresrun import checkpoint, logs, outputs, progress, sampling, store, support, validate
from hiresrun.build import (
    build_accelerator,
    build_conditioner,
    build_logger,
    build_sampler,
    build_trainer,
    calibration_overlap,
    choice,
    parse_seeds,
    sampler_scheduler,
    seed_loader,
)
from hiresrun.errors import Unsupported, UsageError
from hiresrun.models import count_params, save_pipeline


# -- verbs ------------------------------------------------------------------------------------------------
def sample(cfg: DictConfig) -> dict | None:
    """Generate images with a method (and accelerator) into the run folder batch by batch (hiresrun/store.py:
    resumable, shardable), then score the whole seed set once: grid, metrics, manifest."""
    from hiresrun import memory

    run_dir = Path(cfg.paths.run_dir)
    shard = store.parse_shard(cfg.sample.get("shard"))
    planned = memory.check(cfg)  # a size the device cannot hold is refused before any weight is loaded
    sampler, ckpt = build_sampler(cfg)
    base, conditioner = sampler.method.base, sampler.conditioner
    from_file = conditioner.prompts.seeds if conditioner.prompts is not None else None
    seeds = parse_seeds(from_file if from_file and cfg.sample.seeds is None else cfg.sample.seeds,
                        cfg.sample.num_samples)  # a prompt file's seeds obey the same rules
    calibration_overlap(cfg, seeds)
    for line in conditioner.check_lengths(seeds):
        print(line)
    plan = store.batches(seeds, int(cfg.sample.batch_size))
    if shard[1] > len(plan):
        raise UsageError(f"sample.shard={cfg.sample.shard}: {len(plan)} batches of sample.batch_size="
                         f"{cfg.sample.batch_size} cannot make {shard[1]} shards; use at most {len(plan)} shards or a "
                         f"smaller sample.batch_size")
    folder = store.Store(run_dir)  # everything that can refuse the run has run: now the folder is written
    info = {"identity": store.identity(cfg, base.weights_hash, ckpt), "checkpoint": ckpt,
            **sampling_record(cfg, base, conditioner, seeds), "memory": planned}
    folder.check(info)  # a refusal here leaves the folder as it was (open checks again under its lock)
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    claim = folder.claim(shard) if first else None  # one process per shard of a folder (DDP: its global rank 0)
    try:
        return _sample_into(cfg, folder, info, sampler, plan, shard, base, conditioner, first)
    finally:
        if claim is not None:
            claim.close()


def device_index(trainer: DictConfig) -> int | None:
    """The index of the one device `trainer.devices` asks for (`auto`: one on the CPU or a one-GPU machine, as
    Lightning counts), or None when it asks for several."""
    devices, kind = trainer.get("devices", 1), str(trainer.get("accelerator", "cpu"))
    if isinstance(devices, (list, ListConfig)):
        return int(devices[0]) if len(devices) == 1 else None
    alone = devices in (1, "1") or (devices == "auto" and (kind == "cpu" or torch.cuda.device_count() <= 1))
    return 0 if alone else None


def several_processes(trainer: DictConfig) -> bool:
    """Whether Lightning starts more than one process for this trainer config (several devices or nodes, DDP and its
    kin); it launches them by running the starting command line again."""
    strategy = str(trainer.get("strategy", "auto"))
    return device_index(trainer) is None or int(trainer.get("num_nodes", 1)) != 1 or any(
        k in strategy for k in ("ddp", "fsdp", "deepspeed"))


def one_device(cfg: DictConfig) -> torch.device | None:
    """The device when `trainer` asks for one process on one device at a precision the sampler applies itself
    (`hiresrun sample` then runs without a Lightning Trainer); None when Lightning's plumbing is needed (several
    devices or nodes, a strategy, a launcher's environment, a precision that converts the weights)."""
    t = cfg.trainer
    launched = any(int(os.environ.get(k, "1") or 1) > 1 for k in ("WORLD_SIZE", "SLURM_NTASKS"))
    if launched or several_processes(t) or str(t.get("strategy", "auto")) != "auto" \
            or str(t.get("precision")) not in MIXED:
        return None
    kind, index = str(t.get("accelerator", "cpu")), device_index(t)
    if kind == "cpu":
        return torch.device("cpu")
    if kind in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", index)
    return None


# trainer.precision -> the autocast dtype the sampler applies (None: full precision), as Lightning's mixed plugins do
MIXED = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def sample_here(sampler: sampling.Sampler, todo: list[list[int]], device: torch.device, precision: str,
                signals) -> None:
    """The batches of a one-device sample run, in order, each handed to the sampler's sink as it is made (written,
    featurized and reported by its background thread while the next batch samples); a signal stops after the batch
    in flight, once everything made is on disk (signals.SampleSignals)."""
    sampler.autocast = MIXED[str(precision)]
    sampler.net.to(device).eval()
    sink = sampler.sink
    sink.background = sink.writer is not None
    try:
        with signals:
            for seeds in todo:
                with torch.inference_mode():
                    sampler.batch(seeds)
                if signals.signum is not None:
                    sink.flush()  # the count the signal reports is of images on disk
                signals.after_batch(len(seeds))
    finally:
        sink.close()  # whatever stopped the loop, the batches already made reach the disk


def _sample_into(cfg: DictConfig, folder: store.Store, info: dict, sampler: sampling.Sampler,
                 plan: list[list[int]], shard: tuple[int, int], base, conditioner, first: bool) -> dict | None:
    """The part of `sample` that writes: the folder's identity, the batches still to do, the scoring."""
    from hiresrun.signals import SampleSignals

    run_dir = folder.run_dir
    folder.open(info, write=first)
    done = folder.done()
    mine = store.shard_batches(plan, shard)
    todo = [b for b in mine if not all(s in done and done[s]["seeds"] == b for s in b)]
    sink = sampling.Sink(writer=folder.writer(store.writer_name(shard)),
                         facts=lambda chunk: image_facts(base, conditioner, chunk))
    if "_target_" in (cfg.get("metrics") or {}):  # each batch's Inception rows, by the rank that made it
        from hiresrun.metrics.generated import BatchFeatures

        sink.featurize = BatchFeatures(cfg.metrics, run_dir)
    sampler.sink = sink
    total, left = sum(map(len, mine)), sum(map(len, todo))
    device = one_device(cfg)
    trainer = None
    if device is None:  # several devices, nodes or a converting precision: Lightning deals the batches to ranks
        from hiresrun.lit import LitModule, SampleInterrupt

        trainer = build_trainer(cfg, False, [SampleInterrupt(run_dir, total - left, total)],
                                enable_progress_bar=False)  # Lightning's bar counts batches without a total
        world, rank = trainer.world_size, trainer.global_rank
        device = trainer.strategy.root_device
    else:
        world, rank = 1, 0
    if left < total and rank == 0:
        print(f"hiresrun: resuming {run_dir}: {total - left:,} of {total:,} images are on disk, {left:,} to go")
    if cfg.trainer.enable_progress_bar and os.isatty(1) and trainer is None:  # one bar, in one process
        sink.progress = progress.reporter(left, "sampling")
    else:  # a log file, or several ranks: a line every so many images (rank 0)
        sink.progress = progress.Progress(total, total - left, left, int(cfg.sample.get("progress_every") or 0),
                                          world, rank)
    outputs.reset_peak_memory(device)
    if todo and trainer is not None:
        trainer.test(LitModule(net=sampler.net, method=sampler.method, sampler=sampler),
                     dataloaders=DataLoader(store.Batches(todo), batch_size=None), verbose=False)
    elif todo:
        sample_here(sampler, todo, device, str(cfg.trainer.precision), SampleSignals(run_dir, total - left, total))
    if rank != 0:
        return None
    logger = build_logger(cfg)
    made = {s for b in todo for s in b}
    if shard[1] > 1:  # a shard scores nothing: the metrics belong to the union (hiresrun merge)
        return finish(info, [run_dir], run_dir, logger, batches=mine, shard=shard, made=made)
    return finish(info, [run_dir], run_dir, logger, made=made)


def sampling_record(cfg: DictConfig, base, conditioner, seeds: list[int]) -> dict:
    """What `finish` needs besides the images, saved in sampling.json so that `merge` scores shards without
    loading the model: the seeds, the base's facts, the names of the choices, the resolved config."""
    facts = {"resolution": base.resolution, "weights_sha256": base.weights_hash, "source": base.source,
             "conditioning": base.conditioning, "text": base.text is not None, "xl": bool(base.text and base.text.xl),
             "null_class": base.null_class, "default_prompts": base.default_prompts}
    cond = {"guidance_scale": conditioner.guidance_scale, "guidance_rescale": conditioner.guidance_rescale,
            "negative_prompt": conditioner.negative_prompt, "class_labels_given": conditioner.class_labels is not None,
            "micro": {k: v or ([0, 0] if k == "crops_coords_top_left" else [int(cfg.data.resolution)] * 2)
                      for k, v in conditioner.micro.items()} if base.text is not None and base.text.xl else None,
            "prompts": (str(cfg.prompts) if cfg.get("prompts") else "sample.prompt"
                        if cfg.sample.get("prompt") is not None else f"model.prompts={base.default_prompts}")}
    return {"seeds": outputs.seed_ranges(seeds), "batch_size": int(cfg.sample.batch_size), "base": facts,
            "conditioning": cond, "choices": {g: choice(cfg, g) for g in ("method", "accelerator", "sampler")},
            "config": OmegaConf.to_container(cfg, resolve=True)}


def image_facts(base, conditioner, seeds: list[int]) -> dict:
    """Per image of a batch: its prompt (text models) or requested class (class models), for the batch record."""
    if base.text is not None:
        return {"prompts": conditioner.prompts_of(seeds)}
    if base.conditioning == "class":
        return {"labels": conditioner.labels_of(seeds, sampling.generators(seeds)).tolist()}
    return {}


def finish(info: dict, folders: list[Path], out_dir: Path, logger=None, batches=None, shard=None,
           task: str = "sample", made: set[int] | None = None) -> dict:
    """Score a sample run's images once, from its batch records on disk (one folder, or the shards of one seed list
    for `merge`): grid, metrics.json, prompts.jsonl, skip_masks.json, manifest.json in `out_dir`. A shard
    (`batches`: its own) gets its cost numbers only."""
    cfg = OmegaConf.create(info["config"])
    seeds = parse_seeds(info["seeds"], 0)
    wanted = seeds if batches is None else [s for b in batches for s in b]
    given = store.union(folders, wanted)
    order = sorted((s, rec, folder) for rec, folder, owned in given for s in owned)
    images = outputs.load_images(Path(f) / store.SAMPLES / store.png_name(s) for s, _, f in order)
    seed_list = [s for s, _, _ in order]
    per = {s: rec for s, rec, _ in order}
    share = lambda key: sum(rec[key] * len(owned) / len(rec["seeds"]) for rec, _, owned in given)
    position = {s: (rec["seeds"].index(s)) for s, rec in per.items()}
    b, c = info["base"], info["conditioning"]
    worlds = sorted({rec.get("world_size", 1) for rec, _, _ in given})
    metrics = {
        "num_samples": len(seed_list), "resolution": int(cfg.data.resolution),
        "nfe_per_image": share("evals") / len(seed_list), "cost_per_image": share("evals") / len(seed_list),
        "unet_passes_per_image": share("passes") / len(seed_list),
        "sec_per_image": share("seconds") / len(seed_list), **info["choices"],
        "num_steps": int(cfg.sampler.num_steps),
        "peak_memory_mb": max(rec.get("peak_memory_mb", 0.0) for rec, _, _ in given),
        **({"estimated_peak_mb": info["memory"]["estimated_peak_mb"]} if info.get("memory") else {}),
        "protocol": {"n": len(seed_list), "seeds": outputs.seed_ranges(seed_list),
                     "model_weights_sha256": b["weights_sha256"], "checkpoint": info.get("checkpoint"),
                     "world_size": worlds[-1],
                     "device": ", ".join(sorted({rec.get("device", "?") for rec, _, _ in given})),
                     "precision": str(cfg.trainer.precision),
                     "sec_per_image": "wall seconds of method.sample summed over batches (all ranks, shards and "
                                      "resumed parts) / images",
                     "peak_memory_mb": outputs.PEAK_MEMORY + "; the largest over the processes that made the images",
                     **({"estimated_peak_mb": "hiresrun/memory.py's upper bound from the config files, made before "
                                              "loading: " + json.dumps(info["memory"])} if info.get("memory") else {}),
                     "nfe_per_image": "denoiser steps per image; unet_passes_per_image counts 2 per guided step",
                     "cost_per_image": "nfe_per_image in full-evaluation units: a cache's partial call counts its "
                                       "measured FLOP share of a full call (accelerator=deepcache)",
                     "folders": [str(f) for f in folders]},
    }
    labels = texts = None
    if b["conditioning"] == "class":
        labels = [per[s]["labels"][position[s]] for s in seed_list]
        metrics["protocol"]["class"] = {"labels_per_image": labels, "given": c["class_labels_given"],
                                        "null_class": b["null_class"], "guidance_scale": c["guidance_scale"]}
    if b["text"]:
        texts = [per[s]["prompts"][position[s]] for s in seed_list]
        unique = list(dict.fromkeys(texts))
        metrics["protocol"]["text"] = {
            "prompts": c["prompts"], "unique_prompts": unique,
            "prompt_index_per_image": [unique.index(t) for t in texts],
            "negative_prompt": c["negative_prompt"], "guidance_scale": c["guidance_scale"],
            "guidance_rescale": c["guidance_rescale"], "micro_conditioning": c["micro"]}
        outputs.write_text(out_dir / "prompts.jsonl", "".join(json.dumps({"seed": sd, "prompt": t}) + "\n"
                                                              for sd, t in zip(seed_list, texts)))
    accelerator = build_accelerator(cfg) if "_target_" in cfg.accelerator else None
    per_image = {str(s): per[s]["accelerator"][str(s)] for s in seed_list if "accelerator" in per[s]}
    summary = accelerator.summary(per_image) if accelerator is not None and len(per_image) == len(seed_list) else None
    if summary:
        outputs.write_json(out_dir / "skip_masks.json", summary[0])
        metrics.update(summary[1])
    captions = outputs.captions(seed_list, texts, labels)
    outputs.save_grid(images[:64], out_dir / "grid.png", captions[:64])
    if shard is not None:
        metrics["shard"] = f"{shard[0]}/{shard[1]}"
        metrics["protocol"]["shard"] = (f"shard {shard[0]} of {shard[1]}: batches {shard[0]}, {shard[0]} + "
                                        f"{shard[1]}, ... of the run's sample.batch_size batches; quality metrics come "
                                        f"from `hiresrun merge` over all shards")
    elif "_target_" in (cfg.get("metrics") or {}):  # quality vs the real set (+ a reference run, same seeds)
        real = instantiate(cfg.data, base_resolution=b["resolution"])
        from hiresrun.metrics.generated import FeatureCache

        cache = FeatureCache([f for _, _, f in order], seed_list, [rec["sha256"][position[s]] for s, rec, _ in order])
        quality = instantiate(cfg.metrics).evaluate(images, real, cfg.get("reference"), seed_list, prompts=texts,
                                                    labels=labels, cache=cache)
        metrics["protocol"].update(quality.pop("protocol"))
        metrics.update(quality)
    elif cfg.get("reference"):  # metrics=none still scores fidelity to the reference run it was given
        from hiresrun.metrics import Metrics

        quality = Metrics(cache_dir=cfg.paths.cache_dir).fidelity(images, cfg.reference, seed_list)
        metrics["protocol"].update(quality.pop("protocol"))
        metrics.update(quality)
    if made and shard is None and not cfg.sample.save_images:  # scored: this run's own images go, nothing else
        store.Store(folders[0]).drop(made)
    metrics = outputs.write_metrics(out_dir, task, metrics)
    outputs.write_json(out_dir / "manifest.json", outputs.manifest(b["weights_sha256"], b["source"]))
    if logger:
        logger.log_metrics({f"sample/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        logs.log_grid(logger, "sample/grid", out_dir / "grid.png", f"seeds {outputs.seed_ranges(seed_list[:64])}")
        nfe = [float(per[s]["accelerator"][str(s)].get("nfe", metrics["nfe_per_image"])) if "accelerator" in per[s]
               else metrics["nfe_per_image"] for s in seed_list[:logs.TABLE_ROWS]]
        logs.log_samples(logger, images, seed_list, nfe, texts, labels)
        logger.finalize("success")
        logs.close(logger)
    what = f"shard {shard[0]}/{shard[1]}: " if shard else ""
    print(f"hiresrun: {what}{metrics['num_samples']} images at {metrics['resolution']}px, "
          f"{metrics['nfe_per_image']:.1f} NFE and {metrics['sec_per_image']:.3f} s per image -> {out_dir}")
    if shard:
        print(f"hiresrun: when all {shard[1]} shards are done: hiresrun merge gen=<their folders> (one folder if "
              f"they share it)")
    return metrics


def merge(cfg: DictConfig) -> dict:
    """`hiresrun merge gen=<folder> [gen=[a,b,c]]`: the shards of one sample run, scored once over their union with
    the settings they were sampled with; refuses shards of different settings, seeds missing or doubled."""
    given = cfg.merge.gen
    folders = [Path(str(f)) for f in (given if isinstance(given, (list, ListConfig)) else [given])] if given else []
    # a sweep folder whose job folders are the shards (hiresrun sample -m sample.shard=0/4,1/4,...)
    folders = [g for f in folders for g in ([f] if (f / store.CONFIG).is_file() or not f.is_dir() else
                                            sorted(d for d in f.iterdir() if (d / store.CONFIG).is_file()) or [f])]
    if not folders:
        raise UsageError("`hiresrun merge` needs gen=<sample run folder> or gen=[<shard folder>,...]")
    infos = []
    for f in folders:
        info = store.Store(f).read_config()
        if info is None:
            raise UsageError(f"gen={f}: no {store.CONFIG} there; give the folders of `hiresrun sample` runs")
        infos.append(info)
    for f, info in zip(folders[1:], infos[1:]):
        changed = store.checkpoint_change(info, infos[0])
        if changed:
            raise UsageError(f"{f} and {folders[0]} were sampled from different checkpoints ({changed}): merge shards "
                             f"of one run")
        if not store.same(info["identity"], infos[0]["identity"]) or info["seeds"] != infos[0]["seeds"]:
            diff = store.differences(info["identity"], infos[0]["identity"])
            if info["seeds"] != infos[0]["seeds"]:
                diff.append(f"seeds {infos[0]['seeds']} -> {info['seeds']}")
            raise UsageError(f"{f} was sampled with other settings than {folders[0]} ({'; '.join(diff[:4])}): "
                             f"merge shards of one run")
    info = infos[0]
    if "_target_" in (cfg.get("metrics") or {}) or cfg.get("reference"):  # the merge command's own metrics win
        info = {**info, "config": {**info["config"], "metrics": OmegaConf.to_container(cfg.metrics, resolve=True),
                                   "reference": cfg.get("reference") or info["config"].get("reference")}}
    return finish(info, folders, Path(cfg.paths.run_dir), task="merge")


def _fit(cfg: DictConfig, base, method, data, task: str):
    """Shared by train and pretrain: wrap, fit with EMA and checkpoints, return (trainer, net)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hiresrun.lit import EMA, FinalCheckpoint, Interrupt, LitModule, TrainClock, TrainProgress

    run_dir = Path(cfg.paths.run_dir)
    ckpt = checkpoint.resolve(cfg.ckpt_path, cfg.paths.output_root, task, str(cfg.method._target_))
    own = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    if ckpt is None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and own.is_file():
        ckpt = str(own)  # a job SLURM requeued (preemption, time limit) continues its own run folder
        print(f"hiresrun: requeued job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): resuming {own}")
    torch.manual_seed(cfg.seed)  # what a method adds (upsamplers, discriminators) starts from `seed`, not chance
    net = method.wrap(base)
    # metrics=...: a small-n FID of the validation grid against the real set, `val/fid_proxy` (a trend, not a result)
    val_metric = instantiate(cfg.metrics).proxy(data) if "_target_" in (cfg.get("metrics") or {}) else None
    grids = sampling.Sampler(net, method, sampler_scheduler(cfg, base, method), cfg.sampler.num_steps,
                             conditioner=build_conditioner(cfg, base, for_grids=True))
    lit = LitModule(net, method, grids, optimizer=instantiate(cfg.optimizer), seed=cfg.seed,
                    grid_dir=str(run_dir / "grids"), val_metric=val_metric)
    # enable_version_counter=False: a run resumed into its own folder overwrites last.ckpt (no last-v1.ckpt beside a
    # stale last.ckpt that `ckpt_path=<folder>` would then load)
    callbacks = [ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step_{step:07d}", save_last=True,
                                 every_n_train_steps=cfg.train.checkpoint_every, save_top_k=-1,
                                 auto_insert_metric_name=False, enable_version_counter=False)]
    if cfg.train.ema_decay > 0:
        callbacks.append(EMA(cfg.train.ema_decay))
    callbacks.append(FinalCheckpoint(run_dir / "checkpoints" / "last.ckpt", cfg.train.checkpoint_every))
    callbacks.append(Interrupt(run_dir / "checkpoints" / "last.ckpt"))
    clock = TrainClock()
    callbacks.append(clock)
    # our own progress (steps of max_steps, loss, pace, ETA): a bar in a terminal, lines in a log file
    callbacks.append(TrainProgress(bool(cfg.trainer.enable_progress_bar) and os.isatty(1)))
    logger = build_logger(cfg, resume=ckpt is not None)
    trainable = count_params(net)
    print(f"hiresrun: {task} {'' if task == 'pretrain' else choice(cfg, 'method')}: {trainable:,} trainable parameters"
          + (f", resuming from {ckpt}" if ckpt else ""))
    trainer = build_trainer(cfg, logger, callbacks, enable_progress_bar=False)  # TrainProgress says it
    data.setup("fit")
    grid_loader = seed_loader(list(range(cfg.train.grid_seeds)), cfg.sample.batch_size)
    if ckpt:
        checkpoint.load(ckpt)  # refuse a hostile or broken file in one line before Lightning touches it
    trainer.fit(lit, train_dataloaders=data.train_dataloader(), val_dataloaders=grid_loader, ckpt_path=ckpt,
                weights_only=True)
    if logger:
        logger.log_metrics({"train/trainable_params": trainable})
        logs.close(logger)
    return trainer, net, {"trainable_params": trainable, "train_seconds": clock.seconds()}


def set_dropout(cfg: DictConfig, base) -> None:
    """train.caption_dropout / train.label_dropout onto the base (what its training batches drop for guidance)."""
    base.caption_dropout = float(cfg.train.get("caption_dropout", 0.0))
    base.label_dropout = float(cfg.train.get("label_dropout", 0.0))
    for name in ("caption_dropout", "label_dropout"):
        if not 0 <= getattr(base, name) <= 1:
            raise UsageError(f"train.{name}={getattr(base, name)}: must lie in [0, 1]")
    if base.label_dropout > 0 and base.null_class is None:
        raise UsageError(f"train.label_dropout={base.label_dropout} replaces labels by the null class; set "
                         f"model.null_class=<its index> (-1 = the class embedding's last row)")


def check_channels(base, data) -> None:
    """Training data must have the channels the model takes (folder images are converted to data.channels)."""
    channels = getattr(data, "channels", None)
    if channels is not None and channels != base.channels:
        raise UsageError(f"data.channels={channels}, but the model takes {base.channels}-channel images; set "
                         f"data.channels={base.channels} (folder images are converted when read)")


def train(cfg: DictConfig) -> None:
    """Train what the chosen method trains, at the target resolution, with the base frozen where it says."""
    method = instantiate(cfg.method)
    if not method.trains:
        raise UsageError(f"method={choice(cfg, 'method')} trains nothing; `hiresrun train` needs +method=<a method "
                         f"that trains, e.g. +method=finetune>, or use `hiresrun sample`")
    base = instantiate(cfg.model)
    base.check_resolution(cfg.data.resolution)
    set_dropout(cfg, base)
    data = instantiate(cfg.data, base_resolution=base.resolution)
    check_channels(base, data)
    if method.precompute(base, data, Path(cfg.paths.run_dir)):  # a stage that only computes (PaGoDA's encoder)
        return
    trainer, net, stats = _fit(cfg, base, method, data, "train")
    if trainer.is_global_zero and getattr(data, "class_to_index", None):  # the labels this run trained with
        outputs.write_json(Path(cfg.paths.run_dir) / "class_index.json", data.class_to_index)
    if trainer.is_global_zero:
        # the size the method trains at (PaGoDA's stage=base: the base's own, whatever data.resolution says)
        resolution = int(method.resolution)
        _finish_training(cfg, trainer, net, base, {"method": choice(cfg, "method"), "resolution": resolution,
                                                   **stats})


def pretrain(cfg: DictConfig) -> None:
    """Train the base model from scratch at its own resolution (the architecture in model.path's config)."""
    from hiresrun.methods.finetune import Finetune

    torch.manual_seed(cfg.seed)  # the fresh architecture's initialisation follows `seed`
    base = instantiate(cfg.model, init="scratch")
    set_dropout(cfg, base)
    data = instantiate(cfg.data, resolution=base.resolution, base_resolution=base.resolution)
    check_channels(base, data)
    trainer, net, stats = _fit(cfg, base, Finetune(base.resolution), data, "pretrain")
    if trainer.is_global_zero:
        _finish_training(cfg, trainer, net, base, {"method": "pretrain", "resolution": base.resolution, **stats})


def _finish_training(cfg: DictConfig, trainer, net, base, stats: dict) -> None:
    run_dir = Path(cfg.paths.run_dir)
    if hasattr(net, "save_pretrained") and all(p.requires_grad for p in net.parameters()):
        # the whole UNet was trained (not an adapter on a frozen one): export it in diffusers format
        save_pipeline(net, base.scheduler_config, run_dir / "model")
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    outputs.write_metrics(run_dir, cfg.task, {"steps": trainer.global_step, **stats, **logged})
    outputs.write_json(run_dir / "manifest.json", outputs.manifest(base.weights_hash, base.source))
    print(f"hiresrun: trained {trainer.global_step} steps -> {run_dir}")


def evaluate(cfg: DictConfig) -> dict:
    """`hiresrun eval eval.gen=<folder> [eval.ref=<folder>] [reference=<run dir>]` scores a folder of images
    against real images (default: the data config's real set, features cached); `hiresrun eval eval.mode=ref`
    computes and caches the real set's features once. Metrics options as for sample; metrics=default implied."""
    from hiresrun.metrics import Metrics, load_folder

    has_target = "_target_" in (cfg.get("metrics") or {})
    metrics = instantiate(cfg.metrics) if has_target else Metrics(cache_dir=cfg.paths.cache_dir)
    real = cfg.eval.ref or (instantiate(cfg.data) if cfg.eval.mode == "ref" else None)
    if cfg.eval.mode == "ref":
        result = metrics.reference_statistics(real, int(cfg.data.resolution), int(cfg.data.get("channels", 1)))
        print(f"hiresrun: reference features of {result['real']} ({result['n_reference']} images, "
              f"{result['computed']} computed, {result['reused']} reused) in {result['folder']}")
    elif cfg.eval.mode == "score":
        if not cfg.eval.gen:
            raise UsageError("`hiresrun eval` needs eval.gen=<folder of generated images> (or eval.mode=ref to "
                             "cache the real set's features)")
        images, seeds = load_folder(cfg.eval.gen)
        real = real or instantiate(cfg.data, resolution=int(images.shape[-1]))  # the real set at the images' size
        result = {"gen": str(cfg.eval.gen), "num_samples": len(images),
                  "resolution": int(images.shape[-1]), **metrics.evaluate(images, real, cfg.get("reference"), seeds)}
        shown = [f"{k} {result[k]:.4g}" for k in ("fid", "kid", "patch_fid", "swd", "digit_acc", "lpips_to_ref")
                 if k in result]
        print(f"hiresrun: {len(images)} images: {', '.join(shown)} -> {cfg.paths.run_dir}")
    else:
        raise UsageError(f"eval.mode={cfg.eval.mode}: choose score (eval.gen vs eval.ref) or ref")
    return outputs.write_metrics(Path(cfg.paths.run_dir), "eval", result)


def calibrate(cfg: DictConfig) -> dict:
    """`hiresrun calibrate +accelerator=adaptive target.psnr=30`: the largest delta keeping the target against the
    full-step outputs of `calibrate.seeds`, saved for `accelerator.calibration=<file>` (hiresrun/tune.py)."""
    from hiresrun.tune import calibrate as search

    return search(cfg)


TASKS = {"pretrain": pretrain, "train": train, "sample": sample, "eval": evaluate, "calibrate": calibrate,
         "merge": merge}


def refuse(cfg: DictConfig, error: Unsupported) -> None:
    """A pair the method and accelerator do not support: an error when run alone; in a sweep (`-m`) the job folder
    gets status.json {"status": "refused", "reason": ...} and the sweep goes on to the next pair."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        raise error
    outputs.write_json(Path(cfg.paths.run_dir) / "status.json", {
        "status": "refused", "reason": str(error), "task": cfg.task, "method": choice(cfg, "method"),
        "accelerator": choice(cfg, "accelerator")})
    print(f"hiresrun: refused: {error}")


def run(cfg: DictConfig):
    if cfg.task not in TASKS:
        raise UsageError(f"task={cfg.task}: choose one of {', '.join(TASKS)}")
    validate.default_resolution(cfg)
    validate.check_values(cfg)
    OmegaConf.resolve(cfg)
    if cfg.task in ("sample", "train", "calibrate"):  # before anything loads (hiresrun/support.py)
        try:
            support.check(cfg, choice(cfg, "method"), None if cfg.task == "train" else choice(cfg, "accelerator"))
        except Unsupported as error:
            return refuse(cfg, error)
    return TASKS[cfg.task](cfg)
