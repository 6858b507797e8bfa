"""Matplotlib figures of a run (convergence, noise schedule) as uint8 images."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..engine.labels import comparison_labels
from .metrics import step_metrics, structure_step


def figure_png(fig) -> np.ndarray:
    """A matplotlib figure as a uint8 RGB array (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def convergence_plot(runs, current: int | None = None):
    """A matplotlib figure: 1 - SSIM(x0-hat, final) and latent distance per step, progress on x, one line
    per run (named as in a comparison: by sampler, or model and sampler); the structure step is marked, and the
    `current` step (1-based, first run) highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for k, (run, label) in enumerate(zip(runs, comparison_labels([r.settings for r in runs]))):
        metrics = run.info.metrics or step_metrics(run)
        n = len(metrics)
        x = [m["step"] / n * 100 for m in metrics]
        line, = ax.plot(x, [1 - m["ssim_x0_to_final"] for m in metrics], marker=".", label=f"{label}: 1 - SSIM")
        if len(runs) == 1:
            ax.plot(x, [m["latent_distance_x0_to_final"] for m in metrics], ls="--", color="gray",
                    label="latent distance")
        found = structure_step(metrics)
        if found:
            ax.axvline(found / n * 100, color=line.get_color(), ls=":", lw=1)
            ax.annotate(f"structure at step {found}", (found / n * 100, 0.9 - 0.1 * k), fontsize=8,
                        color=line.get_color(), xytext=(3, 0), textcoords="offset points")
        if current and k == 0:
            m = metrics[current - 1]
            ax.plot([current / n * 100], [1 - m["ssim_x0_to_final"]], "o", ms=10, mfc="none", color="crimson")
    ax.set_xlabel("progress through the schedule (%)")
    ax.set_ylabel("distance to the final image")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.set_title("x0-hat vs the final image (dotted: where structure appears)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def schedule_plot(run, current: int | None = None):
    """sigma (log scale) and noise share per step, the current step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s.index for s in run.steps]
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    ax.semilogy(steps, [max(s.sigma, 1e-4) for s in run.steps], marker=".", label="sigma")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma (log)")
    twin = ax.twinx()
    twin.plot(steps, [s.noise_share for s in run.steps], color="orange", label="noise share")
    twin.set_ylabel("noise share")
    twin.set_ylim(0, 1.05)
    if current:
        ax.axvline(current, color="crimson", lw=1.5)
    ax.set_title(f"{run.settings.sampler}: noise level per step", fontsize=9)
    ax.grid(alpha=0.3)
    return fig
