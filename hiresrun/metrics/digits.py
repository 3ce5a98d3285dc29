"""A small digit classifier for the embedded MNIST, shipped in hiresrun/assets/digit-classifier/, and the
scores it gives samples: `digit_acc`, `digit_conf` and `fd_digits` (a Frechet distance in its feature
space, the FID recipe of Heusel et al. 2017 with a domain classifier, as in the MNIST studies of Lucic et al. 2018).

Train (the card records the run):  python -m hiresrun.metrics.digits --out hiresrun/assets/digit-classifier
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.data import MNIST_SIZE, holdout_split, load_mnist, resize
from hiresrun.errors import UsageError
from hiresrun.metrics.weights import sha256

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digit-classifier" / "model.safetensors"
FEATURES = 128


class DigitNet(nn.Module):
    """Three conv blocks (16-32-64, 3x3, ReLU, max-pool) -> 128-d feature (penultimate, ReLU) -> 10 logits."""

    def __init__(self):
        super().__init__()
        blocks = []
        for cin, cout in ((1, 16), (16, 32), (32, 64)):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.trunk = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, 10))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """float (B, 1, 32, 32) in [-1, 1] -> (logits, features)."""
        f = self.trunk(x)
        return self.head(f), f


def prepare(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float (N, 1, 32, 32) in [-1, 1]: RGB averaged to grey, resized as data.resize does
    (exact average pooling for multiples of 32, antialiased bilinear otherwise)."""
    x = images.float().mean(1, keepdim=True) / 127.5 - 1
    return resize(x, MNIST_SIZE) if x.shape[-1] != MNIST_SIZE or x.shape[-2] != MNIST_SIZE else x


def load_classifier(path: str | Path | None = None) -> tuple[DigitNet, str]:
    """The shipped classifier (or the weights at `path`) in eval mode, and the sha256 of its file."""
    from safetensors.torch import load_file

    p = Path(path).expanduser() if path else ASSET
    if not p.is_file():
        raise UsageError(f"metrics.digit_classifier={p}: no such file; reinstall hiresrun or train one with "
                         f"`python -m hiresrun.metrics.digits`")
    net = DigitNet()
    net.load_state_dict(load_file(str(p)))
    return net.eval().requires_grad_(False), sha256(p)


@torch.inference_mode()
def classify(net: DigitNet, images: Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images -> softmax probabilities (N, 10) and penultimate features (N, 128), float64."""
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        logits, f = net(prepare(images[i:i + batch_size]))
        probs.append(logits.double().softmax(1))
        feats.append(f.double())
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def scores(probs: np.ndarray, threshold: float) -> dict:
    """digit_acc: share of images whose top class has probability >= threshold; digit_conf: mean top prob."""
    top = probs.max(1)
    return {"digit_acc": float((top >= threshold).mean()), "digit_conf": float(top.mean())}


def class_acc(probs: np.ndarray, labels) -> float:
    """Share of images the classifier labels (top-1, no threshold) as the class they were sampled for."""
    return float((probs.argmax(1) == np.asarray(labels)).mean())


# -- training -----------------------------------------------------------------------------------------------
def splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """fit (3,500) / test (500, 50 per class) from the 4,000 non-reference images; ref = the 1,000-image
    FID reference set (never seen in training either)."""
    images, labels = load_mnist()
    rest, ref = holdout_split(labels, 100, 0)           # the data module's reference split
    fit, test = holdout_split(labels[rest], 50, seed + 1)
    fit, test = rest[fit], rest[test]
    return {k: (images[i], labels[i]) for k, i in (("fit", fit), ("test", test), ("ref", ref))}


def augment(x: Tensor, g: torch.Generator, pad: int = 3) -> Tensor:
    """Digits as samplers draw them: shifted by up to `pad` px; 15% softened (the look of a 2x
    upsampled digit: average-pool then bilinear up), another 15% with contrast scaled by 0.6-1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    soft = F.interpolate(F.avg_pool2d(x, 2), size=(h, w), mode="bilinear", align_corners=False)
    u = torch.rand(n, 1, 1, 1, generator=g)
    dim = (x + 1) * (0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)) - 1
    return torch.where(u < 0.15, soft, torch.where(u < 0.3, dim, x))


def outliers(x: Tensor, g: torch.Generator) -> Tensor:
    """Non-digits of the kinds broken samplers emit, one kind per image: uniform noise, noise blobs,
    pixel-shuffled digits, 2x2 mosaics of half-size digits (the repetition of naive upscaling), 2x
    enlarged digit fragments, and overlays of two digits. Trained towards a uniform softmax (outlier
    exposure, Hendrycks et al. 2019) so that `digit_acc` does not reward them."""
    n, _, h, w = x.shape
    kind = torch.randint(0, 6, (n,), generator=g)
    other = x[torch.randperm(n, generator=g)]
    noise = torch.rand(x.shape, generator=g) * 2 - 1
    blobs = F.avg_pool2d(F.pad(torch.rand(x.shape, generator=g), (2, 2, 2, 2), mode="reflect"), 5, 1)
    blobs = ((blobs - blobs.mean((2, 3), keepdim=True)) * 12).clamp(-1, 1)
    shuffled = x.flatten(2)[:, :, torch.randperm(h * w, generator=g)].view_as(x)
    mosaic = F.avg_pool2d(x, 2).repeat(1, 1, 2, 2)
    top, left = torch.randint(0, h // 2 + 1, (2,), generator=g).tolist()
    fragment = F.interpolate(x[:, :, top:top + h // 2, left:left + w // 2], size=(h, w), mode="bilinear")
    overlay = torch.maximum(x, other)
    kinds = torch.stack([noise, blobs, shuffled, mosaic, fragment, overlay])
    return kinds[kind, torch.arange(n)]


def accuracy(net: DigitNet, images: Tensor, labels: Tensor) -> float:
    probs, _ = classify(net.eval(), images)
    return float((probs.argmax(1) == labels.numpy()).mean())


def train(epochs: int = 10, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> tuple[DigitNet, dict]:
    """AdamW, one-cycle schedule, `augment` and outlier exposure on the fit split; returns the net and its
    card numbers."""
    torch.manual_seed(seed)
    data, g = splits(seed), torch.Generator().manual_seed(seed)
    x, y = prepare(data["fit"][0]), data["fit"][1]
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            logits = net(torch.cat([augment(x[idx], g), outliers(x[idx[:batch_size // 2]], g)]))[0]
            uniform = -logits[batch_size:].log_softmax(1).mean(1).mean()  # cross-entropy to the uniform
            loss = F.cross_entropy(logits[:batch_size], y[idx]) + 0.5 * uniform
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    card = {"seconds": round(time.perf_counter() - start, 1), "epochs": epochs, "seed": seed,
            "fit_images": len(x), "test_accuracy": accuracy(net, *data["test"]),
            "ref_accuracy": accuracy(net, *data["ref"])}
    net.eval()
    card["ref_digit_acc@0.9"] = scores(classify(net, data["ref"][0])[0], 0.9)["digit_acc"]
    return net, card


def main() -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description="Train the digit classifier for digit_acc / fd_digits.")
    ap.add_argument("--out", default=str(ASSET.parent))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    net, card = train(epochs=args.epochs, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    card["sha256"] = sha256(out / "model.safetensors")
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
