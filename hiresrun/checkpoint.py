"""Reading checkpoints without running code from them.

A Lightning `.ckpt` is a pickle, and a pickle can call any Python function while it loads (`os.system` included).
Every checkpoint hiresrun reads goes through `load`, which unpickles with `weights_only=True`: torch's restricted
unpickler, which builds tensors, numbers, strings and plain containers and refuses every other global before
calling it. What hiresrun itself writes (state dicts, loop and callback states, the base's hash) is made of those
types only, so nothing legitimate is lost; a file that needs more is refused with one line and nothing runs.
Lightning's own resume (`Trainer.fit(ckpt_path=...)`) is called with `weights_only=True` for the same reason.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch

from hiresrun.errors import UsageError


def load(path: str | Path, key: str = "ckpt_path") -> dict:
    """The checkpoint at `path` as a dict of tensors and plain values (on the CPU); `key` names the config key the
    path came from, for the one-line refusal."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UsageError(f"{key}={path}: cannot read it ({e.strerror}); give a .ckpt written by `hiresrun train`") \
            from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise UsageError(f"{key}={path}: not a checkpoint (a torch file starts as a zip archive or a pickle); give a "
                         f".ckpt written by `hiresrun train`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a global outside torch's allowlist: refused before it is called
        found = re.search(r"(?:GLOBAL|global:?)\s+([\w.]+)", str(e))
        detail = f"{found[1]}" if found else ""
        raise UsageError(f"{key}={path}: refused to load: the file asks to run Python code while unpickling"
                         f"{f' ({detail})' if detail else ''}, which a hiresrun checkpoint never does; load "
                         f"checkpoints written by `hiresrun train` only") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated, not a torch file, unreadable
        raise UsageError(f"{key}={path}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'empty'}); give a .ckpt written by "
                         f"`hiresrun train`") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(f"{key}={path}: not a Lightning checkpoint (no state_dict); give a .ckpt written by "
                         f"`hiresrun train`")
    return checkpoint


def run_method(run_dir: Path) -> str | None:
    """The method `_target_` a run folder was made with (its saved Hydra config), or None when it has none."""
    from omegaconf import OmegaConf

    config = Path(run_dir) / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    return str(OmegaConf.load(config).get("method", {}).get("_target_"))


def resolve(ckpt_path: str | None, output_root: str, task: str, method: str | None = None) -> str | None:
    """A checkpoint file, a run folder (its checkpoints/last.ckpt), or `last`: the newest last.ckpt of an earlier
    `hiresrun <task>` run under output_root (<root>/<task>/<date>/<time>/, where Hydra puts runs by default) made with
    the same method (`method`: its `_target_`); runs placed elsewhere with hydra.run.dir need their folder given.
    A checkpoint whose run folder names another method is refused."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = sorted(Path(output_root, task).glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if method is not None:
            found = [p for p in found if run_method(p.parents[1]) in (method, None)]
        if not found:
            which = f" with method {method.rsplit('.', 1)[-1]}" if method else ""
            raise UsageError(f"ckpt_path=last: no earlier `hiresrun {task}` checkpoint{which} under "
                             f"{output_root}/{task}/<date>/<time>/; give the checkpoint file or run folder "
                             f"(runs placed with hydra.run.dir are not searched)")
        return str(found[-1])
    p = Path(ckpt_path)
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        raise UsageError(f"ckpt_path={ckpt_path}: no such checkpoint; give a .ckpt file, a run folder or `last`")
    trained_with = run_method(p.parents[1])
    if method is not None and trained_with is not None and trained_with != method:
        raise UsageError(f"ckpt_path={p} was trained with method {trained_with.rsplit('.', 1)[-1]}, this run is "
                         f"{method.rsplit('.', 1)[-1]}: use the same +method= (or start without ckpt_path)")
    return str(p)


def trained_state(path: str | Path, weights_hash: str | None, prefix: str, key: str = "ckpt_path") -> dict:
    """The tensors under `prefix` (`net.`, `net.gen.`) of a `hiresrun train` checkpoint, prefix removed, after
    checking it was trained on the base these weights hash to (frozen base weights are not in the file)."""
    loaded = load(path, key)
    trained_on = loaded.get("base", {}).get("weights_sha256")
    if trained_on and weights_hash and weights_hash != trained_on:
        raise UsageError(f"{key}={path} was trained on base weights {trained_on[:12]} ({loaded['base'].get('source')})"
                         f", but model= gives {weights_hash[:12]}; pass the same model")
    return {k[len(prefix):]: v for k, v in loaded["state_dict"].items() if k.startswith(prefix)}


def fingerprint(path: str | Path) -> dict:
    """The checkpoint file's identity: its sha256 (what a sample run records and a resume or merge compares) and the
    stat fields that change when the file is replaced (`unchanged` checks them after loading)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    st = os.stat(path)
    return {"path": str(path), "sha256": h.hexdigest(), "stat": [st.st_ino, st.st_size, st.st_mtime_ns]}


def unchanged(print_: dict) -> None:
    """Refuse when the file was replaced between hashing and loading (a training run writing `last.ckpt`)."""
    st = os.stat(print_["path"])
    if [st.st_ino, st.st_size, st.st_mtime_ns] != print_["stat"]:
        raise UsageError(f"ckpt_path: {print_['path']} was replaced while it was read (a training run is writing "
                         f"it); pass a fixed checkpoint file (checkpoints/step_*.ckpt) or wait for training to end")
