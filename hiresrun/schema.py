"""The constructor signature is the config schema: for every option of the `method` and
`accelerator` groups, Hydra's ConfigStore gets `schema/<group>/<option>`, the keyword arguments of the option's
`_target_` with their defaults, read from the signature. Each YAML file extends its schema (`defaults:
[/schema/<group>/<option>@_here_, _self_]`) and writes only `_target_`, interpolations and the values it
deliberately changes, so a default lives in one place and every knob is still settable as `method.<knob>=`.
"""

from __future__ import annotations

import inspect
from importlib.resources import files

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import OmegaConf

GROUPS = ("method", "accelerator")


def plain(value):
    """A default as YAML can hold it: tuples become lists."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def signature_defaults(target: str) -> dict:
    """{keyword: default} of the class at `target`, for every parameter that has a default."""
    params = inspect.signature(get_class(target)).parameters.values()
    return {p.name: plain(p.default) for p in params
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def options(group: str) -> dict[str, dict]:
    """option name -> its YAML file's own content (not composed), for one group of the installed configs."""
    folder = files("hiresrun.conf").joinpath(group)
    return {f.name[:-len(".yaml")]: OmegaConf.to_container(OmegaConf.create(f.read_text()))
            for f in folder.iterdir() if f.name.endswith(".yaml")}


PARTS = "_parts_"  # accelerator nodes: {option name: its _target_}; a list selection merges these into one dict


def register() -> None:
    """Each accelerator's schema also names the option (`_parts_`): Hydra merges the files of a list selection
    (`+accelerator=[adaptive,deepcache]`) into one node, and this dict is what still tells which options made it."""
    store = ConfigStore.instance()
    for group in GROUPS:
        for name, own in options(group).items():
            node = signature_defaults(own["_target_"])
            if group == "accelerator":
                node[PARTS] = {name: own["_target_"]}
            store.store(group=f"schema/{group}", name=name, node=node)
