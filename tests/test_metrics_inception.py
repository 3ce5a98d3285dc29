"""Metrics with the real Inception network (~0.2-0.5 s per image on 2 cores): clean-fid agreement, the full
evaluation and its protocol, the training proxy, and the `sample` / `eval` verbs. Sets are kept tiny."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose, tiny_overrides

from hiresrun.data import MnistDataModule, holdout_split, load_mnist
from hiresrun.metrics import Metrics, load_folder
from hiresrun.outputs import save_samples

PROTOCOL_KEYS = {"n_generated", "n_reference", "seeds", "real", "resolution", "feature_extractor",
                 "feature_weights_sha256", "resize_mode", "crop_scheme", "swd_protocol", "kid_protocol",
                 "reference_stats_sha256", "library_versions", "digits"}


@pytest.fixture(scope="module")
def mnist():
    images, labels = load_mnist()
    train, ref = holdout_split(labels, 100, 0)
    return images[train], images[ref]


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # clean-fid's sqrtm of singular covariances
def test_fid_on_two_folders_equals_clean_fids_own(tmp_path, mnist):
    from cleanfid import fid as cleanfid

    gen, real = tmp_path / "gen", tmp_path / "real"
    save_samples(torch.arange(6), mnist[0][:6], gen)
    save_samples(torch.arange(6), mnist[1][:6], real)
    m = Metrics(kid=False, patch_fid=False, swd=False, digits=False, cache_dir=tmp_path / "cache")
    ours = m.evaluate(load_folder(gen)[0], str(real))["fid"]
    theirs = cleanfid.compute_fid(str(gen), str(real), mode="clean", custom_feat_extractor=m.inception.pool3,
                                  device=torch.device("cpu"), num_workers=0, batch_size=6, use_dataparallel=False,
                                  verbose=False)
    assert ours > 10 and ours == pytest.approx(theirs, rel=1e-3)


def test_evaluate_gives_every_number_and_a_complete_protocol(tmp_path, mnist):
    seeds = [4, 9, 21, 22]
    gen = mnist[0][:4]
    noisy = (gen.float() + 40 * torch.randn(gen.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    save_samples(torch.tensor(seeds), noisy.round().to(torch.uint8), tmp_path / "full-step" / "samples")
    m = Metrics(num_reference=6, cache_dir=tmp_path / "cache")
    out = m.evaluate(gen, MnistDataModule(), reference=tmp_path / "full-step", seeds=seeds)
    for key in ("fid", "fid_floor", "kid", "kid_std", "patch_fid", "swd", "swd_32px", "swd_16px", "digit_acc",
                "digit_conf", "fd_digits", "lpips_to_ref", "psnr_to_ref", "ssim_to_ref"):
        assert isinstance(out[key], float) and math.isfinite(out[key]), key
    assert out["fid"] > 0 and out["patch_fid"] > 0 and out["swd"] > 0 and 0 < out["lpips_to_ref"] < 1
    assert out["digit_acc"] >= 0.5  # real digits
    proto = out["protocol"]
    assert PROTOCOL_KEYS <= set(proto) and {"lpips", "reference_run"} <= set(proto)
    assert proto["n_generated"] == 4 and proto["n_reference"] == 6 and proto["seeds"] == "4,9,21-22"
    assert set(proto["reference_stats_sha256"]) == {"inception", "patch", "swd", "digits"}
    assert proto["library_versions"]["clean-fid"] and proto["feature_weights_sha256"].startswith("7ff4a85c")
    json.dumps(out)  # metrics.json-ready
    proxy = m.proxy(MnistDataModule())(gen[:2])  # reuses the cached real features
    assert proxy["val/fid_proxy_n"] == 2 and proxy["val/fid_proxy"] > 0 and m.cache.misses == 4


def test_sample_with_metrics_default_then_eval_of_its_folder_agree(tmp_path, tiny_model_dir):
    from hiresrun import run

    cache = tmp_path / "cache"
    quick = ["metrics=default", "metrics.num_reference=6", "metrics.kid=false", "metrics.patch_fid=false",
             f"paths.cache_dir={cache}"]
    cfg = compose(tiny_overrides(tiny_model_dir) + quick, tmp_path / "sample")
    sampled = run.run(cfg)
    written = json.loads((tmp_path / "sample" / "metrics.json").read_text())
    assert written["fid"] == sampled["fid"] and "kid" not in written and "patch_fid" not in written
    assert written["nfe_per_image"] == 2 and written["swd_16px"] > 0 and "fd_digits" in written  # MNIST at 16 px
    assert written["protocol"]["n_reference"] == 6 and written["protocol"]["seeds"] == "0-2"
    assert written["protocol"]["model_weights_sha256"] and written["protocol"]["reference_stats_sha256"]["inception"]
    cfg = compose(["task=eval", "data.resolution=16", f"eval.gen={tmp_path / 'sample' / 'samples'}",
                   f"reference={tmp_path / 'sample'}"] + quick, tmp_path / "eval")
    evaluated = run.run(cfg)
    for key in ("fid", "swd", "digit_acc", "fd_digits"):  # same seeds read back from the file names
        assert evaluated[key] == pytest.approx(sampled[key], rel=1e-9), key
    assert evaluated["lpips_to_ref"] == 0 and evaluated["ssim_to_ref"] == pytest.approx(1)


def test_eval_mode_ref_caches_once_and_eval_needs_gen(tmp_path):
    from hiresrun import run
    from hiresrun.errors import UsageError

    opts = ["task=eval", "eval.mode=ref", "metrics=default", "metrics.fid=false", "metrics.kid=false",
            "metrics.patch_fid=false", f"paths.cache_dir={tmp_path}"]
    first = run.run(compose(opts, tmp_path / "a"))
    again = run.run(compose(opts, tmp_path / "b"))
    assert (first["computed"], again["computed"], again["reused"]) == (2, 0, 2)
    assert first["protocol"]["reference_stats_sha256"] == again["protocol"]["reference_stats_sha256"]
    assert first["n_reference"] == 1000 and first["task"] == again["task"] == "eval"
    with pytest.raises(UsageError, match="eval.gen"):
        run.run(compose(["task=eval"], tmp_path / "c"))


def test_validation_logs_the_fid_proxy_with_its_n(tmp_path, tiny_model_dir):
    from lightning.pytorch.loggers import CSVLogger

    from hiresrun import build, run
    from hiresrun.lit import LitModule
    from hiresrun.sampling import Sampler

    cfg = compose(tiny_overrides(tiny_model_dir) + ["metrics=default", "metrics.num_reference=4",
                                                    f"paths.cache_dir={tmp_path}"], tmp_path / "r")
    base = run.instantiate(cfg.model)
    method = run.instantiate(cfg.method)
    proxy = run.instantiate(cfg.metrics).proxy(MnistDataModule(resolution=16))
    net = method.wrap(base)
    lit = LitModule(net, method, Sampler(net, method, build.sampler_scheduler(cfg, base), 2), val_metric=proxy)
    logger = CSVLogger(tmp_path, name="log")
    trainer = build.build_trainer(cfg, logger, limit_val_batches=None)
    trainer.validate(lit, dataloaders=build.seed_loader([0, 1, 2], 3), verbose=False)
    logger.finalize("success")
    text = (tmp_path / "log" / "version_0" / "metrics.csv").read_text()
    assert "val/fid_proxy" in text and "val/fid_proxy_n" in text and ",3.0" in text


def test_reference_without_metrics_default_still_scores_fidelity(tmp_path, tiny_model_dir):
    """`reference=<run>` with metrics=none: LPIPS / PSNR / SSIM to that run's images are computed, not dropped."""
    from hiresrun import run

    run.run(compose(tiny_overrides(tiny_model_dir) + ["metrics=none"], tmp_path / "full"))
    same = run.run(compose(tiny_overrides(tiny_model_dir) + ["metrics=none", f"reference={tmp_path / 'full'}",
                                                             f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "a"))
    assert same["lpips_to_ref"] == pytest.approx(0, abs=1e-6) and same["ssim_to_ref"] == pytest.approx(1)
    assert same["psnr_to_ref"] > 70 and same["protocol"]["reference_run"] == str(tmp_path / "full")
    other = run.run(compose(tiny_overrides(tiny_model_dir) + ["metrics=none", f"reference={tmp_path / 'full'}",
                                                              "sampler.num_steps=1",
                                                              f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "b"))
    assert other["psnr_to_ref"] < same["psnr_to_ref"] and other["lpips_to_ref"] > 0
