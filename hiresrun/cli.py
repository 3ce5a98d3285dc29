"""`hiresrun VERB [overrides]`: the verb becomes `task=VERB`, the rest is Hydra's own command line.

Errors speak to the user: one line, exit 2 for bad usage or config, 1 for runtime failures, and a
run folder that got nothing but Hydra's bookkeeping is removed. HYDRA_FULL_ERROR=1 shows tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hiresrun.errors import DataError, HiresrunError, UsageError
from hiresrun.naming import register as register_folder_names

register_folder_names()  # the resolvers conf/config.yaml's run and sweep folder names call

# The Hydra verbs: run.TASKS's names (tests/test_cli.py checks they agree), written out so that composing or refusing
# a command line imports nothing heavy (run.py imports torch).
VERBS = ("pretrain", "train", "sample", "eval", "calibrate", "merge")


# The commands that are not Hydra tasks, and the module whose main(argv) runs each: `list` the options and which pairs
# run on a model, `report` a finished sweep, `runs` the run folders under a folder.
READERS = {"list": "hiresrun.listing", "report": "hiresrun.report", "runs": "hiresrun.runs",
           "convert": "hiresrun.convert"}


def verbs() -> tuple[str, ...]:
    return VERBS


# `+method=x` is the documented form; the defaults list already holds method/accelerator, so Hydra
# wants the plain form. Both are accepted and mean the same.
ADDABLE = ("method", "accelerator")
EVAL_ALIASES = {"gen": "eval.gen", "ref": "eval.ref"}


def fail(message: str, code: int) -> None:
    print(f"hiresrun: error: {message}", file=sys.stderr)
    sys.exit(code)


# What `--help` lists as config groups: the user's choices, not the internal ones (schema/*, experiment/parts).
HELP_GROUPS = ("model", "method", "accelerator", "sampler", "data", "metrics", "trainer", "logger", "experiment",
               "hydra/launcher")


def help_text() -> str:
    """conf/hydra/help/hiresrun.yaml's template with the groups a user picks from and their options."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from hiresrun.listing import options

    template = OmegaConf.load(str(files("hiresrun.conf").joinpath("hydra", "help", "hiresrun.yaml"))).template
    conf = files("hiresrun.conf")
    lines = []
    for group in HELP_GROUPS:
        if group == "experiment":
            folder = conf.joinpath("experiment")
            names = sorted([f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml")]
                           + [f"{f.name}/*" for f in folder.iterdir() if f.is_dir() and f.name not in ("parts",
                                                                                                    "__pycache__")])
        elif group == "hydra/launcher":
            names = ["basic (default)", "submitit_local", "submitit_slurm",
                     *sorted(f.name[:-5] for f in conf.joinpath("hydra", "launcher").iterdir()
                             if f.name.endswith(".yaml"))]
        else:
            names = options(group)
        lines.append(f"{group}: {', '.join(names)}")
    return template.replace("$APP_CONFIG_GROUPS", "\n".join(f"  {line}" for line in lines))


# The top-level keys each verb reads: `hiresrun <verb> --cfg job` prints these and leaves out the rest.
VERB_KEYS = {
    "sample": ("task", "seed", "model", "method", "accelerator", "sampler", "data", "sample", "metrics", "reference",
               "prompts", "ckpt_path", "trainer", "logger", "paths"),
    "train": ("task", "seed", "model", "method", "sampler", "data", "train", "optimizer", "metrics", "prompts",
              "ckpt_path", "trainer", "logger", "paths"),
    "pretrain": ("task", "seed", "model", "sampler", "data", "train", "optimizer", "metrics", "ckpt_path", "trainer",
                 "logger", "paths"),
    "calibrate": ("task", "seed", "model", "method", "accelerator", "sampler", "data", "sample", "target",
                  "calibrate", "prompts", "ckpt_path", "trainer", "logger", "paths"),
    "eval": ("task", "seed", "model", "eval", "data", "metrics", "reference", "logger", "paths"),
    "merge": ("task", "seed", "model", "merge", "data", "metrics", "reference", "logger", "paths"),
}


def _cfg_job(args: list[str]) -> bool:
    """`hiresrun <verb> --cfg job [--resolve]`: the composed config of the keys that verb reads, printed as Hydra
    prints it; True when it printed. Other `--cfg` forms (hydra, all, --package) stay Hydra's."""
    if args.count("--cfg") + args.count("-c") != 1 or "--package" in args or "-p" in args:
        return False
    at = args.index("--cfg") if "--cfg" in args else args.index("-c")
    if args[at + 1:at + 2] != ["job"]:
        return False
    from hydra import initialize_config_module
    from omegaconf import OmegaConf, open_dict, read_write

    overrides = [a for i, a in enumerate(args) if not a.startswith("-") and i != at + 1]
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        cfg = compose(list_selection(overrides))
    keep = [k for k in VERB_KEYS.get(str(cfg.task), tuple(cfg)) if k in cfg]
    if "--resolve" in args:  # resolved in the whole config (keys refer across verbs), then cut
        from hydra.core.hydra_config import HydraConfig

        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.runtime.output_dir = "<the run folder>"
        HydraConfig.instance().set_config(cfg)
        cfg = OmegaConf.create({k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
                                else cfg[k] for k in keep})
    print(OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, keep)), end="")
    return True


