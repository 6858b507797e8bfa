"""Image space, made visible: a run's latents at every step as a path on a fixed 2D map of the training images.

Every image is a point in latent space (8 x 8 x 4 = 256 numbers for the emoji model). The map is a linear
projection to 2D: PCA, fitted once on the latents of the model's training images and shipped with it
(`image_map.npz` in the model folder; `python -m visualizer.analysis.image_map [--model shapes]` rebuilds it).
The training images sit in clusters on it, labelled by what separates them: the emoji by their main colour
(image space sorts by appearance, not meaning), the shapes model's scenes by their background. A run's x_t
(from the initial noise) and x0-hat at every step become paths across it, ending in a cluster. For a model
without a shipped map, the projection is fitted on the runs' own latents (no clusters are drawn).
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MAP_FILE = "image_map.npz"
NEIGHBOURS = 15  # a point's cluster: the majority of its nearest training scenes on the map
SIZE = 360  # pixels per side of a rendered map
GROUP_COLORS = [(120, 120, 255), (240, 200, 120), (120, 200, 140), (240, 150, 60), (90, 200, 200), (220, 90, 200)]
PATH_COLORS = [(255, 80, 80), (255, 200, 40), (80, 220, 255), (120, 255, 120), (255, 120, 255), (255, 160, 60),
               (160, 160, 255), (255, 255, 255)]


@dataclass
class ImageMap:
    mean: np.ndarray  # [D]: the latent mean the projection is centred on
    axes: np.ndarray  # [2, D]: unit rows, the map's two directions
    points: np.ndarray  # [n, 2]: reference latents (training scenes) on the map; empty for a fitted-on-runs map
    labels: np.ndarray  # [n]: each reference point's cluster, an index into groups
    groups: tuple[str, ...]  # cluster names

    def project(self, latents) -> np.ndarray:
        """[k, ...] latents (any shape per latent, D numbers) -> [k, 2] map coordinates. Plain numpy: it runs on the
        app's handler threads, and torch work off the engine thread slows every run (see api.ENGINE_THREAD)."""
        flat = np.asarray(latents, dtype=np.float64).reshape(len(latents), -1)
        return (flat - self.mean) @ self.axes.T

    def cluster(self, xy: np.ndarray) -> str | None:
        """The cluster of map point `xy`: the majority of its NEIGHBOURS nearest reference points."""
        if not len(self.points):
            return None
        nearest = np.argsort(((self.points - xy) ** 2).sum(1))[:NEIGHBOURS]
        return self.groups[int(np.bincount(self.labels[nearest], minlength=len(self.groups)).argmax())]

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean.astype(np.float32), axes=self.axes.astype(np.float32),
                 points=self.points.astype(np.float16), labels=self.labels.astype(np.uint8), groups=np.array(self.groups))

    @classmethod
    def load(cls, path: Path) -> "ImageMap":
        data = np.load(path)
        return cls(data["mean"].astype(np.float64), data["axes"].astype(np.float64), data["points"].astype(np.float64),
                   data["labels"].astype(int), tuple(str(g) for g in data["groups"]))


def fit(latents, labels: Sequence[int] = (), groups: Sequence[str] = ()) -> ImageMap:
    """PCA of `latents` [k, ...] to 2D; with labels, the latents themselves become the map's reference points."""
    flat = np.asarray(latents, dtype=np.float64).reshape(len(latents), -1)
    mean = flat.mean(0)
    axes = np.linalg.svd(flat - mean, full_matrices=False)[2][:2]
    axes *= np.sign(axes.sum(1, keepdims=True) + 1e-12)  # a fixed orientation
    points = (flat - mean) @ axes.T if len(labels) else np.zeros((0, 2))
    return ImageMap(mean, axes, points, np.asarray(labels, int), tuple(groups))


def shipped(model_source: str | None) -> ImageMap | None:
    """The map shipped in a model folder, if there is one."""
    path = Path(model_source) / MAP_FILE if model_source else None
    return ImageMap.load(path) if path is not None and path.is_file() else None


