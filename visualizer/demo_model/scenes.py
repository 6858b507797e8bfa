"""Procedural captioned shape scenes: the embedded model's training data and its scorer.

Every scene is one coloured shape on a plain background. `Scene` holds its attributes,
`render` draws it, `caption` describes it, and `detect` reads the attributes back from any
image (a generated one included), so prompt adherence can be measured without a human.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLORS = {  # name -> RGB
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = {  # name -> centre as a fraction of the image (x, y)
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
SIZES = {"small": 0.11, "large": 0.19}  # name -> half-width as a fraction of the image
SYNONYMS = {"center": "centre", "grey": "gray", "big": "large"}

# (colour, shape, position) triples never shown in training, used to score generalisation.
HELD_OUT = (
    ("red", "triangle", "right"), ("green", "circle", "top"), ("blue", "diamond", "left"),
    ("yellow", "square", "bottom"), ("purple", "circle", "centre"), ("orange", "triangle", "left"),
    ("red", "square", "top"), ("green", "diamond", "bottom"), ("blue", "triangle", "centre"),
    ("yellow", "circle", "right"), ("purple", "square", "left"), ("orange", "diamond", "top"),
)


@dataclass(frozen=True)
class Scene:
    color: str  # shape colour, a key of COLORS
    shape: str  # one of SHAPES
    position: str  # a key of POSITIONS
    size: str  # a key of SIZES
    background: str  # a key of BACKGROUNDS
    jitter: tuple[float, float] = (0.0, 0.0)  # small offset of the centre, fraction of the image


def random_scene(rng: random.Random, allow_held_out: bool = False) -> Scene:
    """A uniformly random scene; held-out triples are skipped unless allowed."""
    while True:
        scene = Scene(
            color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES),
            position=rng.choice(list(POSITIONS)), size=rng.choice(list(SIZES)),
            background=rng.choice(list(BACKGROUNDS)),
            jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
        )
        if allow_held_out or (scene.color, scene.shape, scene.position) not in HELD_OUT:
            return scene


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A caption; with `rng`, optional words (size, background) are dropped at random."""
    size = scene.size if rng is None or rng.random() < 0.6 else None
    background = scene.background if rng is None or rng.random() < 0.6 else None
    words = ["a"] + ([size] if size else []) + [scene.color, scene.shape]
    words += ["in", "the", "centre"] if scene.position == "centre" else ["on", "the", scene.position]
    if background:
        words += ["of", "a", background, "background"]
    return " ".join(words)


def vocabulary() -> list[str]:
    """Every word the embedded model was trained on, synonyms included."""
    words = {"a", "in", "the", "on", "of", "background"}
    words |= set(COLORS) | set(BACKGROUNDS) | set(SHAPES) | set(POSITIONS) | set(SIZES) | set(SYNONYMS)
    return sorted(words)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 1.2, cy), (cx, cy + r * 1.2), (cx - r * 1.2, cy)]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    polygon = _shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image of `size` x `size` (drawn at 4x and downsampled: smooth edges)."""
    big = size * 4
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    fx, fy = POSITIONS[scene.position]
    cx, cy = (fx + scene.jitter[0]) * big, (fy + scene.jitter[1]) * big
    _draw_shape(ImageDraw.Draw(image), scene.shape, cx, cy, SIZES[scene.size] * big, COLORS[scene.color])
    return image.resize((size, size), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Detection:
    color: str | None  # nearest palette colour of the shape, None when no shape was found
    shape: str | None
    position: str | None


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(rgb - np.array(palette[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(distances))]


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def detect(image: Image.Image) -> Detection:
    """Read colour, shape and position of the single shape in `image` (any size, RGB)."""
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > 60
    if mask.sum() < 12:
        return Detection(None, None, None)
    color = _nearest(np.median(pixels[mask], axis=0), COLORS)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / IMAGE_SIZE, ys.mean() / IMAGE_SIZE
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    shape = _best_template(mask, xs, ys)
    return Detection(color, shape, position)


def _best_template(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> str:
    """The shape whose template, fitted to the mask's bounding box, overlaps it most."""
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    scores = {}
    for shape in SHAPES:
        r = half / 1.2 if shape == "diamond" else half
        canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r, 255)
        scores[shape] = _mask_iou(mask, np.asarray(canvas) > 127)
    return max(scores, key=scores.get)


def matches(detection: Detection, color: str, shape: str, position: str) -> dict[str, bool]:
    """Which of the requested attributes the detection got right."""
    return {"color": detection.color == color, "shape": detection.shape == shape,
            "position": detection.position == position}


def unknown_words(prompt: str) -> list[str]:
    """Words of `prompt` the embedded model never saw in training (in order, without repeats)."""
    known = set(vocabulary())
    words = [w.strip(".,;:!?\"'").lower() for w in prompt.split()]
    return list(dict.fromkeys(w for w in words if w and w not in known))
