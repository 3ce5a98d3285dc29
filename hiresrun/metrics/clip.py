"""`clip_score` (Hessel et al. 2021) for text-to-image runs: torchmetrics' `CLIPScore`, max(100 * mean over images of
cos(image, prompt), 0) (torchmetrics clamps the mean; the paper's CLIP-S clamps each image), CLIP found offline only.

Resolution: `metrics.clip_model` as a local folder (a transformers CLIPModel + processor, `save_pretrained`
layout), else the hub id's snapshot in the Hugging Face cache. Nothing downloads: absent weights give one line
saying how to supply them and the run's other metrics still come out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

DEFAULT = "openai/clip-vit-large-patch14"  # the usual clip_score backbone (ViT-L/14, 224 px)


def resolve(name: str) -> Path | None:
    """A local CLIP folder for `name` (a path, or a hub id already in the Hugging Face cache), or None."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a hub id
        return None


def missing_line(name: str) -> str:
    return (f"hiresrun: clip_score skipped: no CLIP weights for metrics.clip_model={name} in a local folder or the "
            f"Hugging Face cache (nothing is downloaded); pass metrics.clip_model=<folder with a CLIPModel and "
            f"processor> or fill the cache once online")


class Features(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embedding as a tensor, as
    torchmetrics' CLIPScore expects (transformers >= 5 returns an output object whose pooler_output it is)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load(folder: Path):
    """(model, CLIPProcessor) from a local folder: the callable form torchmetrics' CLIPScore takes for weights
    that are not one of its named hub ids."""
    from transformers import CLIPModel, CLIPProcessor

    return Features(CLIPModel.from_pretrained(folder).eval()), CLIPProcessor.from_pretrained(folder)


@torch.no_grad()
def clip_score(images: Tensor, prompts: list[str], folder: Path, batch_size: int = 32, device: str = "cpu") -> float:
    """Mean CLIP score of uint8 (N, C, H, W) images against their prompts (grey images repeated to RGB)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: load(folder)).to(device)
    rgb = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
    for i in range(0, len(rgb), batch_size):
        metric.update(rgb[i:i + batch_size].to(device), prompts[i:i + batch_size])
    return float(metric.compute())
