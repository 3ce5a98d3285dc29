"""The command line as a user meets it: verbs, Hydra flags, run folders, and one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import cli
from PIL import Image


def one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("hiresrun: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_help_lists_verbs_and_groups(tmp_path):
    out = cli("--help", cwd=tmp_path).stdout
    for word in ("pretrain", "train", "sample", "eval", "merge", "trainer: cpu, ddp, gpu"):
        assert word in out
    samplers = next(line for line in out.splitlines() if line.strip().startswith("sampler:"))
    for name in ("ddim", "ddpm", "dpmsolver", "euler", "heun", "unipc", "edm_heun", "edm_euler", "edm_dpmsolver"):
        assert name in samplers.split(":", 1)[1].replace(",", " ").split()
    methods = next(line for line in out.splitlines() if line.strip().startswith("method:"))
    for name in ("finetune", "none", "selfcascade", "simple", "upsample"):  # others may join the list
        assert name in methods.split(":", 1)[1].replace(",", " ").split()


def test_help_shows_the_groups_a_user_picks_from_and_no_internal_one(tmp_path):
    from hiresrun.cli import help_text
    from hiresrun.listing import options

    out = help_text()
    assert "schema" not in out and "parts" not in out and "$APP_CONFIG_GROUPS" not in out
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in out.splitlines()
             if line.startswith("  ") and ":" in line and line.split(":", 1)[0].strip().replace("/", "").isalpha()}
    for group in ("model", "method", "accelerator", "sampler", "data", "metrics", "trainer", "logger"):
        assert lines[group].replace(",", " ").split() == options(group), group
    assert "runs" in out and "hydra/launcher" in lines


def test_cfg_job_of_a_verb_prints_only_the_keys_that_verb_reads(tmp_path):
    from hydra import initialize_config_module

    from hiresrun import cli as command_line

    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        for verb, keys in command_line.VERB_KEYS.items():
            composed = command_line.compose([f"task={verb}"])
            assert set(keys) <= set(composed) - {"hydra"}, verb  # every key named is a key of the config
    train = cli("train", "+method=finetune", "--cfg", "job", cwd=tmp_path).stdout
    sample = cli("sample", "+method=upsample", "--cfg", "job", "--resolve", "data.resolution=32", cwd=tmp_path).stdout
    top = lambda text: {line.split(":")[0] for line in text.splitlines() if line and not line[0].isspace()}  # noqa
    assert top(train) == set(command_line.VERB_KEYS["train"]) and "optimizer" in top(train)
    assert top(sample) == set(command_line.VERB_KEYS["sample"]) and not top(sample) & {"train", "optimizer", "target"}
    assert "  resolution: 32" in sample  # --resolve resolves


def test_the_verbs_are_the_task_table_and_help_or_a_refused_key_imports_no_torch(tmp_path):
    """cli.VERBS is run.TASKS's list (written out so the command line composes without importing run.py), and
    `--help` or a mistyped key never imports torch, Lightning or diffusers (hiresrun/schema.py reads the constructors'
    defaults from their source)."""
    import subprocess
    import sys

    from hiresrun import cli as command_line
    from hiresrun import run

    assert command_line.VERBS == tuple(run.TASKS)
    for argv in (["--help"], ["sample", "sampler.num_step=3"], ["sample", "+method=selfcascades"]):
        script = (f"import sys; sys.argv = ['hiresrun', *{argv!r}]\nfrom hiresrun.cli import main\ntry:\n    main()\n"
                  f"except SystemExit as e:\n    code = e.code\nprint(code, sorted(m for m in ('torch', 'lightning', "
                  f"'diffusers') if m in sys.modules))")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().splitlines()[-1] == f"{0 if argv == ['--help'] else 2} []", (argv, done.stderr)


def test_cfg_job_prints_the_composed_config_and_plus_method_equals_method(tmp_path):
    plus = cli("sample", "+method=upsample", "--cfg", "job", cwd=tmp_path)
    plain = cli("sample", "method=upsample", "--cfg", "job", cwd=tmp_path)
    assert plus.returncode == 0 and "hiresrun.methods.upsample.Upsample" in plus.stdout
    assert plus.stdout == plain.stdout
    assert "task: sample" in plus.stdout


def test_sample_writes_the_run_folder(tiny_model_dir, tmp_path):
    proc = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=16",
               "sampler.num_steps=2", "sample.seeds=[3,7,11]", "logger=csv", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["000003.png", "000007.png", "000011.png"]
    assert Image.open(run / "samples" / "000007.png").size == (16, 16)
    assert (run / "grid.png").is_file() and (run / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 3 and metrics["resolution"] == 16 and metrics["nfe_per_image"] == 2
    assert metrics["sec_per_image"] > 0 and metrics["protocol"]["seeds"] == "3,7,11"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and manifest["model"]["weights_sha256"]
    assert manifest["command"].startswith("hiresrun sample ") and "sample.seeds=[3,7,11]" in manifest["command"]
    assert not list(run.glob("*.tmp"))


def test_unknown_group_option_is_one_line_exit_2(tmp_path):
    proc = cli("sample", "sampler=nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert "sampler=nope is not an option; choose from: ddim, ddpm, dpmsolver" in one_error_line(proc)
    assert not (tmp_path / "outputs").exists()


def test_unknown_verb_and_unknown_key(tmp_path):
    proc = cli("smaple", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown verb 'smaple'" in one_error_line(proc)
    proc = cli("sample", "sample.nmu_samples=3", cwd=tmp_path)
    assert proc.returncode == 2 and "nmu_samples" in one_error_line(proc)


def test_resolution_the_unet_cannot_take(tiny_model_dir, tmp_path):
    proc = cli("sample", "model=diffusers", f"model.path={tiny_model_dir}", "data.resolution=15", "logger=none",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.resolution=15 is not divisible by 2" in one_error_line(proc)
    assert not list((tmp_path / "outputs").rglob("*.json"))
    assert not list((tmp_path / "outputs").rglob(".hydra"))  # nothing half-written is left behind


def test_missing_model_path(tmp_path):
    proc = cli("sample", "model=diffusers", f"model.path={tmp_path}/no-such-model", "logger=none", cwd=tmp_path,
               env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "no-such-model" in one_error_line(proc)


def test_train_without_a_method(tiny_model_dir, tmp_path):
    proc = cli("train", "model=diffusers", f"model.path={tiny_model_dir}", "logger=none", cwd=tmp_path)
    assert proc.returncode == 2 and "+method=" in one_error_line(proc)


def test_a_broken_model_config_is_one_line_and_full_error_shows_traceback(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{ not json")
    proc = cli("sample", "model=diffusers", f"model.path={tmp_path}/broken", "logger=none", cwd=tmp_path)
    assert proc.returncode == 2 and one_error_line(proc)  # read before any work: the folder given is broken
    assert "config.json: not valid JSON" in proc.stderr
    proc = cli("sample", "model=diffusers", f"model.path={tmp_path}/broken", "logger=none", cwd=tmp_path,
               env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr  # the exception itself, as Python ends on it


@pytest.mark.slow  # a -m sweep of +method/+accelerator runs fast in tests/test_matrix.py (refused_alone...)
def test_multirun_sweeps_plus_method(tiny_model_dir, tmp_path):
    proc = cli("sample", "-m", "+method=none,upsample", "model=diffusers", f"model.path={tiny_model_dir}",
               "data.resolution=16", "sampler.num_steps=2", "sample.num_samples=2", "logger=none",
               "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0-method=none", "1-method=upsample"]  # job number, then the overrides the sweep varies
    methods = sorted(json.loads((tmp_path / "sweep" / j / "metrics.json").read_text())["method"] for j in jobs)
    assert methods == ["none", "upsample"]


def test_tab_completion_sees_past_the_verb(tmp_path):
    line = "hiresrun sample sampler="
    proc = cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert "sampler=dpmsolver" in proc.stdout.split()


def test_eval_short_forms_become_eval_keys():
    from hiresrun.cli import normalise

    args = normalise(["eval", "gen=out/samples", "ref=real/", "task=ref", "reference=run"])
    assert args == ["eval.gen=out/samples", "eval.ref=real/", "eval.mode=ref", "reference=run", "task=eval"]
    # other verbs leave them alone (there they would be unknown keys, reported as such)
    assert normalise(["sample", "gen=x"]) == ["gen=x", "task=sample"]
