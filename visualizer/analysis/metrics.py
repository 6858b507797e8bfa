"""How a run converges: per-step metrics against the final image, the structure step, change heatmaps."""
from __future__ import annotations

import numpy as np


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two uint8 RGB images (grey, box window), in [-1, 1]."""
    x, y = (np.asarray(i, np.float64).mean(axis=2) / 255 for i in (a, b))

    def box(z):
        c = np.pad(z, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        w = window
        return (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]) / (w * w)

    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx ** 2, box(y * y) - my ** 2, box(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean square difference of two uint8 images, in [0, 1]."""
    return float(np.sqrt((((a.astype(np.float64) - b.astype(np.float64)) / 255) ** 2).mean()))


def step_metrics(run) -> list[dict]:
    """Per step: how far x0-hat and x_t are from the final image (SSIM, RMSE in [0, 1]; latent distance
    relative to the final latents) and how much x0-hat changed since the previous step."""
    final = run.frames["xt"][-1]
    final_latents = run.tensors["latents"][-1]
    norm = float(final_latents.norm()) or 1.0
    out = []
    for i in range(len(run)):
        x0 = run.frames["x0"][i]
        out.append({
            "step": i + 1,
            "ssim_x0_to_final": round(ssim(x0, final), 4),
            "rmse_x0_to_final": round(rmse(x0, final), 4),
            "rmse_xt_to_final": round(rmse(run.frames["xt"][i], final), 4),
            "latent_distance_x0_to_final": round(float((run.tensors["x0"][i] - final_latents).norm()) / norm, 4),
            "change_from_previous": round(rmse(x0, run.frames["x0"][i - 1]), 4) if i else None,
        })
    return out


def structure_step(metrics: list[dict]) -> int | None:
    """The step (1-based) where structure appears: the first whose x0-hat distance to the final image
    (1 - SSIM) has fallen to half its value at step 1; None if it never does."""
    if not metrics:
        return None
    start = 1 - metrics[0]["ssim_x0_to_final"]
    return next((m["step"] for m in metrics if 1 - m["ssim_x0_to_final"] <= start / 2), None)


def heat(values: np.ndarray, scale: float | None = None) -> np.ndarray:
    """A 2-D array -> uint8 RGB heatmap (black -> red -> yellow -> white)."""
    v = values / (scale or values.max() or 1.0)
    v = np.clip(v, 0, 1)
    return (np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1) * 255).astype(np.uint8)


def change_image(previous: np.ndarray | None, current: np.ndarray) -> np.ndarray:
    """|current - previous| per pixel (uint8 frames) as a heatmap; black when there is no previous frame."""
    if previous is None:
        previous = current
    return heat(np.abs(current.astype(np.float32) - previous.astype(np.float32)).mean(axis=2), scale=255 * 0.25)


def change_heatmap(run, index: int) -> np.ndarray:
    """|x0-hat(step) - x0-hat(previous step)| of step `index` (0-based) as a heatmap (black at the first step)."""
    return change_image(run.frames["x0"][index - 1] if index else None, run.frames["x0"][index])


def attach_metrics(run) -> None:
    """Store per-step metrics and the structure step in `run.info` (so they land in run.json); a stopped run
    has no final image to measure against, so it gets none."""
    if len(run) and not run.info.stopped and {"xt", "x0"} <= set(run.frames):
        run.info.metrics = step_metrics(run)
        run.info.structure_step = structure_step(run.info.metrics)
