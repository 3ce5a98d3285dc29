"""Torch hook bookkeeping shared by accelerators and methods."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils.hooks import RemovableHandle


@contextmanager
def hooks_removed_after(handles: list[RemovableHandle]) -> Iterator[list[RemovableHandle]]:
    """`with hooks_removed_after(acc.attach(net)):` -- whatever happens inside, the model leaves without the hooks
    (every attach site: sampling, Self-Cascade's upsamplers in sampling and training)."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
