"""accelerator=freeu: FreeU (Si et al., CVPR 2024, arXiv 2309.11497), diffusers' own implementation.

The comparison arm for Skip-Tuning: in the two lowest-resolution up stages, the first half of the backbone
channels is multiplied by b1/b2 and the lowest-frequency FFT window of the skip by s1/s2. diffusers applies it
inside the up blocks once `unet.enable_freeu(s1, s2, b1, b2)` has set those attributes; we only switch it on
and off (no re-implementation). Gives no speed-up; it is here for quality at equal NFE. Under classifier-free
guidance both halves of the doubled batch pass through the same up blocks, so both are rebalanced.
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


# The FreeU README's parameters per model family (ChenyangSi/FreeU, "Parameters"): (b1, b2, s1, s2).
FAMILY_DEFAULTS = {"sd1": (1.5, 1.6, 0.9, 0.2),    # SD 1.5 (SD 1.4: 1.3, 1.4, 0.9, 0.2)
                   "sd2": (1.4, 1.6, 0.9, 0.2),    # SD 2.1
                   "sdxl": (1.3, 1.4, 0.9, 0.2)}   # SDXL


def family(unet: nn.Module) -> str:
    """sd1 / sd2 / sdxl from the UNet config: SDXL's text_time added embedding, else the cross-attention width
    (768: CLIP ViT-L, SD 1.x; 1024: OpenCLIP ViT-H, SD 2.x); anything else is treated as SD 1.x."""
    config = unet.config
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if getattr(config, "cross_attention_dim", None) == 1024 else "sd1"


class FreeU(Accelerator):
    """FreeU through `enable_freeu` / `disable_freeu`; a factor left None takes the FreeU README's value for the
    UNet's family (SD 1.5, SD 2.1 or SDXL, read from its config)."""

    supports = Support(level="features",
                       unets=("UNet2DConditionModel",), why="diffusers' enable_freeu exists on that class only")

    def __init__(self, b1: float | None = None,    # backbone factor, stage 1 (lowest resolution)
                 b2: float | None = None,          # backbone factor, stage 2
                 s1: float | None = None,          # skip low-frequency factor, stage 1
                 s2: float | None = None):         # skip low-frequency factor, stage 2
        self.b1, self.b2, self.s1, self.s2 = b1, b2, s1, s2

    def factors(self, unet: nn.Module) -> dict[str, float]:
        chosen = dict(zip(("b1", "b2", "s1", "s2"), FAMILY_DEFAULTS[family(unet)]))
        return {k: float(getattr(self, k) if getattr(self, k) is not None else chosen[k]) for k in chosen}

    def attach(self, net: nn.Module) -> list[FreeURestore]:
        unet = find_unet(net)
        if not hasattr(unet, "enable_freeu"):
            raise UsageError(f"accelerator=freeu needs a diffusers UNet with enable_freeu (UNet2DConditionModel); "
                             f"{type(unet).__name__} has none: use accelerator=skiptuning")
        handle = FreeURestore(unet)
        unet.enable_freeu(**self.factors(unet))
        return [handle]
