"""The one LightningModule: `training_step` -> method.loss; validation and test call the sampler (sampling.Sampler).

Validation draws a fixed-seed grid every `grid_every` steps (with EMA weights: Lightning's weight-averaging
callback swaps them in for validation). Test is `hiresrun sample` on several devices: batches of seeds arrive as a
dataloader dealt to the ranks (store.Batches), and each rank's sampler writes its own images and records
(store.Writer); rank 0 scores from disk. On one device `hiresrun sample` calls the sampler without a Trainer.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.errors import DataError
from hiresrun.signals import Interrupted, SampleSignals, Signals


def ema_avg_fn(decay: float):
    """EMA with the usual warm-up: decay_s = min(decay, (1 + s) / (10 + s)) after s updates."""

    def avg(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        return averaged * d + current * (1 - d)

    return avg


class FinalCheckpoint(L.Callback):
    """`last.ckpt` at the last step when max_steps is not a multiple of checkpoint_every (ModelCheckpoint saves only
    at multiples), written inside the fit stage after the EMA update, so it holds the final raw and EMA weights and
    resumes exactly. Listed after the EMA callback."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = Path(path), every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.max_steps is not None and step == trainer.max_steps > 0 and step % self.every:
            trainer.save_checkpoint(self.path)


class Interrupt(L.Callback):
    """SIGINT (Ctrl-C) or SIGTERM (what SLURM sends before a requeue or at the time limit) during training: the
    current step finishes, `last.ckpt` is written there (so a resume is exact), one line says where and how to
    resume, and the command exits 130 / 143 (hiresrun/signals.py). Under DDP the ranks agree each step (any rank's
    signal stops all). Listed after the EMA callback, so the checkpoint holds the step's EMA weights."""

    def __init__(self, path: Path):
        self.path, self.signals = Path(path), Signals()

    def on_train_start(self, trainer, pl_module) -> None:
        self.signals.install()

    def stop(self, trainer) -> int | None:
        """The signal to stop on after this step (every rank agrees under DDP), else None."""
        stop = self.signals.signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return (self.signals.signum or signal.SIGTERM) if stop else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self.stop(trainer)
        if signum is None:
            return
        trainer.save_checkpoint(self.path)
        self.signals.hand_over(signum, f"after step {trainer.global_step}: saved {self.path}", trainer.is_global_zero)
        raise Interrupted(f"interrupted by {signal.Signals(signum).name} after step {trainer.global_step}: saved "
                          f"{self.path}; resume with the same command plus ckpt_path={self.path.parents[1]}", signum)

    def teardown(self, trainer, pl_module, stage) -> None:
        self.signals.restore()


class SampleInterrupt(L.Callback):
    """`hiresrun sample` on several devices: SIGINT / SIGTERM / SIGUSR2 let the batch in flight finish and be
    written (images, then its record), then stop with the count on disk and how to resume (signals.SampleSignals)."""

    def __init__(self, run_dir: Path, done_before: int, total: int):
        self.signals = SampleSignals(run_dir, done_before, total)

    def on_test_start(self, trainer, pl_module) -> None:
        self.signals.install()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.signals.after_batch(len(batch), trainer.world_size, trainer.is_global_zero)

    def teardown(self, trainer, pl_module, stage) -> None:
        self.signals.restore()


