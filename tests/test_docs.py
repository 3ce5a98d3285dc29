"""The README and docs/ against the code: README fits on a screen (12 KB), its support table is the declarations'
rendering, every relative link resolves, and every documented command names a verb, options and keys that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# What runs besides the Hydra verbs (hiresrun/cli.py dispatches them before Hydra).
OTHER_COMMANDS = {"report", "list", "runs"}


def fenced_commands(text: str) -> list[str]:
    """`hiresrun ...` lines of the code blocks, continuation lines joined, `&&` chains split, comments cut."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in line.split("&&"):
                part = part.split("  #")[0].strip()
                if part.startswith("hiresrun "):
                    out.append(part)
    return out


def inline_commands(text: str) -> list[str]:
    return [c for c in re.findall(r"`(hiresrun [a-z]+ [^`]*)`", text) if "=" in c]


def documented() -> list[tuple[str, str]]:
    return [(page.name, c) for page in PAGES for c in fenced_commands(page.read_text())
            + inline_commands(page.read_text())]


def has_key(cfg, dotted: str) -> bool:
    """Whether the composed config has this key, a mandatory (`???`) value included."""
    from omegaconf import OmegaConf

    parent, _, last = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    return OmegaConf.is_dict(node) and last in list(node.keys())  # `in` alone misses a `???` value


def test_the_readme_fits_on_a_screen_and_its_support_table_is_the_declarations():
    from hiresrun.listing import support_table

    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes: move detail into docs/"
    table = text.split("<!-- table:support -->\n")[1].split("\n<!-- /table:support -->")[0]
    assert table == support_table(), "README's support table is stale: python scripts/docs.py"


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for page in PAGES:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if link.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (page.parent / link.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)} -> {link}")
    assert not broken, broken
    index = (REPO / "docs" / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if p.name != "README.md" and f"]({p.name})" not in index] == []


def test_every_documented_command_names_a_verb_options_and_keys_that_exist():
    """Each documented `hiresrun <verb> ...` (docs/bad-input.md's lines are wrong on purpose) names a verb, group
    options that compose, and keys that the config those options make has, so a renamed key, option or verb fails
    here until the docs follow. Values are not checked: a placeholder `<...>` stands for any."""
    from hydra import initialize_config_module

    from hiresrun import cli
    from hiresrun.listing import GROUPS

    commands = [(page, c) for page, c in documented() if page != "bad-input.md"]
    assert len(commands) >= 60
    wrong, composed = [], {}
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        for page, command in commands:
            words = shlex.split(re.sub(r"\$\([^)]*\)", "x", command).replace("[ref=", "ref=").replace(
                "[reference=", "reference=").replace(">]", ">"), comments=True)
            verb, args = words[1], [w for w in words[2:] if "=" in w and not w.startswith(("-", "hydra"))]
            if verb == "convert":  # its own argument parser: the documented arguments parse
                from hiresrun import convert

                convert.parser().parse_args(words[2:])
                continue
            if verb in OTHER_COMMANDS:
                continue
            if verb not in cli.VERBS:
                wrong.append(f"{page}: {command}: no verb {verb}")
                continue
            choices, keys = [f"task={verb}"], []
            for a in args:
                key, value = a.split("=", 1)
                key = cli.EVAL_ALIASES.get(key.lstrip("+"), key.lstrip("+"))
                if key in GROUPS or key == "experiment":
                    first = value if value.startswith("[") else value.split(",")[0]  # a sweep: its first option
                    choices.append(f"{key}={first}")
                elif "." in key and not a.startswith("+"):  # `+key=` adds a key on purpose
                    keys.append(key)
            try:
                cfg = composed.get(tuple(choices))
                if cfg is None:
                    cfg = composed[tuple(choices)] = cli.compose(cli.list_selection(choices))
            except Exception as e:  # noqa: BLE001 - the message is the finding
                wrong.append(f"{page}: {command}: {str(e).splitlines()[0]}")
                continue
            missing = [k for k in keys if not has_key(cfg, k)]
            wrong += [f"{page}: {command}: no key {k} with {' '.join(choices[1:])}" for k in missing]
    assert not wrong, "\n".join(wrong)
