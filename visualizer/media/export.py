"""Exports of a run's frames: GIF, MP4, WebP, ZIP of PNGs, contact sheet, and sampler grids.

Frames are uint8 [H, W, 3] arrays. Small frames are upscaled by a whole factor (nearest) so that
the shorter side is at least `min_size` pixels: a 64x64 model's frames stay crisp and visible.
"""
from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..engine.run import START_FILE
from .page import write_page
from ..engine.labels import comparison_labels, start_label, step_label


MIN_SIZE = 256


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def upscale(frame: np.ndarray, min_size: int = MIN_SIZE) -> Image.Image:
    image = Image.fromarray(frame)
    factor = max(1, math.ceil(min_size / min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 else image


def caption_frame(image: Image.Image, text: str) -> Image.Image:
    """`image` with a dark band below it holding `text`."""
    size = max(11, image.width // 28)
    band = size + 8
    out = Image.new("RGB", (image.width, image.height + band), (20, 20, 24))
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((6, image.height + 4), text, fill=(235, 235, 235), font=_font(size))
    return out


def prepare(frames: Sequence[np.ndarray], captions: Sequence[str] | None = None, min_size: int = MIN_SIZE) -> list[Image.Image]:
    images = [upscale(f, min_size) for f in frames]
    if captions:
        images = [caption_frame(im, text) for im, text in zip(images, captions)]
    return images


def _durations(count: int, fps: float, hold_last: float) -> list[int]:
    frame_ms = int(round(1000 / fps))
    return [frame_ms] * (count - 1) + [max(frame_ms, int(hold_last * 1000))]


def save_gif(images: Sequence[Image.Image], path: str | Path, fps: float = 8, hold_last: float = 1.5) -> Path:
    """Looping GIF; frames are pre-quantized (fast octree) so 50 frames of 512x512 encode quickly."""
    if not images:
        raise ValueError("No frames to export.")
    quantized = [im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE) for im in images]
    quantized[0].save(path, save_all=True, append_images=quantized[1:], loop=0,
                      duration=_durations(len(images), fps, hold_last), optimize=False, disposal=1)
    return Path(path)


def save_webp(images: Sequence[Image.Image], path: str | Path, fps: float = 8, hold_last: float = 1.5) -> Path:
    if not images:
        raise ValueError("No frames to export.")
    images[0].save(path, save_all=True, append_images=list(images[1:]), loop=0,
                   duration=_durations(len(images), fps, hold_last), quality=85, method=2)
    return Path(path)


def save_mp4(images: Sequence[Image.Image], path: str | Path, fps: float = 8, hold_last: float = 1.5) -> Path:
    """H.264 MP4 (yuv420p, even sizes) through imageio-ffmpeg; the last frame is repeated to hold it."""
    import imageio_ffmpeg

    if not images:
        raise ValueError("No frames to export.")
    width, height = images[0].size
    width, height = width + width % 2, height + height % 2
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1, quality=7,
                                         ffmpeg_log_level="error", output_params=["-preset", "veryfast"])
    writer.send(None)
    hold = max(0, int(round(hold_last * fps)) - 1)
    try:
        for image in list(images) + [images[-1]] * hold:
            canvas = Image.new("RGB", (width, height))
            canvas.paste(image.convert("RGB"), (0, 0))
            writer.send(np.ascontiguousarray(np.asarray(canvas)))
    finally:
        writer.close()
    return Path(path)


def save_zip(frames: dict[str, Sequence[np.ndarray]], path: str | Path, start: np.ndarray | None = None) -> Path:
    """PNG frames at native size, named like kind_0001.png (step 1 on), in one ZIP; `start` (the initial noise) as
    xt_0000.png, as in a run folder."""
    def png(frame: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        return buffer.getvalue()

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        if start is not None:
            archive.writestr(START_FILE, png(start))
        for kind, items in frames.items():
            for i, frame in enumerate(items, start=1):
                archive.writestr(f"{kind}_{i:04d}.png", png(frame))
    return Path(path)


def grid(images: Sequence[Image.Image], labels: Sequence[str] | None = None, columns: int | None = None,
         gap: int = 4) -> Image.Image:
    """Images laid out in a grid (row-major), each with its label underneath; images of other sizes (runs of
    different models) are resized to the largest."""
    size = (max(im.width for im in images), max(im.height for im in images))
    images = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]
    if labels:
        images = [caption_frame(im, label) for im, label in zip(images, labels)]
    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w + (columns - 1) * gap, rows * h + (rows - 1) * gap), (20, 20, 24))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return sheet


def contact_sheet(frames: Sequence[np.ndarray], labels: Sequence[str], count: int = 8, columns: int = 8) -> Image.Image:
    """A filmstrip of `count` evenly spaced steps (always the last one), labelled."""
    picks = sorted({round(i * (len(frames) - 1) / max(1, count - 1)) for i in range(min(count, len(frames)))})
    return grid([upscale(frames[i], 128) for i in picks], [labels[i] for i in picks], columns=min(columns, len(picks)))


def aligned_indices(step_counts: Sequence[int], frames: int | None = None) -> list[list[int]]:
    """For each output frame, the step index (0-based) of every run at the same progress through its schedule."""
    frames = frames or max(step_counts)
    return [[max(0, math.ceil((j + 1) / frames * n) - 1) for n in step_counts] for j in range(frames)]