class TrainProgress(L.Callback):
    """What training is doing, on rank 0: in a terminal a bar (`bar`), otherwise a line every 5% of the steps
    (a log file, a SLURM job): "hiresrun: training step 300/1,000, loss 0.0612, 4.2 steps/s, ETA 3 min 10 s". Steps
    count from where a resumed run starts; without `trainer.max_steps` a line every 100 steps and no ETA."""

    def __init__(self, bar: bool, clock=time.monotonic):
        from hiresrun.progress import duration

        self.bar, self.clock, self.duration, self.tqdm = bar, clock, duration, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.first, self.start, self.shown = trainer.global_step, self.clock(), trainer.global_step
        self.every = max(1, (self.total - self.first) // 20) if self.total else 100
        if self.bar and trainer.is_global_zero:
            from tqdm import tqdm

            self.tqdm = tqdm(total=self.total, initial=self.first, unit="step", desc="training", dynamic_ncols=True)

    def line(self, step: int, loss: float | None) -> str:
        rate = (step - self.first) / max(self.clock() - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        eta = f", ETA {self.duration((self.total - step) / rate if rate > 0 else float('inf'))}" if self.total else ""
        shown = f", loss {loss:.4g}" if loss is not None else ""
        return f"hiresrun: training step {step:,}{of}{shown}, {rate:.3g} steps/s{eta}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        loss = trainer.callback_metrics.get("train/loss")
        loss = float(loss) if loss is not None else None
        if self.tqdm is not None:
            self.tqdm.update(step - self.tqdm.n)
            if loss is not None:
                self.tqdm.set_postfix(loss=f"{loss:.4g}", refresh=False)
        elif step - self.shown >= self.every or step == self.total:
            self.shown = step
            print(self.line(step, loss), flush=True)

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None


class TrainClock(L.Callback):
    """Wall seconds spent training, kept in every checkpoint, so a resumed run reports the total, not its last part."""

    def __init__(self):
        self.before, self.start = 0.0, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def state_dict(self) -> dict:
        return {"train_seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.before = float(state.get("train_seconds", 0.0))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a hidden temporary name and renamed, so a full disk or a kill mid-write never leaves a
    truncated `.ckpt` (nor replaces a good `last.ckpt` with one); a write error is one line naming the file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        partial_path = path.with_name(f".{path.name}.partial")
        try:
            super().save_checkpoint(checkpoint, partial_path, storage_options)
            os.replace(partial_path, path)
        except OSError as e:
            partial_path.unlink(missing_ok=True)
            raise DataError(f"could not write checkpoint {path}: {e.strerror or e}; free space in {path.parent} or "
                            f"put the run on a writable disk (hydra.run.dir=<folder>)") from e


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger, except that a resumed version keeps its earlier rows (Lightning's writer deletes an
    existing metrics.csv when it opens the version folder)."""

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept = path.read_text() if path.is_file() else None
        experiment = _CSVLogger.experiment.fget(self)
        if kept:
            path.write_text(kept)
            experiment.metrics_keys = kept.splitlines()[0].split(",")
        return experiment


class EMA(WeightAveraging):
    """Exponential moving average of every weight, updated after each optimiser step."""

    def __init__(self, decay: float = 0.999):
        super().__init__(avg_fn=ema_avg_fn(decay), use_buffers=True)


def fill_frozen(checkpoint: dict, full: dict) -> None:
    """Checkpoints leave out frozen weights; take them from the model as built (same base, checked by hash)."""
    for key in ("state_dict", "current_model_state"):
        if key in checkpoint:
            checkpoint[key] = {**{k: v for k, v in full.items() if k not in checkpoint[key]}, **checkpoint[key]}


class LitModule(L.LightningModule):
    """Trains `net` with `method.loss` (or the method's own `training_step`); its validation grids and, for several
    devices, `hiresrun sample`'s batches are the sampler's (sampling.Sampler, which holds the same `net`)."""

    def __init__(self, net: nn.Module, method, sampler: sampling.Sampler | None = None, optimizer=None, seed: int = 0,
                 grid_dir: str | None = None, val_metric=None):
        super().__init__()
        self.val_metric = val_metric  # images -> {"val/fid_proxy": ..., "val/fid_proxy_n": ...} (metrics.FidProxy)
        self.net, self.method = net, method
        if sampler is not None and sampler.net is not net:
            raise ValueError("LitModule: the sampler must sample the module it trains (sampler.net is net)")
        self.sampler = sampler
        self.optimizer, self.seed, self.grid_dir = optimizer, seed, grid_dir
        self._outputs: list[dict] = []
        self.results: dict | None = None
        self.automatic_optimization = not method.manual_optimization  # PaGoDA steps G and D itself

    # -- training ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.method.optimizers(self.net, self.optimizer)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Every random draw of a step (t, eps, dropout) comes from a seed fixed by (seed, step, rank), so a
        # run resumed from a checkpoint continues exactly as if it had never stopped.
        torch.manual_seed(self.seed + 1_000_003 * self.global_step + 7919 * self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        auto = self.automatic_optimization
        out = self.method.loss(self.net, batch) if auto else self.method.training_step(self, batch)
        bad = [k for k, v in out.items() if not torch.isfinite(v.detach()).all()]  # loss, or PaGoDA's loss_g/loss_d
        if bad:  # diverged: stop before a NaN step is saved
            raise DataError(f"train: the loss is {float(out[bad[0]].detach().float().mean())} ({bad[0]}) at step "
                            f"{self.global_step}: training diverged; lower optimizer.lr; checkpoints/last.ckpt keeps "
                            f"the last periodic (finite) state")
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True,
                      batch_size=batch["image"].shape[0])
        return out["loss"] if auto else None

    # -- checkpoints: only what trains, plus the base's identity --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = {f"net.{n}" for n, p in self.net.named_parameters() if not p.requires_grad}
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                checkpoint[key] = {k: v for k, v in checkpoint[key].items() if k not in frozen}
        base = self.method.base
        checkpoint["base"] = {"weights_sha256": base.weights_hash, "source": base.source}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fill_frozen(checkpoint, self.state_dict())

    # -- sampling ---------------------------------------------------------------------------------------
    def validation_step(self, seeds: Tensor, batch_idx: int) -> None:
        self._outputs.append(self.sampler.generate(seeds.tolist()))

    def on_validation_epoch_end(self) -> None:
        gathered = self._gather()
        if self.trainer.is_global_zero and gathered is not None and self.grid_dir:
            from hiresrun.outputs import save_grid

            path = Path(self.grid_dir) / f"step_{self.global_step:07d}.png"
            save_grid(gathered["images"], path, [f"seed {s}" for s in gathered["seeds"].tolist()])
            if self.logger:
                from hiresrun.logs import log_grid

                log_grid(self.logger, "val/grid", path, f"EMA samples at step {self.global_step}", self.global_step)
        if self.trainer.is_global_zero and gathered is not None and self.val_metric is not None and self.logger:
            self.logger.log_metrics(self.val_metric(gathered["images"]), step=self.global_step)

    def test_step(self, seeds: Tensor, batch_idx: int) -> None:
        """One batch of `hiresrun sample` on several devices: written by the sampler's sink on this rank."""
        out = self.sampler.batch(seeds.tolist(), self.global_rank, self.trainer.world_size)
        if self.sampler.sink.writer is None:  # kept in memory, gathered at the end
            self._outputs.append(out)

    def on_test_epoch_end(self) -> None:
        if self.sampler.sink.writer is None:
            self.results = self._gather()
        elif self.trainer.world_size > 1:  # every rank's records are on disk before rank 0 reads them
            self.trainer.strategy.barrier("hiresrun-samples-written")

    def _gather(self) -> dict | None:
        """Concatenate this rank's outputs, gather across ranks, drop the DistributedSampler's padding."""
        if not self._outputs:
            return None
        local = {k: torch.cat([o[k].reshape(-1, *o[k].shape[1:]) if o[k].ndim else o[k][None]
                               for o in self._outputs]) for k in self._outputs[0]}
        self._outputs = []
        if self.trainer.world_size > 1:
            local = {k: v.flatten(0, 1) for k, v in self.all_gather(local).items()}
        order = torch.argsort(local["seeds"], stable=True)
        seeds, first = torch.unique_consecutive(local["seeds"][order], return_counts=True)
        keep = order[torch.cumsum(first, 0) - first]
        return {"seeds": seeds, "images": local["images"][keep].cpu(),
                "evals": int(local["evals"].sum()), "passes": int(local["passes"].sum()),
                "seconds": float(local["seconds"].sum()),
                "generated": len(local["seeds"])}
