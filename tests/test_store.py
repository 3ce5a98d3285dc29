"""Sampling at cluster scale (hiresrun/store.py): a killed run resumes to the same bytes without redoing finished
images, shards merge into the one run's images and metrics, a folder of other settings is refused, progress lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hiresrun import progress, store
from hiresrun.outputs import load_images

FAST = ["model=diffusers", "data.resolution=16", "logger=none", "trainer.enable_progress_bar=false"]


def common(model_dir: Path, *extra: str) -> list[str]:
    return ["sample", *FAST, f"model.path={model_dir}", *extra]


def here(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`hiresrun <args>` in this process (conftest.in_process: the API's form of the command line)."""
    from conftest import in_process

    return in_process(list(args), cwd)


def images_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "samples").glob("*.png"))}


def record_lines(folder: Path) -> list[dict]:
    return [json.loads(x) for p in (folder / "records").glob("*.jsonl") for x in p.read_text().splitlines()
            if x.strip().endswith("}")]


def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_bytes(tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, "sampler.num_steps=40", "sample.num_samples=12", "sample.batch_size=1",
                  "+accelerator=adaptive")
    whole = here(*args, "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    exe = Path(sys.executable).with_name("hiresrun")
    proc = subprocess.Popen([str(exe), *args, "hydra.run.dir=cut"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HIRESRUN_OUTPUTS": str(tmp_path / "o")})
    deadline = time.time() + 120
    while time.time() < deadline and len(record_lines(tmp_path / "cut")) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {json.dumps(r["seeds"]) for r in record_lines(tmp_path / "cut")}
    assert 4 <= len(before) < 12 and not (tmp_path / "cut" / "metrics.json").exists()
    again = here(*args, "hydra.run.dir=cut", cwd=tmp_path)  # the same command, in this process
    assert again.returncode == 0, again.stderr
    assert f"{len(before)} of 12 images are on disk, {12 - len(before)} to go" in again.stdout
    assert images_bytes(tmp_path / "cut") == images_bytes(tmp_path / "whole")
    seeds = [s for r in record_lines(tmp_path / "cut") for s in r["seeds"]]
    assert sorted(seeds) == list(range(12)), "a finished image was generated twice"
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    for key in ("num_samples", "nfe_per_image", "unet_passes_per_image", "nfe_min", "nfe_max", "speedup_nfe"):
        assert m1[key] == m2[key], key
    assert (tmp_path / "whole" / "skip_masks.json").read_text() == (tmp_path / "cut" / "skip_masks.json").read_text()


def test_a_rerun_of_a_finished_run_generates_nothing_and_a_corrupt_image_is_redone(tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, "sampler.num_steps=2", "sample.num_samples=6", "sample.batch_size=2",
                  "hydra.run.dir=run")
    assert here(*args, cwd=tmp_path).returncode == 0
    first = images_bytes(tmp_path / "run")
    again = here(*args, cwd=tmp_path)
    assert again.returncode == 0 and "6 of 6 images are on disk, 0 to go" in again.stdout
    assert len(record_lines(tmp_path / "run")) == 3
    (tmp_path / "run" / "samples" / "000003.png").write_bytes(b"not a png")  # same name, wrong bytes
    third = here(*args, cwd=tmp_path)
    assert "4 of 6 images are on disk, 2 to go" in third.stdout  # the batch holding seed 3 (seeds 2, 3) is redone
    assert images_bytes(tmp_path / "run") == first and len(record_lines(tmp_path / "run")) == 4


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["own folders", "one shared folder"])
def test_three_shards_merged_equal_one_run_images_and_fid(shared, tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, "sampler.num_steps=2", "sample.num_samples=7", "sample.batch_size=2",
                  "metrics=default", "metrics.patch_fid=false", "metrics.num_reference=6",
                  "metrics.kid_subset_size=3")
    one = here(*args, "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    dirs = ["shared"] * 3 if shared else [f"s{k}" for k in range(3)]
    for k in range(3):
        proc = here(*args, f"sample.shard={k}/3", f"hydra.run.dir={dirs[k]}", cwd=tmp_path)
        assert proc.returncode == 0 and f"shard {k}/3" in proc.stdout, proc.stderr
        assert "fid" not in json.loads((tmp_path / dirs[k] / "metrics.json").read_text())
    gen = dirs[0] if shared else "[" + ",".join(str(tmp_path / d) for d in dirs) + "]"
    merged = here("merge", f"gen={gen}", "hydra.run.dir=merged", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert len(images_bytes(tmp_path / "one")) == 7
    union = {} if not shared else images_bytes(tmp_path / "shared")
    for d in set(dirs):
        union |= images_bytes(tmp_path / d)
    assert union == images_bytes(tmp_path / "one")
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "merged"))
    for key in ("fid", "kid", "swd", "digit_acc", "num_samples", "nfe_per_image"):
        assert m1[key] == m2[key], key
    assert m2["protocol"]["seeds"] == "0-6"


def test_merge_refuses_missing_overlapping_or_mismatched_shards(tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, "sampler.num_steps=2", "sample.num_samples=6", "sample.batch_size=2")
    for k in (0, 1):
        assert here(*args, f"sample.shard={k}/3", f"hydra.run.dir=s{k}", cwd=tmp_path).returncode == 0
    missing = here("merge", f"gen=[{tmp_path / 's0'},{tmp_path / 's1'}]", cwd=tmp_path)
    assert missing.returncode == 2 and "2 of 6 seeds have no finished image" in missing.stderr
    assert "4-5" in missing.stderr
    assert here(*args, "hydra.run.dir=all", cwd=tmp_path).returncode == 0
    overlap = here("merge", f"gen=[{tmp_path / 'all'},{tmp_path / 's0'}]", cwd=tmp_path)
    assert overlap.returncode == 2 and "seeds 0-1 are in both" in overlap.stderr
    assert here(*args, "sampler.num_steps=3", "sample.shard=2/3", "hydra.run.dir=s2", cwd=tmp_path).returncode == 0
    other = here("merge", f"gen=[{tmp_path / 's0'},{tmp_path / 's1'},{tmp_path / 's2'}]", cwd=tmp_path)
    assert other.returncode == 2 and "sampler.num_steps 2 -> 3" in other.stderr
    (tmp_path / "empty").mkdir()
    nothing = here("merge", f"gen={tmp_path / 'empty'}", cwd=tmp_path)
    assert nothing.returncode == 2 and "no sampling.json" in nothing.stderr


def test_resuming_into_a_folder_of_other_settings_is_refused_and_nothing_changes(tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, "sample.num_samples=3", "hydra.run.dir=run")
    assert here(*args, "sampler.num_steps=2", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix != ".log"}
    proc = here(*args, "sampler.num_steps=3", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "holds images sampled with other settings (sampler.num_steps 2 -> 3)" in line, line
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix != ".log"}
    assert {p: b for p, b in after.items() if ".hydra" not in str(p)} == \
           {p: b for p, b in before.items() if ".hydra" not in str(p)}
    # what does not change an image may change: more seeds, another batch of ranks
    more = here(*args, "sampler.num_steps=2", "sample.num_samples=5", cwd=tmp_path)
    assert more.returncode == 0 and len(images_bytes(tmp_path / "run")) == 5


@pytest.mark.parametrize("value, line", [("3/3", "sample.shard=3/3: write K/N with 0 <= K < N"),
                                          ("0/0", "sample.shard=0/0: write K/N"),
                                          ("half", "sample.shard=half: write K/N"),
                                          ("0/9", "4 batches of sample.batch_size=1 cannot make 9 shards")])
def test_bad_shards_are_one_line(value, line, tiny_model_dir, tmp_path):
    proc = here(*common(tiny_model_dir, "sample.num_samples=4", "sample.batch_size=1", f"sample.shard={value}",
                       "hydra.run.dir=run"), cwd=tmp_path)
    assert proc.returncode == 2 and line in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_shard_auto_reads_the_slurm_array(monkeypatch):
    assert store.parse_shard("auto") == (0, 1)  # outside an array: one shard
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert store.parse_shard("auto") == (5, 8)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-8
    assert store.parse_shard("auto") == (7, 8)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    with pytest.raises(store.UsageError, match=r"SLURM_ARRAY_TASK_ID=8 \(min 0\) is not one of the "
                                               r"SLURM_ARRAY_TASK_COUNT=8 tasks"):
        store.parse_shard("auto")


def test_a_full_disk_while_sampling_is_one_line_and_leaves_no_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import compose, tiny_overrides
    from PIL import Image

    from hiresrun import run
    from hiresrun.errors import DataError

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")  # what a full disk leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DataError) as e:
        run.run(compose(tiny_overrides(tiny_model_dir) + ["sample.num_samples=2"], tmp_path / "run"))
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"could not write {tmp_path / 'run' / 'samples' / '000000.png'}: No "
                                                f"space left on device; free space")
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".partial")]
    assert not list((tmp_path / "run").rglob("*.png"))


