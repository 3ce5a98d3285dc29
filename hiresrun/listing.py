"""`hiresrun list`: what there is to choose, each option with the line its YAML opens with; `hiresrun list
model=<m> [overrides]`: every method x accelerator pair on that model, supported or refused and why, from the `Support`
declarations (hiresrun/support.py) and the model's config files: what `hiresrun sample` would say before any work.
Not a Hydra task: it composes a config per pair and builds nothing."""

from __future__ import annotations

from importlib.resources import files

from hiresrun.errors import UsageError

GROUPS = ("model", "method", "accelerator", "sampler", "data", "metrics", "trainer", "logger")
NOT_ALONE = {("accelerator", "chain")}  # a list's node (+accelerator=[a,b]), not an option of its own


def describe_option(group: str, name: str, width: int = 100) -> str:
    """The first sentence of the comment conf/<group>/<name>.yaml opens with, cut at `width` characters."""
    text = files("hiresrun.conf").joinpath(group, f"{name}.yaml").read_text()
    lead = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lead.append(line[1:].strip())
    said = " ".join(lead)
    end = said.find(". ")
    said = said[:end + 1] if end >= 0 else said
    return said if len(said) <= width else said[:width - 3].rstrip() + "..."


def options(group: str) -> list[str]:
    folder = files("hiresrun.conf").joinpath(group)
    return sorted(f.name[:-len(".yaml")] for f in folder.iterdir()
                  if f.name.endswith(".yaml") and (group, f.name[:-len(".yaml")]) not in NOT_ALONE)


def catalogue() -> str:
    """Every group's options, one line each, with what the option is."""
    lines = []
    for group in GROUPS:
        lines.append(f"{group}:")
        names = options(group)
        width = max(map(len, names))
        lines += [f"  {name:<{width}}  {describe_option(group, name)}" for name in names]
    lines.append("lists: +accelerator=[adaptive,deepcache] (one node per member: accelerator.adaptive.delta=...)")
    return "\n".join(lines)


def pairs(overrides: list[str]) -> list[tuple[str, str, str | None]]:
    """(method, accelerator, None | the refusal) for every pair on the model the overrides pick."""
    from hydra import compose, initialize_config_module
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from hiresrun import cli, support

    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        cfg = cli.compose([o for o in overrides if not o.startswith(("method=", "accelerator="))])
        nodes = {(g, n): compose("config", overrides=[*overrides, f"{g}={n}"])[g]
                 for g in ("method", "accelerator") for n in options(g)}
    if OmegaConf.is_missing(cfg.model, "path"):
        chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "?")
        raise UsageError(f"hiresrun list model={chosen}: this model option needs model.path=<folder or hub id>")
    unet, space, text, edm = support.model_facts(cfg.model)
    out = []
    for method in options("method"):
        node = nodes[("method", method)]
        m = get_class(node._target_).declared(node)
        for accelerator in options("accelerator"):
            part = nodes[("accelerator", accelerator)]
            a = get_class(part._target_).declared(part)
            out.append((method, accelerator, support.refusal(method, m, accelerator, a, f"model.path={cfg.model.path}",
                                                              unet, space, text, edm)))
    return out


# The support table's order (any other option follows, sorted), its rows besides the named model options
# (model=diffusers facts no option file states), and the method settings tried where a method's defaults are refused.
ORDER = ["tiny-mnist", "tiny-sd-mnist", "tiny-flux-mnist", "sd15", "sd21", "sdxl", "dit", "sd3", "sd35", "flux-dev",
         "flux-schnell", "none", "upsample", "attnsf", "scalecrafter", "demofusion", "hidiffusion", "finetune", "lora",
         "selfcascade", "simple", "pagoda"]
EXTRA_ROWS = {"EDM UNet: `diffusers`, `model.parametrization=edm`": ("UNet2DModel", "pixel", False, True)}
VARIANTS = {"selfcascade": ("method.mode=tuning_free", "tuning-free")}


def _ordered(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def support_table() -> str:
    """Models x methods, each cell the accelerators that run with that pair (markdown), from the `Support`
    declarations and the model option files: README's table, which tests/test_docs.py regenerates."""
    from hydra import compose, initialize_config_module
    from hydra.utils import get_class

    from hiresrun import support

    methods = _ordered(options("method"))
    accelerators = [a for a in _ordered(options("accelerator")) if a != "none"]
    with initialize_config_module("hiresrun.conf", version_base="1.3"):
        nodes = {(g, n): compose("config", overrides=[f"{g}={n}"])[g] for g in ("method", "accelerator")
                 for n in options(g)}
        nodes.update({("variant", m): compose("config", overrides=[f"method={m}", v[0]]).method
                      for m, v in VARIANTS.items() if m in methods})
        rows = {f"`{m}`": support.model_facts(compose("config", overrides=[f"model={m}"]).model)
                for m in _ordered(options("model")) if m != "diffusers"}
    rows.update(EXTRA_ROWS)
    declared = {key: get_class(node._target_).declared(node) for key, node in nodes.items()}

    def cell(method, m, facts):
        def runs(accelerator):
            a = declared[("accelerator", accelerator)]
            return support.refusal(method, m, accelerator, a, "", *facts) is None
        if not runs("none"):
            return None
        ok = [a for a in accelerators if runs(a)]
        if len(ok) == len(accelerators):
            return "all"
        off = [a for a in accelerators if a not in ok]
        if not ok:
            return "no accelerator"
        return ("+ " + ", ".join(ok)) if len(ok) <= len(off) else "all but " + ", ".join(off)

    lines = ["| model | " + " | ".join(f"`{m}`" for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for label, facts in rows.items():
        cells = []
        for method in methods:
            said = cell(method, declared[("method", method)], facts)
            if said is None and ("variant", method) in declared:
                said = cell(method, declared[("variant", method)], facts)
                said = f"{VARIANTS[method][1]}: {said}" if said else None
            cells.append(said or "refused")
        unet, space, text, _ = facts
        lines.append(f"| {label} ({space} {unet}{', text' if text else ''}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from hiresrun import cli

    if argv in (["--help"], ["-h"]):
        print(__doc__.split("\n\n")[0])
        return 0
    if not argv:
        print(catalogue())
        return 0
    given = cli.list_selection([a[1:] if a.startswith("+") else a for a in argv])
    cli.check_grammar(given)
    if not any(a.startswith("model=") or a.startswith("model.path=") for a in given):
        raise UsageError("hiresrun list takes model=<option> [model.path=<folder>] (or nothing, for every option)")
    rows = pairs(given)
    width = max(len(f"{m} + {a}") for m, a, _ in rows)
    for method, accelerator, reason in rows:
        verdict = "supported" if reason is None else "refused: " + reason.split(" is not supported: ", 1)[-1]
        print(f"{method + ' + ' + accelerator:<{width}}  {verdict}")
    ran = sum(r is None for _, _, r in rows)
    print(f"{ran} of {len(rows)} pairs are supported on this model (a method that trains samples with ckpt_path=); "
          f"`hiresrun sample` refuses the others before any work")
    return 0
