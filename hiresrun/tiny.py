"""Tiny random Stable Diffusion, SDXL, DiT, SD3 and FLUX pipeline folders, built from config as diffusers' own tests
build theirs.

They have the real families' layout (a cross-attention `UNet2DConditionModel`, an `AutoencoderKL` with 2x
downsampling, CLIP text encoders, tokenizers, a scheduler, `model_index.json`), written by diffusers' own
`save_pretrained`, so `StableDiffusionPipeline.from_pretrained(folder)` / `StableDiffusionXLPipeline` load them
offline. The tokenizers' vocabularies are written here (CLIP: byte-level characters, no merges; T5: a unigram table
of characters and a few word starts): nothing downloads. Weights are random (seeded): for wiring and parity tests,
not for quality.

    python -m hiresrun.tiny sd <folder>      # or sdxl, dit, sd3, flux, or clip (a tiny CLIP for clip_score runs)
    python -m hiresrun.tiny sdxl <folder> --full   # a full-size replica of a released model (hiresrun/replica.py)
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


def t5(max_length: int = 512, hidden: int = 32, seed: int = 5):
    """A T5 tokenizer (unigram pieces: the printable characters, each lowercase letter and digit as a word start, and
    T5's specials <pad>=0, </s>=1, <unk>=2) and a 2-layer T5 encoder of width `hidden`."""
    import string

    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.printable if not c.isspace()]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase + string.digits]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    config = T5Config(vocab_size=len(tok), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu")
    torch.manual_seed(seed)
    return tok, T5EncoderModel(config).eval()


def _flow_vae(latent_channels: int, sample_size: int, scaling: float, shift: float):
    """An AutoencoderKL with one 2x downsampling, the flow models' latent width and their scaling and shift factors
    (SD3: 1.5305 / 0.0609, FLUX: 0.3611 / 0.1159), no quant convs (as their released VAEs)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, layers_per_block=1, sample_size=2 * sample_size, scaling_factor=scaling,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def _finish(folder: Path, scratch: Path, native: int) -> Path:
    """Remove the tokenizer scratch files; record the folder's native image side (hiresrun.json), which a FLUX
    transformer's config does not state."""
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    (folder / "hiresrun.json").write_text(json.dumps({"resolution": native}, indent=1) + "\n")
    return folder


def sd3(folder: str | Path, sample_size: int = 8, max_length: int = 512) -> Path:
    """A tiny random Stable Diffusion 3 pipeline folder: SD3Transformer2DModel (patch 2, joint attention), two CLIP
    encoders with projections and a T5 encoder, a 16-channel VAE with shift, the flow-matching Euler scheduler with
    SD3's shift 3. The T5 tokenizer's limit is `max_length` tokens (512, as the released models')."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    scratch = folder / ".tokenizer-src"
    tok, hidden = tokenizer(scratch), 16
    tok3, enc3 = t5(max_length, hidden=2 * hidden)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=2 * hidden, caption_projection_dim=16,
                                        pooled_projection_dim=2 * hidden, pos_embed_max_size=4 * sample_size)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(4, sample_size, 1.5305, 0.0609),
        text_encoder=text_encoder(tok, hidden, projection=hidden, seed=2), tokenizer=tok,
        text_encoder_2=text_encoder(tok, hidden, projection=hidden, seed=3), tokenizer_2=tok,
        text_encoder_3=enc3, tokenizer_3=tok3)
    pipe.save_pretrained(folder)
    return _finish(folder, scratch, 2 * sample_size)


def flux(folder: str | Path, sample_size: int = 8, guidance_embeds: bool = True, max_length: int = 512) -> Path:
    """A tiny random FLUX.1 pipeline folder: FluxTransformer2DModel (double- and single-stream blocks, 3-axis RoPE,
    guidance embedding as FLUX.1-dev; `guidance_embeds=False` as -schnell) over 2x2-packed latents, a CLIP encoder
    (pooled) and a T5 encoder, a VAE with shift, the flow-matching Euler scheduler with FLUX's resolution-dependent
    shift. `sample_size`: the latent side of the native image (twice that in pixels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    scratch = folder / ".tokenizer-src"
    tok, hidden = tokenizer(scratch), 16
    tok2, enc2 = t5(max_length, hidden=2 * hidden)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * hidden,
                                         pooled_projection_dim=hidden, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_flow_vae(4, sample_size, 0.3611, 0.1159),
                        text_encoder=text_encoder(tok, hidden, seed=2), tokenizer=tok, text_encoder_2=enc2,
                        tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(folder)
    return _finish(folder, scratch, 2 * sample_size)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[3] == "--full":  # a full-size replica of a released model (hiresrun/replica.py)
        from hiresrun import replica

        print(replica.write(sys.argv[1], sys.argv[2]))
        sys.exit(0)
    builders = {"clip": clip, "dit": dit, "sd3": sd3, "flux": flux, "flux-schnell":
                lambda where: flux(where, guidance_embeds=False)}
    if len(sys.argv) != 3 or sys.argv[1] not in (*builders, "sd", "sdxl"):
        sys.exit("usage: python -m hiresrun.tiny sd|sdxl|dit|sd3|flux|flux-schnell|clip <folder>\n"
                 "       python -m hiresrun.tiny sd15|sd21-base|sdxl|sd3-medium|flux-dev|flux-schnell <folder> --full")
    kind, where = sys.argv[1], sys.argv[2]
    print(builders[kind](where) if kind in builders else build(where, kind))
