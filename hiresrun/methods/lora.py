"""method=lora: LoRA fine-tuning at the target resolution (Hu et al., ICLR 2022), Self-Cascade's LoRA-R4 / LoRA-R32
comparison rows: low-rank adapters on the attention projections of the frozen base, trained with the base's own
denoising loss, sampled with the adapter on. Built with `peft` (`inject_adapter_in_model`), the library behind
diffusers' own `add_adapter`, which UNet2DModel lacks.

W x becomes W x + (alpha / r) B A x for each targeted projection, A (r x in) drawn by peft's default (Kaiming
uniform), B (out x r) zero: at step 0 the adapted UNet is the base bit for bit. Checkpoints hold the adapter weights
only (frozen weights are left out of every hiresrun checkpoint) with the base's weight hash.
"""

from __future__ import annotations

from torch import nn

from hiresrun.errors import UsageError
from hiresrun.methods.finetune import Finetune
from hiresrun.models import BaseModel
from hiresrun.support import ANY_UNET, FLOW_TRANSFORMERS, Support

# The attention projections of diffusers' Attention: query, key, value and output (Self-Cascade's LoRA baselines).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


class LoRA(Finetune):
    """Finetune's loss and sampling on the frozen base plus rank-`rank` adapters on `targets`."""

    supports = Support(unets=ANY_UNET + FLOW_TRANSFORMERS, flow=True,  # flow models: the rectified-flow loss
                       why="the loss reads the UNet's single eps/v output; a DiT's learned-variance channels are not "
                           "trained here",
                       edm=False, why_edm="its loss is DDPM's on the VP grid; EDM's weighted loss is not built")

    def __init__(self, resolution: int,
                 rank: int = 4,                          # r: the adapters' rank (the paper's baselines: 4 and 32)
                 alpha: float | None = None,             # scale alpha / r; null = rank (scale 1)
                 targets: list[str] | None = None,       # module names to adapt; null = ATTENTION
                 dropout: float = 0.0):                  # dropout on the adapter's input
        super().__init__(resolution)
        if rank < 1:
            raise UsageError(f"method.rank={rank}: the adapters' rank, at least 1 (the paper's baselines: 4, 32)")
        if not 0 <= dropout < 1:
            raise UsageError(f"method.dropout={dropout}: a probability in [0, 1)")
        self.rank, self.alpha, self.dropout = int(rank), float(alpha if alpha is not None else rank), float(dropout)
        self.targets = list(targets) if targets is not None else list(ATTENTION)

    def wrap(self, base: BaseModel) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        unet = super().wrap(base).requires_grad_(False)  # finetune's training scheduler, the base frozen
        if not any(n == t or n.endswith("." + t) for n, _ in unet.named_modules() for t in self.targets):
            raise UsageError(f"method.targets={self.targets}: no module of the {type(unet).__name__} is named so; "
                             f"the attention projections are {ATTENTION}")
        # peft's own injection (UNet2DModel has no diffusers add_adapter); only the adapters are trainable
        inject_adapter_in_model(LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                           target_modules=self.targets, init_lora_weights=True), unet)
        return unet
