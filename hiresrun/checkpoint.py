"""Reading checkpoints without running code from them.

A Lightning `.ckpt` is a pickle, and a pickle can call any Python function while it loads (`os.system` included).
Every checkpoint hiresrun reads goes through `load`, which unpickles with `weights_only=True`: torch's restricted
unpickler, which builds tensors, numbers, strings and plain containers and refuses every other global before
calling it. What hiresrun itself writes (state dicts, loop and callback states, the base's hash) is made of those
types only, so nothing legitimate is lost; a file that needs more is refused with one line and nothing runs.
Lightning's own resume (`Trainer.fit(ckpt_path=...)`) is called with `weights_only=True` for the same reason.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from hiresrun.errors import UsageError


def load(path: str | Path, key: str = "ckpt_path") -> dict:
    """The checkpoint at `path` as a dict of tensors and plain values (on the CPU); `key` names the config key the
    path came from, for the one-line refusal."""
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