def test_features_that_a_read_only_shard_cannot_keep_are_still_scored(tmp_path, monkeypatch):
    """`hiresrun merge` of shards on read-only storage: the per-image feature cache is a cache; rows it cannot write
    are used, counted as unsaved, and leave no temporary file."""
    import numpy as np

    from hiresrun.metrics import generated

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    cache = generated.FeatureCache([tmp_path] * 3, [0, 1, 2], ["a" * 64, "b" * 64, "c" * 64])
    monkeypatch.setattr(generated.np, "save", read_only)
    rows = cache.rows("inception", {"k": 1}, (2,), lambda idx: np.arange(2 * len(idx), dtype=np.float32))
    assert rows.tolist() == [[0, 1], [2, 3], [4, 5]] and (cache.computed, cache.unsaved) == (3, 3)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_shards_take_interleaved_whole_batches_that_cover_the_run_once():
    plan = store.batches(list(range(10)), 3)
    assert plan == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    parts = [store.shard_batches(plan, (k, 3)) for k in range(3)]
    assert parts == [[[0, 1, 2], [9]], [[3, 4, 5]], [[6, 7, 8]]]
    assert sorted(s for p in parts for b in p for s in b) == list(range(10))


def test_progress_lines_count_pace_and_time_left(capsys):
    now = [0.0]
    p = progress.Progress(total=1000, already=200, todo=800, every=100, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 10.0
        p(50)  # 5 img/s
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["hiresrun: sampling 300/1,000 images, 5 img/s, ETA 2 min 20 s",
                     "hiresrun: sampling 400/1,000 images, 5 img/s, ETA 2 min 0 s"]
    ddp = progress.Progress(total=100, already=0, todo=100, every=10, world=2, clock=lambda: now[0] + 1)
    ddp(10)
    assert "sampling 20/100 images" in capsys.readouterr().out  # rank 0's pace times the ranks
    assert progress.duration(3 * 3600 + 22 * 60) == "3 h 22 min"


def test_sampling_prints_progress_lines_into_a_log(tiny_model_dir, tmp_path):
    proc = here(*common(tiny_model_dir, "sampler.num_steps=1", "sample.num_samples=6", "sample.batch_size=2",
                       "sample.progress_every=2", "hydra.run.dir=run"), cwd=tmp_path)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("hiresrun: sampling ")]
    assert [x.split(" images")[0] for x in lines] == [f"hiresrun: sampling {k}/6" for k in (2, 4, 6)]
    assert load_images(tmp_path / "run" / "samples").shape[0] == 6


