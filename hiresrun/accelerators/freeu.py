"""accelerator=freeu: FreeU (Si et al., CVPR 2024, arXiv 2309.11497), diffusers' own implementation.

The comparison arm for Skip-Tuning: in the two lowest-resolution up stages, the first half of the backbone
channels is multiplied by b1/b2 and the lowest-frequency FFT window of the skip by s1/s2. diffusers applies it
inside the up blocks once `unet.enable_freeu(s1, s2, b1, b2)` has set those attributes; we only switch it on
and off (no re-implementation). Gives no speed-up; it is here for quality at equal NFE.
"""

from __future__ import annotations

from torch import nn

from hiresrun.accelerators import Accelerator
from hiresrun.accelerators.skiptuning import find_unet
from hiresrun.errors import UsageError
from hiresrun.support import Support

KEYS = ("s1", "s2", "b1", "b2")


class FreeURestore:
    """The handle `attach` returns: `remove()` calls diffusers' `disable_freeu`, then puts every up block's
    s1/s2/b1/b2 back exactly as found (absent attributes removed again, earlier values restored)."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.saved = [{k: getattr(b, k) for k in KEYS if hasattr(b, k)} for b in unet.up_blocks]

    def remove(self) -> None:
        self.unet.disable_freeu()
        for block, saved in zip(self.unet.up_blocks, self.saved):
            for k in KEYS:
                if k in saved:
                    setattr(block, k, saved[k])
                elif hasattr(block, k):
                    delattr(block, k)


class FreeU(Accelerator):
    """FreeU through `enable_freeu` / `disable_freeu`; defaults are diffusers' SD-1.5 values."""

    supports = Support(unets=("UNet2DConditionModel",), why="diffusers' enable_freeu exists on that class only")

    def __init__(self, b1: float = 1.5,    # backbone factor, stage 1 (lowest resolution)
                 b2: float = 1.6,          # backbone factor, stage 2
                 s1: float = 0.9,          # skip low-frequency factor, stage 1
                 s2: float = 0.2):         # skip low-frequency factor, stage 2
        self.b1, self.b2, self.s1, self.s2 = b1, b2, s1, s2

    def attach(self, net: nn.Module) -> list[FreeURestore]:
        unet = find_unet(net)
        if not hasattr(unet, "enable_freeu"):
            raise UsageError(f"accelerator=freeu needs a diffusers UNet with enable_freeu (UNet2DConditionModel); "
                             f"{type(unet).__name__} has none: use accelerator=skiptuning")
        handle = FreeURestore(unet)
        unet.enable_freeu(s1=self.s1, s2=self.s2, b1=self.b1, b2=self.b2)
        return [handle]
