"""Class-conditional bases: labels per seed, class guidance through the same wrapper as text, labelled image
folders (ImageNet-style trees), label dropout, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLAIN_BLOCKS, SCHED, accelerator_options, compose, tiny_unet
from hydra.errors import InstantiationException

from hiresrun import run, sampling
from hiresrun.errors import UsageError
from hiresrun.models import model_fn, save_pipeline
from hiresrun.outputs import load_images

ONE_LINE = (UsageError, InstantiationException)  # Hydra wraps errors raised while building a config's object


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional UNet2DModel: 10 classes + a null row (index 10), 8 px, 1 channel."""
    unet = tiny_unet(**PLAIN_BLOCKS, num_class_embeds=11)
    folder = tmp_path_factory.mktemp("cls") / "model"
    save_pipeline(unet, SCHED, folder)
    return folder


def sample(folder, run_dir, *extra, n=4):
    cfg = compose(["model=diffusers", f"model.path={folder}", "data.resolution=8", "sampler.num_steps=5",
                   f"sample.num_samples={n}", "logger=none", "trainer.enable_progress_bar=false", *extra], run_dir)
    return run.run(cfg), load_images(run_dir / "samples")


def test_given_labels_keep_each_seeds_noise(class_dir, tmp_path):
    """Labels are always drawn from the seed's generator first, so giving a seed the label it would have drawn
    changes nothing; a different label changes the image."""
    from hiresrun.conditioning import Conditioner
    from hiresrun.models import load_model

    drawn = Conditioner(load_model(str(class_dir), null_class=-1)).labels_of([0, 1, 2, 3],
                                                                            sampling.generators([0, 1, 2, 3]))
    assert drawn.max() < 10  # the null row is never drawn
    _, free = sample(class_dir, tmp_path / "free", "model.null_class=-1")
    labels = "[" + ",".join(str(int(c)) for c in drawn) + "]"
    _, given = sample(class_dir, tmp_path / "given", "model.null_class=-1", f"sample.class_labels={labels}")
    assert torch.equal(free, given)
    other = "[" + ",".join(str((int(c) + 1) % 10) for c in drawn) + "]"
    _, moved = sample(class_dir, tmp_path / "moved", "model.null_class=-1", f"sample.class_labels={other}")
    assert not torch.equal(free, moved)


@pytest.mark.parametrize("null", [0, 4, 10])
def test_the_null_class_is_never_drawn_wherever_it_sits(null, class_dir):
    """Drawn labels cover every class but the null one, uniformly in the draw: the draw d in 0..9 maps to d, or d + 1
    at and above the null row; with the null class last (10) the labels are the draws themselves."""
    from hiresrun.conditioning import Conditioner
    from hiresrun.models import load_model

    seeds = list(range(1000))
    base = load_model(str(class_dir), null_class=null)
    labels = Conditioner(base).labels_of(seeds, sampling.generators(seeds))
    draws = torch.cat([torch.randint(10, (1,), generator=g) for g in sampling.generators(seeds)])
    assert base.num_classes == 10
    assert not (labels == null).any()
    assert set(labels.tolist()) == set(range(11)) - {null}
    assert torch.equal(labels, draws + (draws >= null).long())


def test_class_guidance_is_the_cfg_formula_on_the_null_class(class_dir, tmp_path):
    """w = 3 on class 7 against the null class, checked against a DDIM loop written here."""
    from diffusers import DDIMScheduler, UNet2DModel

    metrics, ours = sample(class_dir, tmp_path / "g", "model.null_class=-1", "sample.class_labels=[7]",
                           "sample.guidance_scale=3", n=2)
    assert metrics["unet_passes_per_image"] == 2 * metrics["nfe_per_image"] == 10
    unet = UNet2DModel.from_pretrained(class_dir / "unet").eval()
    scheduler = DDIMScheduler.from_config(json.loads((class_dir / "scheduler" / "scheduler_config.json").read_text()))
    scheduler.set_timesteps(5)
    gens = sampling.generators([0, 1])
    for g in gens:  # the label draw that precedes the noise
        torch.randint(10, (1,), generator=g)
    x = sampling.noise(gens, (1, 8, 8))
    labels, null = torch.tensor([7, 7]), torch.tensor([10, 10])
    with torch.no_grad():
        for t in scheduler.timesteps:
            c, u = unet(x, t, class_labels=labels).sample, unet(x, t, class_labels=null).sample
            x = scheduler.step(u + 3 * (c - u), t, x).prev_sample
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round()
    assert (ours.float() - ref).abs().max() <= 1


