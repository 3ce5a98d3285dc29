"""Test-side stand-ins for the authors' checkpoints (tests/test_convert.py, scripts/convert_fixtures.py).

The fixtures in tests/fixtures/convert/ hold no weights: a network's parameter names and shapes, the module tree of
an NVlabs pickle (class names, the attributes hiresrun reads), the inputs and the outputs the authors' own module gave
with the weights `synthetic` draws from a seed. A test rebuilds the same checkpoint from the fixture: a state dict, or
a pickle in NVlabs' format (each module a `torch_utils.persistence._reconstruct_persistent_obj(meta)` call, torch's
containers pickled as torch pickles them), with no code of the authors'."""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict

import torch


def synthetic(layout: list, seed: int) -> OrderedDict:
    """name -> tensor for [[name, shape], ...]: one generator, in order; weights ~ N(0, 1 / fan_in), 1-D tensors
    N(0, 0.1^2) (+1 for norm scales)."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for name, shape in layout:
        x = torch.randn(tuple(shape), generator=g)
        if len(shape) >= 2:
            x = x / math.sqrt(math.prod(shape[1:]))
        else:
            x = 0.1 * x + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        out[name] = x
    return out


def _reconstruct_persistent_obj(meta):  # pickled by reference only; hiresrun's unpickler never calls it
    raise RuntimeError("not called")


def _persistence_module() -> types.ModuleType:
    if "torch_utils.persistence" not in sys.modules:
        package = types.ModuleType("torch_utils")
        module = types.ModuleType("torch_utils.persistence")
        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        module._reconstruct_persistent_obj = _reconstruct_persistent_obj
        package.persistence = module
        sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = package, module
    return sys.modules["torch_utils.persistence"]


class Persistent(torch.nn.Module):
    """A module pickled as NVlabs' persistence pickles one: (_reconstruct_persistent_obj, (meta,))."""

    def __init__(self, class_name: str, attrs: dict, init_kwargs: dict):
        super().__init__()
        self._orig_class_name = class_name
        self._init_args, self._init_kwargs = (), dict(init_kwargs)
        for key, value in attrs.items():
            setattr(self, key, value)

    def __reduce__(self):
        persistence = _persistence_module()
        state = {k: v for k, v in self.__dict__.items() if k != "_orig_class_name"}
        meta = dict(type="class", version=6, module_src="# the authors' module source is not included here",
                    class_name=self._orig_class_name, state=state)
        return persistence._reconstruct_persistent_obj, (meta,)


def build_tree(node: dict, tensors: dict, prefix: str = "") -> torch.nn.Module:
    """The module tree a fixture describes, its parameters from `tensors` (state-dict names under `prefix`)."""
    if node["class"] == "ModuleDict":
        module = torch.nn.ModuleDict()
    else:
        module = Persistent(node["class"], node.get("attrs", {}), node.get("init_kwargs", {}))
    for name in node.get("params", []):
        module.register_parameter(name, torch.nn.Parameter(tensors[prefix + name], requires_grad=False))
    for name, value in node.get("buffers", {}).items():
        module.register_buffer(name, torch.tensor(value))
    for name, child in node.get("children", {}).items():
        module.add_module(name, build_tree(child, tensors, f"{prefix}{name}."))
    return module


def nvlabs_pickle(tree: dict, tensors: dict, extra: dict | None = None) -> bytes:
    """An NVlabs network pickle ({'ema': <network>, ...}) of the fixture's tree with these tensors."""
    _persistence_module()
    return pickle.dumps({"ema": build_tree(tree, tensors), **(extra or {})})
