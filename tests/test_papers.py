"""experiments/papers/*.md: every row of a paper's table gives the paper's number (or says our notes lack it) and names
commands that compose at the paper's scale (a `conf/experiment/fullscale/` file: never an embedded model), or says it
is not built yet; the rows a table says run on a tiny replica are run end to end by a test."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hiresrun import cli

REPO = Path(__file__).resolve().parents[1]
PAPERS = sorted((REPO / "experiments" / "papers").glob("*.md"))
EMBEDDED = ("tiny-mnist", "tiny-sd-mnist")


def rows(page: Path) -> list[list[str]]:
    """(row, kind, paper's number, command, needs, here) of each table row."""
    table = page.read_text().split("<!-- rows -->")[1].split("<!-- /rows -->")[0]
    out = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    assert all(len(r) == 6 for r in out), page.name
    return out


def test_every_row_is_a_command_that_composes_or_says_it_is_not_built():
    from hydra import initialize_config_module

    assert {p.stem for p in PAPERS} >= {"selfcascade", "pagoda", "simple", "adaptive", "skiptuning", "baselines"}
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        for page in PAPERS:
            table = rows(page)
            assert len(table) >= 5, page.name
            for row, _, paper, command, _, here in table:
                assert paper, (page.name, row)  # a number, or "—" where our notes lack it
                if command == "not built yet":
                    assert not here, row
                    continue
                commands = re.findall(r"`(hiresrun [^`]+)`", command)
                assert commands, (page.name, row)
                for c in commands:
                    words = shlex.split(c)
                    assert words[1] in cli.VERBS, c
                    assert any(w.startswith("experiment=fullscale/") for w in words), c  # the paper's setting
                    cfg = cli.compose(cli.list_selection([f"task={words[1]}", *words[2:]]))
                    assert str(cfg.task) == words[1] and cfg.model.path not in EMBEDDED, c


def test_the_rows_marked_tiny_replica_are_run_by_a_test():
    """A tiny-replica row's experiment file is run end to end: by the text matrix's runner (SD / SDXL families) or by
    the EDM tests (tests/test_edm.py, tests/test_pagoda_edm.py), which name it."""
    from test_text_matrix import test_fullscale_text_settings_run_end_to_end_on_the_tiny_folders as runner

    ran = {name for name, _ in next(m for m in runner.pytestmark if m.name == "parametrize").args[1]}
    for name in ("test_edm.py", "test_pagoda_edm.py"):
        ran |= set(re.findall(r"experiment=fullscale/([\w-]+)", (REPO / "tests" / name).read_text()))
    marked = 0
    for page in PAPERS:
        for row, _, _, command, _, here in rows(page):
            if here == "tiny replica":
                experiments = set(re.findall(r"experiment=fullscale/([\w-]+)", command))
                assert experiments and experiments <= ran, (page.name, row, experiments - ran)
                marked += 1
    assert marked >= 8
