"""The embedded latent text-to-image base `model=tiny-sd-mnist`: diffusers' StableDiffusionPipeline loads it and
equals hiresrun image for image with its real weights; its tokenizer, prompt set and captions; prompt_acc."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose
from test_text import pipeline_images

from hiresrun import digits_text, run
from hiresrun.data import MnistDataModule
from hiresrun.metrics import Metrics
from hiresrun.outputs import load_images

FOLDER = Path(__file__).resolve().parents[1] / "hiresrun" / "assets" / "tiny-sd-mnist"


def tiny_sd_sample(run_dir: Path, *extra: str, seeds: int = 4):
    cfg = compose(["model=tiny-sd-mnist", "data.resolution=16", "sampler.num_steps=4", f"sample.num_samples={seeds}",
                   "logger=none", "trainer.enable_progress_bar=false", *extra], run_dir)
    return run.run(cfg), load_images(run_dir / "samples")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_equal_to_stable_diffusion_pipeline_with_its_real_weights(guidance, tmp_path):
    """No prompt given: the model's own digit prompts (image i asks for digit i mod 10)."""
    metrics, ours = tiny_sd_sample(tmp_path / "run", f"sample.guidance_scale={guidance}", "sampler=ddim")
    ref = pipeline_images(FOLDER, "sd", "ddim", list(range(4)), digits_text.prompt_set(), guidance_scale=guidance)
    assert ours.shape == ref.shape == (4, 1, 16, 16)
    assert (ours.float() - ref).abs().max() <= 1.0
    text = metrics["protocol"]["text"]
    assert text["prompts"] == "model.prompts=digits" and text["unique_prompts"] == digits_text.prompt_set()[:4]
    assert metrics["unet_passes_per_image"] == (8 if guidance > 1 else 4)


def test_tokenizer_gives_every_template_word_one_token():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(FOLDER / "tokenizer")
    for prompt in digits_text.prompt_set():
        ids = tok(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2 and tok.unk_token_id not in ids[1:-1]


def test_shipped_prompt_set_is_the_generated_one_and_names_one_digit_per_line():
    lines = (FOLDER.parent / "prompts" / "digits.txt").read_text().splitlines()
    assert lines == digits_text.prompt_set() and len(lines) == 50
    assert [digits_text.requested_digit(p) for p in lines] == [k % 10 for k in range(50)]
    assert digits_text.requested_digit("a cat") is None and digits_text.requested_digit("one or 7") is None


def test_digit_captions_follow_the_label_and_the_index():
    data = MnistDataModule(resolution=16, base_resolution=16, captions="digits")
    data.setup("fit")
    for i in (0, 1, 7, 123):
        item = data.train_set[i]
        assert item["caption"] == digits_text.caption(int(item["label"]), i)
        assert digits_text.requested_digit(item["caption"]) == int(item["label"])
    plain = MnistDataModule(resolution=16, base_resolution=16)
    plain.setup("fit")
    assert "caption" not in plain.train_set[0]


def test_prompt_acc_scores_the_digit_the_prompt_asks_for():
    """Real held-out digits: prompts naming their true digit score like class_acc; naming the next digit scores
    near zero; a prompt with no digit skips prompt_acc with the reason."""
    data = MnistDataModule(resolution=16, base_resolution=16)
    data.setup("fit")
    x, labels = data.ref_set.image[:40], data.ref_set.label[:40].tolist()
    images = ((x + 1) * 127.5).round().to(torch.uint8)
    m = Metrics(fid=False, kid=False, patch_fid=False, swd=False)
    right = m.evaluate(images, data, prompts=[digits_text.caption(d, i) for i, d in enumerate(labels)], labels=labels)
    wrong = m.evaluate(images, data, prompts=[digits_text.caption((d + 1) % 10, i) for i, d in enumerate(labels)])
    assert right["prompt_acc"] == right["class_acc"] > 0.8 and wrong["prompt_acc"] < 0.1
    skipped = m.evaluate(images, data, prompts=["a cat"] * 40)
    assert "prompt_acc" not in skipped and "1 of" not in skipped["protocol"]["prompt_acc"]
