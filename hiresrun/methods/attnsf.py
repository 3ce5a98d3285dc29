"""method=attnsf: Attn-SF (Jin et al., NeurIPS 2023, "Training-free diffusion model adaptation to variable-sized
text-to-image synthesis"), one of Self-Cascade's tuning-free comparison rows.

A self-attention layer trained on N_base tokens spreads its attention more thinly over the N tokens of a larger
image (the entropy of softmax(q.k / sqrt(d)) grows with log N). Attn-SF keeps it as concentrated as in training by
scaling each self-attention layer's logits by

    lambda = sqrt(log N / log N_base) = sqrt(log_{N_base} N),

N_base = N / (target / base)^2 being the tokens that layer saw at the base resolution. Nothing is trained; cross-
attention (a fixed number of text keys) is left alone.

How: a forward hook multiplies the layer's query by lambda right before the scores are formed (the output of
`norm_q` where the layer normalises its queries, else of `to_q`), so q.k / sqrt(d) becomes lambda q.k / sqrt(d) under
whatever attention processor diffusers runs (SDPA, sliced, xformers). The hooks are set for one sampling call and
removed after it (hooks.hooks_removed_after). At the base resolution lambda = 1 and no hook is set: `none` bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.errors import UsageError
from hiresrun.hooks import hooks_removed_after
from hiresrun.methods.none import NoneMethod
from hiresrun.models import model_fn
from hiresrun.support import Support


def attention_scale(tokens: int, area_ratio: float) -> float:
    """lambda = sqrt(log N / log N_base) for a layer with N = `tokens` tokens at the target size; 1 where the layer had
    a single token at the base size (log 1 = 0: no spread to undo) or the sizes are equal."""
    base_tokens = tokens / area_ratio
    if area_ratio == 1 or base_tokens <= 1:
        return 1.0
    return math.sqrt(math.log(tokens) / math.log(base_tokens))


def self_attention_layers(net: nn.Module) -> list[nn.Module]:
    """diffusers' Attention modules that attend over the image's own tokens (not to text or class keys)."""
    from diffusers.models.attention_processor import Attention

    return [m for m in net.modules() if isinstance(m, Attention) and not m.is_cross_attention]


def scale_queries(net: nn.Module, area_ratio: float) -> list:
    """Hooks that multiply each self-attention layer's final query by its lambda (attention_scale); [] when
    area_ratio is 1."""
    if area_ratio == 1:
        return []
    handles = []
    for layer in self_attention_layers(net):
        # the query right before the scores: after norm_q (B, heads, N, d) where the layer normalises it, else the
        # projection's output (B, N, heads * d)
        module, axis = (layer.norm_q, -2) if layer.norm_q is not None else (layer.to_q, 1)
        handles.append(module.register_forward_hook(
            lambda m, inputs, out, axis=axis: out * attention_scale(out.shape[axis], area_ratio)))
    return handles


class AttnSF(NoneMethod):
    """The frozen base sampled directly at the target size with each self-attention layer's logits scaled by
    sqrt(log_{N_base} N)."""

    supports = Support(why="it scales the self-attention layers of a diffusers UNet or transformer",
                       why_flow="its processor scales self-attention, not SD3's / FLUX's joint text-image attention")

    def wrap(self, base) -> nn.Module:
        net = super().wrap(base)
        if not self_attention_layers(net):
            raise UsageError(f"method=attnsf scales self-attention logits and the {type(base.unet).__name__} at "
                             f"{base.source} has no self-attention layer (it would sample as method=none); use "
                             f"method=none")
        return net

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        x_T = sampling.noise(gens, self.latent_shape(self.resolution), net.device)
        ratio = (self.resolution / self.base.resolution) ** 2
        with hooks_removed_after(scale_queries(net, ratio)):
            return self.base.decode(loop(model_fn(net), x_T))
