"""Loading base models: layouts, scheduler configs, UNet classes, a VAE, class conditioning."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PLAIN_BLOCKS, SCHED, tiny_unet
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from hiresrun.errors import UsageError
from hiresrun.methods.finetune import Finetune
from hiresrun.methods.none import NoneMethod
from hiresrun.models import DEFAULT_SCHEDULER, load_model, save_pipeline
from hiresrun.sampling import Sampler


def test_pipeline_layout_reloads_bit_identical(tiny_model_dir):
    a, b = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    assert a.weights_hash == b.weights_hash and len(a.weights_hash) == 64
    assert a.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert a.resolution == 8 and a.channels == 1 and a.downsample_factor == 2
    for (n, p), (_, q) in zip(a.unet.named_parameters(), tiny_unet().named_parameters()):
        assert torch.equal(p, q), n


def test_bare_unet_folder_with_and_without_scheduler_config(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "bare")
    assert load_model(str(tmp_path / "bare")).scheduler_config == DEFAULT_SCHEDULER
    (tmp_path / "bare" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "scaled_linear"}))
    assert load_model(str(tmp_path / "bare")).scheduler_config["beta_schedule"] == "scaled_linear"


def test_folder_without_a_unet_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no diffusers UNet or transformer config.json"):
        load_model(str(tmp_path / "empty"))


def test_resolution_check_names_a_valid_size(tiny_model_dir):
    base = load_model(str(tiny_model_dir))
    base.check_resolution(16)
    with pytest.raises(UsageError, match="data.resolution=17 is not divisible by 2.*use e.g. data.resolution=18"):
        base.check_resolution(17)


def test_class_conditional_model_samples_and_trains(tmp_path):
    unet = tiny_unet(**PLAIN_BLOCKS, num_class_embeds=10)
    save_pipeline(unet, SCHED, tmp_path / "cls")
    base = load_model(str(tmp_path / "cls"), conditioning="class")
    method = NoneMethod(resolution=8)
    sampler = Sampler(method.wrap(base), method, DDIMScheduler.from_config(SCHED), num_steps=2)
    together = sampler.generate([0, 1, 2])["images"]
    assert torch.equal(together[2], sampler.generate([2])["images"][0])
    ft = Finetune(resolution=8)
    net = ft.wrap(load_model(str(tmp_path / "cls"), conditioning="class"))
    batch = {"image": torch.zeros(2, 1, 8, 8), "label": torch.tensor([3, 4])}
    loss = ft.loss(net, batch)["loss"]
    loss.backward()
    assert net.class_embedding.weight.grad[3].abs().sum() > 0 and net.class_embedding.weight.grad[5].abs().sum() == 0
    with pytest.raises(UsageError, match="choose auto, none, class or text"):
        load_model(str(tmp_path / "cls"), conditioning="bogus")


def test_unconditioned_model_refuses_class_conditioning(tiny_model_dir):
    with pytest.raises(UsageError, match="no class embedding"):
        load_model(str(tiny_model_dir), conditioning="class")


def test_condition_model_and_vae_load_and_decode(tmp_path):
    """A latent model (UNet2DConditionModel + AutoencoderKL in vae/) slots in without reshaping the code."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=8, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, scaling_factor=0.5)
    unet.save_pretrained(tmp_path / "latent" / "unet")
    vae.save_pretrained(tmp_path / "latent" / "vae")
    base = load_model(str(tmp_path / "latent"))
    assert type(base.unet).__name__ == "UNet2DConditionModel" and base.vae_scale == 0.5
    assert base.resolution == 8 and base.channels == 3 and base.latent_factor == 2
    base.cond = {"encoder_hidden_states": torch.zeros(1, 1, 8)}
    method = NoneMethod(resolution=8)
    sampler = Sampler(method.wrap(base), method, DDIMScheduler.from_config(DEFAULT_SCHEDULER), num_steps=2)
    assert sampler.generate([0])["images"].shape == (1, 3, 8, 8)
    z = base.encode(torch.zeros(1, 3, 8, 8))
    assert z.shape == (1, 4, 4, 4)


def test_a_broken_config_json_is_named_in_one_line(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel",')
    with pytest.raises(UsageError, match=r"m/unet/config.json: not valid JSON .*; repair or re-export"):
        load_model(str(tmp_path / "m"))


def test_a_model_folder_may_name_classes_from_diffusers_and_transformers_only(tiny_sd_dir, tmp_path, monkeypatch):
    """model_index.json chooses the module each part's class comes from: a folder naming a module of its own would run
    that module's code whenever the folder is importable (PYTHONPATH=., a notebook there). Refused in one line before
    anything is imported; a `_class_name` outside diffusers' models likewise."""
    import json
    import shutil
    import sys

    from hiresrun.errors import UsageError
    from hiresrun.models import load_model

    folder = tmp_path / "evil"
    shutil.copytree(tiny_sd_dir, folder)
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Encoder:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["evilmod", "Encoder"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"model_index.json's text_encoder names the module 'evilmod'; hiresrun "
                                         r"loads classes from diffusers and transformers only"):
        load_model(str(folder))
    assert not marker.exists() and "evilmod" not in sys.modules
    index["text_encoder"] = ["transformers", "load_tf_weights_in_bert"]  # a function, not a model class
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="which is not a transformers model or tokenizer class"):
        load_model(str(folder))
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "DDPMScheduler"}))
    with pytest.raises(UsageError, match="names DDPMScheduler as its _class_name, which is not a diffusers model"):
        load_model(str(folder))
