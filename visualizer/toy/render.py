"""Pictures of a 2D run (toy.ToyRun): the points with the model's vector field, x0-hat, films and traces.

Frames are uint8 [SIZE, SIZE, 3] arrays drawn with PIL over the square [-VIEW_RADIUS, VIEW_RADIUS]^2.
Points are coloured by where they end (their cluster, or their angle around the centre), so a film
shows the colours sorting themselves out as the noise flows onto the pattern.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..media.export import caption_frame, grid, save_gif, save_mp4
from .model import PATTERNS, VIEW_RADIUS, ToyRun, final_clusters

SIZE = 360  # pixels per side
BACKGROUND = (20, 20, 24)
ARROW_SHARE = 0.3  # arrows reach this share of the way from a grid point to its x0-hat
CLUSTER_COLORS = [(240, 90, 80), (80, 200, 120), (90, 150, 250), (240, 200, 60)]
VIEWS = {"points": "points x_t and the field", "x0": "x0-hat of every point"}  # kind -> View menu label


def to_pixels(points: np.ndarray) -> np.ndarray:
    """[n, 2] model coordinates -> [n, 2] pixel coordinates (y up)."""
    scale = SIZE / (2 * VIEW_RADIUS)
    return np.stack([(points[:, 0] + VIEW_RADIUS) * scale, (VIEW_RADIUS - points[:, 1]) * scale], 1)


def point_colors(run: ToyRun) -> np.ndarray:
    """[n, 3] uint8: each point's colour from where it ends: its cluster, else its angle around the centre."""
    final = run.points[-1]
    if PATTERNS[run.settings.pattern][1]:
        return np.array(CLUSTER_COLORS, np.uint8)[final_clusters(run)]
    hue = (np.arctan2(final[:, 1], final[:, 0]) / (2 * np.pi)) % 1.0
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.65, 1.0)] for h in hue], np.uint8)


def _canvas(run: ToyRun) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x, y in to_pixels(run.pattern[::4]):
        draw.point((x, y), fill=(70, 70, 84))
    return image


def _arrows(draw: ImageDraw.ImageDraw, start: np.ndarray, end: np.ndarray) -> None:
    spacing = SIZE / len(np.unique(start[:, 0].round(3)))
    a, b = to_pixels(start), to_pixels(start + ARROW_SHARE * (end - start))
    for (x0, y0), (x1, y1) in zip(a, b):
        dx, dy = x1 - x0, y1 - y0
        length = float(np.hypot(dx, dy))
        if length < 1.0:
            draw.point((x0, y0), fill=(120, 120, 140))
            continue
        if length > 1.2 * spacing:  # keep neighbours' arrows apart; the direction is what matters
            dx, dy = dx * 1.2 * spacing / length, dy * 1.2 * spacing / length
            x1, y1, length = x0 + dx, y0 + dy, 1.2 * spacing
        draw.line((x0, y0, x1, y1), fill=(120, 120, 140), width=1)
        ux, uy, head = dx / length, dy / length, min(4.0, length / 2)
        for side in (1, -1):
            draw.line((x1, y1, x1 - head * (ux + side * 0.5 * uy), y1 - head * (uy - side * 0.5 * ux)),
                      fill=(120, 120, 140), width=1)


def _points(image: Image.Image, points: np.ndarray, colors: np.ndarray) -> Image.Image:
    """`image` with each point as a 3x3 square of its colour (drawn in numpy: thousands of points in a few ms)."""
    pixels = np.array(image)
    xy = to_pixels(points).round().astype(int)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            x, y = xy[:, 0] + dx, xy[:, 1] + dy
            inside = (x >= 0) & (x < SIZE) & (y >= 0) & (y < SIZE)
            pixels[y[inside], x[inside]] = colors[inside]
    return Image.fromarray(pixels)


def frame(run: ToyRun, position: int, kind: str = "points", colors: np.ndarray | None = None) -> np.ndarray:
    """Position 0 is the initial noise, k the points after step k. "points": the points and the field that will
    move them next; "x0": x0-hat of step k (of step 1 at position 0) over the faint pattern. `colors`: from
    point_colors(run) (computed when not given)."""
    colors = point_colors(run) if colors is None else colors
    image = _canvas(run)
    if kind == "points":
        _arrows(ImageDraw.Draw(image), run.grid, run.field[position])
        image = _points(image, run.points[position], colors)
    elif kind == "x0":
        image = _points(image, run.x0[max(position, 1) - 1], colors)
    else:
        raise ValueError(f"unknown 2D view {kind!r}; views: {', '.join(VIEWS)}")
    return np.asarray(image)


def caption(run: ToyRun, position: int) -> str:
    if position == 0:
        return f"{run.settings.sampler} · start: pure noise"
    step = run.steps[position - 1]
    return f"{run.settings.sampler} · step {step.index}/{len(run)} · t={step.timestep:.0f} · sigma={step.sigma:.2f}"


def films(runs: Sequence[ToyRun], kind: str = "points") -> list[Image.Image]:
    """One captioned picture per position (initial noise first), the runs side by side."""
    colors = point_colors(runs[0])
    positions = max(len(r) for r in runs) + 1
    pictures = []
    for p in range(positions):
        cells = [caption_frame(Image.fromarray(frame(r, min(p, len(r)), kind, colors)), caption(r, min(p, len(r))))
                 for r in runs]
        pictures.append(cells[0] if len(cells) == 1 else grid(cells))
    return pictures


def export(runs: Sequence[ToyRun], folder: Path, formats: Sequence[str] = ("gif",), fps: float = 10,
           kind: str = "points") -> dict[str, Path]:
    """points.gif / points.mp4 of the runs (side by side when several) in `folder`."""
    pictures = films(runs, kind)
    savers = {"gif": save_gif, "mp4": save_mp4}
    return {fmt: savers[fmt](pictures, Path(folder) / f"{kind}.{fmt}", fps=fps) for fmt in formats}


def trace(run: ToyRun) -> dict:
    """Every point's pixel position at every position of the run (initial noise first), for the page to trace a
    clicked point's path: {"size": SIZE, "points": [[[x, y], ...] per point] per position} as whole pixels."""
    return {"size": SIZE, "points": [to_pixels(p).round().astype(int).tolist() for p in run.points]}
