"""Every view of every step written once as an image file, for a browser to load, cache and scrub.

`RunFiles` follows a generation as it streams (step events, then exact frames as they are decoded) and
ends with the finished runs; each cell is one run (one sampler). Small frames are PNG (lossless and
tiny), large ones WebP. No gradio here: the UI turns the paths into URLs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..engine.run import START, Run, Step
from ..analysis import image_map
from ..analysis import word_maps
from ..analysis.metrics import change_image
from ..engine.labels import comparison_labels
from ..media.views import latent_tiles

PNG_MAX_SIDE = 256  # frames up to this size are PNG; larger ones WebP
DRAWN_KINDS = ("map",)  # flat drawings: PNG at any size (smaller and 3x faster to write than WebP for these)
WEBP_QUALITY = 90
STEP_KINDS = ("xt", "x0", "latents", "noise", "change")  # what every step gets; "forward" comes on request
START_LATENTS = "start-latents"  # the start's latent channels (its decoded frame is kind run.START)


@dataclass
class Cell:
    label: str  # the sampler (or run) name shown on the cell
    total: int  # steps the run will have
    steps: list[Step] = field(default_factory=list)
    paths: dict[str, list[Path | None]] = field(default_factory=dict)  # kind -> one file per step (None: not yet)
    curve: list[float] | None = None  # 1 - SSIM of x0-hat to the final image, per step (finished runs)
    structure: int | None = None  # the step where structure appears
    words: dict | None = None  # word maps: {"tokens": [...], "shares": per step, each token's share}; their
    # heatmaps are the kinds "attn0", "attn1", ... (per step) and "attn0-all", ... (all steps, one image)
    prediction: str | None = None  # what the model outputs (RunInfo.prediction_type), once the run is done
    start: bool = True  # the run has a start frame (the initial noise, kinds START and START_LATENTS); False for
    # runs saved before there was one


class RunFiles:
    """The files of one generation (one or several runs in lockstep) under `folder`."""

    def __init__(self, folder: Path, labels: list[str], totals: list[int]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cells = [Cell(label, total) for label, total in zip(labels, totals)]

    def _write(self, cell: int, kind: str, index: int, image: np.ndarray) -> None:
        """Write step `index` (0-based) of `kind` for `cell`, unless it is already there."""
        paths = self.cells[cell].paths.setdefault(kind, [])
        paths.extend([None] * (index + 1 - len(paths)))
        if paths[index] is not None:
            return
        suffix = "png" if max(image.shape[:2]) <= PNG_MAX_SIDE or kind in DRAWN_KINDS else "webp"
        path = self.folder / f"{cell}-{kind}-{index + 1:04d}.{suffix}"
        Image.fromarray(image).save(path, **({"quality": WEBP_QUALITY} if suffix == "webp" else {"compress_level": 1}))
        paths[index] = path

    def add_step(self, event, first_cell: int = 0) -> None:
        """A finished step: its numbers and the views computed from its tensors (latents, noise prediction).
        `first_cell`: the cell of the event's sampler 0 (a generation of several models fills cells in turn)."""
        number = first_cell + event.sampler_index
        cell = self.cells[number]
        cell.total = event.total_steps
        index = event.step.index - 1
        if len(cell.steps) == index:
            cell.steps.append(event.step)
        self._write(number, "latents", index, latent_tiles(event.xt[0]))
        self._write(number, "noise", index, latent_tiles(event.eps[0]))
        if index == 0:
            self._write(number, START_LATENTS, 0, latent_tiles(event.x_in[0]))

    def add_decoded(self, frames: dict[int, dict[str, dict[int, np.ndarray] | list[np.ndarray]]],
                    first_cell: int = 0) -> None:
        """Exact frames decoded so far (sampler -> kind -> step -> frame, as StreamingDecoder.frames, or lists):
        write the new ones, and the change heatmap of each x0-hat whose previous step is there too."""
        for sampler, kinds in frames.items():
            cell = first_cell + sampler
            for kind, items in kinds.items():
                items = dict(enumerate(items)) if isinstance(items, list) else items
                written = self.cells[cell].paths.get(kind, [])
                for step in sorted(items):
                    if step >= len(written) or written[step] is None:
                        self._write(cell, kind, step, items[step])
                        written = self.cells[cell].paths[kind]
                if kind == "x0":
                    changes = self.cells[cell].paths.get("change", [])
                    for step in sorted(items):
                        if (step >= len(changes) or changes[step] is None) and (step == 0 or step - 1 in items):
                            self._write(cell, "change", step, change_image(items.get(step - 1), items[step]))
                            changes = self.cells[cell].paths["change"]

    def add_run(self, cell: int, run: Run) -> None:
        """A finished run: whatever is still missing, the final numbers and the convergence curve."""
        self.cells[cell].steps = list(run.steps)
        self.cells[cell].total = len(run)
        self.cells[cell].prediction = run.info.prediction_type
        self.cells[cell].start = run.start_frame is not None
        if {"xt", "eps"} <= set(run.tensors):  # a saved run may come without its tensors (frames only)
            for index in range(len(run)):
                self._write(cell, "latents", index, latent_tiles(run.tensors["xt"][index]))
                self._write(cell, "noise", index, latent_tiles(run.tensors["eps"][index]))
        if run.start_frame is not None:
            self._write(cell, START, 0, run.start_frame)
            if "x_in" in run.tensors:
                self._write(cell, START_LATENTS, 0, latent_tiles(run.tensors["x_in"][0]))
        self.add_decoded({cell: {k: run.frames[k] for k in ("xt", "x0") if k in run.frames}})
        if "attention" in run.tensors and run.info.attention:
            tokens = run.info.attention["tokens"]
            for k in range(len(tokens)):
                for index, frame in enumerate(word_maps.heat_frames(run, k)):
                    self._write(cell, f"attn{k}", index, frame)
                self._write(cell, f"attn{k}-all", 0, word_maps.aggregate_heat(run, k))
            self.cells[cell].words = {"tokens": tokens, "shares": word_maps.shares(run)}
        if run.info.metrics:
            self.cells[cell].curve = [round(1 - m["ssim_x0_to_final"], 4) for m in run.info.metrics]
            self.cells[cell].structure = run.info.structure_step

    def add_view(self, cell: int, kind: str, frames: list[np.ndarray]) -> None:
        """Another per-step view (e.g. forward noising), replacing any earlier one of that kind."""
        self.cells[cell].paths[kind] = []
        for index, frame in enumerate(frames):
            self._write(cell, kind, index, frame)

    def add_maps(self, runs: list[Run]) -> None:
        """The "map" view: each finished run's path through image space, step by step (image_map.py)."""
        for cell, frames in enumerate(image_map.step_frames(runs)):
            if frames is not None:
                self.add_view(cell, "map", frames)

    @classmethod
    def of_runs(cls, folder: Path, runs: list[Run]) -> "RunFiles":
        """Files for runs that are already finished (a loaded example, a re-decoded run)."""
        files = cls(folder, comparison_labels([r.settings for r in runs]), [len(r) for r in runs])
        for cell, run in enumerate(runs):
            files.add_run(cell, run)
        files.add_maps(runs)
        return files