def for_runs(runs) -> ImageMap:
    """The map for these runs: the one shipped with their model, else PCA of their own x_t and x0-hat latents."""
    from ..engine.models import resolve

    found = shipped(resolve(runs[0].settings.model).source)
    if found is not None:
        return found
    return fit(np.concatenate([np.concatenate([r.tensors[k] for k in ("initial_noise", "xt", "x0")]) for r in runs]))


@dataclass
class Path2D:
    """One run on the map."""
    xt: np.ndarray  # [steps + 1, 2]: the initial noise, then x_t after each step
    x0: np.ndarray  # [steps, 2]: x0-hat of each step
    label: str  # e.g. "seed 3"

    @property
    def end(self) -> np.ndarray:
        return self.x0[-1]


def path(run, image_map: ImageMap, label: str = "") -> Path2D:
    xt = image_map.project(np.concatenate([run.tensors["initial_noise"], run.tensors["xt"]]))
    return Path2D(xt, image_map.project(run.tensors["x0"]), label or f"seed {run.settings.seed}")


def _frame(image_map: ImageMap, paths: Sequence[Path2D]):
    """The map's view box (lo, hi): around the reference points (a path that leaves it is cut at the edge), or for a
    map without them around the paths' points (their 1st to 99th percentiles)."""
    if len(image_map.points):
        lo, hi = image_map.points.min(0), image_map.points.max(0)
    else:
        every = np.concatenate([np.concatenate([p.xt, p.x0]) for p in paths])
        lo, hi = np.percentile(every, 1, axis=0), np.percentile(every, 99, axis=0)
    pad = 0.08 * (hi - lo).max() + 1e-6
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2 + pad
    return centre - half, centre + half


@dataclass
class Canvas:
    """A map's view box and its background (the reference points and cluster names), drawn once."""
    lo: np.ndarray
    hi: np.ndarray
    base: Image.Image

    def to_px(self, xy: np.ndarray) -> np.ndarray:
        return np.stack([(xy[:, 0] - self.lo[0]) / (self.hi[0] - self.lo[0]) * SIZE,
                         (self.hi[1] - xy[:, 1]) / (self.hi[1] - self.lo[1]) * SIZE], 1)


def canvas(image_map: ImageMap, paths: Sequence[Path2D]) -> Canvas:
    """The background every picture of these paths on this map shares."""
    lo, hi = _frame(image_map, paths)
    out = Canvas(lo, hi, Image.new("RGB", (SIZE, SIZE), (20, 20, 24)))
    pixels = np.array(out.base)
    xy = out.to_px(image_map.points).astype(int)
    inside = (xy >= 0).all(1) & (xy < SIZE - 1).all(1)
    colors = (np.array(GROUP_COLORS)[image_map.labels % len(GROUP_COLORS)] * 0.6).astype(np.uint8)
    for dx in (0, 1):
        for dy in (0, 1):
            pixels[xy[inside, 1] + dy, xy[inside, 0] + dx] = colors[inside]
    out.base = Image.fromarray(pixels)
    draw, font = ImageDraw.Draw(out.base), ImageFont.load_default(size=12)
    for k, name in enumerate(image_map.groups):
        mine = image_map.points[image_map.labels == k]
        if len(mine):
            x = float(np.clip(out.to_px(np.median(mine, 0, keepdims=True))[0, 0], 55, SIZE - 55))
            draw.text((x, 14 + 14 * (k % 2)), name, fill=GROUP_COLORS[k % len(GROUP_COLORS)], font=font, anchor="mm")
    return out


def render(image_map: ImageMap, paths: Sequence[Path2D], position: int | None = None,
           background: Canvas | None = None) -> np.ndarray:
    """The map with its clusters and each path up to `position` (0 = the initial noise; None = the whole path):
    x_t as a thin line from a square (the initial noise), x0-hat as dots, a ring where x0-hat is now.
    `background`: from canvas(), to draw many pictures on one. uint8 [SIZE, SIZE, 3]."""
    background = background or canvas(image_map, paths)
    image = background.base.copy()
    draw = ImageDraw.Draw(image)
    for n, p in enumerate(paths):
        color = PATH_COLORS[n % len(PATH_COLORS)]
        upto = len(p.x0) if position is None else position
        xt, x0 = background.to_px(p.xt[:upto + 1]), background.to_px(p.x0[:upto])
        if len(xt) > 1:
            draw.line([tuple(q) for q in xt], fill=color, width=1)
        for x, y in x0:
            draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=color)
        x, y = (x0[-1] if len(x0) else xt[0])
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=color, width=2)
        sx, sy = xt[0]
        draw.rectangle((sx - 2, sy - 2, sx + 2, sy + 2), outline=color)
    return np.asarray(image)


