"""Full-size replicas of released text-to-image models: the released architectures (their config.json values, recorded
below with where each was published) with random weights, written as pipeline folders in bf16 safetensors.

A network's compute and memory do not depend on its weights, so a replica measures what the real model costs (time,
peak memory, the code paths at 1024-4096 px) on a machine that cannot download the weights. Images are noise.

    python -m hiresrun.tiny sdxl <folder> --full          # or sd15, sd21-base, sd3-medium, flux-dev, flux-schnell

Tokenizers are hiresrun.tiny's (byte-level CLIP, a unigram T5): the released ones are vocabulary files that cannot be
fetched here, and token ids only index the embedding tables, whose sizes are the released ones. Parameters are drawn
N(0, 0.02) (norm scales 1, biases 0) in place on the CPU, in bf16: the weights of FLUX.1 (12 B + 4.8 B T5) take ~34 GB
of memory and disk; SDXL ~7 GB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HF = "https://huggingface.co/"

# The released UNet / transformer / VAE / text-encoder configs (architecture keys; the rest are the classes' defaults,
# which equal the released values). Each family names the files its values come from.
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_H = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
          "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512}
CLIP_BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
             "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False}
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
FLOW_VAE = {**SD_VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False,
            "use_post_quant_conv": False, "force_upcast": True}
SD_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
           "block_out_channels": [320, 640, 1280, 1280],
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
           "attention_head_dim": 8}
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}

RELEASED = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline", "native": 512,
        "source": "stable-diffusion-v1-5/stable-diffusion-v1-5 (unet, vae, text_encoder, scheduler config.json)",
        "unet": ("UNet2DConditionModel", SD_UNET), "vae": ("AutoencoderKL", SD_VAE),
        "text_encoder": ("CLIPTextModel", CLIP_L), "scheduler": ("PNDMScheduler", {**SD_SCHEDULER,
                                                                                    "skip_prk_steps": True}),
        "parameters": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    },
    "sd21-base": {
        "pipeline": "StableDiffusionPipeline", "native": 512,
        "source": "stabilityai/stable-diffusion-2-1-base (unet, vae, text_encoder, scheduler config.json)",
        "unet": ("UNet2DConditionModel", {**SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                                          "use_linear_projection": True}),
        "vae": ("AutoencoderKL", SD_VAE), "text_encoder": ("CLIPTextModel", CLIP_H),
        "scheduler": ("PNDMScheduler", {**SD_SCHEDULER, "skip_prk_steps": True}),
        "parameters": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline", "native": 1024,
        "source": "stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, text_encoder, text_encoder_2, scheduler "
                  "config.json)",
        "unet": ("UNet2DConditionModel", {
            "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816}),
        "vae": ("AutoencoderKL", {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}),
        "text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG),
        "scheduler": ("EulerDiscreteScheduler", {**SD_SCHEDULER, "interpolation_type": "linear",
                                                 "timestep_spacing": "leading"}),
        "parameters": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                       "text_encoder_2": 694_659_840},
    },
    "sd3-medium": {
        "pipeline": "StableDiffusion3Pipeline", "native": 1024,
        "source": "stabilityai/stable-diffusion-3-medium-diffusers (transformer, vae, text_encoder, text_encoder_2, "
                  "text_encoder_3, scheduler config.json)",
        "transformer": ("SD3Transformer2DModel", {
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
            "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}),
        "vae": ("AutoencoderKL", {**FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG), "text_encoder_3": ("T5EncoderModel", T5_XXL),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
        "parameters": {"transformer": 2_028_328_000, "vae": 83_819_683, "text_encoder": 123_650_304,
                       "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656},
    },
    "flux-dev": {
        "pipeline": "FluxPipeline", "native": 1024,
        "source": "black-forest-labs/FLUX.1-dev (transformer, vae, text_encoder, text_encoder_2, scheduler "
                  "config.json)",
        "transformer": ("FluxTransformer2DModel", {
            "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}),
        "vae": ("AutoencoderKL", {**FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}),
        "text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", {
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}),
        "parameters": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
                       "text_encoder_2": 4_762_310_656},
    },
}
RELEASED["flux-schnell"] = {
    **RELEASED["flux-dev"], "source": "black-forest-labs/FLUX.1-schnell (as FLUX.1-dev without the guidance embedder; "
                                      "scheduler without dynamic shifting)",
    "transformer": ("FluxTransformer2DModel", {**RELEASED["flux-dev"]["transformer"][1], "guidance_embeds": False}),
    "scheduler": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 1.0,
                                                      "use_dynamic_shifting": False}),
    "parameters": {**RELEASED["flux-dev"]["parameters"], "transformer": 11_891_178_560},  # dev less 10,229,760
}
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def component_class(name: str):
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name)


def build(cls_name: str, config: dict, device: str = "cpu"):
    """One component with the released config on `device` (`meta`: no memory, for counting)."""
    cls = component_class(cls_name)
    if cls.__module__.startswith("transformers"):
        config_cls = {"T5EncoderModel": "T5Config"}.get(cls_name, "CLIPTextConfig")
        import transformers

        conf = getattr(transformers, config_cls)(**config)
        with torch.device(device):
            return cls(conf)
    with torch.device(device):
        return cls.from_config(config)


def parameter_counts(family: str) -> dict[str, int]:
    """Each network component's parameter count, built on the meta device (no memory, no time)."""
    spec = RELEASED[family]
    return {c: sum(p.numel() for p in build(*spec[c], device="meta").parameters()) for c in COMPONENTS if c in spec}