def test_the_guidance_wrapper_is_one_for_text_and_class():
    """models.model_fn: without `negative` (or w <= 1) one pass; with it one doubled pass, [uncond; cond]."""
    calls = []

    class Net(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            calls.append(class_labels.tolist())
            return type("Out", (), {"sample": x * class_labels.view(-1, 1, 1, 1).float()})()

    fn, x = model_fn(Net()), torch.ones(2, 1, 1, 1)
    plain = fn(x, torch.tensor(5), {"class_labels": torch.tensor([2, 3])})
    assert calls == [[2, 3]] and plain.flatten().tolist() == [2.0, 3.0]
    guided = fn(x, torch.tensor(5), {"class_labels": torch.tensor([2, 3]), "guidance_scale": 2.0,
                                     "negative": {"class_labels": torch.tensor([0, 0])}})
    assert calls[-1] == [0, 0, 2, 3] and guided.flatten().tolist() == [4.0, 6.0]  # 0 + 2 (c - 0)


@pytest.mark.parametrize("extra,match", [
    (["sample.guidance_scale=2"], "class guidance needs the model's null class; set model.null_class"),
    (["model.null_class=-1", "sample.class_labels=[10]"], "not be the null class 10"),
    (["sample.class_labels=[11]"], r"labels must lie in 0..10"),
    (["model.null_class=12"], "outside the model's 11 class rows"),
])
def test_bad_class_inputs_are_one_line(extra, match, class_dir, tmp_path):
    with pytest.raises(ONE_LINE, match=match):
        sample(class_dir, tmp_path / "r", *extra)
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_class_labels_on_an_unconditional_model_are_refused(tiny_model_dir, tmp_path):
    cfg = compose(["model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16", "logger=none",
                   "sample.class_labels=[1]"], tmp_path / "r")
    with pytest.raises(UsageError, match="not class-conditional"):
        run.run(cfg)


# -- labelled folders ---------------------------------------------------------------------------------------------
def tree(root: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.random.default_rng(hash((name, i)) % 2**32).integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def train_cfg(folder, data, run_dir, *extra):
    return compose(["model=diffusers", f"model.path={folder}", "method=finetune", "task=train", "data=folder",
                    f"data.root={data}", "data.channels=1", "data.resolution=8", "data.labels=subfolders",
                    "data.batch_size=4", "trainer.max_steps=2", "train.grid_every=0", "logger=none",
                    "trainer.enable_progress_bar=false", *extra], run_dir)


def test_labelled_tree_trains_with_label_dropout_and_records_its_classes(class_dir, tmp_path):
    from hiresrun.data import FolderDataModule

    data = tree(tmp_path / "tree", {"cat": 3, "ant": 2, "dog": 3})
    dm = FolderDataModule(str(data), resolution=8, base_resolution=8, channels=1, labels="subfolders")
    dm.setup()
    assert dm.class_to_index == {"ant": 0, "cat": 1, "dog": 2}  # sorted names
    assert sorted(int(dm.train_set[i]["label"]) for i in range(len(dm.train_set))) == [0, 0, 1, 1, 1, 2, 2, 2]
    run.run(train_cfg(class_dir, data, tmp_path / "run", "model.null_class=-1", "train.label_dropout=0.5"))
    assert json.loads((tmp_path / "run" / "class_index.json").read_text()) == {"ant": 0, "cat": 1, "dog": 2}
    (tmp_path / "order.json").write_text(json.dumps({"dog": 0, "cat": 1, "ant": 2}))
    official = FolderDataModule(str(data), resolution=8, base_resolution=8, channels=1, labels="subfolders",
                                class_index=str(tmp_path / "order.json"))
    official.setup()
    assert official.class_to_index == {"ant": 2, "cat": 1, "dog": 0}


def test_label_dropout_replaces_labels_by_the_null_class():
    from hiresrun.models import BaseModel

    unet = torch.nn.Module()
    unet.config = type("C", (), {"num_class_embeds": 11, "block_out_channels": (8,)})()
    base = BaseModel(unet=unet, scheduler_config=SCHED, resolution=8, channels=1, weights_hash="x", source="x",
                     conditioning="class", null_class=10, label_dropout=0.5)
    torch.manual_seed(0)
    labels = base.batch_condition({"label": torch.arange(10).repeat(10)})["class_labels"]
    dropped = (labels == 10).float().mean()
    assert 0.35 < dropped < 0.65 and torch.equal(labels[labels != 10], torch.arange(10).repeat(10)[labels != 10])
    assert torch.equal(base.batch_condition({"label": torch.arange(10)}, dropout=False)["class_labels"],
                       torch.arange(10))


@pytest.mark.parametrize("case,match", [
    ("empty", "class folder .*bird holds no readable image"),
    ("loose", "lies directly in data.root"),
    ("unmapped", "names no index for class folder 'dog'"),
    ("dropout", "train.label_dropout=0.5 replaces labels by the null class; set model.null_class"),
    ("range", "a training label is 11"),
])
def test_bad_labelled_folders_are_one_line(case, match, class_dir, tmp_path):
    from PIL import Image

    data = tree(tmp_path / "tree", {"cat": 2, "dog": 2})
    extra = []
    if case == "empty":
        (data / "bird").mkdir()
    elif case == "loose":
        Image.new("L", (16, 16)).save(data / "stray.png")
    elif case == "unmapped":
        (tmp_path / "order.json").write_text(json.dumps({"cat": 0}))
        extra = [f"data.class_index={tmp_path / 'order.json'}"]
    elif case == "dropout":
        extra = ["train.label_dropout=0.5"]
    else:
        (tmp_path / "order.json").write_text(json.dumps({"cat": 0, "dog": 11}))
        extra = [f"data.class_index={tmp_path / 'order.json'}"]
    with pytest.raises(ONE_LINE, match=match):
        run.run(train_cfg(class_dir, data, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- DiT ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_image_for_image_equal_to_the_dit_pipeline(guidance, tiny_dit_dir, tmp_path):
    from diffusers import DiTPipeline

    metrics, ours = sample(tiny_dit_dir, tmp_path / "run", "data.resolution=16", "sample.class_labels=[3,1,7]",
                           f"sample.guidance_scale={guidance}", n=3)
    pipe = DiTPipeline.from_pretrained(tiny_dit_dir)
    pipe.set_progress_bar_config(disable=True)
    gens = sampling.generators([0, 1, 2])
    for g in gens:  # hiresrun draws each seed's label first (always), then the noise
        torch.randint(1000, (1,), generator=g)
    ref = pipe(class_labels=[3, 1, 7], num_inference_steps=5, guidance_scale=guidance, generator=gens,
               output_type="np").images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 255
    assert ours.shape == ref.shape == (3, 3, 16, 16)
    assert (ours.float() - ref).abs().max() <= 1.0
    assert metrics["unet_passes_per_image"] == (10 if guidance > 1 else 5)


def test_dit_defaults_to_its_pipelines_guidance_and_null_label(tiny_dit_dir, tmp_path):
    from hiresrun.models import load_model

    base = load_model(str(tiny_dit_dir))
    assert (base.conditioning, base.class_table, base.null_class, base.num_classes) == ("class", 1001, 1000, 1000)
    assert base.resolution == 16 and base.downsample_factor == 2
    metrics, _ = sample(tiny_dit_dir, tmp_path / "run", "data.resolution=16", n=2)
    assert metrics["unet_passes_per_image"] == 2 * metrics["nfe_per_image"]  # 4.0: DiTPipeline's default


@pytest.mark.parametrize("scope", ["axes", pytest.param("all", marks=pytest.mark.slow)])
def test_dit_pairs_run_or_are_refused_by_their_declarations(scope, tiny_dit_dir, tmp_path):
    """Transformers run none / upsample / tuning-free Self-Cascade with the step-level accelerators (adaptive,
    stepskip), diffusers' cache hooks (cache) or none; every pair that needs UNet blocks (Skip-Tuning, FreeU,
    DeepCache, tuned Self-Cascade, finetune, simple, PaGoDA) is refused up front. The fast suite runs the supported
    pairs with method=none or accelerator=none (each option once), the slow one every supported pair."""
    from conftest import CONF
    from hydra.utils import get_class

    from hiresrun import support
    from hiresrun.errors import Unsupported

    ran, refused = set(), set()
    accelerators = {a: get_class(compose([f"accelerator={a}"]).accelerator._target_).supports
                    for a in accelerator_options()}
    for method in sorted(f.stem for f in (CONF / "method").glob("*.yaml")):
        for mode in (["tuned", "tuning_free"] if method == "selfcascade" else [None]):
            name = f"{method}{'-' + mode if mode else ''}"
            extra = [f"method.mode={mode}"] if mode else []
            node = compose([f"method={method}", *extra]).method
            m = get_class(node._target_).declared(node)
            for accelerator, a in accelerators.items():
                refusal = support.refusal(method, m, accelerator, a, "m", "DiTTransformer2DModel", "latent", False)
                if scope == "axes" and "none" not in (method, accelerator):  # the declarations alone
                    if refusal:
                        refused.add((name, accelerator))
                    continue
                cfg = compose(["model=diffusers", f"model.path={tiny_dit_dir}", f"method={method}",
                               f"accelerator={accelerator}", "data.resolution=32", "sample.num_samples=2",
                               "sampler.num_steps=3", "logger=none", "trainer.enable_progress_bar=false",
                               "ckpt_path=/nonexistent", *extra], tmp_path / name / accelerator)
                if refusal:
                    with pytest.raises(Unsupported):
                        run.run(cfg)  # refused before ckpt_path or the model is looked at
                    refused.add((name, accelerator))
                    continue
                cfg.ckpt_path = None
                assert run.run(cfg)["num_samples"] == 2
                ran.add((name, accelerator))
    target = lambda a: get_class(compose([f"accelerator={a}"]).accelerator._target_)  # noqa: E731
    drive_dit = {a for a in accelerator_options()
                 if "DiTTransformer2DModel" in target(a).supports.unets}
    assert {"none", "adaptive", "stepskip", "cache"} <= drive_dit  # the step-level ones and diffusers' cache hooks
    every = {(m, a) for m in ("none", "upsample", "attnsf", "selfcascade-tuning_free") for a in drive_dit} | {
        ("demofusion", "none")}  # DemoFusion's views refuse the step and block caches
    assert ran == (every if scope == "all" else {(m, a) for m, a in every if "none" in (m, a)})
    assert ("none", "deepcache") in refused
    assert ("selfcascade-tuned", "none") in refused and ("none", "skiptuning") in refused
    assert ("finetune", "none") in refused and ("pagoda", "none") in refused and ("none", "freeu") in refused


def test_identities_hold_on_the_dit_path(tiny_dit_dir, tmp_path):
    base = ["data.resolution=32", "sample.class_labels=[5,9]", "sample.guidance_scale=4", "sampler.num_steps=10"]
    _, none = sample(tiny_dit_dir, tmp_path / "none", *base, n=2)
    _, adaptive = sample(tiny_dit_dir, tmp_path / "ad", *base, "accelerator=adaptive", "accelerator.delta=0", n=2)
    _, cascade = sample(tiny_dit_dir, tmp_path / "sc", *base, "method=selfcascade", "method.mode=tuning_free",
                        "method.strength=1", n=2)
    assert torch.equal(none, adaptive) and torch.equal(none, cascade)


def test_class_acc_counts_images_classified_as_their_requested_digit():
    import numpy as np

    from hiresrun.metrics.digits import class_acc

    probs = np.eye(10)[[3, 3, 7, 1]]
    assert class_acc(probs, [3, 5, 7, 1]) == 0.75


def test_metrics_json_records_each_images_class(class_dir, tmp_path):
    metrics, _ = sample(class_dir, tmp_path / "r", "model.null_class=-1", "sample.class_labels=[4,2]", n=3)
    assert metrics["protocol"]["class"]["labels_per_image"] == [4, 2, 4]
    assert metrics["protocol"]["class"]["null_class"] == 10


def test_dit_guidance_rescale_is_applied_and_dits_grid_is_interpolated_above_its_size(tiny_dit_dir):
    """sample.guidance_rescale on a DiT is diffusers' rescale_noise_cfg of the guided eps (0 = DiTPipeline's output);
    above the native size diffusers' PatchEmbed interpolates the sin-cos grid: at 2x, patch (2i, 2j) gets the
    trained table's position (i, j) and the others half-step positions (what README says)."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from hiresrun.models import transformer_fn

    net = DiTTransformer2DModel.from_pretrained(tiny_dit_dir / "transformer").eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    cond = {"class_labels": torch.tensor([3, 5]), "negative": {"class_labels": torch.tensor([1000, 1000])},
            "guidance_scale": 4.0}
    with torch.no_grad():
        plain = transformer_fn(net)(x, t, cond)
        rescaled = transformer_fn(net)(x, t, {**cond, "guidance_rescale": 0.7})
        both = net(torch.cat([x, x]), timestep=t.expand(4), class_labels=torch.tensor([3, 5, 1000, 1000])).sample[:, :4]
    text, uncond = both.chunk(2)
    assert torch.allclose(plain, uncond + 4.0 * (text - uncond), atol=1e-6)
    assert torch.allclose(rescaled, rescale_noise_cfg(plain, text, guidance_rescale=0.7), atol=1e-6)
    assert not torch.allclose(rescaled, plain)
    dim, base = net.pos_embed.pos_embed.shape[-1], net.pos_embed.base_size
    native = get_2d_sincos_pos_embed(dim, (base, base), base_size=base, output_type="pt").reshape(base, base, dim)
    double = get_2d_sincos_pos_embed(dim, (2 * base, 2 * base), base_size=base, output_type="pt")
    double = double.reshape(2 * base, 2 * base, dim)
    assert torch.allclose(double[::2, ::2], native, atol=1e-6)
    assert torch.allclose(native.float(), net.pos_embed.pos_embed.reshape(base, base, dim).float(), atol=1e-6)
