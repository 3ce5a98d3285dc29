"""A sample run's images on disk, written batch by batch by the process that made them, so that a run resumes,
shards and merges (docs/ARCHITECTURE.md, "Contracts": run folders lose nothing).

A sample run folder holds
    sampling.json                the identity of the images (every setting that changes a pixel), the full seed list,
                                 the batch size, the base's facts and the resolved config (what `merge` scores with)
    samples/<seed:06d>.png       one image per seed, written atomically (outputs.save_png)
    records/<writer>.jsonl       one line per finished batch, appended after its images: seeds, each PNG's sha256,
                                 model calls, seconds, and per-image facts (prompt, class label, AdaptiveDiffusion
                                 masks). One file per writing process, so ranks and shards never share a file.

The unit of work is a batch of `sample.batch_size` consecutive seeds of the full list, fixed before anything is
split: shard K of N takes batches K, K+N, ...; rank r of W takes every W-th batch still to do. A batch is done when
its record is on disk and every PNG in it has the recorded sha256, so a kill at any point (mid-image, mid-record)
costs at most the batches in flight, and a resumed, sharded or many-rank run holds the same bytes as one process
(the network sees the same batches).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from hiresrun.build import parse_seeds
from hiresrun.errors import DataError, UsageError

CONFIG = "sampling.json"
RECORDS = "records"
SAMPLES = "samples"
# Settings that do not change an image: where and how the run is executed, what is measured afterwards.
NOT_IMAGES = ("sample.seeds", "sample.num_samples", "sample.shard", "sample.save_images", "sample.progress_every",
              "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.enable_progress_bar",
              "trainer.log_every_n_steps", "trainer.default_root_dir", "logger", "paths", "metrics", "reference",
              "eval", "calibrate", "merge",
              "hydra", "task", "train", "optimizer", "data.root", "data.num_workers", "data.batch_size",
              "ckpt_path")  # the checkpoint is compared by its file's sha256 (`identity`), not by how it was named


def png_name(seed: int) -> str:
    return f"{seed:06d}.png"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- which batches a process runs ------------------------------------------------------------------------------
def parse_shard(value) -> tuple[int, int]:
    """`K/N` (0 <= K < N) -> (K, N); `auto` reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (one shard outside
    an array job); null -> (0, 1)."""
    if value is None or str(value) in ("", "0/1"):
        return 0, 1
    if str(value) == "auto":
        task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return 0, 1
        base = os.environ.get("SLURM_ARRAY_TASK_MIN", "0")  # arrays may start at 1 (--array=1-8)
        if not all(re.fullmatch(r"\d+", v) for v in (task, count, base)) or not 0 <= int(task) - int(base) < \
                int(count):
            raise UsageError(f"sample.shard=auto: SLURM_ARRAY_TASK_ID={task} (min {base}) is not one of the "
                             f"SLURM_ARRAY_TASK_COUNT={count} tasks; submit with --array=0-<N-1> or give "
                             f"sample.shard=K/N")
        return int(task) - int(base), int(count)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise UsageError(f"sample.shard={value}: write K/N with 0 <= K < N (e.g. sample.shard=0/4 for the first of "
                         f"four shards), or sample.shard=auto inside a SLURM array job")
    return int(m[1]), int(m[2])


def batches(seeds: list[int], batch_size: int) -> list[list[int]]:
    """The full run's batches: consecutive seeds of the list, `batch_size` each (the last may be shorter)."""
    return [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]


def shard_batches(all_batches: list[list[int]], shard: tuple[int, int]) -> list[list[int]]:
    k, n = shard
    return all_batches[k::n]


# -- the identity of the images -----------------------------------------------------------------------------------
def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def images_only(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not any(k == x or k.startswith(x + ".") for x in NOT_IMAGES)}


def identity(cfg: DictConfig, weights_sha256: str | None, ckpt: dict | None = None) -> dict:
    """Every resolved setting that can change an image, flattened (`sampler.num_steps: 50`), plus the weights: the
    base's hash and the trained checkpoint's file hash (`ckpt_path` itself is only where it was found: `last` or a run
    folder resolve to whatever checkpoint is newest when a process starts)."""
    return {**images_only(_flat(OmegaConf.to_container(cfg, resolve=True))), "model.weights_sha256": weights_sha256,
            "checkpoint.sha256": ckpt["sha256"] if ckpt else None}


