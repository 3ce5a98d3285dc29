"""Every bad input in one table: each case is refused with one line naming the key and the fix, exit 2, and no
run folder. The same cases render docs/bad-input.md (input, exit code, the line printed); the last test checks the
committed file is what they print now (`HIRESRUN_WRITE_DOCS=1 pytest tests/test_bad_input.py` rewrites it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, tiny_overrides
from hydra.errors import InstantiationException

from hiresrun import run
from hiresrun.errors import UsageError

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
TRAIN = ["task=train", "method=finetune"]
TEXT = ["model.path=tiny-sd-mnist", "model.resolution=null"]  # the embedded text model, for prompt files
FLUX = ["model.path=tiny-flux-mnist", "model.resolution=null", "sample.prompt=seven", "sampler=flow_euler"]  # flow
# (overrides after the tiny model's fast settings, a regular expression the line must match). `{imgs}`: a folder of
# six 16 px greyscale images; `{tmp}`: the test's folder. `cli:` cases go through the command line's composition.
CASES = [
    (["sampler.num_steps=0"], r"sampler.num_steps=0: must be at least 1"),
    (["sampler.num_steps=-5"], r"sampler.num_steps=-5: must be at least 1"),
    (["data.resolution=0"], r"data.resolution=0: must be a positive image side"),
    (["data.resolution=-32"], r"data.resolution=-32: must be a positive image side"),
    (["data.resolution=15"], r"data.resolution=15 is not divisible by 2"),
    (["data.batch_size=0"], r"data.batch_size=0: must be at least 1"),
    (["sample.batch_size=0"], r"sample.batch_size=0: must be at least 1"),
    (["sample.num_samples=0"], r"sample.num_samples=0: must be at least 1, or give .* sample.seeds"),
    (["sample.seeds=9-3"], r"sample.seeds=9-3: write a list"),
    (["sample.seeds=[1,1]"], r"seeds must be non-negative, distinct"),
    (["sample.seeds=[2147483648]"], r"seeds must lie below 2\^31"),
    (["sample.shard=3/3"], r"sample.shard=3/3: write K/N with 0 <= K < N"),
    (["sample.shard=2/3", "sample.num_samples=2", "sample.batch_size=1"], r"2 batches of sample.batch_size=1 cannot "
                                                                          r"make 3 shards"),
    (["trainer.devices=0"], r"trainer.devices=0: give a count"),
    (["trainer.devices=-3"], r"trainer.devices=-3: give a count"),
    (["trainer.precision=banana"], r"trainer.precision=banana: choose one of"),
    (["trainer.accelerator=gpu"], r"no CUDA device is visible"),
    ([*TRAIN, "optimizer.lr=nan"], r"optimizer.lr=nan: must be a positive finite"),
    ([*TRAIN, "optimizer.lr=-1"], r"optimizer.lr=-1: must be a positive finite"),
    ([*TRAIN, "train.checkpoint_every=-1"], r"train.checkpoint_every=-1: must be at least 1"),
    ([*TRAIN, "train.caption_dropout=2"], r"train.caption_dropout=2.0: must lie in \[0, 1\]"),
    ([*TRAIN, "train.label_dropout=0.5"], r"train.label_dropout=0.5 replaces labels by the null class; set "
                                          r"model.null_class"),
    ([*TRAIN, "data=folder", "data.root={imgs}", "data.channels=3"], r"data.channels=3, but the model takes "
                                                                      r"1-channel images"),
    ([*TRAIN, "data.captions=banana"], r"data.captions=banana: choose none or digits"),
    (["model.path={tmp}/nowhere"], r"model.path=.*nowhere"),
    (["model.init=banana"], r"model.init=banana: choose pretrained or scratch"),
    (["model.conditioning=banana"], r"model.conditioning=banana: choose auto, none, class or text"),
    (["model.conditioning=class"], r"model.conditioning=class but the UNet .* has no class embedding"),
    (["model.parametrization=banana"], r"model.parametrization=banana: choose standard or edm"),
    (["model.parametrization=edm", "model.sigma_min=-1"], r"model.sigma_min=-1, sigma_max=80.0.*need 0 < "),
    (["model.parametrization=edm"], r"model.parametrization=edm needs an EDM sampler"),
    (["sampler=edm_heun"], r"integrates an EDM-preconditioned network; .* set model.parametrization=edm if it is one"),
    (["model.null_class=3"], r"model.null_class=3, but .* is not class-conditional"),
    (["sample.class_labels=[1]"], r"sample.class_labels given, but .* is not class-conditional"),
    (["sample.guidance_scale=2"], r"sample.guidance_scale=2: .* has no text or class conditioning to guide"),
    (["sample.prompt=a digit"], r"sample.prompt .* is not a text-to-image model"),
    (["prompts=smoke", "sample.prompt=x"], r"prompts=<file> and sample.prompt are both given; pick one"),
    (["prompts={tmp}/none.txt"], r"prompts=.*none.txt"),
    (["method=finetune"], r"method=finetune samples with trained weights: pass ckpt_path="),
    (["method=finetune", "ckpt_path={tmp}/none.ckpt"], r"ckpt_path=.*none.ckpt"),
    (["method=selfcascade", "method.mode=banana"], r"method.mode=banana: choose tuning_free or tuned"),
    (["method=selfcascade", "method.mode=tuning_free", "method.strength=1.5"], r"method.strength=1.5: must lie in "
                                                                               r"\[0, 1\]"),
    (["method=simple", "method.schedule=cosine"], r"method.schedule=cosine: choose shifted or interpolated"),
    (["method=pagoda", "method.stage=banana"], r"method.stage=banana: choose encode \| base \| grow"),
    (["method=pagoda", "method.g_output=banana"], r"method.g_output=banana: choose auto \| raw \| x0"),
    (["method=pagoda", "method.flips=[2]"], r"method.flips=\[2\]: a non-empty subset of \[0, 1\]"),
    (["method=pagoda", "accelerator=adaptive"], r"method=pagoda with accelerator=adaptive is not supported"),
    (["method=demofusion", "data.resolution=20"], r"grows the image by whole multiples of the base.s 8 px"),
    (["method=demofusion", "accelerator=deepcache"], r"calls the model several times per sampler step"),
    (["method=hidiffusion", "method.t1=2"], r"method.t1=2.*: a share of the steps, in \[0, 1\]"),
    (["method=scalecrafter", "method.preset=sdxl-2048"], r"names convolutions this UNet2DModel lacks"),
    (["accelerator=freeu"], r"accelerator=freeu needs a UNet2DConditionModel"),
    (["accelerator=skiptuning", "accelerator.rho=3"], r"accelerator.rho=3: skip scales must lie in \(0, 1\]"),
    (["accelerator=adaptive", "accelerator.delta=-1"], r"accelerator.delta=-1"),
    (["accelerator=stepskip", "accelerator.every=0"], r"accelerator.every=0: must be at least 1"),
    (["accelerator=stepskip", "accelerator.mask=102"], r"accelerator.mask=102: give one 1 \(compute\) or 0"),
    (["accelerator=deepcache", "accelerator.interval=0"], r"accelerator.interval=0: must be at least 1"),
    (["accelerator=deepcache", "accelerator.schedule=cubic"], r"accelerator.schedule=cubic: choose uniform or "
                                                                r"quadratic"),
    (["accelerator=cache"], r"accelerator=cache needs a DiTTransformer2DModel or Transformer2DModel"),
    (["accelerator=[stepskip,adaptive]"], r"stepskip and adaptive both decide which steps call the model"),
    (["accelerator=[adaptive,deepcache]"], r"adaptive calls the model on sub-batches .* set "
                                           r"accelerator.adaptive.decision_scope=batch"),
    (["cli:", "accelerator=[adaptive,deepcache]", "accelerator.delta=0.1"], r"each member has its own node; set "
                                                                    r"accelerator.<member>.delta"),
    (["accelerator=chain"], r"accelerator=chain has no members"),
    # values that used to be refused only after images were written, or to pass silently, or as a raw exception
    (["sample.seeds=true"], r"sample.seeds=True: seeds are whole numbers"),
    (["sample.seeds=[a,b]"], r"seeds are whole numbers; write a list"),
    (["sample.seeds=[1.5,2]"], r"seeds are whole numbers; write a list"),
    (["sample.seeds=1e23"], r"seeds must lie below 2\^31"),
    (["sample.num_samples=abc"], r"sample.num_samples=abc: must be a whole number"),
    (["sample.num_samples=2.5"], r"sample.num_samples=2.5: must be a whole number"),
    (["sample.batch_size=1.5"], r"sample.batch_size=1.5: must be a whole number"),
    (["data.resolution=abc"], r"data.resolution=abc: must be a whole number"),
    (["seed=abc"], r"seed=abc: must be a whole number"),
    (["sampler.num_steps=1.5"], r"sampler.num_steps=1.5: must be a whole number"),
    (["sampler.num_steps=5000"], r"sampler.num_steps=5000: the model's schedule has 1000 training timesteps"),
    ([*TRAIN, "trainer.max_steps=-5"], r"trainer.max_steps=-5: must be at least -1"),
    ([*TRAIN, "optimizer.weight_decay=nan"], r"optimizer.weight_decay=nan: must be a finite number"),
    ([*TRAIN, "train.ema_decay=inf"], r"train.ema_decay=inf: must be a finite number"),
    (["accelerator=adaptive", "accelerator.c_max=2.5"], r"accelerator.c_max=2.5: must be a whole number"),
    (["accelerator=skiptuning", "accelerator.rho=nan"], r"accelerator.rho=nan: must be a finite number"),
    (["accelerator=adaptive", "accelerator.delta=nan"], r"accelerator.delta=nan: must be a finite number"),
    (["accelerator=adaptive", "accelerator.delta=inf"], r"accelerator.delta=inf: must be a finite number"),
    (["accelerator=deepcache", "accelerator.interval=1.5"], r"accelerator.interval=1.5: must be a whole number"),
    (["accelerator=deepcache", "accelerator.interval=2", "accelerator.branch=99"], r"accelerator.branch=99: this "
                                                                                    r"UNet has 2 down blocks"),
    (["accelerator=stepskip", "accelerator.mask=[1,0,1,0]"], r"accelerator.mask has 4 entries but the sampling "
                                                             r"loop makes 2 steps"),
    (["accelerator=stepskip", "accelerator.mask=[0,0]"], r"the first step is always computed; start the mask "
                                                         r"with 1"),
    (["model.vae_tile_above=-1"], r"model.vae_tile_above=-1: give an image side in px"),
    (["model.vae_tile_size=100"], r"model.vae_tile_size=100: give the tiles' side in image px, a multiple of 8"),
    (["model.compile=banana"], r"model.compile=banana: choose true or false"),
    (["sample.guidance_scale=nan"], r"sample.guidance_scale=nan: must be a finite number"),
    (["reference={tmp}/missing"], r"reference=<tmp>/missing: no such folder"),
    (["metrics=default", "metrics.num_reference=0"], r"metrics.num_reference=0: must be at least 2"),
    (["metrics=default", "metrics.kid_subsets=nan"], r"metrics.kid_subsets=nan: must be a whole number"),
    (["model.path=/no/such/model/folder"], r"model.path=/no/such/model/folder: no such folder"),
    (["method=finetune", "ckpt_path={imgs}/0.png"], r"ckpt_path=<images>/0.png: not a checkpoint"),
    ([*TEXT, "prompts={tmp}/latin1.txt"], r"not UTF-8 text"),
    ([*TEXT, "prompts={tmp}/long.csv"], r"not a readable CSV file \(field larger than field limit"),
    ([*TEXT, "prompts={tmp}/big-seed.jsonl"], r"line 1 has seed=1099511627776; seeds are whole numbers"),
    ([*TEXT, "prompts={tmp}/bool-seed.jsonl"], r"line 1 has seed=True"),
    # flow-matching models (the embedded FLUX-shaped base): sizes, guidance, T5 length, samplers, declarations
    ([*FLUX, "data.resolution=18"], r"not divisible by 4, the model's downsampling factor"),
    ([*FLUX, "sample.true_cfg_scale=3"], r"needs a negative prompt to guide away from"),
    ([*FLUX, "sample.max_sequence_length=64"], r"the T5 tokenizer takes 1 \.\. 16 tokens"),
    ([*FLUX, "sample.guidance_scale=3"], r"has no guidance input and would ignore it"),
    ([*FLUX[:3]], r"integrates a VP \(eps/v\) model; FluxTransformer2DModel is a flow-matching model"),
    ([*FLUX, "sampler=flow_heun"], r"no resolution-dependent shift"),
    ([*FLUX, "accelerator=deepcache"], r"accelerator=deepcache needs a UNet2DModel or UNet2DConditionModel"),
    ([*FLUX, "method=demofusion"], r"does not drive flow-matching transformers"),
    ([*FLUX, "model.positions=sideways"], r"model.positions=sideways: choose extrapolate \| interpolate \| ntk"),
    ([*TEXT, "sample.true_cfg_scale=2"], r"is FLUX's true classifier-free guidance"),
    (["model.resolution_shift=true"], r"shifts a flow-matching model's schedule"),
    (["accelerator=adaptive", "accelerator.calibration={tmp}/bad-calibration.json"], r"not a `hiresrun calibrate` "
                                                                                     r"file"),
    (["cli:", "sampler.num_step=10"], r"sampler.num_step is not a key of sampler; did you mean sampler.num_steps\?"),
    (["cli:", "sample.num_sample=3"], r"sample.num_sample is not a key of sample; did you mean sample.num_samples"),
    (["cli:", "sampler=banana"], r"sampler=banana is not an option; choose from: .*ddim"),
    (["cli:", "hydra.run.dir=/proc/hiresrun-bad-input"], r"cannot write the run folder /proc/hiresrun-bad-input"),
    (["cli:", "hydra.run.dir={tmp}/\u00e9t\u00e9"], r"Hydra's override grammar cannot read this value unquoted; "
                                                    r"quote it: hydra.run.dir='"),
]
FILES = {  # {tmp}/<name>: the bad files the cases above name
    "latin1.txt": "caf\u00e9 au lait\n".encode("latin-1"),
    "long.csv": ("prompt,seed\n" + "x" * 140_000 + ",1\n").encode(),
    "big-seed.jsonl": b'{"prompt": "a digit", "seed": 1099511627776}\n',
    "bool-seed.jsonl": b'{"prompt": "a digit", "seed": true}\n',
    "bad-calibration.json": b'{"key": [1, 2], "delta": "soon"}\n',
}
SEEN: dict[int, tuple[str, int, str]] = {}  # case index -> (the input as typed, exit code, the line)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def observe(i: int, model_dir: Path, imgs: Path, tmp_path: Path, capsys) -> tuple[str, int, str]:
    """Run case i the way the command line would; return (input, exit code, the one line)."""
    overrides, _ = CASES[i]
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    fill = lambda o: o.replace("{imgs}", str(imgs)).replace("{tmp}", str(tmp_path))
    task = "train" if "task=train" in overrides else "sample"
    shown = " ".join(o.replace("{imgs}", "<images>").replace("{tmp}", "<tmp>") for o in overrides
                     if o not in ("cli:", "task=train"))
    typed = f"hiresrun {task} {shown.replace('method=', '+method=', 1) if 'method=' in shown else shown}"
    if overrides[0] == "cli:":
        from hiresrun.cli import check_grammar, normalise, validate

        args = [fill(o) for o in overrides[1:]]
        given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
        with pytest.raises(UsageError) as refused:  # what cli.main prints after `hiresrun: error: `, exit 2
            args = normalise(["sample", *args])
            check_grammar(args)
            validate([a for a in args if not a.startswith("hydra.")], given[0] if given else None)
        assert "\n" not in str(refused.value)
        return typed, refused.value.exit_code, str(refused.value).replace(str(tmp_path), "<tmp>")
    run_dir = tmp_path / "run"
    cfg = compose(tiny_overrides(model_dir) + [fill(o) for o in overrides], run_dir)
    with pytest.raises((UsageError, InstantiationException)) as err:
        run.run(cfg)
    e = err.value
    while not isinstance(e, UsageError) and e.__cause__ is not None:  # Hydra wraps what constructors raise
        e = e.__cause__
    assert isinstance(e, UsageError), repr(err.value)
    assert not run_dir.exists(), f"{typed} left {sorted(run_dir.rglob('*'))}"
    line = str(e)
    assert "\n" not in line
    return typed, e.exit_code, line.replace(str(tmp_path), "<tmp>").replace(str(imgs), "<images>").replace(
        str(model_dir), "<model>")


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(i, tiny_model_dir, imgs, tmp_path, capsys):
    if "CUDA" in CASES[i][1] and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: trainer.accelerator=gpu is valid here")
    typed, code, line = observe(i, tiny_model_dir, imgs, tmp_path, capsys)
    assert code == 2 and re.search(CASES[i][1], line), line
    SEEN[i] = (typed, code, line)


def render(rows: list[tuple[str, int, str]]) -> str:
    cell = lambda s: s.replace("|", "\\|")
    body = "\n".join(f"| `{cell(t)}` | {c} | {cell(line)} |" for t, c, line in rows)
    return ("# Bad input: what hiresrun says\n\n"
            "Generated by `tests/test_bad_input.py` from its own cases (`HIRESRUN_WRITE_DOCS=1 .venv/bin/python -m "
            "pytest tests/test_bad_input.py` rewrites it; the suite fails when this file and the messages disagree). "
            "Each input below is refused before any work: one line on stderr (`hiresrun: error: ` + the line), "
            "exit code 2, no run folder. `<model>` is a local diffusers folder (a 16 px, 1-channel `UNet2DModel` "
            "here), `<images>` a folder of greyscale images, `<tmp>` any folder; the sample inputs are given with "
            f"`model=diffusers model.path=<model> data.resolution=16`.\n\n"
            f"{len(rows)} inputs.\n\n| input | exit | the line printed |\n|---|---|---|\n{body}\n")


def test_the_bad_input_table_in_docs_is_what_the_cases_print(tiny_model_dir, imgs, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the committed table is the CPU machine's (trainer.accelerator=gpu is valid with a GPU)")
    rows = []
    for i in range(len(CASES)):
        if i not in SEEN:
            SEEN[i] = observe(i, tiny_model_dir, imgs, tmp_path / str(i), capsys)
        rows.append(SEEN[i])
    text = render(rows)
    if os.environ.get("HIRESRUN_WRITE_DOCS") == "1":
        DOC.write_text(text)
    assert len(rows) >= 40 and DOC.read_text() == text, "docs/bad-input.md is stale: rerun with HIRESRUN_WRITE_DOCS=1"