def normalise(argv: list[str]) -> list[str]:
    """Verb -> `task=verb`; `+method=x` -> `method=x` (likewise accelerator)."""
    args = list(argv) or ["--help"]
    if not args[0].startswith("-") and "=" not in args[0]:
        verb = args.pop(0)
        if verb not in verbs():
            raise UsageError(f"unknown verb '{verb}'; use one of: {', '.join(verbs() + tuple(READERS))} "
                             f"(hiresrun --help)")
        args = verb_forms(verb, args) + [f"task={verb}"]
    return flags_first(list_selection([a[1:] if any(a.startswith(f"+{g}=") for g in ADDABLE) else a for a in args]))


def list_selection(args: list[str]) -> list[str]:
    """`accelerator=[a,b]` -> `accelerator=chain` plus a node per member (`+accelerator@accelerator.a=a`), so each
    member keeps its own knobs (`accelerator.a.delta=`) and nothing has to be told apart after Hydra composes; a list
    of one is that option (`none` adds nothing). A flat `accelerator.<knob>=` beside a list is refused with the
    member form."""
    out, members = [], []
    for a in args:
        listed = re.fullmatch(r"accelerator=\[([^\[\]]*)\]", a)
        if listed:
            names = [n.strip() for n in listed[1].split(",") if n.strip() and n.strip() != "none"] or ["none"]
            if len(set(names)) != len(names):
                raise UsageError(f"{a}: names an accelerator twice; list each once")
            if len(names) == 1:
                out.append(f"accelerator={names[0]}")
                continue
            members = names
            out += ["accelerator=chain", *(f"+accelerator@accelerator.{n}={n}" for n in names)]
        elif a.startswith("accelerator=") and "[" in a:
            raise UsageError(f"{a}: a sweep over accelerator lists is not supported; run one list per command "
                             f"(a sweep over its members' knobs works: accelerator.<member>.<knob>=a,b)")
        else:
            out.append(a)
    for a in out if members else []:
        key = a.lstrip("+~").partition("=")[0]
        if key.startswith("accelerator.") and key.split(".")[1] not in members:
            knob = key.split(".", 1)[1]
            raise UsageError(f"{a}: with accelerator=[{','.join(members)}] each member has its own node; set "
                             f"accelerator.<member>.{knob}=..., e.g. accelerator.{members[0]}.{knob}")
    return out


def verb_forms(verb: str, args: list[str]) -> list[str]:
    """A verb's short forms spelled out: eval's `gen=`, `ref=`, `task=ref`; merge's `gen=`."""
    if verb == "eval":  # clean-fid-like short forms
        return [eval_short_form(a) for a in args]
    if verb == "merge":
        return [f"merge.{a}" if a.startswith("gen=") else a for a in args]
    return list(args)


VALUED = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
          "--experimental-rerun"}
INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def eval_short_form(arg: str) -> str:
    """`gen=x` -> `eval.gen=x`, `ref=x` -> `eval.ref=x`, `task=ref` -> `eval.mode=ref`; anything else as given."""
    key, eq, value = arg.partition("=")
    if arg == "task=ref":
        return "eval.mode=ref"
    return f"{EVAL_ALIASES[key]}{eq}{value}" if key in EVAL_ALIASES else arg


def flags_first(args: list[str]) -> list[str]:
    """Hydra's parser wants its flags (with their values) before the overrides: `sample x=1 --cfg job` works."""
    flags, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        takes = a in VALUED or (a in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO)
        if a.startswith("-"):
            flags += args[i:i + 1 + takes]
            i += 1 + takes
        else:
            rest.append(a)
            i += 1
    return flags + rest


def validate(overrides: list[str], run_dir: str | None = None) -> None:
    """Compose once before Hydra runs, to turn composition errors, and values the config alone shows are wrong, into
    one line (UsageError, exit 2)."""
    from hydra import initialize_config_module

    from hiresrun.validate import check_plain_values

    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        cfg = compose(overrides)
    check_plain_values(cfg)  # a count, seed or rate that cannot work: refused before torch is imported
    check_run_dir(run_dir or str(cfg.hydra.run.dir))


def compose(overrides: list[str]) -> DictConfig:
    """The config these overrides make, with Hydra's node (inside an initialised config module); a composition error
    is a UsageError whose message is the one line: an unknown key with the keys there, an option not in its group."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException, MissingConfigException

    try:
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        raise UsageError(_missing_option(e, overrides)) from None
    except (HydraException, ValueError) as e:
        raise UsageError(_unknown_key(e, overrides) or str(e).strip().splitlines()[0]) from None


def _unknown_key(e: Exception, overrides: list[str]) -> str | None:
    """`sampler.num_step=10` -> one line naming the keys that exist there, closest first."""
    import difflib

    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    m = re.search(r"Could not override '([^']+)'", str(e))
    if not m:
        return None
    key = m[1]
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        if GlobalHydra.instance().is_initialized():  # called from `compose`, inside the config module
            node = hydra_compose("config", overrides=rest)
        else:
            with initialize_config_module("hiresrun.conf", version_base="1.3"):
                node = hydra_compose("config", overrides=rest)
        for part in parent.split(".") if parent else []:
            node = node[part]
        keys = sorted(str(k) for k in node.keys())
    except Exception:  # the rest does not compose either: Hydra's own first line
        return None
    close = difflib.get_close_matches(leaf, keys, n=3, cutoff=0.5)
    where = parent or "the top level"
    prefix = f"{parent}." if parent else ""
    hint = f"did you mean {', '.join(prefix + k for k in close)}? " if close else ""
    return (f"{key} is not a key of {where}; {hint}keys there: {', '.join(keys)} "
            f"(+{key}=... adds a new key)")


def check_run_dir(run_dir: str) -> None:
    """The run folder must be creatable and writable before any work starts (one line, exit 2, not a traceback)."""
    import tempfile

    folder = Path(run_dir).absolute()
    made = [d for d in [folder, *folder.parents] if not d.exists()]  # what this check creates, leaf first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"cannot write the run folder {run_dir}: {e.strerror or e}; pick a writable place with "
                         f"hydra.run.dir=<folder> or HIRESRUN_OUTPUTS=<folder>") from None
    finally:
        for d in made:  # leave nothing behind: Hydra makes the folder itself when the run starts
            with contextlib.suppress(OSError):
                d.rmdir()


def _missing_option(e, overrides: list[str]) -> str:
    text = str(e)
    for o in overrides:
        group, _, option = o.lstrip("+~").partition("=")
        if f"'{group}/{option}'" in text:
            choices = ", ".join(e.options or []) if getattr(e, "options", None) else "see hiresrun --help"
            return f"{group}={option} is not an option; choose from: {choices}"
    return text.strip().splitlines()[0]


def check_grammar(args: list[str]) -> None:
    """Each `key=value` must parse in Hydra's override grammar; a value it cannot read unquoted (a non-ASCII path,
    say) is one line showing the quoted form, not the lexer's four."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for i, arg in enumerate(args):
        if "=" not in arg or arg.startswith("-") or (i and args[i - 1] in VALUED):
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            key, _, value = arg.partition("=")
            raise UsageError(f"{arg}: Hydra's override grammar cannot read this value unquoted; quote it: "
                             f"{key}='{value}'") from None