def test_inception_rows_are_cached_per_image_while_sampling_and_reused_by_resume_and_merge(tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, "sampler.num_steps=2", "sample.num_samples=6", "sample.batch_size=2",
                  "metrics=default", "metrics.num_reference=6", "metrics.kid_subset_size=3", "metrics.swd=false")
    assert here(*args, "sample.shard=0/2", "hydra.run.dir=s0", cwd=tmp_path).returncode == 0
    assert here(*args, "sample.shard=1/2", "hydra.run.dir=s1", cwd=tmp_path).returncode == 0
    for shard, seeds in (("s0", [0, 1, 4, 5]), ("s1", [2, 3])):  # batches (0,1), (4,5) and (2,3)
        kinds = sorted((tmp_path / shard / "features").iterdir())
        assert [k.name.split("-")[0] for k in kinds] == ["inception", "patch"]
        for k in kinds:  # one file per image, named by seed and the PNG's hash from the batch record
            assert sorted(int(p.name[:6]) for p in k.glob("*.npy")) == seeds
    merged = here("merge", f"gen=[{tmp_path / 's0'},{tmp_path / 's1'}]", "hydra.run.dir=merged", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    m = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    assert "12 row sets reused, 0 computed" in m["protocol"]["generated_features"]  # 6 images x (whole, crops)

    # the cached rows are what Inception gives the PNG on disk, and a rescore without them computes the same FID
    from hiresrun.metrics import Metrics
    from hiresrun.outputs import load_image

    metrics = Metrics(num_reference=6, kid_subset_size=3, swd=False)
    png = tmp_path / "s1" / "samples" / "000003.png"
    row = next((tmp_path / "s1" / "features").glob("inception-*/000003-*.npy"))
    assert row.name.endswith(store.sha256(png)[:16] + ".npy")
    np.testing.assert_allclose(np.load(row), metrics.inception.features(load_image(png)[None])[0], rtol=1e-5,
                               atol=1e-5)
    for victim in [*(tmp_path / "s0" / "features").glob("inception-*/00000[01]-*.npy")]:
        victim.unlink()
    (next((tmp_path / "s1" / "features").glob("patch-*/000002-*.npy"))).write_bytes(b"torn")  # a half-written file
    again = here("merge", f"gen=[{tmp_path / 's0'},{tmp_path / 's1'}]", "hydra.run.dir=again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    m2 = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert "9 row sets reused, 3 computed" in m2["protocol"]["generated_features"]
    for key in ("fid", "kid", "patch_fid"):
        assert m2[key] == pytest.approx(m[key], rel=1e-6, abs=1e-9), key


def test_shards_or_a_resume_from_another_checkpoint_are_refused_naming_both(tiny_model_dir, tmp_path):
    """`ckpt_path=<run folder>` resolves to the run's newest last.ckpt when each process starts: a shard started after
    training went on samples other weights. sampling.json records the resolved file's sha256, so a resume into the
    folder, or a merge of such shards, is refused in one line naming both checkpoints."""
    from conftest import compose, tiny_overrides

    from hiresrun import run
    from hiresrun.errors import UsageError

    train = tmp_path / "train" / "run"
    training = ["task=train", "method=selfcascade", "method.upsampler=light", "data.batch_size=4", "train.grid_every=0"]
    run.run(compose(tiny_overrides(tiny_model_dir) + training + ["trainer.max_steps=1"], train))
    sample = tiny_overrides(tiny_model_dir) + ["method=selfcascade", "method.upsampler=light", f"ckpt_path={train}",
                                               "sample.num_samples=4", "sample.batch_size=2"]
    run.run(compose(sample + ["sample.shard=0/2"], tmp_path / "s0"))
    info = json.loads((tmp_path / "s0" / "sampling.json").read_text())
    first = info["checkpoint"]
    assert first["from"] == str(train) and first["path"] == str(train / "checkpoints" / "last.ckpt")
    assert info["identity"]["checkpoint.sha256"] == first["sha256"] and "ckpt_path" not in info["identity"]
    run.run(compose(tiny_overrides(tiny_model_dir) + training + ["trainer.max_steps=2", f"ckpt_path={train}"], train))
    with pytest.raises(UsageError, match=r"holds images sampled from another checkpoint .*sha256 "
                                         rf"{first['sha256'][:12]}\) -> .*last.ckpt"):
        run.run(compose(sample + ["sample.shard=1/2"], tmp_path / "s0"))
    run.run(compose(sample + ["sample.shard=1/2"], tmp_path / "s1"))
    with pytest.raises(UsageError, match="were sampled from different checkpoints"):
        run.run(compose(["task=merge", f"merge.gen=[{tmp_path / 's0'},{tmp_path / 's1'}]", "logger=none"],
                        tmp_path / "merged"))
    assert not (tmp_path / "merged" / "metrics.json").exists()


def test_nothing_a_run_did_not_make_is_deleted(tiny_model_dir, tmp_path):
    """(a) a finished 8-image folder rerun with 2 seeds keeps all 8 (the folder's seed set grows; the rerun scores its
    own 2); (b) disjoint seed lists into one folder: the second process is refused while the first holds the folder,
    or both finish, and neither deletes the other's images; (c) a folder of images no run recorded is refused, not
    emptied; save_images=false removes only the images that run made."""
    import fcntl

    from conftest import compose, tiny_overrides

    from hiresrun import run
    from hiresrun.errors import UsageError

    run_dir = tmp_path / "run"
    common = tiny_overrides(tiny_model_dir) + ["sample.batch_size=2"]
    run.run(compose(common + ["sample.num_samples=8"], run_dir))
    before = images_bytes(run_dir)
    assert len(before) == 8
    metrics = run.run(compose(common + ["sample.num_samples=2"], run_dir))
    assert metrics["num_samples"] == 2 and images_bytes(run_dir) == before  # nothing deleted, nothing redone
    assert json.loads((run_dir / "sampling.json").read_text())["seeds"] == "0-7"
    run.run(compose(common + ["sample.seeds=20-23"], run_dir))  # another seed list into the same folder
    assert len(images_bytes(run_dir)) == 12 and all(images_bytes(run_dir)[k] == v for k, v in before.items())
    assert json.loads((run_dir / "sampling.json").read_text())["seeds"] == "0-7,20-23"

    with open(run_dir / ".lock-shard0of1", "a+") as held:  # a process sampling shard 0/1 into this folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 4242 on node7")
        held.flush()
        with pytest.raises(UsageError, match="process 4242 on node7 is sampling shard 0/1 into this folder"):
            run.run(compose(common + ["sample.seeds=30-31"], run_dir))
        run.run(compose(common + ["sample.seeds=30-33", "sample.shard=1/2"], run_dir))  # another shard: works
    assert len(images_bytes(run_dir)) == 14 and (run_dir / "samples" / "000032.png").is_file()

    mine = tmp_path / "mine"
    (mine / "samples").mkdir(parents=True)
    (mine / "samples" / "000000.png").write_bytes(b"a user's image")
    with pytest.raises(UsageError, match="holds images that no hiresrun sample run recorded"):
        run.run(compose(common + ["sample.num_samples=2"], mine))
    assert (mine / "samples" / "000000.png").read_bytes() == b"a user's image"

    run.run(compose(common + ["sample.seeds=40-41", "sample.save_images=false"], run_dir))
    left = images_bytes(run_dir)
    assert len(left) == 14 and "000040.png" not in left and all(left[k] == v for k, v in before.items())


# SIGTERM (what SLURM sends) in the fast suite; SIGINT takes the same path and runs with the slow tests
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143),
                                          pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_while_sampling_finishes_the_batch_says_how_to_resume_and_the_rerun_completes(
        signum, code, tiny_model_dir, tmp_path):
    exe = Path(sys.executable).with_name("hiresrun")
    args = [str(exe), *common(tiny_model_dir, "sampler.num_steps=8", "sample.num_samples=40", "sample.batch_size=2",
                              "hydra.run.dir=run")]
    env = {**os.environ, "HIRESRUN_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list((tmp_path / "run" / "records").glob("*.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    said = [x for x in err.splitlines() if x.startswith("hiresrun:")]
    assert len(said) == 1 and f"interrupted by {signal.Signals(signum).name} with " in said[0], err[-2000:]
    assert f"hydra.run.dir={tmp_path / 'run'}" in said[0]
    assert not (tmp_path / "run" / "metrics.json").exists()
    on_disk = len(images_bytes(tmp_path / "run"))
    assert 0 < on_disk < 40 and on_disk % 2 == 0  # whole batches only
    assert f"{on_disk} of 40 images on disk" in said[0]
    again = here(*args[1:], cwd=tmp_path)  # the rerun needs no process of its own
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{on_disk} of 40 images are on disk, {40 - on_disk} to go" in again.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_samples"] == 40


def test_a_long_phase_says_its_progress_in_lines_without_a_terminal(capsys):
    """progress.reporter (feature extraction over a real set): without a terminal a line every 5% of the total, in the
    phase's own unit, ending at the total."""
    say = progress.reporter(100, "real-set patch features (x)", unit="crops")
    for _ in range(10):
        say(10)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[0].startswith("hiresrun: real-set patch features (x) 10/100 crops, ")
    assert " crops/s, ETA " in lines[0] and lines[-1].startswith("hiresrun: real-set patch features (x) 100/100 crops")
    assert lines[-1].endswith("ETA 0 s")


def test_the_background_writer_keeps_the_order_and_hands_its_error_to_the_sampling_thread():
    """Sink(background=True): batches reach the writer in the order they were made; a write that fails stops all
    later writes and is raised in the sampling thread (at the next hand-over or at close), never lost."""
    from hiresrun.errors import DataError
    from hiresrun.sampling import Sink

    written, featurized = [], []

    class Writer:
        def write(self, seeds, images, facts):
            if seeds[0] == 4:
                raise DataError("disk full")
            written.append(list(seeds))
            return ["h"] * len(seeds)

    sink = Sink(writer=Writer(), featurize=lambda seeds, *_: featurized.append(list(seeds)), background=True)
    raised = []
    for batch in ([0, 1], [2, 3], [4, 5], [6, 7], [8, 9]):
        try:
            sink.put(batch, torch.zeros(2, 1, 2, 2, dtype=torch.uint8), {}, "cpu")
        except DataError as e:
            raised.append(e)
            break
    try:
        sink.close()
    except DataError as e:
        raised.append(e)
    assert [str(e) for e in raised] == ["disk full"]
    assert written == featurized == [[0, 1], [2, 3]]  # nothing after the failed batch
    ok = Sink(writer=type("W", (), {"write": lambda self, s, i, f: written.append(list(s)) or ["h"] * len(s)})(),
              background=True)
    written.clear()
    for batch in ([0], [1], [2], [3], [4]):
        ok.put(batch, torch.zeros(1, 1, 2, 2, dtype=torch.uint8), {}, "cpu")
    ok.flush()
    assert written == [[0], [1], [2], [3], [4]]
    ok.close()