def grid_frames(runs_frames: Sequence[Sequence[np.ndarray]], run_labels: Sequence[Sequence[str]],
                columns: int | None = None, min_size: int = MIN_SIZE) -> list[Image.Image]:
    """Side-by-side animation frames of several runs, aligned by progress through the schedule."""
    out = []
    for picks in aligned_indices([len(f) for f in runs_frames]):
        cells = [upscale(frames[i], min_size) for frames, i in zip(runs_frames, picks)]
        out.append(grid(cells, [labels[i] for labels, i in zip(run_labels, picks)], columns))
    return out


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two frames with a thin dark line between them (the "both" view)."""
    return np.concatenate([left, np.full((left.shape[0], 2, 3), 20, np.uint8), right], axis=1)


def view_frames(run, view: str = "xt") -> list[np.ndarray]:
    """The frames an animation shows: 'xt', 'x0', or 'both' (x_t and x0-hat side by side)."""
    if view == "both":
        return [side_by_side(a, b) for a, b in zip(run.frames["xt"], run.frames["x0"])]
    if view not in run.frames:
        raise ValueError(f"Unknown view {view!r}: choose xt, x0 or both.")
    return list(run.frames[view])


def film(run, view: str = "xt", start: bool = True) -> tuple[list[np.ndarray], list[str]]:
    """What an animation of `run` shows, with a label per frame: the start (with `start`, where the run has it: the
    initial noise, in every view, as nothing is predicted before step 1), then each step in `view`."""
    frames, labels = view_frames(run, view), [step_label(s, len(run)) for s in run.steps]
    if not start or run.start_frame is None or not frames:
        return frames, labels
    start = side_by_side(run.start_frame, run.start_frame) if view == "both" else run.start_frame
    return [start, *frames], [start_label(run), *labels]


ANIMATIONS = {"gif": ("denoising.gif", save_gif), "mp4": ("denoising.mp4", save_mp4), "webp": ("denoising.webp", save_webp)}
RUN_FORMATS = (*ANIMATIONS, "zip", "sheet", "html")  # what export_run writes
GRID_FORMATS = ("png", *ANIMATIONS, "html")  # what export_grid writes (html: page.py's one-file player)


def export_run(run, folder: str | Path, formats: Sequence[str] = ("gif",), view: str = "xt", fps: float = 8,
               captions: bool = True) -> dict[str, Path]:
    """Write the asked exports of a decoded run into `folder`: gif, mp4, webp, zip, sheet, html (player.html, every
    view: `view` is the animations' and the sheet's). Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames, labels = film(run, view)
    written: dict[str, Path] = {}
    animations = [f for f in formats if f in ANIMATIONS]
    if animations:
        images = prepare(frames, labels if captions else None)
        for fmt in animations:
            name, save = ANIMATIONS[fmt]
            written[fmt] = save(images, folder / name, fps=fps)
    if "zip" in formats:
        written["zip"] = save_zip(run.frames, folder / "frames.zip", run.start_frame)
    if "sheet" in formats:
        written["sheet"] = folder / "sheet.png"
        contact_sheet(frames, labels).save(written["sheet"])
    if "html" in formats:
        written["html"] = write_page([run], folder)
    unknown = set(formats) - set(RUN_FORMATS)
    if unknown:
        raise ValueError(f"Unknown export format(s): {', '.join(sorted(unknown))}.")
    return written


def export_grid(runs, folder: str | Path, formats: Sequence[str] = ("png", "gif"), view: str = "xt",
                fps: float = 8, columns: int | None = None) -> dict[str, Path]:
    """Comparison exports (samplers, or models): grid.png (final images, labelled), grid.gif / grid.mp4 (aligned
    animation) and player.html (the comparison's player, one file)."""
    unknown = set(formats) - set(GRID_FORMATS)
    if unknown:
        raise ValueError(f"Unknown grid export format(s): {', '.join(sorted(unknown))}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = columns or min(4, len(runs))
    names = comparison_labels([r.settings for r in runs])
    written: dict[str, Path] = {}
    if "png" in formats:
        finals = [upscale(view_frames(r, view)[-1]) for r in runs]
        written["png"] = folder / "grid.png"
        grid(finals, names, columns).save(written["png"])
    animations = [f for f in formats if f in ANIMATIONS]
    if animations:
        starts = all(r.start_frame is not None for r in runs)  # a shared first frame, then aligned steps
        films = [film(r, view, starts) for r in runs]
        labels = [[f"{name} · {label}" for label in film_labels] for (_, film_labels), name in zip(films, names)]
        images = grid_frames([frames[starts:] for frames, _ in films], [lab[starts:] for lab in labels], columns)
        if starts:
            first = [upscale(frames[0]) for frames, _ in films]
            images.insert(0, grid(first, [lab[0] for lab in labels], columns))
        for fmt in animations:
            written[fmt] = ANIMATIONS[fmt][1](images, folder / f"grid.{fmt}", fps=fps)
    if "html" in formats:
        written["html"] = write_page(runs, folder)
    return written
