"""experiments/papers/*.md: every row of a paper's table names a command that composes (verb, experiment file, keys),
or says it is not built yet; the rows a table says run on a tiny replica are the ones tests/test_text_matrix.py runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hiresrun import cli

REPO = Path(__file__).resolve().parents[1]
PAPERS = sorted((REPO / "experiments" / "papers").glob("*.md"))


def rows(page: Path) -> list[list[str]]:
    table = page.read_text().split("<!-- rows -->")[1].split("<!-- /rows -->")[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]


def test_every_row_is_a_command_that_composes_or_says_it_is_not_built():
    from hydra import initialize_config_module

    assert PAPERS, "experiments/papers/ holds the papers' tables"
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        for page in PAPERS:
            table = rows(page)
            assert len(table) >= 5, page.name
            for row, _, command, _, here in table:
                if command == "not built yet":
                    assert not here, row
                    continue
                commands = re.findall(r"`(hiresrun [^`]+)`", command)
                assert commands, (page.name, row)
                for c in commands:
                    words = shlex.split(c)
                    assert words[1] in cli.VERBS, c
                    cfg = cli.compose(cli.list_selection([f"task={words[1]}", *words[2:]]))
                    assert str(cfg.task) == words[1] and cfg.model.path == "stabilityai/stable-diffusion-2-1-base", c


def test_the_rows_marked_tiny_replica_are_the_ones_the_text_matrix_runs():
    from test_text_matrix import test_fullscale_text_settings_run_end_to_end_on_the_tiny_folders as runner

    ran = {name for name, _ in next(m for m in runner.pytestmark if m.name == "parametrize").args[1]}
    for page in PAPERS:
        for row, _, command, _, here in rows(page):
            if here == "tiny replica":
                experiments = set(re.findall(r"experiment=fullscale/([\w-]+)", command))
                assert experiments and experiments <= ran, (row, experiments - ran)
