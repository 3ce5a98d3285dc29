"""accelerator=tome: Token Merging for Stable Diffusion (Bolya & Hoffman, CVPRW 2023), the accelerator papers'
comparison row, through the authors' `tomesd` package.

Before a transformer block's self-attention (and, if asked, its cross-attention and feed-forward), `ratio` of the
image tokens are merged into their most similar partners (bipartite soft matching over a 2 x 2 stride), the block
runs on the fewer tokens, and the outputs are unmerged back. tomesd swaps the class of each of the UNet's
`BasicTransformerBlock`s for its own and puts it back on `remove_patch`; we apply it for one sampling call and remove
it after. `ratio=0` sets nothing: the plain sampler bit for bit.

One deliberate change from tomesd's defaults: `use_rand=false`. tomesd's random partition draws from one generator
shared by the whole batch and advanced at every call, so an image would depend on its batch-mates and on how many
calls came before; the fixed partition (the first token of each 2 x 2 window is a destination) keeps image i a
function of seed i alone, as every hiresrun sample is.
"""

from __future__ import annotations

from torch import nn

from hiresrun.accelerators import Accelerator
from hiresrun.accelerators.skiptuning import find_unet
from hiresrun.errors import UsageError
from hiresrun.support import Support


class ToMeRestore:
    """`remove()` undoes tomesd's patch: the blocks get their own class back, its hooks go, and the `_tome_info`
    attributes it left are deleted, so the UNet is as it was found."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def remove(self) -> None:
        import tomesd

        tomesd.remove_patch(self.unet)
        for module in self.unet.modules():
            if "_tome_info" in module.__dict__:
                del module._tome_info


class ToMe(Accelerator):
    """tomesd's `apply_patch` on the UNet for each sampling call."""

    supports = Support(level="features", unets=("UNet2DConditionModel",),
                       why="tomesd merges tokens in a UNet2DConditionModel's BasicTransformerBlocks")

    def __init__(self, ratio: float = 0.5,          # share of tokens merged before each merged layer; 0 = off
                 max_downsample: int = 1,           # merge in blocks at most this downsampled (1, 2, 4 or 8)
                 sx: int = 2, sy: int = 2,          # stride of the destination grid
                 use_rand: bool = False,            # tomesd's random partition (batch-dependent; see above)
                 merge_attn: bool = True,           # merge before self-attention
                 merge_crossattn: bool = False,     # ... before cross-attention
                 merge_mlp: bool = False):          # ... before the feed-forward
        if not 0 <= ratio < 1:
            raise UsageError(f"accelerator.ratio={ratio}: the share of tokens merged, in [0, 1) (0 = off; tomesd's "
                             f"default 0.5)")
        if max_downsample not in (1, 2, 4, 8):
            raise UsageError(f"accelerator.max_downsample={max_downsample}: choose 1, 2, 4 or 8")
        if sx < 1 or sy < 1:
            raise UsageError(f"accelerator.sx={sx}, accelerator.sy={sy}: strides of at least 1")
        self.ratio, self.max_downsample, self.sx, self.sy = float(ratio), max_downsample, sx, sy
        self.use_rand, self.merge_attn = use_rand, merge_attn
        self.merge_crossattn, self.merge_mlp = merge_crossattn, merge_mlp

    def attach(self, net: nn.Module) -> list[ToMeRestore]:
        if self.ratio == 0:
            return []
        import tomesd

        unet = find_unet(net)
        if not any(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules()):
            raise UsageError(f"accelerator=tome merges tokens in transformer blocks and this {type(unet).__name__} has "
                             f"none (tomesd would change nothing); use accelerator=deepcache or none")
        handle = ToMeRestore(unet)
        tomesd.apply_patch(unet, ratio=self.ratio, max_downsample=self.max_downsample, sx=self.sx, sy=self.sy,
                           use_rand=self.use_rand, merge_attn=self.merge_attn, merge_crossattn=self.merge_crossattn,
                           merge_mlp=self.merge_mlp)
        return [handle]
