"""Per-image conditioning for sampling: class labels, prompts, classifier-free guidance, SDXL micro-conditioning.

`Conditioner(seeds, gens, device)` gives the `cond` dict the loop passes to every model call (models.py: one row
per image; `negative` holds the unconditional rows, `guidance_scale` / `guidance_rescale` the settings). Text is
encoded by the diffusers pipeline's own `encode_prompt` (Stable Diffusion 1.x/2.x: one CLIP encoder; SDXL: two,
penultimate hidden states concatenated, the second encoder's pooled projection), so prompts mean exactly what
they mean in `StableDiffusionPipeline` / `StableDiffusionXLPipeline`. Image i gets seed i and prompt i mod P (or
the prompt file's row for seed i, when the file gives seeds).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hiresrun.errors import UsageError
from hiresrun.models import library_class

SHIPPED = Path(__file__).parent / "assets" / "prompts"  # prompt sets shipped for tests and smoke runs
TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
# The pipelines' default guidance scales (FLUX.1-dev's is the embedded scale; a model without the embedding: none)
DEFAULT_GUIDANCE = {"StableDiffusionPipeline": 7.5, "StableDiffusionXLPipeline": 5.0, "StableDiffusion3Pipeline": 7.0,
                    "FluxPipeline": 3.5}
MAX_SEQUENCE = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512}  # the pipelines' default T5 sequence lengths


# -- prompts ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    text: str
    seed: int | None = None


def read_prompts(path: str) -> list[Prompt]:
    """`.txt` (one prompt per line), `.jsonl` (objects with "prompt" and optional "seed") or `.csv` (a header with
    a `prompt` column and optional `seed`). A missing, empty or malformed file ends with one line naming it."""
    p = Path(path).expanduser()
    shipped = SHIPPED / f"{path}.txt"
    if not p.is_file() and shipped.is_file():  # a shipped set by name (prompts=smoke)
        p = shipped
    if not p.is_file():
        raise UsageError(f"prompts={path}: no such file; give a .txt (one prompt per line), .jsonl or .csv file, or "
                         f"a shipped set ({', '.join(sorted(f.stem for f in SHIPPED.glob('*.txt')))})")
    kind = p.suffix.lower()
    if kind not in (".txt", ".jsonl", ".csv"):
        raise UsageError(f"prompts={path}: unknown format {kind or '(no suffix)'}; use .txt, .jsonl or .csv")
    rows: list[Prompt] = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompts={path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if kind == ".txt":
        rows = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    elif kind == ".jsonl":
        from hiresrun.outputs import read_jsonl

        for n, row in read_jsonl(p, f"prompts={path}", '{"prompt": "a cat", "seed": 3}'):
            rows.append(_row(row, path, f"line {n}"))
    else:
        try:
            rows = _csv_rows(text, path)
        except csv.Error as e:  # a field over csv's limit, a stray quote
            raise UsageError(f"prompts={path}: not a readable CSV file ({e}); check its quoting, or use .jsonl") \
                from None
    if not rows:
        raise UsageError(f"prompts={path}: the file holds no prompts; write at least one")
    seeded = [r.seed is not None for r in rows]
    if any(seeded) and not all(seeded):
        raise UsageError(f"prompts={path}: some rows give a seed and others do not; give every row a seed or none")
    if all(seeded) and len({r.seed for r in rows}) != len(rows):
        raise UsageError(f"prompts={path}: a seed appears twice; each seed names one image")
    return rows


def _csv_rows(text: str, path: str) -> list[Prompt]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise UsageError(f"prompts={path}: the CSV header has no `prompt` column (found "
                         f"{reader.fieldnames}); write a header line `prompt,seed`")
    return [_row({k: v for k, v in row.items() if v not in (None, "")}, path, f"line {n}")
            for n, row in enumerate(reader, 2)]


def _row(row, path: str, where: str) -> Prompt:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UsageError(f"prompts={path}: {where} has no string `prompt`; write e.g. "
                         f'{{"prompt": "a photo of a cat", "seed": 0}}')
    seed = row.get("seed")
    if seed is not None:
        given = seed
        if isinstance(seed, str) and re.fullmatch(r"\s*\d+\s*", seed):  # CSV fields are text
            seed = int(seed)
        whole = isinstance(seed, int) and not isinstance(seed, bool)
        if not whole or not 0 <= seed < 2 ** 31:
            raise UsageError(f"prompts={path}: {where} has seed={given!r}; seeds are whole numbers in 0 .. 2^31 - 1")
    return Prompt(row["prompt"], seed)


class Prompts:
    """Which prompt image (seed) s gets: the row with seed s when the file gives seeds, else row s mod P."""

    def __init__(self, rows: list[Prompt]):
        self.rows = rows
        self.by_seed = {r.seed: r.text for r in rows} if rows[0].seed is not None else None

    @property
    def seeds(self) -> list[int] | None:
        return None if self.by_seed is None else [r.seed for r in self.rows]

    def __call__(self, seed: int) -> str:
        if self.by_seed is None:
            return self.rows[seed % len(self.rows)].text
        if seed not in self.by_seed:
            raise UsageError(f"sample.seeds: seed {seed} has no row in the prompts file (which gives seeds); "
                             f"leave sample.seeds unset to sample the file's seeds")
        return self.by_seed[seed]


# -- text encoders -------------------------------------------------------------------------------------------------
class TextEncoder:
    """The text side of a diffusers SD / SDXL / SD3 / FLUX pipeline folder, encoding through the pipeline's
    `encode_prompt` (SD3: two CLIPs and T5, CLIP pooled; FLUX: CLIP pooled and T5)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.kind = type(pipe).__name__
        self.xl = self.kind == "StableDiffusionXLPipeline"
        from hiresrun.flow import FLOW_PIPELINES

        self.flow = FLOW_PIPELINES.get(self.kind)
        suffixes = ("", "_2", "_3")  # SD: one CLIP; SDXL: two; FLUX: CLIP and T5; SD3: two CLIPs and T5
        self.tokenizers = [t for t in (getattr(pipe, f"tokenizer{k}", None) for k in suffixes) if t is not None]
        self.encoders = [e for e in (getattr(pipe, f"text_encoder{k}", None) for k in suffixes) if e is not None]
        # T5's tokens (sample.max_sequence_length): the pipeline's default, or the T5 tokenizer's own limit where that
        # is shorter (the embedded tiny-flux-mnist's word-level tokenizer takes 16)
        self.max_sequence_length = min(MAX_SEQUENCE[self.kind], self.t5_limit) if self.flow else None

    @classmethod
    def load(cls, root: Path, unet, vae, scheduler_config: dict) -> TextEncoder:
        import diffusers

        index = json.loads((root / "model_index.json").read_text())
        kind = index.get("_class_name")
        if kind not in TEXT_PIPELINES:
            raise UsageError(f"model.path={root}: a {kind} pipeline; hiresrun drives text models of the kinds "
                             f"{', '.join(TEXT_PIPELINES)}")
        parts = {}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
            library, class_name = (index.get(name) or [None, None])[:2]
            if library is None:
                continue
            loader = library_class(library, class_name, f"model.path={root}: model_index.json's {name}")
            dtype = {"dtype": torch.float32} if name.startswith("text_encoder") else {}  # fp32, as the denoiser
            part = loader.from_pretrained(root / name, **dtype)
            parts[name] = part.eval().requires_grad_(False) if name.startswith("text_encoder") else part
        scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
        from hiresrun.flow import FLOW_PIPELINES

        if kind in FLOW_PIPELINES:  # encode_prompt only: the loop is hiresrun's
            flow = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
            pipe = getattr(diffusers, kind)(vae=vae, transformer=unet, scheduler=flow, **parts)
        elif kind == "StableDiffusionXLPipeline":
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, unet=unet, scheduler=scheduler, add_watermarker=False,
                force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True), **parts)
        else:
            pipe = diffusers.StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, safety_checker=None,
                                                     feature_extractor=None, requires_safety_checker=False, **parts)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe)

    @property
    def embedded_guidance(self) -> bool:
        """FLUX.1-dev: the guidance scale is an input of the transformer (guidance distillation), not two passes."""
        return self.flow == "flux" and bool(self.pipe.transformer.config.guidance_embeds)

    @property
    def default_guidance(self) -> float:
        if self.flow == "flux" and not self.embedded_guidance:  # FLUX.1-schnell: no guidance input at all
            return 1.0
        return DEFAULT_GUIDANCE[self.kind]

    @property
    def max_length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    @property
    def t5_limit(self) -> int | None:
        """The T5 tokenizer's own limit (model_max_length): the longest `max_sequence_length` it takes; None without
        T5."""
        return int(self.tokenizers[-1].model_max_length) if self.flow else None

    def too_long(self, prompt: str) -> bool:
        """Longer than a CLIP tokenizer's window or, on flow models, than the T5 sequence: truncated either way."""
        limits = [t.model_max_length for t in self.tokenizers]
        if self.flow:
            limits[-1] = self.max_sequence_length
        return any(len(t(prompt).input_ids) > m for t, m in zip(self.tokenizers, limits))

    @torch.no_grad()
    def encode(self, prompts: list[str], device, negative: list[str] | None = None, guidance: bool = False,
               size: int | None = None, micro: dict | None = None, embedded: float | None = None) -> dict:
        """UNet keyword arguments for `prompts` (and, with `guidance`, a `negative` entry for the unconditional
        rows). SDXL adds `added_cond_kwargs`: the pooled text embedding and the micro-conditioning time ids
        (original_size, crops_coords_top_left, target_size; all from `size` unless `micro` overrides). SD3 and FLUX:
        the T5 sequence and the pooled CLIP projection; FLUX.1-dev adds `guidance`, the embedded scale (`embedded`,
        default the pipeline's 3.5) per row."""
        for e in self.encoders:
            e.to(device)
        if self.flow:
            return self._encode_flow(prompts, device, negative, guidance, embedded)
        if self.xl:
            pe, ne, pooled, npooled = self.pipe.encode_prompt(prompt=prompts, device=device,
                                                               num_images_per_prompt=1,
                                                               do_classifier_free_guidance=guidance,
                                                               negative_prompt=negative)
            ids = self.time_ids(size, micro or {}, pe.dtype, device).expand(len(prompts), -1)
            cond = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
            if guidance:
                cond["negative"] = {"encoder_hidden_states": ne,
                                    "added_cond_kwargs": {"text_embeds": npooled, "time_ids": ids}}
            return cond
        pe, ne = self.pipe.encode_prompt(prompts, device, 1, guidance, negative_prompt=negative)
        cond = {"encoder_hidden_states": pe}
        if guidance:
            cond["negative"] = {"encoder_hidden_states": ne}
        return cond

    def _encode_flow(self, prompts, device, negative, guidance: bool, embedded: float | None) -> dict:
        n = len(prompts)
        if self.flow == "sd3":
            pe, ne, pooled, npooled = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=guidance, negative_prompt=negative,
                max_sequence_length=self.max_sequence_length)
            cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
            if guidance:
                cond["negative"] = {"encoder_hidden_states": ne, "pooled_projections": npooled}
            return cond
        pe, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                                max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        if self.embedded_guidance:  # float32, as FluxPipeline makes it
            scale = DEFAULT_GUIDANCE[self.kind] if embedded is None else float(embedded)
            cond["guidance"] = torch.full((n,), scale, device=device, dtype=torch.float32)
        if guidance:  # true CFG: the negative prompt's rows, the same embedded scale
            ne, npooled, _ = self.pipe.encode_prompt(prompt=negative or [""] * n, prompt_2=None, device=device,
                                                     num_images_per_prompt=1,
                                                     max_sequence_length=self.max_sequence_length)
            cond["negative"] = {"encoder_hidden_states": ne, "pooled_projections": npooled,
                                **({"guidance": cond["guidance"]} if "guidance" in cond else {})}
        return cond

    @staticmethod
    def time_ids(size: int | None, micro: dict, dtype, device) -> Tensor:
        """SDXL's add_time_ids: original_size + crops_coords_top_left + target_size, as diffusers builds them."""
        original = tuple(micro.get("original_size") or (size, size))
        crops = tuple(micro.get("crops_coords_top_left") or (0, 0))
        target = tuple(micro.get("target_size") or (size, size))
        return torch.tensor([list(original + crops + target)], dtype=dtype, device=device)


