"""`hiresrun convert` (hiresrun/convert.py): each conversion reproduces the outputs the authors' own modules gave
(tests/fixtures/convert/, written by scripts/convert_fixtures.py from guided-diffusion's UNetModel and EDM's
EDMPrecond + DhariwalUNet with seeded weights), the converted folders sample end to end, and bad files are one line:
an unknown architecture, a truncated file, a pickle that asks for anything else, an existing folder."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import hiresrun
from hiresrun import convert, edm

sys.path.insert(0, str(Path(__file__).parent))
from convert_weights import nvlabs_pickle, synthetic  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "convert"
ADM_FLAGS = {"adm-new-updown-class": ["--head-channels", "16", "--attention-order", "new"],
             "adm-legacy-conv-uncond": ["--num-heads", "2", "--attention-order", "legacy"]}


def fixture(name: str) -> tuple[dict, dict]:
    return (json.loads((FIXTURES / f"{name}.json").read_text()),
            torch.load(FIXTURES / f"{name}.pt", weights_only=True))


def adm_file(name: str, folder: Path) -> Path:
    spec, _ = fixture(name)
    path = folder / f"{name}.pt"
    torch.save(synthetic(spec["layout"], spec["seed"]), path)
    return path


def edm_file(folder: Path, extra: dict | None = None) -> Path:
    spec, _ = fixture("edm-dhariwal")
    path = folder / "edm.pkl"
    path.write_bytes(nvlabs_pickle(spec["tree"], synthetic(spec["layout"], spec["seed"]), extra))
    return path


def converted(folder: Path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(folder / "unet").eval()


@pytest.mark.parametrize("name", sorted(ADM_FLAGS))
def test_an_adm_state_dict_converts_to_the_authors_outputs(name, tmp_path):
    src = adm_file(name, tmp_path)
    assert convert.main(["adm", str(src), str(tmp_path / "out"), "--image-size", "16", *ADM_FLAGS[name]]) == 0
    _, io = fixture(name)
    with torch.no_grad():
        out = converted(tmp_path / "out")(io["x"], io["t"], class_labels=io["y"]).sample
    assert out.shape == io["out"].shape
    assert torch.allclose(out, io["out"], atol=1e-4), (out - io["out"]).abs().max()
    facts = json.loads((tmp_path / "out" / "hiresrun.json").read_text())
    assert facts["learned_variance"] == (io["out"].shape[1] == 6) and facts["parametrization"] == "standard"


def test_an_nvlabs_edm_pickle_converts_to_the_authors_denoiser(tmp_path):
    src = edm_file(tmp_path)
    assert convert.main(["edm", str(src), str(tmp_path / "out")]) == 0
    _, io = fixture("edm-dhariwal")
    sigma = io["sigma"].reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = edm.coefficients(sigma, 0.5)
    with torch.no_grad():
        F_x = converted(tmp_path / "out")(c_in * io["x"], c_noise.flatten(), class_labels=io["labels"]).sample
    assert torch.allclose(F_x, io["F"], atol=1e-4)
    assert torch.allclose(c_skip * io["x"] + c_out * F_x, io["denoised"], atol=1e-4)  # EDM's D(x; sigma)
    facts = json.loads((tmp_path / "out" / "hiresrun.json").read_text())
    assert facts["parametrization"] == "edm" and facts["sigma_data"] == 0.5 and facts["conditioning"] == "class"


def test_converted_folders_sample_and_say_how_they_must_be_read(tmp_path):
    assert convert.main(["edm", str(edm_file(tmp_path)), str(tmp_path / "edm")]) == 0
    images = hiresrun.load("model=diffusers", f"model.path={tmp_path / 'edm'}", "model.parametrization=edm",
                           "sampler=edm_heun", sampler__num_steps=3, data__resolution=16)([0, 1])
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(hiresrun.HiresrunError, match="hiresrun.json says the network is EDM's F .*set "
                                                     "model.parametrization=edm"):
        hiresrun.load("model=diffusers", f"model.path={tmp_path / 'edm'}", data__resolution=16)
    src = adm_file("adm-new-updown-class", tmp_path)  # learned variance: the sampler reads the eps half
    assert convert.main(["adm", str(src), str(tmp_path / "adm"), "--image-size", "16",
                         *ADM_FLAGS["adm-new-updown-class"]]) == 0
    images = hiresrun.load("model=diffusers", f"model.path={tmp_path / 'adm'}", sampler__num_steps=3,
                           data__resolution=16)([0])
    assert images.shape == (1, 3, 16, 16)


def test_the_consistency_models_teacher_reads_a_thousand_times_c_noise(tmp_path):
    """--time edm-1000: the converted network called with t = c_noise is the original called with 1000 c_noise."""
    src = adm_file("adm-new-updown-class", tmp_path)
    assert convert.main(["adm", str(src), str(tmp_path / "out"), "--image-size", "16", "--time", "edm-1000",
                         *ADM_FLAGS["adm-new-updown-class"]]) == 0
    base = hiresrun.load("model=diffusers", f"model.path={tmp_path / 'out'}", "model.parametrization=edm",
                         "sampler=edm_heun", data__resolution=16).method.base
    _, io = fixture("adm-new-updown-class")
    with torch.no_grad():
        out = base.unet(io["x"], io["t"] / 1000, class_labels=io["y"]).sample
    assert torch.allclose(out, io["out"], atol=1e-3)


class _Hostile:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def test_a_pickle_that_asks_for_other_code_is_refused_and_nothing_runs(tmp_path, capsys):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Hostile()}))
    os.chdir(tmp_path)
    assert convert.main(["edm", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresrun: error: ") and "\n" not in err
    assert "asks for posix.system" in err and not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, says", [
    ("truncated", "is not a readable network pickle"),
    ("ddpmpp", "only DhariwalUNet"),
    ("edm2", "is an EDM2 network"),
])
def test_bad_pickles_are_one_line(case, says, tmp_path, capsys):
    spec, _ = fixture("edm-dhariwal")
    if case == "truncated":
        data = edm_file(tmp_path).read_bytes()
        (tmp_path / "bad.pkl").write_bytes(data[: len(data) // 2])
    else:
        tree = json.loads(json.dumps(spec["tree"]))
        if case == "ddpmpp":
            tree["children"]["model"]["class"] = "SongUNet"
        else:
            tree["class"] = "Precond"
        (tmp_path / "bad.pkl").write_bytes(nvlabs_pickle(tree, synthetic(spec["layout"], spec["seed"])))
    assert convert.main(["edm", str(tmp_path / "bad.pkl"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresrun: error: ") and "\n" not in err and says in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_unknown_architecture_and_a_truncated_state_dict_are_one_line(tmp_path, capsys):
    from diffusers import UNet2DModel

    other = UNet2DModel(block_out_channels=(32, 32), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                        up_block_types=("UpBlock2D",) * 2)
    torch.save(other.state_dict(), tmp_path / "diffusers.pt")
    assert convert.main(["adm", str(tmp_path / "diffusers.pt"), str(tmp_path / "a"), "--preset",
                         "adm-imagenet64"]) == 2
    assert "is not an ADM UNetModel state dict" in capsys.readouterr().err
    data = adm_file("adm-legacy-conv-uncond", tmp_path).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    assert convert.main(["adm", str(tmp_path / "cut.pt"), str(tmp_path / "b"), "--preset", "adm-imagenet64"]) == 2
    assert "is not a readable torch state dict" in capsys.readouterr().err
    src = adm_file("adm-legacy-conv-uncond", tmp_path)
    assert convert.main(["adm", str(src), str(tmp_path / "c"), "--image-size", "16", "--attention-order", "new"]) == 2
    assert "--head-channels" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_an_existing_folder_is_kept_unless_forced(tmp_path, capsys):
    src = edm_file(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert convert.main(["edm", str(src), str(tmp_path / "out")]) == 2
    assert "exists; choose a new folder or pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert convert.main(["edm", str(src), str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "unet" / "config.json").is_file() and not (tmp_path / "out" / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm.pkl", "out"]  # no temporary folder left


def test_the_command_line_prints_how_to_sample(tmp_path, capsys):
    src = edm_file(tmp_path)
    assert convert.main(["edm", str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"model.path={tmp_path / 'out'} model.conditioning=class model.parametrization=edm" in out
    from hiresrun import cli

    assert cli.READERS["convert"] == "hiresrun.convert"  # `hiresrun convert ...` reaches this main
