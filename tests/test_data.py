"""Datamodules: the embedded MNIST views and image folders, with their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hiresrun.data import FolderDataModule, MnistDataModule, holdout_split, load_mnist
from hiresrun.errors import DataError, UsageError


def test_mnist_is_padded_and_base_views_are_exact_pools():
    images, labels = load_mnist()
    assert images.shape == (5000, 1, 32, 32) and images.dtype == torch.uint8
    assert images[:, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0  # 2-pixel background border
    assert torch.bincount(labels).tolist() == [500] * 10
    dm = MnistDataModule(resolution=32, base_resolution=8)
    dm.setup()
    item = dm.train_set[0]
    assert item["image"].shape == (1, 32, 32) and item["base"].shape == (1, 8, 8)
    assert torch.allclose(item["base"], F.avg_pool2d(item["image"][None], 4)[0], atol=1e-6)
    assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_reference_split_is_balanced_disjoint_and_seeded():
    _, labels = load_mnist()
    train, ref = holdout_split(labels, 100, seed=0)
    assert len(ref) == 1000 and len(train) == 4000
    assert set(train.tolist()).isdisjoint(ref.tolist())
    assert torch.bincount(labels[ref]).tolist() == [100] * 10
    assert torch.equal(ref, holdout_split(labels, 100, seed=0)[1])
    assert not torch.equal(ref, holdout_split(labels, 100, seed=1)[1])


def write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        ext = ["png", "jpg", "webp"][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.{ext}")


def test_folder_crops_resizes_and_gives_base_views(tmp_path):
    write_images(tmp_path / "imgs", [(40, 30), (64, 64), (30, 50)])
    dm = FolderDataModule(root=str(tmp_path / "imgs"), resolution=16, base_resolution=8, batch_size=2)
    dm.setup()
    assert len(dm.train_set) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["base"].shape == (2, 3, 8, 8)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_folder_corrupt_file_fails_naming_it_or_is_skipped(tmp_path, capsys):
    write_images(tmp_path / "imgs", [(20, 20), (20, 20)])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        FolderDataModule(root=str(tmp_path / "imgs"), resolution=16, base_resolution=8).setup()
    dm = FolderDataModule(root=str(tmp_path / "imgs"), resolution=16, base_resolution=8, on_error="skip")
    dm.setup()
    assert len(dm.train_set) == 2
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_folder_empty_or_missing_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no readable images"):
        FolderDataModule(root=str(tmp_path / "empty")).setup()
    with pytest.raises(UsageError, match="no such folder"):
        FolderDataModule(root=str(tmp_path / "nowhere")).setup()


def test_captions_from_metadata_jsonl_or_same_stem_txt(tmp_path):
    import json

    from PIL import Image

    from hiresrun.data import FolderDataModule

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("a red square\n")
    dm = FolderDataModule(str(tmp_path), resolution=8, base_resolution=4, batch_size=1)
    dm.setup()
    assert [dm.train_set[i]["caption"] for i in range(3)] == ["", "a red square", ""]
    rows = [{"file_name": f"{i}.png", "text": f"square {i}"} for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm.setup()  # metadata.jsonl wins over .txt files
    assert [dm.train_set[i]["caption"] for i in range(3)] == ["square 0", "square 1", "square 2"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{broken\n')
    with pytest.raises(UsageError, match="metadata.jsonl: line 2 is not JSON"):
        dm.setup()
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "a"}\n')
    with pytest.raises(UsageError, match='lacks "file_name" or a string "text"'):
        dm.setup()
    none = FolderDataModule(str(tmp_path), resolution=8, base_resolution=4, batch_size=1, captions="none")
    none.setup()
    assert "caption" not in none.train_set[0]