@torch.no_grad()
def fill(module: torch.nn.Module, seed: int) -> None:
    """Random weights in place: N(0, 0.02) for matrices and embeddings, 1 for norm scales, 0 for biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))


def write(family: str, folder: str | Path) -> Path:
    """A replica pipeline folder of `family` (RELEASED): each component built from its released config in bf16,
    random-filled, saved with save_pretrained (safetensors, sharded); the tokenizers and model_index.json as the
    pipeline writes them; hiresrun.json records the native size and the source."""
    if family not in RELEASED:
        raise SystemExit(f"python -m hiresrun.tiny {family} --full: choose one of {', '.join(RELEASED)}")
    import diffusers

    from hiresrun import tiny

    spec, folder = RELEASED[family], Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for seed, c in enumerate(c for c in COMPONENTS if c in spec):
            parts[c] = build(*spec[c]).eval()
            fill(parts[c], seed)
    finally:
        torch.set_default_dtype(previous)
    scratch = folder / ".tokenizer-src"
    clip_tok = tiny.tokenizer(scratch)
    if "vae" in parts and spec["vae"][1].get("force_upcast"):
        parts["vae"].to(torch.float32)  # released force_upcast VAEs are stored in fp32 by their pipelines' users
    scheduler = getattr(diffusers, spec["scheduler"][0]).from_config(spec["scheduler"][1])
    t5_tok = tiny.t5()[0] if any(spec[c][0] == "T5EncoderModel" for c in COMPONENTS if c in spec) else None
    toks = {"tokenizer": clip_tok}
    if spec["pipeline"] == "StableDiffusionXLPipeline":
        toks["tokenizer_2"] = clip_tok
    elif spec["pipeline"] == "StableDiffusion3Pipeline":
        toks.update(tokenizer_2=clip_tok, tokenizer_3=t5_tok)
    elif spec["pipeline"] == "FluxPipeline":
        toks["tokenizer_2"] = t5_tok
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if spec["pipeline"] == "StableDiffusionPipeline" else {}
    pipe = getattr(diffusers, spec["pipeline"])(**parts, scheduler=scheduler, **toks, **extra)
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    (folder / "hiresrun.json").write_text(json.dumps({"resolution": spec["native"], "replica": family,
                                                      "source": HF + spec["source"]}, indent=1) + "\n")
    return folder