def checkpoint_change(ours: dict, theirs: dict) -> str | None:
    """`old -> new` naming both checkpoints (file, what it resolved from, sha256) when two sample records were made
    from different trained weights; None when they agree."""
    a, b = theirs.get("checkpoint"), ours.get("checkpoint")
    if (a or {}).get("sha256") == (b or {}).get("sha256"):
        return None
    name = lambda c: "no checkpoint" if not c else f"{c['path']} (ckpt_path={c['from']}, sha256 {c['sha256'][:12]})"
    return f"{name(a)} -> {name(b)}"


def same(ours: dict, theirs: dict) -> bool:
    return images_only(ours) == images_only(theirs)


def differences(ours: dict, theirs: dict) -> list[str]:
    ours, theirs = images_only(ours), images_only(theirs)
    keys = sorted(set(ours) | set(theirs))
    return [f"{k} {theirs.get(k, '(unset)')} -> {ours.get(k, '(unset)')}" for k in keys if ours.get(k) != theirs.get(k)]


class Store:
    """One sample run folder (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.samples, self.records = self.run_dir / SAMPLES, self.run_dir / RECORDS

    # -- the folder's identity ------------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        path = self.run_dir / CONFIG
        return json.loads(path.read_text()) if path.is_file() else None

    def open(self, info: dict, write: bool) -> None:
        """Refuse a folder whose images were made with other settings (one line naming them); else (`write`: rank 0)
        write `sampling.json` = `info` (its identity, this run's seeds and config)."""
        import fcntl

        from hiresrun import outputs

        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock-sampling", "a") as lock:  # one reader-writer of sampling.json at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._open(info, write, outputs)

    def _open(self, info: dict, write: bool, outputs) -> None:
        old = self.check(info)
        if write:  # the folder's seed set grows: a run with fewer seeds keeps the earlier runs' images
            grown = sorted(set(parse_seeds(old["seeds"], 0) if old else []) | set(parse_seeds(info["seeds"], 0)))
            outputs.write_json(self.run_dir / CONFIG, {**info, "seeds": outputs.seed_ranges(grown)})

    def check(self, info: dict) -> dict | None:
        """Refuse, touching nothing, a folder whose images were made from another checkpoint or with other settings,
        or that holds images no run recorded; -> the folder's sampling.json (None for a new folder)."""
        old = self.read_config()
        changed = checkpoint_change(info, old) if old is not None else None
        if changed:
            raise UsageError(f"{self.run_dir} holds images sampled from another checkpoint ({changed}); resume with "
                             f"ckpt_path=<that file>, or sample into a new folder (hydra.run.dir=<folder>)")
        if old is not None and not same(info["identity"], old["identity"]):
            diff = differences(info["identity"], old["identity"])
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise UsageError(f"{self.run_dir} holds images sampled with other settings ({shown}); resume with the "
                             f"same settings, or sample into a new folder (hydra.run.dir=<folder>)")
        if old is None and self.samples.is_dir() and any(self.samples.glob("*.png")):
            # images nothing recorded (a user's folder): never ours to overwrite or delete
            raise UsageError(f"{self.samples} holds images that no hiresrun sample run recorded; sample into a new "
                             f"folder (hydra.run.dir=<folder>) or move them away")
        return old

    def claim(self, shard: tuple[int, int]):
        """Hold this folder's lock for one shard of work for as long as the process runs (an OS lock, gone with the
        process, kill -9 included). Shards K/N of one run share a folder; a second process given the same shard
        (the same batches, or other seeds with sample.shard unset) is refused in one line naming the holder."""
        import fcntl
        import socket

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f".lock-shard{shard[0]}of{shard[1]}"
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(f"{self.run_dir}: {holder} is sampling shard {shard[0]}/{shard[1]} into this folder; "
                             f"wait for it, use another folder, or split the work with sample.shard=K/N") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        return handle

    # -- what is on disk --------------------------------------------------------------------------------------
    def read_records(self) -> list[dict]:
        """Every complete batch record of this folder, oldest file first (a line cut by a kill is skipped)."""
        out = []
        for path in sorted(self.records.glob("*.jsonl"), key=lambda p: (p.stat().st_mtime, p.name)):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "seeds" in rec and "sha256" in rec:
                    out.append(rec)
        return out

    def done(self, verify: bool = True) -> dict[int, dict]:
        """seed -> the newest record holding it whose image is on disk with the recorded hash."""
        out, hashes = {}, {}
        for rec in self.read_records():
            for s, h in zip(rec["seeds"], rec["sha256"]):
                path = self.samples / png_name(s)
                if not path.is_file():
                    continue
                if verify and s not in hashes:
                    hashes[s] = sha256(path)
                if not verify or hashes[s] == h:
                    out[s] = rec
        return out

    # -- writing --------------------------------------------------------------------------------------------------
    def writer(self, name: str) -> Writer:
        return Writer(self, name)

    def drop(self, made: set[int]) -> None:
        """`sample.save_images=false`: remove the images of `made`, the seeds this run generated, once scored; images
        of earlier runs into the folder stay."""
        for s in made:
            (self.samples / png_name(s)).unlink(missing_ok=True)


class Writer:
    """Appends this process's batches: images first (atomic), then one flushed, fsynced record line."""

    def __init__(self, store: Store, name: str):
        self.store, self.path = store, store.records / f"{name}.jsonl"

    def write(self, seeds: list[int], images, facts: dict) -> list[str]:
        """-> each PNG's sha256."""
        from hiresrun.outputs import save_png

        hashes = []
        for s, im in zip(seeds, images):
            path = self.store.samples / png_name(s)
            save_png(im, path)
            hashes.append(sha256(path))
        line = json.dumps({"seeds": [int(s) for s in seeds], "sha256": hashes, **facts}, allow_nan=False)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a torn last line is skipped on reading (`read_records`): the batch is redone
            raise DataError(f"could not write {self.path}: {e.strerror or e}; free space in {self.path.parent} or "
                            f"put the run on a writable disk; the same command then resumes") from None
        return hashes


def union(folders: list[Path], seeds: list[int]) -> list[tuple[dict, Path, list[int]]]:
    """The finished images of `seeds` across sample folders (shards): (record, folder, the seeds it gives) per
    record, each seed once. Refuses a union with seeds missing or in two folders, naming them."""
    from hiresrun.outputs import seed_ranges

    wanted, owner, given = set(seeds), {}, {}
    for folder in folders:
        done = {s: r for s, r in Store(folder).done().items() if s in wanted}
        twice = sorted(s for s in done if s in owner)
        if twice:
            raise UsageError(f"seeds {seed_ranges(twice)[:200]} are in both {owner[twice[0]]} and {folder}: merge "
                             f"shards that split one seed list (sample.shard=K/N with the same N)")
        for s, rec in done.items():
            owner[s] = folder
            given.setdefault(id(rec), (rec, folder, []))[2].append(s)
    missing = sorted(wanted - set(owner))
    if missing:
        raise UsageError(f"{len(missing)} of {len(seeds)} seeds have no finished image in "
                         f"{', '.join(map(str, folders))}: {seed_ranges(missing)[:200]}; run the missing shards (the "
                         f"same command resumes a shard), then merge again")
    return list(given.values())


class Batches(torch.utils.data.IterableDataset):
    """The batches still to do, dealt round-robin to the ranks (read when the loop starts, after DDP is up)."""

    def __init__(self, todo: list[list[int]]):
        self.todo = todo

    def __iter__(self):
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        for batch in self.todo[rank::world]:
            yield torch.tensor(batch)


def writer_name(shard: tuple[int, int]) -> str:
    """A records file of its own for every process: shard, host and pid (ranks, shards and reruns never share)."""
    import socket

    return f"shard{shard[0]}of{shard[1]}-{socket.gethostname()}-{os.getpid()}"