def mappable(run) -> bool:
    """Whether the run kept the latents a map needs (a saved run may come with frames only)."""
    return {"initial_noise", "xt", "x0"} <= set(run.tensors)


def step_frames(runs) -> list[list[np.ndarray] | None]:
    """For each run: its map at every step (its own path up to that step), or None without latents. One map for all
    the runs of a model (shipped with it, else fitted on them): models have latent spaces of their own."""
    frames: list[list[np.ndarray] | None] = [None] * len(runs)
    for model in dict.fromkeys(r.settings.model for r in runs):
        group = [k for k, r in enumerate(runs) if r.settings.model == model and mappable(r)]
        if not group:
            continue
        image_map = for_runs([runs[k] for k in group])
        paths = {k: path(runs[k], image_map) for k in group}
        shared = canvas(image_map, list(paths.values()))
        for k, p in paths.items():
            frames[k] = [render(image_map, [p], i + 1, shared) for i in range(len(p.x0))]
    return frames


def seeds_map(runs) -> tuple[np.ndarray, str]:
    """Several runs' whole paths on one map, and a line saying which cluster each ended nearest."""
    image_map = for_runs(runs)
    paths = [path(r, image_map) for r in runs]
    ends = [image_map.cluster(p.end) for p in paths]
    if ends[0] is None:
        return render(image_map, paths), f"{len(runs)} paths on a map fitted to these runs (no shipped clusters)."
    counts = {name: ends.count(name) for name in dict.fromkeys(ends)}
    return render(image_map, paths), "Ended nearest: " + ", ".join(f"{name} {n} of {len(runs)}"
                                                               for name, n in counts.items()) + "."


def build(model: str = "embedded", scenes_count: int = 900, seed: int = 0) -> ImageMap:
    """An embedded model's map: PCA of the VAE latents (posterior means, scaled) of its training images. The
    emoji model: every emoji, labelled by its main colour; the shapes model: `scenes_count` random scenes,
    labelled by their background."""
    from ..demo_model import emoji, scenes
    from ..engine.decode import from_vae_space
    from ..engine.models import embedded_name, load_pipeline

    pipe = load_pipeline(model)
    if embedded_name(model) == "shapes":
        rng = random.Random(seed)
        drawn = [scenes.random_scene(rng) for _ in range(scenes_count)]
        images = np.stack([np.asarray(scenes.render(s)) for s in drawn]).transpose(0, 3, 1, 2)
        labels, groups = [list(scenes.BACKGROUNDS).index(s.background) for s in drawn], \
            tuple(f"{b} background" for b in scenes.BACKGROUNDS)
    else:
        images = emoji.images()
        labels, groups = [emoji.colour_group(image) for image in images], emoji.COLOUR_GROUPS
    pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        latents = torch.cat([from_vae_space(pipe.vae, pipe.vae.encode(chunk).latent_dist.mean)
                             for chunk in pixels.split(256)])
    return fit(latents, labels, groups)


def main(argv=None) -> None:
    from ..engine.models import resolve

    parser = argparse.ArgumentParser(description="Fit an embedded model's image-space map and save it in its folder.")
    parser.add_argument("--model", default="embedded", help="emoji (embedded) or shapes")
    parser.add_argument("--scenes", type=int, default=900, help="shapes: how many training scenes")
    args = parser.parse_args(argv)
    target = Path(resolve(args.model).source) / MAP_FILE
    build(args.model, scenes_count=args.scenes).save(target)
    print(f"-> {target}")


if __name__ == "__main__":
    main()
