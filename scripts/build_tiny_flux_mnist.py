"""Build `hiresrun/assets/tiny-flux-mnist`, the embedded flow-matching text-to-image base (a FLUX.1 pipeline folder
at 16 px: latent 8x8x4, packed 2x2 into 16 tokens). Two steps around one `hiresrun pretrain`, recorded in the
folder's README (its model card):

    python scripts/build_tiny_flux_mnist.py assemble <folder>   # tiny-sd-mnist's VAE (trained on the same digits)
                                                                # and CLIP, a frozen seeded T5 with a word-level
                                                                # tokenizer, the transformer's config (random
                                                                # weights), the scheduler, model_index.json
    hiresrun pretrain model=diffusers model.path=<folder> data=mnist data.captions=digits ...   # the transformer
    python scripts/build_tiny_flux_mnist.py install  <folder> <pretrain run dir>   # copy the trained transformer in

The text side is frozen, as in tiny-sd-mnist (hiresrun trains denoisers, not text encoders): the CLIP encoder is
tiny-sd-mnist's, its pooled output FLUX's pooled projection; the T5 encoder is a seeded 2-layer T5 whose tokenizer
gives each template word one piece, so the joint attention reads a 16-token text sequence. The transformer has
FLUX.1's structure (double-stream blocks with joint text-image attention, single-stream blocks, 3-axis RoPE) and no
guidance embedding (FLUX.1-schnell's shape: trained from scratch there is no guidance to distil; classifier-free
guidance is true CFG against the empty prompt, which caption dropout trains).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from build_tiny_sd_mnist import install  # the same copy of a pretrain run's exported denoiser

SD = Path(__file__).resolve().parents[1] / "hiresrun" / "assets" / "tiny-sd-mnist"
MAX_LENGTH = 16  # T5 tokens per prompt, </s> included (the longest template needs 6)
# FLUX's resolution-dependent shift on this model's token counts: mu 0.5 at the native 16 tokens (16 px), 1.15 at
# 256 tokens (64 px); the released FLUX.1 puts the same two ends at 256 and 4096 tokens (256 px and 1024 px).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 16,
             "max_image_seq_len": 256}


def transformer_model():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def t5_tokenizer(words: list[str]):
    """A T5 (unigram) tokenizer in which each word is one piece "\u2581word" (scored above any split), the characters
    of the words as a fallback, and T5's specials <pad>=0, </s>=1, <unk>=2."""
    from transformers import T5Tokenizer

    chars = sorted({c for w in words for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_LENGTH)


def assemble(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from hiresrun.digits_text import vocabulary

    folder.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(SD / "vae")
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes z / scaling_factor + shift_factor
    vae.save_pretrained(folder / "vae")
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(SD / part, folder / part, dirs_exist_ok=True)
    tok = t5_tokenizer(vocabulary())
    tok.save_pretrained(folder / "tokenizer_2")
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu")
    T5EncoderModel(config).eval().save_pretrained(folder / "text_encoder_2")
    torch.manual_seed(seed)
    transformer_model().save_pretrained(folder / "transformer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1) + "\n")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
             "image_encoder": [None, None], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    (folder / "hiresrun.json").write_text(json.dumps({"resolution": 16}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["assemble", "install"])
    p.add_argument("folder", type=Path)
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.step == "assemble":
        assemble(a.folder, a.seed)
    else:
        install(a.folder, a.run_dir, "transformer")  # tiny-sd-mnist's step, for the transformer


if __name__ == "__main__":
    main()
