"""`hiresrun convert`: the papers' own checkpoints as diffusers `UNet2DModel` folders.

    hiresrun convert adm <state dict .pt> <folder> [--preset NAME | architecture flags] [--force]
    hiresrun convert edm <network .pkl> <folder> [--force]

`adm`: a state dict of OpenAI's ADM `UNetModel` (guided-diffusion, and the consistency-models release of the EDM
ImageNet-64 teacher), read with `torch.load(weights_only=True)`. The architecture is read from the tensors (channels,
levels, blocks per level, attention levels, up/down-sampling resblocks, scale-shift norm, classes, learned variance);
what the tensors cannot say is a flag: the attention's head width or count and its qkv channel order (`legacy`: heads
split before q, k, v; `new`: q, k, v split first), the image size, and what the network's time input is.

`edm`: an NVlabs EDM network pickle (`edm-imagenet-64x64-cond-adm.pkl`: EDMPrecond around a DhariwalUNet, the ADM
architecture). A pickle can name any Python callable and have it called while it loads; this one is read by an
unpickler that resolves only the names such a file needs (tensor rebuilders, ordered dicts, torch's module classes as
inert records, NVlabs' persistence wrapper as a plain dict) and calls none of the file's own code; any other name is
refused in one line. EDM2's magnitude-preserving networks have no diffusers counterpart and are refused.

Both write `<folder>/unet` (config + safetensors), `<folder>/scheduler/scheduler_config.json` and
`<folder>/hiresrun.json` (where the weights came from and the model settings to sample them with), into a temporary
sibling renamed into place: an existing folder is never touched without `--force`.

Mapping (both formats have ADM's layout, which `UNet2DModel` builds with `resnet_time_scale_shift=scale_shift`, the
attention head width as `attention_head_dim`, resnet-type up/down-sampling where the source uses resblocks):
the sinusoidal time features are [cos, sin] of t / 10000^(i / half) (`flip_sin_to_cos`, `freq_shift=0`), the class
embedding is ADM's `label_emb` or EDM's one-hot `map_label` transposed, and each qkv projection is split into
`to_q` / `to_k` / `to_v` in its source's channel order. tests/test_convert.py checks each conversion against outputs
recorded from the authors' own modules (tests/fixtures/convert/).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from hiresrun.errors import UsageError

# Named settings of published checkpoints (architecture flags the tensors cannot give, and how they are sampled).
PRESETS = {
    # guided-diffusion's 64x64_diffusion.pt: class-conditional ImageNet-64, learned variance, cosine schedule
    "adm-imagenet64": dict(head_channels=64, attention_order="new", image_size=64, time="ddpm",
                           beta_schedule="squaredcos_cap_v2"),
    # consistency-models' edm_imagenet64_ema.pt (CTM and PaGoDA's teacher): EDM's F with t = 1000 ln(sigma) / 4
    "cm-edm-imagenet64": dict(head_channels=64, attention_order="new", image_size=64, time="edm-1000"),
}
TIMES = {  # --time: what the network reads as its time input
    "ddpm": "the DDPM timestep 0..999 (a scheduler's own grid)",
    "edm": "EDM's c_noise = ln(sigma) / 4",
    "edm-1000": "1000 c_noise = 250 ln(sigma) (OpenAI's consistency-models release of the EDM teacher)",
}


# -- the restricted unpickler -----------------------------------------------------------------------------------
class Record:
    """An object the pickle describes but hiresrun never builds: its class name and state."""

    def __init__(self, name: str = "", state: dict | None = None):
        self.name, self.state = name, state if state is not None else {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}


_RECORD_CLASSES: dict[str, type] = {}


def _record_class(name: str) -> type:
    """An inert stand-in type for a class the pickle names (pickle's NEWOBJ needs a type): instances are Records."""
    if name not in _RECORD_CLASSES:
        def init(self, *args, **kwargs):
            Record.__init__(self, name)
        _RECORD_CLASSES[name] = type(name.rpartition(".")[2], (Record,), {"__init__": init, "name": name,
                                                                          "state": {}})
    return _RECORD_CLASSES[name]


def _new_object(cls, *args):
    return cls() if isinstance(cls, type) and issubclass(cls, Record) else Record(str(cls))


def _persistent(meta: dict) -> Record:
    """NVlabs' `persistence._reconstruct_persistent_obj`: kept as its class name and state, its source never run."""
    return Record(str(meta.get("class_name")), dict(meta.get("state") or {}))


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


class _EasyDict(dict):
    pass


class Refused(pickle.UnpicklingError):
    """A name the restricted unpickler does not resolve."""


class SafeUnpickler(pickle.Unpickler):
    """Resolves the names an NVlabs network pickle uses to inert stand-ins or to torch's own tensor rebuilders."""

    ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set, ("builtins", "dict"): dict, ("builtins", "list"): list,
        ("builtins", "tuple"): tuple, ("builtins", "float"): float, ("builtins", "int"): int,
        ("builtins", "object"): object,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, hooks: data,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch", "Size"): torch.Size,
        ("copyreg", "_reconstructor"): lambda cls, base, state: _new_object(cls),
        ("copyreg", "__newobj__"): _new_object,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
        ("dnnlib.util", "EasyDict"): _EasyDict,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module.startswith("torch.nn.modules.") and re.fullmatch(r"[A-Z]\w*", name):
            return _record_class(f"{module}.{name}")  # a torch module: its state is read, its class not needed
        if (module, name) in (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                              ("numpy", "dtype")):  # numbers in the networks' init arguments
            import numpy as np

            if name == "dtype":
                return np.dtype
            try:
                from numpy._core.multiarray import scalar
            except ImportError:  # numpy 1
                from numpy.core.multiarray import scalar
            return scalar
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64"):
            return getattr(torch, name)
        raise Refused(f"the file asks for {module}.{name}, which a network pickle does not need")


def load_network_pickle(path: Path) -> dict:
    """The top-level dict of an NVlabs network pickle, its modules as `Record`s; refuses other globals."""
    with open(path, "rb") as f:
        try:
            data = SafeUnpickler(f).load()
        except Refused as e:
            raise UsageError(f"{path} is refused: {e}; only NVlabs EDM network pickles are read (nothing in the file "
                             f"is run)") from None
        except (pickle.UnpicklingError, EOFError, ValueError, RuntimeError, AttributeError, TypeError) as e:
            raise UsageError(f"{path} is not a readable network pickle ({type(e).__name__}: {e}); is the file "
                             f"complete?") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a {type(data).__name__}, not an NVlabs network pickle's dict")
    return data


def module_tensors(record: Record, prefix: str = "") -> dict[str, Tensor]:
    """name -> tensor of every parameter and buffer under `record`, named as torch's state_dict would."""
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (record.state.get(group) or {}).items():
            if isinstance(value, Tensor):
                out[prefix + name] = value
    for name, child in (record.state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


# -- shared by both formats ---------------------------------------------------------------------------------------
def split_qkv(weight: Tensor, bias: Tensor, heads: int, order: str) -> list[tuple[Tensor, Tensor]]:
    """(weight, bias) of q, k, v from a 1x1 qkv projection (3C x C [x 1 ...]) in its source's channel order:
    `new`: [q | k | v], each split into heads; `legacy`: per head [q_h | k_h | v_h]; `edm`: per head, channel-
    interleaved (c, 3)."""
    weight = weight.reshape(weight.shape[0], -1)
    c = weight.shape[0] // 3
    d = c // heads
    if order == "new":
        idx = torch.arange(3 * c).reshape(3, c)
    elif order == "legacy":
        idx = torch.arange(3 * c).reshape(heads, 3, d).permute(1, 0, 2).reshape(3, c)
    elif order == "edm":
        idx = torch.arange(3 * c).reshape(heads, d, 3).permute(2, 0, 1).reshape(3, c)
    else:
        raise ValueError(order)
    return [(weight[i], bias[i]) for i in idx]


def unet_config(*, image_size: int, in_channels: int, out_channels: int, channels: list[int], blocks: int,
                attention: list[bool], updown: bool, scale_shift: bool, head_channels: int, classes: int | None,
                groups: int = 32) -> dict:
    """The `UNet2DModel` config of an ADM-layout network: one entry of `channels` / `attention` per level."""
    down = [("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" if updown else "DownBlock2D") for a in attention]
    up = [("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" if updown else "UpBlock2D") for a in attention[::-1]]
    return dict(sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
                center_input_sample=False, time_embedding_type="positional", freq_shift=0, flip_sin_to_cos=True,
                down_block_types=down, up_block_types=up, block_out_channels=channels, layers_per_block=blocks,
                mid_block_scale_factor=1, downsample_padding=1, downsample_type="resnet" if updown else "conv",
                upsample_type="resnet" if updown else "conv", dropout=0.0, act_fn="silu",
                attention_head_dim=head_channels, norm_num_groups=groups, attn_norm_num_groups=groups, norm_eps=1e-5,
                resnet_time_scale_shift="scale_shift" if scale_shift else "default", add_attention=True,
                class_embed_type=None, num_class_embeds=classes)


def _resnet(out: dict, dst: str, norm1, conv1, emb, norm2, conv2, shortcut) -> None:
    for name, pair in (("norm1", norm1), ("conv1", conv1), ("time_emb_proj", emb), ("norm2", norm2),
                       ("conv2", conv2), ("conv_shortcut", shortcut)):
        if pair is not None:
            out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = pair[0], pair[1]


def _attention(out: dict, dst: str, norm, qkv, proj, heads: int, order: str) -> None:
    out[f"{dst}.group_norm.weight"], out[f"{dst}.group_norm.bias"] = norm
    for name, (w, b) in zip(("to_q", "to_k", "to_v"), split_qkv(qkv[0], qkv[1], heads, order)):
        out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = w, b
    out[f"{dst}.to_out.0.weight"] = proj[0].reshape(proj[0].shape[0], -1)
    out[f"{dst}.to_out.0.bias"] = proj[1]


# -- ADM state dicts ----------------------------------------------------------------------------------------------
def _adm_pair(sd: dict, key: str):
    return (sd[f"{key}.weight"], sd[f"{key}.bias"]) if f"{key}.weight" in sd else None


def adm_architecture(sd: dict, where: str) -> dict:
    """What the tensors of an ADM UNetModel state dict say about its architecture. The levels and blocks per level
    come from the output side, where every level ends in an upsampler (a resblock with `resblock_updown`, else a
    convolution) except the last."""
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd or "middle_block.1.qkv.weight" not in sd:
        raise UsageError(f"{where} is not an ADM UNetModel state dict (no input_blocks.0.0 / middle_block.1.qkv / "
                         f"out.2 weights); for an NVlabs pickle use `hiresrun convert edm`")
    outs = sorted({int(k.split(".")[1]) for k in sd if k.startswith("output_blocks.")})

    def upsampler(o: int) -> str | None:
        for j in (1, 2):
            if f"output_blocks.{o}.{j}.in_layers.0.weight" in sd:
                return "resblock"
            if f"output_blocks.{o}.{j}.conv.weight" in sd:
                return "conv"
        return None

    ups = [o for o in outs if upsampler(o)]
    blocks = ups[0] if ups else len(outs) - 1
    levels = len(outs) // (blocks + 1)
    if len(outs) != levels * (blocks + 1) or ups != [(u + 1) * (blocks + 1) - 1 for u in range(levels - 1)]:
        raise UsageError(f"{where}: its output blocks do not form levels of equal depth; UNet2DModel has one "
                         f"layers_per_block")
    updown = bool(ups) and upsampler(ups[0]) == "resblock"
    firsts = [1 + level * (blocks + 1) for level in range(levels)]
    if not updown and levels > 1 and f"input_blocks.{firsts[0] + blocks}.0.op.weight" not in sd:
        raise UsageError(f"{where}: its downsamplers are average pools (conv_resample=False), which UNet2DModel "
                         f"does not build")
    first, emb = "input_blocks.1.0", sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    return dict(channels=[sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in firsts], blocks=blocks,
                attention=[f"input_blocks.{i}.1.qkv.weight" in sd for i in firsts], updown=updown,
                scale_shift=emb == 2 * sd[f"{first}.out_layers.3.weight"].shape[0],
                in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
                classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None,
                model_channels=sd["input_blocks.0.0.weight"].shape[0])


def adm_state(sd: dict, arch: dict, heads_of, order: str) -> dict:
    """The `UNet2DModel` state dict of an ADM UNetModel state dict (architecture from `adm_architecture`)."""
    out = {}
    out["time_embedding.linear_1.weight"], out["time_embedding.linear_1.bias"] = _adm_pair(sd, "time_embed.0")
    out["time_embedding.linear_2.weight"], out["time_embedding.linear_2.bias"] = _adm_pair(sd, "time_embed.2")
    if arch["classes"]:
        out["class_embedding.weight"] = sd["label_emb.weight"]
    out["conv_in.weight"], out["conv_in.bias"] = _adm_pair(sd, "input_blocks.0.0")

    def res(src: str, dst: str) -> None:
        _resnet(out, dst, _adm_pair(sd, f"{src}.in_layers.0"), _adm_pair(sd, f"{src}.in_layers.2"),
                _adm_pair(sd, f"{src}.emb_layers.1"), _adm_pair(sd, f"{src}.out_layers.0"),
                _adm_pair(sd, f"{src}.out_layers.3"), _adm_pair(sd, f"{src}.skip_connection"))

    def attn(src: str, dst: str) -> None:
        c = sd[f"{src}.qkv.weight"].shape[1]
        _attention(out, dst, _adm_pair(sd, f"{src}.norm"), _adm_pair(sd, f"{src}.qkv"),
                   _adm_pair(sd, f"{src}.proj_out"), heads_of(c), order)

    n, b = len(arch["channels"]), arch["blocks"]
    i = 1
    for level in range(n):
        for j in range(b):
            res(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}")
            if arch["attention"][level]:
                attn(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}")
            i += 1
        if level < n - 1:
            if arch["updown"]:
                res(f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0")
            else:
                out[f"down_blocks.{level}.downsamplers.0.conv.weight"], out[
                    f"down_blocks.{level}.downsamplers.0.conv.bias"] = _adm_pair(sd, f"input_blocks.{i}.0.op")
            i += 1
    res("middle_block.0", "mid_block.resnets.0")
    attn("middle_block.1", "mid_block.attentions.0")
    res("middle_block.2", "mid_block.resnets.1")
    o = 0
    for u in range(n):
        level = n - 1 - u
        for k in range(b + 1):
            res(f"output_blocks.{o}.0", f"up_blocks.{u}.resnets.{k}")
            last = 0
            if arch["attention"][level]:
                attn(f"output_blocks.{o}.1", f"up_blocks.{u}.attentions.{k}")
                last = 1
            if k == b and level > 0:
                src = f"output_blocks.{o}.{last + 1}"
                if arch["updown"]:
                    res(src, f"up_blocks.{u}.upsamplers.0")
                else:
                    out[f"up_blocks.{u}.upsamplers.0.conv.weight"], out[
                        f"up_blocks.{u}.upsamplers.0.conv.bias"] = _adm_pair(sd, f"{src}.conv")
            o += 1
    out["conv_norm_out.weight"], out["conv_norm_out.bias"] = _adm_pair(sd, "out.0")
    out["conv_out.weight"], out["conv_out.bias"] = _adm_pair(sd, "out.2")
    return out


# -- NVlabs EDM pickles -------------------------------------------------------------------------------------------
def edm_network(data: dict, where: str) -> tuple[Record, dict]:
    """(the DhariwalUNet record, EDMPrecond's settings) of a network pickle's `ema` entry."""
    net = data.get("ema", data.get("net"))
    if not isinstance(net, Record):
        raise UsageError(f"{where} has no 'ema' network (its keys: {', '.join(map(str, data))}); not an NVlabs "
                         f"network pickle")
    if net.name == "Precond" or any(r.name in ("MPConv", "MPFourier") for r in _records(net)):  # EDM2's classes
        raise UsageError(f"{where} is an EDM2 network ({net.name}): its magnitude-preserving layers have no diffusers "
                         f"UNet2DModel counterpart; only EDM (EDMPrecond + DhariwalUNet) pickles convert")
    kwargs = dict(net.state.get("_init_kwargs") or {})
    model = (net.state.get("_modules") or {}).get("model")
    if net.name != "EDMPrecond" or not isinstance(model, Record):
        raise UsageError(f"{where}: its network is {net.name}, not EDM's EDMPrecond; only EDMPrecond + DhariwalUNet "
                         f"(the ADM architecture) converts")
    if model.name != "DhariwalUNet":
        raise UsageError(f"{where}: EDMPrecond around a {model.name}; only DhariwalUNet (ADM, the ImageNet-64 "
                         f"model) converts to a diffusers UNet2DModel (DDPM++ / NCSN++ do not)")
    return model, kwargs


def _groups(record: Record, where: str) -> int:
    found = {int(r.state["num_groups"]) for r in _records(record) if r.name == "GroupNorm" and "num_groups" in r.state}
    if len(found) != 1:
        raise UsageError(f"{where}: its group norms use {sorted(found)} groups; UNet2DModel has one norm_num_groups "
                         f"(EDM gives 32 groups to every layer of 128 channels or more)")
    return found.pop()


def _records(record: Record):
    yield record
    for child in (record.state.get("_modules") or {}).values():
        if isinstance(child, Record):
            yield from _records(child)


def edm_state(model: Record, where: str) -> tuple[dict, dict]:
    """(UNet2DModel config, state dict) of a DhariwalUNet record."""
    sd = module_tensors(model)
    kw = dict(model.state.get("_init_kwargs") or {})
    mult, nb = list(kw.get("channel_mult", [1, 2, 3, 4])), int(kw.get("num_blocks", 3))
    res, mc = int(kw["img_resolution"]), int(kw.get("model_channels", 192))
    attn_res = set(kw.get("attn_resolutions", [32, 16, 8]))
    modules = {f"{k}": v for k, v in (model.state["_modules"]).items()}
    blocks = {f"{side}.{name}": b for side in ("enc", "dec") for name, b in modules[side].state["_modules"].items()}

    def heads(name: str) -> int:
        return int(blocks[name].state.get("num_heads") or 0)

    out = {}
    pair = lambda key: (sd[f"{key}.weight"], sd[f"{key}.bias"]) if f"{key}.bias" in sd else None  # noqa: E731

    def res_block(src: str, dst: str) -> None:
        if sd[f"{src}.affine.weight"].shape[0] != 2 * sd[f"{src}.conv1.weight"].shape[0]:
            raise UsageError(f"{where}: {src} adds its embedding (adaptive_scale=False); only EDM's scale-shift blocks "
                             f"convert")
        _resnet(out, dst, pair(f"{src}.norm0"), pair(f"{src}.conv0"), pair(f"{src}.affine"), pair(f"{src}.norm1"),
                pair(f"{src}.conv1"), pair(f"{src}.skip"))
        if heads(src):
            _attention(out, dst.replace("resnets", "attentions"), pair(f"{src}.norm2"), pair(f"{src}.qkv"),
                       pair(f"{src}.proj"), heads(src), "edm")

    levels = len(mult)
    out["time_embedding.linear_1.weight"], out["time_embedding.linear_1.bias"] = pair("map_layer0")
    out["time_embedding.linear_2.weight"], out["time_embedding.linear_2.bias"] = pair("map_layer1")
    if "map_label.weight" in sd:
        out["class_embedding.weight"] = sd["map_label.weight"].t().contiguous()
    for level in range(levels):
        r = res >> level
        if level == 0:
            out["conv_in.weight"], out["conv_in.bias"] = pair(f"enc.{r}x{r}_conv")
        else:
            res_block(f"enc.{r}x{r}_down", f"down_blocks.{level - 1}.downsamplers.0")
        for j in range(nb):
            res_block(f"enc.{r}x{r}_block{j}", f"down_blocks.{level}.resnets.{j}")
    for level in reversed(range(levels)):
        r, u = res >> level, levels - 1 - level
        if level == levels - 1:
            res_block(f"dec.{r}x{r}_in0", "mid_block.resnets.0")
            res_block(f"dec.{r}x{r}_in1", "mid_block.resnets.1")
        else:
            res_block(f"dec.{r}x{r}_up", f"up_blocks.{u - 1}.upsamplers.0")
        for k in range(nb + 1):
            res_block(f"dec.{r}x{r}_block{k}", f"up_blocks.{u}.resnets.{k}")
    out["conv_norm_out.weight"], out["conv_norm_out.bias"] = pair("out_norm")
    out["conv_out.weight"], out["conv_out.bias"] = pair("out_conv")
    widths = {sd[f"{n}.qkv.weight"].shape[1] // heads(n) for n in blocks if heads(n)}
    if len(widths) != 1:
        raise UsageError(f"{where}: attention heads of {sorted(widths)} channels; UNet2DModel has one head width")
    config = unet_config(image_size=res, in_channels=sd[f"enc.{res}x{res}_conv.weight"].shape[1],
                         out_channels=sd["out_conv.weight"].shape[0], channels=[mc * m for m in mult], blocks=nb,
                         attention=[(res >> level) in attn_res for level in range(levels)], updown=True,
                         scale_shift=True, head_channels=widths.pop(),
                         classes=sd["map_label.weight"].shape[1] if "map_label.weight" in sd else None,
                         groups=_groups(model, where))
    return config, out


# -- writing ------------------------------------------------------------------------------------------------------
def build_unet(config: dict, state: dict, where: str):
    from diffusers import UNet2DModel

    unet = UNet2DModel(**config)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UsageError(f"{where}: the tensors do not fill a UNet2DModel of its architecture (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}); is the file an ADM-layout network?")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        raise UsageError(f"{where}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, the architecture needs "
                         f"{tuple(expected[bad[0]].shape)}; check --head-channels / --num-heads")
    unet.load_state_dict({k: v.float() for k, v in state.items()})
    return unet.eval()


def write_folder(unet, scheduler_config: dict, facts: dict, dest: Path, force: bool) -> None:
    """`dest`/unet, /scheduler and /hiresrun.json, written beside `dest` and renamed into place."""
    from diffusers import DDPMScheduler

    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        unet.save_pretrained(tmp / "unet")
        DDPMScheduler.from_config({k: v for k, v in scheduler_config.items() if k != "parametrization"}
                                  ).save_pretrained(tmp / "scheduler")
        if "parametrization" in scheduler_config:  # the EDM keys DDPMScheduler drops
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
        (tmp / "hiresrun.json").write_text(json.dumps(facts, indent=2) + "\n")
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ddpm_schedule(beta_schedule: str, learned: bool) -> dict:
    return {"num_train_timesteps": 1000, "beta_schedule": beta_schedule, "prediction_type": "epsilon",
            "variance_type": "learned_range" if learned else "fixed_small", "clip_sample": True}


def convert_adm(src: Path, head_channels: int | None, num_heads: int | None, attention_order: str,
                image_size: int, time: str, beta_schedule: str = "linear") -> dict:
    try:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{src} is not a readable torch state dict ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"is the file complete?") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UsageError(f"{src} holds no state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    arch = adm_architecture(sd, str(src))
    width = head_channels
    if num_heads:  # ADM's num_heads: the same count at every attention level (and the middle)
        widths = {c // num_heads for c, a in zip(arch["channels"], arch["attention"]) if a} | {
            arch["channels"][-1] // num_heads}
        if len(widths) != 1:
            raise UsageError(f"--num-heads={num_heads} gives heads of {sorted(widths)} channels at the attention "
                             f"levels; UNet2DModel has one head width")
        width = widths.pop()
    config = unet_config(image_size=image_size, in_channels=arch["in_channels"], out_channels=arch["out_channels"],
                         channels=arch["channels"], blocks=arch["blocks"], attention=arch["attention"],
                         updown=arch["updown"], scale_shift=arch["scale_shift"], head_channels=width,
                         classes=arch["classes"])
    unet = build_unet(config, adm_state(sd, arch, lambda c: c // width, attention_order), str(src))
    learned = arch["out_channels"] == 2 * arch["in_channels"]
    if time == "ddpm":
        schedule = ddpm_schedule(beta_schedule, learned)
        facts = {"parametrization": "standard"}
    else:
        from hiresrun import edm

        schedule, facts = edm.scheduler_config(), {"parametrization": "edm", "sigma_data": 0.5}
    facts.update(source=src.name, format="adm", timestep_scale=1000.0 if time == "edm-1000" else 1.0,
                 conditioning="class" if arch["classes"] else "none", learned_variance=learned)
    return {"unet": unet, "schedule": schedule, "facts": facts}


def convert_edm(src: Path) -> dict:
    model, kwargs = edm_network(load_network_pickle(src), str(src))
    config, state = edm_state(model, str(src))
    unet = build_unet(config, state, str(src))
    from hiresrun import edm

    sigma_data = float(kwargs.get("sigma_data", 0.5))
    facts = {"parametrization": "edm", "sigma_data": sigma_data, "source": src.name, "format": "edm",
             "timestep_scale": 1.0, "conditioning": "class" if config["num_class_embeds"] else "none",
             "learned_variance": False}
    return {"unet": unet, "schedule": edm.scheduler_config(sigma_data=sigma_data), "facts": facts}


def usage_command(dest: Path, facts: dict) -> str:
    keys = [f"model=diffusers model.path={dest}", f"model.conditioning={facts['conditioning']}"]
    if facts["parametrization"] == "edm":
        keys += ["model.parametrization=edm", f"model.sigma_data={facts['sigma_data']:g}", "sampler=edm_heun"]
    return "hiresrun sample " + " ".join(keys)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hiresrun convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    adm = sub.add_parser("adm", help="an ADM / guided-diffusion UNetModel state dict (.pt)")
    adm.add_argument("source", type=Path)
    adm.add_argument("dest", type=Path)
    adm.add_argument("--preset", choices=sorted(PRESETS), help="a published checkpoint's flags")
    adm.add_argument("--head-channels", type=int, help="ADM's num_head_channels")
    adm.add_argument("--num-heads", type=int, help="ADM's num_heads (when num_head_channels is -1)")
    adm.add_argument("--attention-order", choices=("legacy", "new"),
                     help="qkv channel order: new = use_new_attention_order (and consistency models' flash attention)")
    adm.add_argument("--image-size", type=int, help="the training resolution")
    adm.add_argument("--time", choices=sorted(TIMES), help="what the network reads as time: " + "; ".join(
        f"{k}: {v}" for k, v in TIMES.items()))
    adm.add_argument("--force", action="store_true", help="replace an existing folder")
    edm = sub.add_parser("edm", help="an NVlabs EDM network pickle (.pkl)")
    edm.add_argument("source", type=Path)
    edm.add_argument("dest", type=Path)
    edm.add_argument("--force", action="store_true", help="replace an existing folder")
    return p


def main(argv: list[str]) -> int:
    from hiresrun.cli import as_error

    args = parser().parse_args(argv)
    try:
        if not args.source.is_file():
            raise UsageError(f"{args.source}: no such file")
        if args.dest.exists() and not args.force:
            raise UsageError(f"{args.dest} exists; choose a new folder or pass --force to replace it")
        if args.format == "adm":
            flags = dict(PRESETS.get(args.preset, {}))
            for key in ("head_channels", "num_heads", "attention_order", "image_size", "time"):
                if getattr(args, key) is not None:
                    flags[key] = getattr(args, key)
            if (flags.get("head_channels") is None) == (flags.get("num_heads") is None):
                raise UsageError("give the attention's --head-channels (ADM's num_head_channels, 64 for the ImageNet "
                                 "models) or --num-heads, or a --preset")
            for key in ("attention_order", "image_size"):
                if key not in flags:
                    raise UsageError(f"give --{key.replace('_', '-')} (the tensors do not say it), or a --preset "
                                     f"({', '.join(sorted(PRESETS))})")
            out = convert_adm(args.source, flags.get("head_channels"), flags.get("num_heads"),
                              flags["attention_order"], int(flags["image_size"]), flags.get("time", "ddpm"),
                              flags.get("beta_schedule", "linear"))
        else:
            out = convert_edm(args.source)
        write_folder(out["unet"], out["schedule"], out["facts"], args.dest, args.force)
    except Exception as e:
        error = as_error(e)
        print(f"hiresrun: error: {error}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in out["unet"].parameters())
    print(f"hiresrun: {args.source.name} -> {args.dest} (UNet2DModel, {n / 1e6:.1f}M parameters)")
    print(f"sample it with: {usage_command(args.dest, out['facts'])}")
    return 0
