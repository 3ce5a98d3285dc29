"""Shared fixtures: a tiny random diffusers model on disk and in-process config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Under `make test` two pytest-xdist workers share the two cores: one thread each (alone, the suite uses both).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _cache_config_files() -> None:
    """Hydra reads and parses every config file again for each composition (hundreds per suite run, 0.1 s each).
    The suite never edits a config file while it runs, so each file's parse is kept per search path and a copy handed
    out: the composed configs are the same objects' equals, the time is not spent twice."""
    import copy

    from hydra._internal.config_repository import ConfigRepository

    read = ConfigRepository.load_config
    cache: dict = {}

    def load_config(self, config_path: str):
        key = (tuple(f"{type(s).__name__}:{s.path}" for s in self.sources), config_path)
        if key not in cache:
            cache[key] = read(self, config_path)
        return copy.deepcopy(cache[key])

    ConfigRepository.load_config = load_config


_cache_config_files()


# The scheduler every tiny test model is saved with (the embedded model's: cosine betas, 1000 steps).
SCHED = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
PLAIN_BLOCKS = {"down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")}


def tiny_unet(sample_size: int = 8, channels: int = 1, **changes):
    """A ~30k-parameter UNet2DModel with the embedded model's block layout (2 levels, attention at the bottom), seeded
    0; `changes` replace constructor arguments (PLAIN_BLOCKS: no attention; num_class_embeds=11: class labels)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    config = dict(sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                  block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    return UNet2DModel(**{**config, **changes})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny model saved as a diffusers pipeline folder (unet/, scheduler/, model_index.json)."""
    from hiresrun.models import save_pipeline

    folder = tmp_path_factory.mktemp("tiny-model")
    save_pipeline(tiny_unet(), SCHED, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A random tiny Stable Diffusion pipeline folder (hiresrun/tiny.py): 16 px images, 8 px latents."""
    from hiresrun.tiny import build

    return build(tmp_path_factory.mktemp("tiny-sd") / "sd", "sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A random tiny SDXL pipeline folder: two text encoders, pooled embeddings, text_time micro-conditioning."""
    from hiresrun.tiny import build

    return build(tmp_path_factory.mktemp("tiny-sdxl") / "sdxl", "sdxl")


def compose(overrides: list[str], run_dir: Path | None = None):
    """The config `hiresrun` would run with these overrides (no Hydra run folder: paths.run_dir is given), in the
    command line's forms (`accelerator=[a,b]` becomes a node per member: cli.list_selection)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from hiresrun.cli import list_selection

    extra = [f"paths.run_dir={run_dir}", f"paths.output_root={run_dir.parent}"] if run_dir else []
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        return hydra_compose("config", overrides=list_selection(overrides) + extra)


def accelerator_options() -> list[str]:
    """The accelerator options a run picks alone: every conf/accelerator file but `chain`, the node of a list
    (`+accelerator=[a,b]`, hiresrun/cli.py's list_selection)."""
    from hiresrun.listing import options

    return options("accelerator")


def tiny_overrides(model_dir: Path) -> list[str]:
    """Fast settings: the tiny model, 2 DDIM steps, a few images, no logger."""
    return ["model=diffusers", f"model.path={model_dir}", "data.resolution=16", "sampler.num_steps=2",
            "sample.num_samples=3", "logger=none", "trainer.enable_progress_bar=false"]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300,
        process: bool = False) -> subprocess.CompletedProcess:
    """`hiresrun <args>` in `cwd`: in this process through the Python API (`hiresrun.api.command`, the same task
    functions without a new interpreter's start-up) when it is a plain run; as the installed console script when
    `process` is set (what the test checks is the process: its exit code, a signal, the console entry point), when it
    has Hydra flags (`-m`, `--cfg`), is not a Hydra verb, sets environment variables or asks for several processes."""
    from hiresrun import cli as command_line

    several = any(a.startswith(("trainer=ddp", "trainer.devices=", "trainer.strategy=", "trainer.num_nodes="))
                  for a in args)  # Lightning launches the other ranks by re-running this process's command line
    plain = args and args[0] in command_line.VERBS and not any(a.startswith("-") for a in args) and not env \
        and not several
    if process or not plain:
        exe = Path(sys.executable).with_name("hiresrun")
        full_env = {**os.environ, "HIRESRUN_OUTPUTS": str(cwd / "outputs"), **(env or {})}
        return subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    return in_process(list(args), cwd)


def in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`hiresrun.api.command(args)` run from `cwd` with HIRESRUN_OUTPUTS=<cwd>/outputs, as a CompletedProcess: exit 0,
    or the error's exit code with the command line's one line on stderr."""
    import contextlib
    import io

    from hiresrun import api
    from hiresrun.errors import HiresrunError

    out, err, code, before = io.StringIO(), io.StringIO(), 0, os.environ.get("HIRESRUN_OUTPUTS")
    here = os.getcwd()
    os.environ["HIRESRUN_OUTPUTS"] = str(cwd / "outputs")
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            api.command(args)
    except HiresrunError as e:
        code = e.exit_code
        err.write(f"hiresrun: error: {e}\n")
    finally:
        os.chdir(here)
        if before is None:
            os.environ.pop("HIRESRUN_OUTPUTS", None)
        else:
            os.environ["HIRESRUN_OUTPUTS"] = before
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """A random tiny DiT pipeline folder: DiTTransformer2DModel (learned variance, 1,000 classes), VAE, DDIM."""
    from hiresrun.tiny import dit

    return dit(tmp_path_factory.mktemp("tiny-dit") / "dit")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A random tiny FLUX.1-dev-shaped pipeline folder (hiresrun/tiny.py): 16 px native, guidance embedding."""
    from hiresrun.tiny import flux

    return flux(tmp_path_factory.mktemp("tiny-flux") / "flux")


@pytest.fixture(scope="session")
def tiny_schnell_dir(tmp_path_factory) -> Path:
    """The FLUX.1-schnell shape: no guidance embedding."""
    from hiresrun.tiny import flux

    return flux(tmp_path_factory.mktemp("tiny-schnell") / "schnell", guidance_embeds=False)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A random tiny Stable Diffusion 3 pipeline folder: 16 px native, position grid of 32 patches."""
    from hiresrun.tiny import sd3

    return sd3(tmp_path_factory.mktemp("tiny-sd3") / "sd3")
