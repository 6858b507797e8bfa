"""Word maps a person sees: per-token heatmaps over the steps and each token's share of attention."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import SettingsError
from .metrics import heat


def token_index(run, word: str) -> int:
    """The position of `word` among the run's word-map tokens, or a SettingsError listing them."""
    tokens = (run.info.attention or {}).get("tokens")
    if not tokens:
        raise SettingsError("This run has no word maps: generate it with attention on (--attention).")
    if word not in tokens:
        raise SettingsError(f"{word!r} is not a token of this prompt; its tokens are: {', '.join(tokens)}.")
    return tokens.index(word)


def heat_frames(run, index: int) -> list[np.ndarray]:
    """Token `index`'s combined map at every step as a heatmap (each step scaled to its own maximum)."""
    return [heat(m.numpy()) for m in run.tensors["attention"][:, index]]


def aggregate_heat(run, index: int) -> np.ndarray:
    """Token `index`'s map summed over all steps (what DAAM shows), as a heatmap."""
    return heat(run.tensors["attention"][:, index].sum(0).numpy())


def shares(run) -> list[list[float]]:
    """Per step, each token's share of the cross-attention the prompt's words get (raw maps, all resolutions)."""
    names = [k for k in run.tensors if k.startswith("attention_")]
    mass = sum(run.tensors[k].mean(dim=(2, 3)) for k in names) / len(names)  # [steps, tokens]
    return (mass / mass.sum(1, keepdim=True).clamp_min(1e-12)).tolist()


def overlay(frame: np.ndarray, heatmap: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """`heatmap` (any size) laid over `frame` with `opacity`, where the map is bright."""
    size = (frame.shape[1], frame.shape[0])
    hot = np.asarray(Image.fromarray(heatmap).resize(size, Image.Resampling.BILINEAR), np.float32)
    alpha = opacity * hot.max(axis=2, keepdims=True) / 255
    return (frame * (1 - alpha) + hot * alpha).astype(np.uint8)