def plain_overrides(args: list[str]) -> list[str] | None:
    """The overrides when the command line is a plain run (no sweep or Hydra flag), else None."""
    if any(a.startswith("-") for a in args):
        return None
    if any(a.startswith(("hydra.", "hydra/")) for a in args):
        return [a for a in args if not a.startswith(("hydra.", "hydra/"))]
    return args


def _clean_failed_run() -> None:
    """Remove this run's folder if it holds nothing but Hydra's bookkeeping (nothing half-written)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.RUN":
        return
    folder = Path(hc.runtime.output_dir)
    if folder.is_dir() and all(p.name in (".hydra", f"{hc.job.name}.log") for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


@hydra.main(config_path="pkg://hiresrun.conf", config_name="config", version_base="1.3")
def _entry(cfg: DictConfig):
    from hiresrun import run

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return run.run(cfg)
    try:
        return run.run(cfg)
    except Exception as e:
        ours = _our_error(e)
        if isinstance(ours, UsageError):
            _clean_failed_run()
            fail(str(ours), 2)
        import logging  # runtime failure: one line here; the run folder's log has the traceback

        logging.getLogger("hiresrun.traceback").exception("failed")
        text = str(ours) if ours else f"{as_error(e)} (HYDRA_FULL_ERROR=1 shows the traceback)"
        fail(text.replace("\n", " "), getattr(ours, "exit_code", 1))


def as_error(e: BaseException) -> HiresrunError:
    """hiresrun's own error behind `e`, else a DataError whose one line names the root failure (Hydra's
    InstantiationException wraps the real one): what the command line prints and the Python API raises."""
    ours = _our_error(e)
    if ours is not None:
        return ours
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return DataError(f"{type(root).__name__}: {root}".replace("\n", " "))


def _our_error(e: BaseException) -> BaseException | None:
    """hiresrun's own error behind `e`, if any (Hydra's instantiate wraps what constructors raise)."""
    while e is not None:
        if isinstance(e, (UsageError, DataError)):
            return e
        e = e.__cause__
    return None


def _completion_without_verb() -> None:
    """Hydra's shell completion reads the typed line from COMP_LINE; drop our verb so it sees overrides only."""
    words = os.environ.get("COMP_LINE", "").split(" ")
    if len(words) > 1 and words[1] in verbs():
        cut = len(words[1]) + 1
        os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:])
        os.environ["COMP_POINT"] = str(max(0, int(os.environ.get("COMP_POINT", "0")) - cut))


def _quiet_known_warnings() -> None:
    """Third-party deprecation notices that say nothing to a hiresrun user (they fill every run's console)."""
    import warnings

    # the frozen base is in eval mode on purpose (methods train only what they add): Lightning's count says nothing
    for text in (".*isinstance\\(treespec, LeafSpec\\).*", ".*set_vital.*", ".*does not have many workers.*",
                 ".*module\\(s\\) in eval mode at the start of training.*"):
        warnings.filterwarnings("ignore", message=text)


def main() -> None:
    _quiet_known_warnings()
    import logging  # a full disk fails every log write: the one error line says so, not a traceback per record

    logging.raiseExceptions = False
    if sys.argv[1:2] and sys.argv[1] in READERS:  # not Hydra tasks: they read options or finished runs
        from importlib import import_module

        try:
            sys.exit(import_module(READERS[sys.argv[1]]).main(sys.argv[2:]))
        except UsageError as e:
            fail(str(e), 2)
    if "-sc" in sys.argv or "--shell-completion" in sys.argv:
        _completion_without_verb()
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        args = normalise(sys.argv[1:])
        if _cfg_job(args):
            sys.exit(0)
        check_grammar(args)
        overrides = plain_overrides(args)
        if overrides is not None:
            given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
            validate(overrides, given[-1] if given else None)
    except UsageError as e:
        fail(str(e), 2)
    sys.argv = [sys.argv[0], *args]
    _entry()


if __name__ == "__main__":
    main()
