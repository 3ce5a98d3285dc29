"""The constructor signature is the config schema: for every option of the `method` and
`accelerator` groups, Hydra's ConfigStore gets `schema/<group>/<option>`, the keyword arguments of the option's
`_target_` with their defaults, read from the signature. Each YAML file extends its schema (`defaults:
[/schema/<group>/<option>@_here_, _self_]`) and writes only `_target_`, interpolations and the values it
deliberately changes, so a default lives in one place and every knob is still settable as `method.<knob>=`.
"""

from __future__ import annotations

import ast
import inspect
from importlib.resources import files
from pathlib import Path

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


def source_defaults(target: str) -> dict:
    """`signature_defaults`, read from the class's source file without importing it (composing a config, and so
    `hiresrun --help` or a refused override, must not pay for torch): the `__init__` of the class, or of the first
    base class that defines one, followed through the module's `from ... import` lines. A default that is not a
    literal, or a class outside hiresrun, falls back to importing (tests/test_config.py checks the two agree)."""
    module, _, name = target.rpartition(".")
    found = _init_args(module, name)
    return signature_defaults(target) if found is None else found


def _source(module: str) -> ast.Module | None:
    root, _, rest = module.partition(".")
    if root != "hiresrun":
        return None
    folder = Path(__file__).parent.joinpath(*rest.split(".")) if rest else Path(__file__).parent
    path = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
    return ast.parse(path.read_text()) if path.is_file() else None


def _init_args(module: str, name: str) -> dict | None:
    tree = _source(module)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None) if tree else None
    if cls is None:
        return None
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:  # inherited: the first base, in this module or imported by name
        if not cls.bases or not isinstance(cls.bases[0], ast.Name):
            return {} if not cls.bases else None
        base = cls.bases[0].id
        imported = next((n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
                         and any(a.name == base and a.asname is None for a in n.names)), None)
        return _init_args(imported or module, base)
    a = init.args
    positional = a.posonlyargs + a.args  # the defaults belong to the last of these; keywords only from a.args
    pairs = [(arg, d) for arg, d in zip(positional[len(positional) - len(a.defaults):], a.defaults)
             if arg not in a.posonlyargs]
    pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    try:
        return {arg.arg: plain(ast.literal_eval(d)) for arg, d in pairs}
    except ValueError:
        return None


def options(group: str) -> dict[str, dict]:
    """option name -> its YAML file's own content (not composed), for one group of the installed configs."""
    folder = files("hiresrun.conf").joinpath(group)
    return {f.name[:-len(".yaml")]: OmegaConf.to_container(OmegaConf.create(f.read_text()))
            for f in folder.iterdir() if f.name.endswith(".yaml")}


def register() -> None:
    store = ConfigStore.instance()
    for group in GROUPS:
        for name, own in options(group).items():
            store.store(group=f"schema/{group}", name=name, node=source_defaults(own["_target_"]))
