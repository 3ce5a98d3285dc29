"""outputs.write_block: a study script rewrites its README table in place, and nothing else."""

from __future__ import annotations

import pytest

from hiresrun.outputs import write_block


def test_write_block_replaces_only_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# t\nbefore\n<!-- table:a -->\nold | row\n<!-- /table:a -->\nafter\n"
                      "<!-- table:b -->\nkeep\n<!-- /table:b -->\n")
    write_block(readme, "a", "| new |\n|---|\n")
    assert readme.read_text() == ("# t\nbefore\n<!-- table:a -->\n| new |\n|---|\n<!-- /table:a -->\nafter\n"
                                  "<!-- table:b -->\nkeep\n<!-- /table:b -->\n")
    write_block(readme, "a", "| new |\n|---|")  # idempotent
    assert readme.read_text().count("| new |") == 1


@pytest.mark.parametrize("doc", ["no markers\n", "<!-- /table:a -->\n<!-- table:a -->\n",
                                 "<!-- table:a -->\n<!-- /table:a -->\n<!-- table:a -->\n"])
def test_write_block_refuses_missing_or_broken_markers(tmp_path, doc):
    readme = tmp_path / "README.md"
    readme.write_text(doc)
    with pytest.raises(ValueError, match="table:a"):
        write_block(readme, "a", "x")
    assert readme.read_text() == doc


def test_peak_memory_on_cpu_is_the_high_water_mark_since_the_last_reset():
    """In a fresh process: an allocation raises the peak by its size; after it is freed and the peak reset, the peak
    drops back (so a later job of the same multirun process does not inherit an earlier job's peak)."""
    import subprocess
    import sys

    code = ("import torch; from hiresrun.outputs import peak_memory_mb as p, reset_peak_memory as r; "
            "cpu = torch.device('cpu'); r(cpu); a = p(cpu); x = torch.ones(256 * 2**20 // 4); b = p(cpu); "
            "del x; r(cpu); c = p(cpu); print(a, b, c)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    before, during, after = map(float, proc.stdout.split())
    assert before > 10 and during >= before + 250 and after < during - 200  # the 256 MiB block, touched


def test_saving_samples_deletes_nothing_and_temp_names_are_not_images(tmp_path):
    import torch

    from hiresrun.outputs import load_images, save_samples

    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    save_samples(torch.tensor([0, 1, 2]), images, tmp_path / "samples")
    (tmp_path / "samples" / ".000009.png.partial").write_bytes(b"half")  # what a kill mid-write leaves
    save_samples(torch.tensor([0, 1]), images[:2], tmp_path / "samples")  # fewer seeds: the third image stays
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert load_images(tmp_path / "samples").shape == (3, 1, 4, 4)
