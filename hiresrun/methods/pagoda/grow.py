"""Progressive growing's initialisation: every parameter of the previous stage's generator whose name and
shape match is copied. Checkpoints hold only what trained, so a grown stage's frozen part comes from its own
`method.previous`, followed back to stage=base."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from hiresrun import checkpoint as checkpoints
from hiresrun.errors import UsageError


def checkpoint_file(previous: str) -> Path:
    p = Path(previous).expanduser()
    p = p / "checkpoints" / "last.ckpt" if p.is_dir() else p
    if not p.is_file():
        raise UsageError(f"method.previous={previous}: no checkpoint there; give the previous stage's run folder "
                         f"or .ckpt")
    return p


def generator_state(previous: str, weights_hash: str, depth: int = 0) -> dict[str, Tensor]:
    """The previous generator's weights (EMA when on), older stages first so later ones override them."""
    from omegaconf import OmegaConf

    ckpt = checkpoint_file(previous)
    state = checkpoints.trained_state(ckpt, weights_hash, "net.gen.", "method.previous")  # weights_only
    if not state:
        raise UsageError(f"method.previous={previous} is not a `+method=pagoda` stage=base or stage=grow checkpoint")
    config = ckpt.parents[1] / ".hydra" / "config.yaml"
    method = OmegaConf.load(config).get("method", {}) if config.is_file() else {}
    if method.get("stage") == "grow" and method.get("previous") and depth < 8:
        state = {**generator_state(str(method["previous"]), weights_hash, depth + 1), **state}
    return state


def load_previous(gen: nn.Module, previous: str, weights_hash: str) -> int:
    """Copy name- and shape-matched parameters into `gen`; returns how many tensors were copied."""
    own = gen.state_dict()
    match = {k: v for k, v in generator_state(previous, weights_hash).items() if k in own and own[k].shape == v.shape}
    gen.load_state_dict({**own, **match})
    return len(match)
