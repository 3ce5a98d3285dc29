"""What a run tells its logger (hiresrun/logs.py) and the grids it saves (outputs.captioned_grid): an offline wandb
run holds the config, name, tags, sweep group, the captioned grid and a table of samples; wandb prints one line;
CSV keeps the config beside its metrics."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import hiresrun
from hiresrun import outputs


def wandb_records(run_dir: Path, wait: float = 30.0) -> list:
    """The protobuf records of an offline wandb run (its .wandb file: a leveldb-style log of 32 KB blocks). wandb's
    service process writes the file; under load it may still be flushing when the run returns, so the file is read
    again until it ends with the run's exit record (at most `wait` seconds)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        found = _records(next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes())
        if (found and found[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _records(raw: bytes) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    pos, block, found, part = 7, 32768, [], b""  # 7: wandb's file header
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        part, pos = part + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            found.append(record)
            part = b""
    return found


def test_an_offline_wandb_run_holds_config_names_grid_and_samples(tmp_path, capfd):
    run = hiresrun.sample("+method=upsample", "+accelerator=stepskip", data__resolution=32, sampler__num_steps=4,
                          accelerator__every=2, sample__num_samples=3, logger="wandb", run_dir=str(tmp_path / "r"))
    out = capfd.readouterr()
    said = [line for line in (out.out + out.err).splitlines() if "wandb" in line.lower() and " images at " not in line]
    assert len(said) == 1 and said[0].startswith("hiresrun: wandb run 'r' saved offline in ")
    assert "upload it with: wandb sync " in said[0]
    assert "\x1b[" not in out.out + out.err
    records = wandb_records(run.run_dir)
    head = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert head.display_name == "r" and head.job_type == "sample"
    assert list(head.tags) == ["sample", "tiny-mnist", "method=upsample", "accelerator=stepskip", "sampler=ddim"]
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["data"]["resolution"] == 32 and config["sampler"]["num_steps"] == 4
    assert "train" not in config and "optimizer" not in config  # what the verb reads
    logged = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
              for i in r.history.item}
    assert {"sample/nfe_per_image", "sample/grid/captions", "sample/images/path"} <= logged
    table = json.loads(next(run.run_dir.glob("wandb/offline-run-*/files/media/table/sample/*.json")).read_text())
    assert table["columns"] == ["seed", "image", "nfe"]
    assert [row[0] for row in table["data"]] == [0, 1, 2]
    assert [row[2] for row in table["data"]] == [2.0] * 3 == [run.metrics["nfe_per_image"]] * 3  # every other step


def test_csv_keeps_the_resolved_config_beside_its_metrics(tmp_path):
    run = hiresrun.sample("+method=upsample", data__resolution=32, sampler__num_steps=2, sample__num_samples=2,
                          logger="csv", run_dir=str(tmp_path / "c"))
    from omegaconf import OmegaConf

    hparams = OmegaConf.load(next(run.run_dir.rglob("hparams.yaml")))
    assert hparams.data.resolution == 32 and hparams.task == "sample" and "optimizer" not in hparams


def test_the_grid_is_enlarged_to_512_px_with_nearest_neighbour_and_captioned():
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    plain = outputs.captioned_grid(images)
    assert plain.width >= 512 and plain.width < 512 + 2 * 32 + 8  # the smallest whole factor (16 here)
    a = np.asarray(plain)
    tile = a[2:2 + 256, 2:2 + 256, 0]  # the first tile: each source pixel a 16 x 16 block of one value
    assert (tile == np.kron(images[0, 0].numpy(), np.ones((16, 16), dtype=np.uint8))).all()
    captioned = outputs.captioned_grid(images, outputs.captions([5, 6, 7, 8], ["a long prompt " * 20] * 4))
    assert captioned.height > plain.height and captioned.width == plain.width
    strip = np.asarray(captioned)[2 + 256:2 + 256 + 12, 2:2 + 256]
    assert (strip < 128).any()  # text drawn under the tile


def test_a_sample_run_saves_its_grid_enlarged_and_captioned(tmp_path):
    run = hiresrun.sample("+method=upsample", data__resolution=32, sampler__num_steps=2, sample__num_samples=4,
                          logger="none", run_dir=str(tmp_path / "g"))
    grid = Image.open(run.run_dir / "grid.png")
    assert grid.width >= 512 and grid.height > grid.width // 2
