"""What the slider shows: one step of a run (or of several, aligned) as an RGB image and a label.

Plain numpy / PIL, no gradio: the UI and the tests call the same functions.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .export import MIN_SIZE, film, grid, upscale, view_frames
from .player import VIEWS  # noqa: F401  (the views a step can be shown in: the player's View menu)
from ..engine.labels import comparison_labels, start_what, step_label



def latent_tiles(tensor) -> np.ndarray:
    """[C, h, w] (tensor or array) -> uint8 grey tiles side by side, each channel normalised to its own range.
    Plain numpy, so it runs on any thread (torch work stays on the engine thread, see api._ENGINE)."""
    array = np.asarray(tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor, dtype=np.float32)
    tiles = []
    for channel in array:
        low, high = channel.min(), channel.max()
        tiles.append(((channel - low) / (high - low + 1e-8) * 255).astype(np.uint8))
        tiles.append(np.full((channel.shape[0], 1), 40, np.uint8))
    return np.repeat(np.concatenate(tiles[:-1], axis=1)[..., None], 3, axis=2)


def frame(run, index: int, view: str = "xt") -> np.ndarray:
    """The image of step `index` (0-based) of `run` in `view` (a VIEWS value), upscaled for display."""
    if view in ("xt", "x0", "both"):
        return np.asarray(upscale(view_frames(run, view)[index], MIN_SIZE))
    if view == "forward":
        if "forward" not in run.frames:
            raise ValueError("No forward-noised image yet: open the Forward noising tab and press Noise it.")
        return np.asarray(upscale(run.frames["forward"][index], MIN_SIZE))
    if view == "map":
        from ..analysis import image_map

        if not image_map.mappable(run):
            raise ValueError("This run was saved without its latents: it has no path to map.")
        return image_map.step_frames([run])[0][index]
    if view == "latents":
        image = latent_tiles(run.tensors["xt"][index])
    elif view == "noise":
        image = latent_tiles(run.tensors["eps"][index])
    else:
        raise ValueError(f"Unknown view {view!r}.")
    return np.asarray(upscale(image, 128))


def start_frame(run, view: str = "xt") -> np.ndarray:
    """The start (the initial noise before step 1, Run.start_frame) as `view` ('xt', 'x0' or 'both') shows it."""
    return np.asarray(upscale(film(run, view)[0][0], MIN_SIZE))


def describe_start(run) -> str:
    """One line about the start: what it is and its noise level (that of step 1's input)."""
    first = run.steps[0]
    return (f"Start (before step 1 of {len(run)}): {start_what(run)} · timestep t = {first.timestep:.0f} · "
            f"sigma = {first.sigma:.3f} · noise share {first.noise_share:.0%}")


def describe(run, index: int) -> str:
    """One line about step `index` (0-based): step, t, sigma, noise share, evaluations."""
    step = run.steps[index]
    return (f"Step {step.index} of {len(run)} · timestep t = {step.timestep:.0f} · sigma = {step.sigma:.3f} · "
            f"noise share {step.noise_share:.0%}" + (f" · {step.evaluations} model evaluations" if step.evaluations > 1 else ""))


def aligned_index(run, progress: float) -> int:
    """The step of `run` at `progress` (0..1] through its schedule (0-based)."""
    return max(0, min(len(run) - 1, math.ceil(progress * len(run)) - 1))


def grid_frame(runs, progress: float, view: str = "xt", columns: int | None = None) -> np.ndarray:
    """All runs at the same progress through their schedules, one labelled cell each."""
    view = view if view in ("xt", "x0") else "xt"
    cells, labels = [], []
    for run, name in zip(runs, comparison_labels([r.settings for r in runs])):
        i = aligned_index(run, progress)
        cells.append(upscale(view_frames(run, view)[i], MIN_SIZE))
        labels.append(f"{name} · {step_label(run.steps[i], len(run))}")
    return np.asarray(grid(cells, labels, columns or min(4, len(runs))))
