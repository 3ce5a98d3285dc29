"""Write tests/fixtures/convert/: outputs of the authors' own modules for `hiresrun convert`'s tests.

    python scripts/convert_fixtures.py --guided-diffusion <checkout of openai/guided-diffusion> \
                                       --edm <checkout of NVlabs/edm>

Builds small random networks with the authors' published module code (guided-diffusion's `UNetModel`, two
configurations covering both attention orders, resblock and convolution resampling, scale-shift and additive time
embedding, class and unconditional; EDM's `EDMPrecond` around a `DhariwalUNet`), loads the weights
`tests/convert_weights.synthetic` draws from a seed, and records the parameter layout, inputs and outputs as JSON
and a small .pt of tensors. No weights and none of the authors' code are written. For EDM it also pickles the
network with the authors' persistence (their format, source included) into a temporary file, converts that with
hiresrun and checks it gives the recorded outputs: the test's own pickle writer (tests/convert_weights.nvlabs_pickle)
stands in for the real format, and this check is what says it does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from convert_weights import synthetic  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "convert"
ADM = {  # name -> guided-diffusion UNetModel keywords
    "adm-new-updown-class": dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                                 attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10,
                                 num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
                                 use_new_attention_order=True),
    "adm-legacy-conv-uncond": dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=2,
                                   attention_resolutions=(1,), channel_mult=(1, 1), num_heads=2,
                                   use_scale_shift_norm=False, resblock_updown=False,
                                   use_new_attention_order=False),
}
EDM = dict(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet", model_channels=128,
           channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def tree(module) -> dict:
    """The module tree of a persistence-wrapped network: class names, the attributes hiresrun reads, parameters."""
    name = type(module).__name__
    node = {"class": name}
    if name != "ModuleDict":
        node["init_kwargs"] = plain(dict(getattr(module, "_init_kwargs", {})))
        node["attrs"] = {k: plain(getattr(module, k)) for k in ("num_groups", "eps", "num_heads", "in_channels",
                                                                 "out_channels") if hasattr(module, k)}
    node["params"] = [n for n, p in module._parameters.items() if p is not None]
    node["buffers"] = {n: b.tolist() for n, b in module._buffers.items() if b is not None}
    node["children"] = {n: tree(c) for n, c in module._modules.items()}
    return node


def adm(gd: Path) -> None:
    sys.path.insert(0, str(gd))
    from guided_diffusion.unet import UNetModel

    for name, kw in ADM.items():
        torch.manual_seed(0)
        net = UNetModel(**kw).eval()
        layout = [[k, list(v.shape)] for k, v in net.state_dict().items()]
        net.load_state_dict(synthetic(layout, seed=1))
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 3, 16, 16, generator=g)
        t = torch.tensor([10, 500])
        y = torch.tensor([3, 7]) if kw.get("num_classes") else None
        with torch.no_grad():
            out = net(x, t, y)
        torch.save({"x": x, "t": t, "y": y, "out": out}, OUT / f"{name}.pt")
        (OUT / f"{name}.json").write_text(json.dumps({"kwargs": plain(kw), "layout": layout, "seed": 1}) + "\n")
        print(name, tuple(out.shape), f"{sum(p.numel() for p in net.parameters())} params")


def edm(repo: Path) -> None:
    sys.path.insert(0, str(repo))
    import pickle

    from training.networks import EDMPrecond

    from hiresrun import convert
    from hiresrun import edm as edm_schedule

    torch.manual_seed(0)
    net = EDMPrecond(**EDM).eval()
    layout = [[k, list(v.shape)] for k, v in net.state_dict().items() if not k.endswith("resample_filter")]
    weights = synthetic(layout, seed=1)
    net.load_state_dict({**net.state_dict(), **weights})
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.05, 5.0])
    labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    with torch.no_grad():
        denoised = net(x, sigma, labels)
        _, _, c_in, c_noise = edm_schedule.coefficients(sigma.reshape(-1, 1, 1, 1), 0.5)
        F_x = net.model(c_in * x, c_noise.flatten(), class_labels=labels)
    torch.save({"x": x, "sigma": sigma, "labels": torch.tensor([3, 7]), "denoised": denoised, "F": F_x},
               OUT / "edm-dhariwal.pt")
    (OUT / "edm-dhariwal.json").write_text(json.dumps({"kwargs": EDM, "layout": layout, "seed": 1,
                                                       "tree": tree(net)}) + "\n")
    # the real format: the authors' persistence pickles the network (with their module source); hiresrun reads it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network-snapshot.pkl"
        path.write_bytes(pickle.dumps({"ema": net, "dataset_kwargs": {"resolution": 16}}))
        out = convert.convert_edm(path)
        with torch.no_grad():
            mine = out["unet"](c_in * x, c_noise.flatten(), class_labels=torch.tensor([3, 7])).sample
        err = float((mine - F_x).abs().max())
        assert err < 1e-4, err
        print("edm-dhariwal: the authors' own pickle converts; max |F difference| =", f"{err:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guided-diffusion", type=Path, required=True)
    p.add_argument("--edm", type=Path, required=True)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    adm(args.guided_diffusion)
    edm(args.edm)


if __name__ == "__main__":
    main()
