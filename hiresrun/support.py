"""What each method and accelerator works with, and the refusal of a pairing that cannot work.

Every method and accelerator class carries `supports = Support(...)`; `check(cfg)` compares the chosen pair with
each other and with the model (read from its config files, before any weights load) and raises `Unsupported`:
one line naming both and the reason. Whether a method needs trained weights stays the instance's `trains`
(Self-Cascade's `mode` decides it), checked where the method is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from hiresrun.errors import Unsupported

PIXEL_AND_LATENT = ("pixel", "latent")
ANY_UNET = ("UNet2DModel", "UNet2DConditionModel")
TRANSFORMERS = ("DiTTransformer2DModel", "Transformer2DModel")  # models.TRANSFORMERS
FLOW_TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")  # flow.FLOW_TRANSFORMERS
ANY_DENOISER = ANY_UNET + TRANSFORMERS + FLOW_TRANSFORMERS
# An accelerator list (`+accelerator=[adaptive,deepcache]`) applies its members outermost first in this order: which
# steps call the model at all, which blocks run inside a call, how the running blocks compute. Two members compose
# when they declare different levels; one level holds at most one member.
LEVELS = {"steps": "which steps call the model", "blocks": "which blocks run inside a call",
          "features": "what the running blocks compute"}


@dataclass(frozen=True)
class Support:
    """The declaration: the models it works with, and the one fact about sampling that pairs can clash on."""

    spaces: tuple[str, ...] = PIXEL_AND_LATENT    # sample spaces: pixel models, latent (VAE) models
    unets: tuple[str, ...] = ANY_DENOISER         # diffusers denoiser classes it can drive (UNets, DiT transformers)
    one_step: bool = False                        # method: samples with one network evaluation, no step loop
    needs_steps: bool = False                     # accelerator: acts between sampler steps (nothing to do in one)
    level: str = ""                               # accelerator: what it decides (LEVELS); "" composes with nothing
    text: bool = True                             # works with text-to-image bases (prompts, guidance)
    edm: bool = True                              # works with EDM-preconditioned bases (model.parametrization=edm)
    flow: bool = False                            # works with flow-matching transformers (SD3, FLUX: hiresrun/flow.py)
    why: str = ""                                 # the code behind a restriction, shown in the refusal
    why_text: str = ""                            # the code behind text=False
    why_edm: str = ""                             # the code behind edm=False
    why_flow: str = ""                            # the code behind flow=False (where the denoiser check passes)
    sub_batches: bool = False                     # accelerator: calls the model on a subset of a batch's images
    whole_batches: bool = False                   # accelerator: keeps state per whole batch (a feature cache)
    views: bool = False                           # method: calls the model several times per step (DemoFusion's
                                                  # views, ScaleCrafter's damped guidance)


def refusal(method: str, m: Support, accelerator: str | None, a: Support, model: str,
            unet: str | None = None, space: str | None = None, text: bool | None = None,
            edm: bool = False) -> str | None:
    """The reason (method, accelerator) cannot run on this model, or None. Unknown model facts (None) pass;
    accelerator None: the method alone (`hiresrun train`)."""
    pair = f"method={method}{f' with accelerator={accelerator}' if accelerator else ''} is not supported"
    if m.one_step and a.needs_steps:
        return (f"{pair}: accelerator={accelerator} acts between sampler steps ({a.why}) and method={method} samples "
                f"with one network evaluation; use accelerator=none or skiptuning")
    if m.views and a.level in ("steps", "blocks"):
        return (f"{pair}: method={method} calls the model several times per sampler step (views of the image, extra "
                f"guidance passes) and accelerator={accelerator} keeps state from one call to the next ({a.why}); use "
                f"an accelerator that changes what the blocks compute (freeu, skiptuning, tome) or accelerator=none")
    for kind, name, s in (("method", method, m), ("accelerator", accelerator, a))[:2 if accelerator else 1]:
        if edm and not s.edm:
            return (f"{pair}: {kind}={name} does not drive EDM-preconditioned networks ({s.why_edm}); {model} has "
                    f"model.parametrization=edm")
        if text and not s.text:
            return (f"{pair}: {kind}={name} does not take text conditioning ({s.why_text}); {model} is a "
                    f"text-to-image model")
        if space is not None and space not in s.spaces:
            return f"{pair}: {kind}={name} works on {' and '.join(s.spaces)} models only ({s.why}); {model} is {space}"
        if unet is not None and unet not in s.unets:
            return f"{pair}: {kind}={name} needs a {' or '.join(s.unets)} ({s.why}); {model} has a {unet}"
        if unet in FLOW_TRANSFORMERS and not s.flow:
            why = s.why_flow or "it is not built for them"
            return (f"{pair}: {kind}={name} does not drive flow-matching transformers ({why}); {model} has a "
                    f"{unet}")
    return None


def chain_refusal(names: list[str], supports: list[Support]) -> str | None:
    """Why these accelerators cannot be applied together, or None (`hiresrun.accelerators.Chain`)."""
    listed = f"accelerator=[{','.join(names)}]"
    for name, s in zip(names, supports):
        if s.level not in LEVELS:
            return f"{listed}: accelerator={name} declares no composition level; use it alone"
    for i, (name, s) in enumerate(zip(names, supports)):
        for other, t in zip(names[i + 1:], supports[i + 1:]):
            if s.level == t.level:
                return f"{listed}: {name} and {other} both decide {LEVELS[s.level]}; keep one of them"
    splits = [n for n, s in zip(names, supports) if s.sub_batches]
    whole = [n for n, s in zip(names, supports) if s.whole_batches]
    if splits and whole:
        return (f"{listed}: {splits[0]} calls the model on sub-batches of images (per-image decisions) and {whole[0]} "
                f"caches whole batches; set accelerator.{splits[0]}.decision_scope=batch")
    return None


def model_facts(model) -> tuple[str | None, str | None, bool | None, bool]:
    """(denoiser class, "pixel" | "latent", text-to-image, EDM) of a model node, from the model's config files alone;
    where they are not on this machine (a hub id outside the cache), from what the model file declares
    (`model.denoiser`, `model.space`, `model.conditioning`). None: unknown, which every check passes."""
    from hiresrun.models import describe, text_model

    unet, space = describe(model.path, model.get("revision"), model.get("vae"))
    if unet is None:
        unet, space = model.get("denoiser"), model.get("space")
    conditioning = model.get("conditioning")
    text = text_model(model.path, model.get("revision")) if conditioning != "none" else False
    if text is None and conditioning in ("text", "class"):
        text = conditioning == "text"
    return unet, space, text, model.get("parametrization", "standard") == "edm"


def check(cfg, method: str, accelerator: str | None) -> None:
    """Refuse the configured pair before anything is built (`method`, `accelerator`: the chosen option names;
    accelerator None checks the method and model only)."""
    from hydra.utils import get_class

    from hiresrun.build import accelerator_members

    m = get_class(cfg.method._target_).declared(cfg.method)
    members = accelerator_members(cfg.accelerator) if accelerator else {}  # a list: refuses clashing members
    parts = members or ({accelerator: cfg.accelerator} if accelerator else {None: None})
    unet, space, text, edm = model_facts(cfg.model)
    for name, part in parts.items():
        a = get_class(part._target_).declared(part) if part is not None else Support()
        reason = refusal(method, m, name, a, f"model.path={cfg.model.path}", unet, space, text, edm)
        if reason:
            raise Unsupported(reason)
