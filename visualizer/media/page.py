"""The player as one self-contained HTML file: a run (or a comparison) to scrub, play and read offline, e.g. in a
blog post's `<iframe>`.

The page runs the app's own player (static/player.*, through player.py: one source) on props whose frame URLs
are WebP data URIs, so it loads nothing: no network, no server, no other file. It offers the x_t, x0-hat and
both views, the slider, arrow keys, Play with speed and loop, the step label, and the convergence, schedule and
numbers tabs (their plots are drawn from the numbers in the page).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..engine.labels import comparison_labels, model_name
from .player import CSS, JS, TEMPLATE, VIEWS, PlayerCell, PlayerProps, step_props

PAGE_VIEWS = ("xt", "x0", "both")  # the views a page offers (its frames: x_t and x0-hat)
PAGE_TABS = ["convergence", "schedule", "numbers"]  # the insight tabs drawn from numbers alone
LOSSLESS_MAX_SIDE = 128  # frames up to this size are lossless WebP (smaller than lossy ones of that size)
WEBP_QUALITY = 70  # larger frames: lossy WebP at this quality (`bench --page`; docs/performance.md)
PAGE_NAME = "player.html"
# the app's theme colours the player's CSS uses (Gradio's variables), light and dark
THEME = """:root { --border-color-primary: #d4d4dc; --color-accent: #f97316; --body-text-color: #1f1f24;
  --body-text-color-subdued: #5b5b66; --background-fill-primary: #ffffff; --background-fill-secondary: #f4f4f6;
  --button-secondary-background-fill: #f4f4f6; color-scheme: light dark; }
@media (prefers-color-scheme: dark) { :root { --border-color-primary: #3a3a44; --body-text-color: #ececf1;
  --body-text-color-subdued: #a0a0ab; --background-fill-primary: #18181c; --background-fill-secondary: #24242a;
  --button-secondary-background-fill: #24242a; } }
body { margin: 0; padding: 8px; font-family: system-ui, -apple-system, "Segoe UI", sans-serif;
  background: var(--background-fill-primary); color: var(--body-text-color); }
.vp-page { max-width: 760px; margin: 0 auto; }
.vp-page h1 { font-size: 16px; font-weight: 600; margin: 0 0 6px; }
.vp-page footer { font-size: 11px; color: var(--body-text-color-subdued); margin-top: 8px; }
"""


def data_uri(frame: np.ndarray) -> str:
    """A uint8 HxWx3 frame as a WebP data URI: lossless up to LOSSLESS_MAX_SIDE, else at WEBP_QUALITY."""
    buffer = io.BytesIO()
    options = {"lossless": True} if max(frame.shape[:2]) <= LOSSLESS_MAX_SIDE else {"quality": WEBP_QUALITY}
    Image.fromarray(frame).save(buffer, format="WEBP", method=6, **options)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(run, label: str) -> PlayerCell:
    """One run on the page: the start (where the run has one), then every step, x_t and x0-hat."""
    curve = [round(1 - m["ssim_x0_to_final"], 4) for m in run.info.metrics] if run.info.metrics else None
    cell = PlayerCell(label=label, total=len(run), steps=[step_props(s) for s in run.steps],
                      frames={kind: [data_uri(f) for f in run.frames[kind]] for kind in ("xt", "x0")}, curve=curve,
                      structure=run.info.structure_step, prediction=run.info.prediction_type)
    if run.start_frame is None:
        return cell
    first = data_uri(run.start_frame)
    return cell.with_start(run.steps[0], {"xt": first, "x0": first})


def title(runs: Sequence) -> str:
    """A line naming what the page shows: prompt, model, sampler(s), steps, seed and guidance."""
    first = runs[0].settings
    samplers = ", ".join(comparison_labels([r.settings for r in runs]))
    steps = "/".join(sorted({str(len(r)) for r in runs}, key=int))
    return (f"“{first.prompt}” · {model_name(runs[0].info.model_source)} · {samplers} · {steps} steps · "
            f"seed {first.seed} · guidance {first.guidance_scale:g}")


def player_page(runs: Sequence) -> str:
    """The HTML of one page showing `runs` (decoded: x_t and x0-hat frames) on one shared slider."""
    runs = list(runs)
    for run in runs:
        if not {"xt", "x0"} <= set(run.frames) or not len(run):
            raise ValueError("The page needs every run's x_t and x0-hat frames: decode them first.")
    labels = comparison_labels([r.settings for r in runs])
    cells = [_cell(run, label) for run, label in zip(runs, labels)]
    names = {key: label for label, key in VIEWS.items()}
    props = PlayerProps(cells=cells, views=[(k, names[k]) for k in PAGE_VIEWS], tabs=PAGE_TABS,
                        status="Drag the slider, use the arrow keys or press Play.", run="page").as_props()
    props_json = json.dumps(props, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside the script
    heading = html.escape(title(runs))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{heading}</title>
<style>{THEME}
{CSS}</style></head>
<body><main class="vp-page"><h1>{heading}</h1>
<div id="player">{TEMPLATE}</div>
<footer>Every frame is what the model computed at that step, decoded through its VAE: x_t is the noisy
latent after the step, x0-hat the model's guess of the final image. Made with the denoising visualizer.</footer>
</main>
<script>
const PROPS = {props_json};
(function (element, props, watch) {{
{JS}
}})(document.getElementById("player"), PROPS, function () {{}});
</script></body></html>
"""


def write_page(runs: Sequence, folder: str | Path) -> Path:
    """Write `player_page(runs)` as folder/player.html; return its path."""
    path = Path(folder) / PAGE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(player_page(runs), encoding="utf-8")
    return path
