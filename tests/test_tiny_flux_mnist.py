"""The embedded flow-matching base `model=tiny-flux-mnist`: diffusers' FluxPipeline loads it and equals hiresrun
image for image with its real weights (native and 2x, with and without true CFG); its T5 tokenizer gives each template
word one piece."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose

from hiresrun import digits_text, flow, run
from hiresrun.outputs import load_images

FOLDER = Path(__file__).resolve().parents[1] / "hiresrun" / "assets" / "tiny-flux-mnist"


@pytest.mark.parametrize("resolution, cfg_scale", [(16, 1.0), (32, 3.0)])
def test_equal_to_the_flux_pipeline_with_its_real_weights(resolution, cfg_scale, tmp_path):
    """No prompt given: the model's own digit prompts (image i asks for digit i mod 10); true CFG against ""."""
    from diffusers import FluxPipeline

    cfg = compose(["model=tiny-flux-mnist", f"data.resolution={resolution}", "sampler.num_steps=4",
                   "sample.num_samples=3", f"sample.true_cfg_scale={cfg_scale}", "sample.negative_prompt=''",
                   "logger=none", "trainer.enable_progress_bar=false"], tmp_path / "run")
    metrics = run.run(cfg)
    ours = load_images(tmp_path / "run" / "samples")
    pipe = FluxPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    ref = []
    for seed, prompt in enumerate(digits_text.prompt_set()[:3]):
        side = resolution // 2
        noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(seed))
        ref.append(pipe(prompt, negative_prompt="", true_cfg_scale=cfg_scale, height=resolution, width=resolution,
                        num_inference_steps=4, latents=flow.pack(noise), max_sequence_length=16,
                        output_type="pt").images)
    ref = torch.cat(ref) * 255
    assert ours.shape == ref.shape == (3, 1, resolution, resolution)
    assert (ours.float() - ref).abs().max() <= 1.0
    assert metrics["unet_passes_per_image"] == (8 if cfg_scale > 1 else 4)


def test_t5_tokenizer_gives_every_template_word_one_piece():
    from transformers import T5Tokenizer

    tok = T5Tokenizer.from_pretrained(FOLDER / "tokenizer_2")
    assert tok.model_max_length == 16
    for prompt in digits_text.prompt_set():
        ids = tok(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 1 and tok.unk_token_id not in ids  # the words, then </s>
