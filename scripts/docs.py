"""Rewrite the README's generated table (what runs on what) from the methods' and accelerators' `Support`
declarations: `python scripts/docs.py`. tests/test_docs.py fails while the README and the declarations disagree."""

from __future__ import annotations

from pathlib import Path

from hiresrun.listing import support_table
from hiresrun.outputs import write_block

README = Path(__file__).resolve().parents[1] / "README.md"

if __name__ == "__main__":
    write_block(README, "support", support_table())
    print(f"wrote the support table into {README}")
