"""Build `hiresrun/assets/tiny-sd-mnist`, the embedded latent text-to-image base (a Stable Diffusion pipeline
folder at 16 px, latent 8x8x4). Three steps, each recorded in the folder's README (its model card):

    python scripts/build_tiny_sd_mnist.py vae      <folder>   # train the AutoencoderKL on the 4,000 MNIST training
                                                              # digits (MSE + KL), set scaling_factor, score the
                                                              # 1,000 held-out digits (PSNR / SSIM) -> vae_card.json
    python scripts/build_tiny_sd_mnist.py assemble <folder>   # tokenizer (one token per template word), the frozen
                                                              # seeded CLIPTextModel, the UNet's config (random
                                                              # weights), scheduler, model_index.json
    hiresrun pretrain model=diffusers model.path=<folder> data=mnist data.captions=digits ...   # the UNet
    python scripts/build_tiny_sd_mnist.py install  <folder> <pretrain run dir>   # copy the trained UNet in

`hiresrun pretrain` has no verb for an autoencoder, so the VAE is trained here, with the same data module, seed and
held-out split as every other run. The text encoder is not trained: a fixed seeded initialisation of a 2-layer CLIP
text transformer already maps each of the template's few dozen word sequences to a distinct embedding sequence, the
UNet's cross-attention learns to read it, and keeping it frozen keeps the folder's text side reproducible from this
script alone (hiresrun trains UNets, not text encoders).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SCHEDULER = {  # Stable Diffusion 1.x's training schedule
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "timestep_spacing": "leading"}
MAX_LENGTH = 16  # tokens per prompt, start and end included (the longest template needs 7)


def vae_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, sample_size=16)


def unet_model():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)


def mnist16(seed: int = 0):
    from hiresrun.data import MnistDataModule

    data = MnistDataModule(resolution=16, base_resolution=16, seed=seed)
    data.setup("fit")
    return data.train_set.image, data.ref_set.image


def train_vae(folder: Path, steps: int, batch: int, lr: float, kl_weight: float, seed: int) -> None:
    from hiresrun.sampling import to_uint8
    from hiresrun.tune import fidelity

    torch.manual_seed(seed)
    train, held = mnist16(seed)
    vae = vae_model().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start, log = time.perf_counter(), []
    for step in range(steps):
        x = train[torch.randint(len(train), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        mse, kl = F.mse_loss(rec, x), posterior.kl().mean() / x[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log.append({"step": step, "mse": round(mse.item(), 5), "kl": round(kl.item(), 4)})
            print(json.dumps(log[-1]), flush=True)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(train[i:i + 500]).latent_dist.mode() for i in range(0, len(train), 500)])
        scale = float(1 / latents.std())
        rec = torch.cat([vae.decode(vae.encode(held[i:i + 500]).latent_dist.mode()).sample
                         for i in range(0, len(held), 500)])
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(folder / "vae")
    quality = fidelity(to_uint8(rec), to_uint8(held))  # PSNR (dB, data range 1) and SSIM of uint8 images
    card = {"steps": steps, "batch_size": batch, "lr": lr, "kl_weight": kl_weight, "seed": seed,
            "seconds": round(time.perf_counter() - start, 1), "scaling_factor": scale, "log": log,
            "heldout_1000": {k: round(v, 3) for k, v in quality.items()}}
    (folder / "vae_card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({k: card[k] for k in ("seconds", "scaling_factor", "heldout_1000")}))


def assemble(folder: Path, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from hiresrun.digits_text import vocabulary

    vocab, merges = word_vocabulary(vocabulary())
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                        model_max_length=MAX_LENGTH)
    tok.save_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).eval().save_pretrained(folder / "text_encoder")
    torch.manual_seed(seed)
    unet_model().save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1) + "\n")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")


def word_vocabulary(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in which every word is one token: its characters, then a left-to-right merge chain
    per word (c1 c2 -> c1c2, c1c2 c3 -> ..., the last merge taking the end-of-word mark)."""
    chars = sorted({c for w in words for c in w})
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merges.append(f"{left} {right}")
            left = left + right
            tokens.append(left)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, list(dict.fromkeys(merges))


def install(folder: Path, run_dir: Path, part: str = "unet") -> None:
    """The pretrain run's exported denoiser (EMA weights, `<run>/model/<part>`: unet, or a flow model's transformer)
    into the folder."""
    src = Path(run_dir) / "model" / part
    if not (src / "config.json").is_file():
        raise SystemExit(f"{src}: no exported {part}; point at a finished `hiresrun pretrain` run folder")
    shutil.rmtree(folder / part)
    shutil.copytree(src, folder / part)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["vae", "assemble", "install"])
    p.add_argument("folder", type=Path)
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.folder.mkdir(parents=True, exist_ok=True)
    if a.step == "vae":
        train_vae(a.folder, a.steps, a.batch, a.lr, a.kl_weight, a.seed)
    elif a.step == "assemble":
        assemble(a.folder, a.seed)
    else:
        install(a.folder, a.run_dir)


if __name__ == "__main__":
    main()