# -- the sampling-time conditioner -----------------------------------------------------------------------------
class Conditioner:
    """`cond` for a batch of seeds: class labels drawn from each seed's generator (before any noise, in every
    method), or the seeds' prompts encoded with guidance settings. Built once per run by run.sample."""

    def __init__(self, base, prompts: Prompts | None = None, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, size: int | None = None,
                 micro: dict | None = None, class_labels: list[int] | None = None, true_cfg_scale: float = 1.0,
                 max_sequence_length: int | None = None):
        self.base, self.prompts, self.negative_prompt = base, prompts, negative_prompt
        self.class_labels = class_labels
        self.size, self.micro = size or base.resolution, micro or {}
        text = base.text
        flux = text is not None and text.flow == "flux"
        self.guidance_scale = float(guidance_scale if guidance_scale is not None else base.default_guidance)
        self.guidance_rescale = float(guidance_rescale)
        self.true_cfg_scale = float(true_cfg_scale)
        if flux and guidance_scale is not None and not text.embedded_guidance:
            raise UsageError(f"sample.guidance_scale={guidance_scale}: this FLUX model (FLUX.1-schnell) has no "
                             f"guidance input and would ignore it; drop it (true CFG: sample.true_cfg_scale with "
                             f"sample.negative_prompt)")
        if not flux and self.true_cfg_scale != 1.0:
            kind = text.kind if text is not None else type(base.unet).__name__
            raise UsageError(f"sample.true_cfg_scale={true_cfg_scale} is FLUX's true classifier-free guidance; this "
                             f"model (a {kind}) guides with sample.guidance_scale: use that")
        if flux and (not math.isfinite(self.true_cfg_scale) or self.true_cfg_scale < 1):
            raise UsageError(f"sample.true_cfg_scale={true_cfg_scale}: must be a number >= 1 (1 = off)")
        if flux and self.true_cfg_scale > 1 and negative_prompt is None:
            raise UsageError(f"sample.true_cfg_scale={true_cfg_scale} needs a negative prompt to guide away from (as "
                             f"FluxPipeline): set sample.negative_prompt=\"...\" (\"\" for the empty prompt)")
        if max_sequence_length is not None:
            limit = text.t5_limit if text is not None else None
            if limit is None:
                raise UsageError(f"sample.max_sequence_length={max_sequence_length} sets the T5 prompt length of SD3 / "
                                 f"FLUX; model.path={base.source} has no T5 encoder: drop it")
            if not 1 <= int(max_sequence_length) <= limit:
                raise UsageError(f"sample.max_sequence_length={max_sequence_length}: the T5 tokenizer takes 1 .. "
                                 f"{limit} tokens; pick one in that range (the pipeline's default: "
                                 f"{MAX_SEQUENCE[text.kind]})")
            text.max_sequence_length = int(max_sequence_length)
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 1:
            raise UsageError(f"sample.guidance_scale={guidance_scale}: must be a number >= 1 (1 = no guidance, one "
                             f"UNet pass per step; Stable Diffusion's default 7.5)")
        if not math.isfinite(self.guidance_rescale) or not 0 <= self.guidance_rescale <= 1:
            raise UsageError(f"sample.guidance_rescale={guidance_rescale}: must lie in [0, 1] (0 = off; 0.7 in "
                             f"Lin et al. 2023)")
        if text is None and (prompts is not None or negative_prompt is not None):
            raise UsageError(f"prompts / sample.prompt / sample.negative_prompt given, but model.path={base.source} "
                             f"is not a text-to-image model; drop them or pick a Stable Diffusion model")
        if base.conditioning == "none" and self.guidance_scale != 1.0:
            raise UsageError(f"sample.guidance_scale={guidance_scale}: model.path={base.source} has no text or class "
                             f"conditioning to guide; leave it unset")
        if base.conditioning == "class" and self.guidance_scale > 1 and base.null_class is None:
            raise UsageError(f"sample.guidance_scale={guidance_scale}: class guidance needs the model's null class; "
                             f"set model.null_class=<the label it was trained with as 'no class'> (-1 = the last)")
        if class_labels is not None:
            if base.conditioning != "class":
                raise UsageError(f"sample.class_labels given, but model.path={base.source} is not class-conditional; "
                                 f"drop it")
            bad = [c for c in class_labels if not 0 <= c < base.class_table or c == base.null_class]
            if bad or not class_labels:
                null = f" and not be the null class {base.null_class}" if base.null_class is not None else ""
                raise UsageError(f"sample.class_labels={class_labels}: labels must lie in "
                                 f"0..{base.class_table - 1}{null}")
        if text is not None and prompts is None:
            raise UsageError(f"model.path={base.source} is a text-to-image model and no prompt is given; pass "
                             f"prompts=<file.txt|.jsonl|.csv> or sample.prompt=\"...\"")
        if not (text is not None and text.xl) and any(v is not None for v in self.micro.values()):
            raise UsageError(f"sample.{next(k for k, v in self.micro.items() if v is not None)} is SDXL "
                             f"micro-conditioning, but model.path={base.source} is not an SDXL model; drop it")

    @property
    def flux(self) -> bool:
        return self.base.text is not None and self.base.text.flow == "flux"

    @property
    def guided(self) -> bool:
        """Two passes per step: classifier-free guidance (FLUX: true CFG; its guidance_scale is an input)."""
        if self.flux:
            return self.true_cfg_scale > 1
        return self.base.conditioning in ("text", "class") and self.guidance_scale > 1

    def labels_of(self, seeds: list[int], gens: list[torch.Generator]) -> Tensor:
        """Each seed's class: drawn uniformly over the classes that are not the null class from its own generator
        (always drawn, so the noise that follows is the same whether labels are given or not), or
        sample.class_labels[seed mod L]."""
        drawn = torch.cat([torch.randint(self.base.num_classes, (1,), generator=g) for g in gens])
        if self.class_labels is None:
            return self.base.class_of(drawn)
        return torch.tensor([self.class_labels[int(s) % len(self.class_labels)] for s in seeds])

    def prompts_of(self, seeds: list[int]) -> list[str]:
        return [self.prompts(int(s)) for s in seeds] if self.prompts is not None else []

    def check_lengths(self, seeds: list[int]) -> list[str]:
        """One warning line per prompt longer than the tokenizer's limit (truncated, as diffusers does)."""
        if self.base.text is None:
            return []
        long = sorted({p for p in self.prompts_of(seeds) + [self.negative_prompt or ""] if self.base.text.too_long(p)})
        return [f"hiresrun: warning: prompt {p[:40]!r}... is longer than the tokenizer's "
                f"{self.base.text.max_length} tokens; truncated, as diffusers does" for p in long]

    def at(self, cond: dict, resolution: int) -> dict:
        """`cond` for a sampling pass at `resolution` pixels: SDXL's time ids become the base model's own at that
        size (original = target = the pass's size, no crop), as the pipeline conditions a call of that size; the
        user's `sample.original_size` / `crops_coords_top_left` / `target_size` apply to the final, target-size
        pass only. Nothing else in `cond` depends on the size."""
        text = self.base.text
        if text is None or not text.xl or "added_cond_kwargs" not in cond:
            return cond
        micro = self.micro if int(resolution) == int(self.size) else {}

        def resized(c: dict) -> dict:
            ids = c["added_cond_kwargs"]["time_ids"]
            new = text.time_ids(int(resolution), micro, ids.dtype, ids.device).expand(ids.shape[0], -1)
            return {**c, "added_cond_kwargs": {**c["added_cond_kwargs"], "time_ids": new}}

        out = resized(cond)
        if isinstance(cond.get("negative"), dict) and "added_cond_kwargs" in cond["negative"]:
            out["negative"] = resized(cond["negative"])
        return out

    def __call__(self, seeds: list[int], gens: list[torch.Generator], device) -> dict:
        base = self.base
        cond = base.broadcast(len(gens), device)
        if base.conditioning == "class":
            labels = self.labels_of(seeds, gens).to(device)
            cond["class_labels"] = labels
            if self.guided:  # the unconditional half: the null class (DiT: its num_classes row)
                cond["negative"] = {"class_labels": torch.full_like(labels, base.null_class)}
                cond["guidance_scale"] = self.guidance_scale
                cond["guidance_rescale"] = self.guidance_rescale
        elif base.conditioning == "text":
            negative = None if self.negative_prompt is None else [self.negative_prompt] * len(seeds)
            cond.update(base.text.encode(self.prompts_of(seeds), device, negative=negative, guidance=self.guided,
                                         size=self.size, micro=self.micro,
                                         embedded=self.guidance_scale if self.flux else None))
            if self.guided:
                cond["guidance_scale"] = self.true_cfg_scale if self.flux else self.guidance_scale
                cond["guidance_rescale"] = self.guidance_rescale
        return cond
