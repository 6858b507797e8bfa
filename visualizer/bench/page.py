"""The one-file player's size (media/page.py), per WebP quality: `python -m visualizer bench --page`.

Rows: the embedded model's 25 steps as the page embeds them (64x64, lossless), and 25 steps at 512x512 two ways,
as no SD weights are here: the embedded model's frames upscaled (smooth: a low bound for a real SD run) and a
random-weights SD VAE decoding a real run's latents (structured noise in every frame: a high bound).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from .. import api
from ..engine.run import Run
from ..media import page

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "example" / "euler"
QUALITIES = (60, 70, 80, 90)
MB = 2 ** 20


def _upscaled(run: Run, side: int) -> Run:
    def up(frame):
        return np.asarray(Image.fromarray(frame).resize((side, side), Image.Resampling.BICUBIC))

    return dataclasses.replace(run, frames={k: [up(f) for f in v] for k, v in run.frames.items()},
                               start_frame=up(run.start_frame))


def _random_vae_run(side: int) -> Run:
    """25 Euler steps of a tiny random SD pipeline whose VAE decodes to `side` pixels."""
    import tempfile

    from ..demo_model.architecture import tiny_pipeline

    folder = tiny_pipeline(Path(tempfile.mkdtemp()))
    return api.run("a red circle", model=str(folder), num_inference_steps=25, width=side, height=side)


def _size(runs, quality: int) -> int:
    previous, page.WEBP_QUALITY = page.WEBP_QUALITY, quality
    try:
        return len(page.player_page(runs).encode())
    finally:
        page.WEBP_QUALITY = previous


def main() -> list[dict]:
    example = Run.load(EXAMPLE)
    rows = [{"frames": "embedded model, 64x64 (lossless)", "quality": "-", "MB": _size([example], 0) / MB}]
    for name, run in (("512x512, embedded frames upscaled (smooth)", _upscaled(example, 512)),
                      ("512x512, random-weights VAE (noisy)", _random_vae_run(512))):
        for quality in QUALITIES:
            rows.append({"frames": name, "quality": quality, "MB": _size([run], quality) / MB})
    print(f"{'25 steps, x_t and x0-hat, start included':46s} {'WebP q':>6s} {'MB':>6s}")
    for row in rows:
        print(f"{row['frames']:46s} {row['quality']!s:>6s} {row['MB']:6.2f}")
    return rows


if __name__ == "__main__":
    main()
