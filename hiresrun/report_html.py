"""report.html for `hiresrun report`: the table, the plots, and the runs' images side by side on the same seeds (a row
per seed, a column per run; above 256 px each image also shows a zoomed centre crop), in one self-contained file
(images inlined as data URIs, no script, nothing fetched) that opens offline in any browser."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

SEEDS = 8          # rows of the image comparison: the first seeds every run has
SHOWN = 192        # px: an image is shown at this size (enlarged nearest neighbour, or reduced when larger)
ZOOM_ABOVE = 256   # px: larger images also show their centre crop at native pixels, enlarged

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; font-size: 13px; vertical-align: top; }
th { background: #f3f3f3; }
td.name, th.name { text-align: left; }
img.pix { image-rendering: pixelated; display: block; }
.caption { font-size: 11px; color: #555; text-align: left; max-width: 192px; }
.plots img { margin-right: 12px; max-width: 48%; }
"""


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def shown(path: Path) -> tuple[str, str | None]:
    """An image as shown (SHOWN px wide: enlarged nearest neighbour, or reduced), and its zoomed centre crop when
    it is larger than ZOOM_ABOVE px."""
    im = Image.open(path).convert("RGB")
    side = max(im.size)
    scaled = im.resize((SHOWN * im.width // side, SHOWN * im.height // side),
                       Image.NEAREST if side <= SHOWN else Image.LANCZOS)
    crop = None
    if side > ZOOM_ABOVE:
        c = side // 4
        left, top = (im.width - c) // 2, (im.height - c) // 2
        crop = data_uri(im.crop((left, top, left + c, top + c)).resize((SHOWN, SHOWN), Image.NEAREST))
    return data_uri(scaled), crop


def markdown_to_html(table: str) -> str:
    """A markdown table (report.markdown_table / problems_table) as an HTML table."""
    rows = [line.strip().strip("|").split(" | ") for line in table.splitlines() if line.strip()]
    head, body = rows[0], [r for r in rows[2:]]
    cell = lambda tag, i, v: f"<{tag}{' class=name' if i < 2 else ''}>{html.escape(v.strip())}</{tag}>"  # noqa: E731
    lines = ["<table>", "<tr>" + "".join(cell("th", i, v) for i, v in enumerate(head)) + "</tr>"]
    lines += ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in body]
    return "\n".join(lines + ["</table>"])


def seed_rows(runs: list[dict]) -> tuple[list[dict], list[int]]:
    """The finished sample runs whose images are on disk, and the first SEEDS seeds all of them have."""
    have = []
    for r in runs:
        folder = r.get("path")
        if r["status"] == "ok" and folder is not None and (Path(folder) / "samples").is_dir():
            seeds = {int(p.stem) for p in (Path(folder) / "samples").glob("*.png") if p.stem.isdigit()}
            if seeds:
                have.append((r, seeds))
    common = sorted(set.intersection(*(s for _, s in have))) if have else []
    return [r for r, _ in have], common[:SEEDS]


def captions_of(run: dict) -> dict[int, str]:
    """seed -> prompt, from a text run's prompts.jsonl."""
    import json

    path = Path(run["path"]) / "prompts.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["seed"]): str(r["prompt"]) for r in rows}


def comparison(runs: list[dict], names: dict[str, str]) -> str:
    """The image table: a row per seed, a column per run."""
    shown_runs, seeds = seed_rows(runs)
    if not seeds:
        return "<p>No images to compare: no finished run kept its samples/ (sample.save_images=false drops them).</p>"
    prompts = {r["run"]: captions_of(r) for r in shown_runs}
    head = "<tr><th class=name>seed</th>" + "".join(f"<th class=name>{html.escape(names[r['run']])}</th>"
                                                   for r in shown_runs) + "</tr>"
    body = []
    for seed in seeds:
        cells = []
        for r in shown_runs:
            full, crop = shown(Path(r["path"]) / "samples" / f"{seed:06d}.png")
            said = prompts[r["run"]].get(seed)
            cells.append("<td>" + f'<img class=pix src="{full}" alt="seed {seed}">'
                         + (f'<img class=pix src="{crop}" alt="seed {seed}, centre crop">' if crop else "")
                         + (f"<div class=caption>{html.escape(said)}</div>" if said else "") + "</td>")
        body.append(f"<tr><td class=name>{seed}</td>{''.join(cells)}</tr>")
    note = (f"<p>The first {len(seeds)} seeds every run has; images shown at {SHOWN} px (nearest neighbour)"
            + (", larger ones reduced, with their centre quarter at native pixels beside" if any(
                max(Image.open(Path(r["path"]) / "samples" / f"{seeds[0]:06d}.png").size) > ZOOM_ABOVE
                for r in shown_runs) else "") + ".</p>")
    return note + "<table>" + head + "".join(body) + "</table>"


def write(runs: list[dict], text: str, tables: list[str], plots: list[Path], names: dict[str, str], title: str,
          path: Path) -> None:
    """report.html: the summary line, the tables, the plots and the image comparison."""
    summary = next((line for line in text.splitlines()[1:] if line.strip()), "")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>Sweep report: {html.escape(title)}</h1>",
             f"<p>{html.escape(summary)}</p>"]
    parts += [markdown_to_html(t) for t in tables if t]
    if plots:
        parts.append("<div class=plots>" + "".join(f'<img src="{data_uri(Image.open(p))}" alt="{p.stem}">'
                                                    for p in plots) + "</div>")
    parts += ["<h2>Samples on the same seeds</h2>", comparison(runs, names), "</body></html>"]
    path.write_text("\n".join(parts))
