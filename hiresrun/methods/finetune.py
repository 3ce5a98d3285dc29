"""method=finetune: train every weight of the base at the target resolution with its own objective.

The naive anchor every paper compares against, and (at the base resolution, from scratch) `hiresrun pretrain`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.methods.none import NoneMethod
from hiresrun.models import BaseModel
from hiresrun.support import ANY_UNET, FLOW_TRANSFORMERS, Support


def denoising_loss(net: nn.Module, scheduler, x0: Tensor, cond: dict | None = None) -> Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) with the target the scheduler predicts (eps, v or x0); on a
    flow-matching scheduler the rectified-flow loss (flow.training_loss)."""
    from hiresrun import flow

    if flow.is_flow_scheduler(scheduler):
        return flow.training_loss(net, scheduler, x0, cond)
    eps = torch.randn_like(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    kind = scheduler.config.prediction_type
    target = {"epsilon": eps, "sample": x0}.get(kind)
    if target is None:
        target = scheduler.get_velocity(x0, eps, t)  # v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)
    return F.mse_loss(net(x_t, t, **(cond or {})).sample.float(), target.float())


class Finetune(NoneMethod):
    """All weights trainable, trained at the target resolution; sampled like `none`."""

    trains = True
    supports = Support(unets=ANY_UNET + FLOW_TRANSFORMERS, flow=True,  # flow models: the rectified-flow loss
                       why="the loss reads the UNet's single eps/v output; a DiT's learned-variance channels are not "
                           "trained here",
                       edm=False, why_edm="its loss is DDPM's on the VP grid; EDM's weighted loss is not built")

    def wrap(self, base: BaseModel) -> nn.Module:
        from diffusers import DDPMScheduler

        from hiresrun import flow

        self.base = base
        self.train_scheduler = flow.training_scheduler(base.scheduler_config) if base.flow else \
            DDPMScheduler.from_config(base.scheduler_config)
        return base.unet.train().requires_grad_(True)

    def loss(self, net: nn.Module, batch: dict) -> dict[str, Tensor]:
        x0 = self.base.encode(batch["image"])
        return {"loss": denoising_loss(net, self.train_scheduler, x0, self.base.batch_condition(batch))}
