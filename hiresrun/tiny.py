"""Tiny random Stable Diffusion and SDXL pipeline folders, built from config as diffusers' own tests build theirs.

They have the real families' layout (a cross-attention `UNet2DConditionModel`, an `AutoencoderKL` with 2x
downsampling, CLIP text encoders, tokenizers, a scheduler, `model_index.json`), written by diffusers' own
`save_pretrained`, so `StableDiffusionPipeline.from_pretrained(folder)` / `StableDiffusionXLPipeline` load them
offline. The tokenizer's vocabulary is written here (byte-level characters, no merges): nothing downloads.
Weights are random (seeded): for wiring and parity tests, not for quality.

    python -m hiresrun.tiny sd <folder>      # or sdxl, dit, or clip (a tiny CLIP for clip_score smoke runs)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# SD 1.x/2.x and SDXL scheduler settings (the released pipelines' scheduler_config.json, scaled-linear betas)
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (every byte as a printable unicode character), each also as a word end `</w>`,
    and the two special tokens: any text tokenizes, character by character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def tokenizer(folder: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def text_encoder(tok, hidden: int, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, projection_dim=projection or hidden)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build(folder: str | Path, family: str = "sd", sample_size: int = 8) -> Path:
    """Write a tiny `family` ("sd" or "sdxl") pipeline folder; `sample_size` is the UNet's latent side (the image
    side is twice that: one VAE downsampling)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    if family not in ("sd", "sdxl"):
        raise ValueError(f"family={family}: choose sd or sdxl")
    folder = Path(folder)
    scratch = folder / ".tokenizer-src"
    tok = tokenizer(scratch)
    xl = family == "sdxl"
    hidden = 16
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=2, cross_attention_dim=2 * hidden if xl else hidden,
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": hidden + 6 * 4, "use_linear_projection": True} if xl else {}))
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=2 * sample_size,
                        scaling_factor=0.13025 if xl else 0.18215, force_upcast=xl)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if xl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder(tok, hidden, seed=2),
                                         text_encoder_2=text_encoder(tok, hidden, projection=hidden, seed=3),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(tok, hidden, seed=2), tokenizer=tok,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    return folder


def dit(folder: str | Path, sample_size: int = 8, classes: int = 1000) -> Path:
    """A tiny random DiT pipeline folder (DiTTransformer2DModel with learned variance, AutoencoderKL, DDIM), the
    layout of facebook/DiT-XL-2-256, which `DiTPipeline.from_pretrained` loads. 1,000 classes, as DiTPipeline
    hard-codes the null label 1000."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=sample_size, patch_size=2,
                                        num_embeds_ada_norm=classes)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=2 * sample_size)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)
    return Path(folder)


def clip(folder: str | Path) -> Path:
    """A tiny random CLIP (transformers CLIPModel + CLIPProcessor at 32 px) for clip_score smoke runs and tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tok = tokenizer(folder / ".tokenizer-src")
    config = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 2, "num_attention_heads": 2,
                                     "max_position_embeddings": tok.model_max_length, "bos_token_id": tok.bos_token_id,
                                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    torch.manual_seed(4)
    CLIPModel(config).eval().save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    for f in (folder / ".tokenizer-src").iterdir():
        f.unlink()
    (folder / ".tokenizer-src").rmdir()
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m hiresrun.tiny sd|sdxl|dit|clip <folder>")
    kind, where = sys.argv[1], sys.argv[2]
    print(clip(where) if kind == "clip" else dit(where) if kind == "dit" else build(where, kind))
