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


def test_peak_memory_on_cpu_is_the_process_peak_rss_and_grows_with_an_allocation():
    """In a fresh process (the test session's own peak is whatever earlier tests reached)."""
    import subprocess
    import sys

    code = ("import resource, torch; from hiresrun.outputs import peak_memory_mb as p; cpu = torch.device('cpu'); "
            "a = p(cpu); assert a == round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), a; "
            "x = torch.ones(256 * 2**20 // 4); b = p(cpu); print(a, b)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    before, after = map(float, proc.stdout.split())
    assert before > 10 and after >= before + 192  # the 256 MiB block, touched
