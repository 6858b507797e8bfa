"""The 2D playground's handler: form values -> ToySettings -> toy.sample -> the player's props.

Each run's frames (points with the field, x0-hat) and its trace file are written once under the output
folder; the page's player scrubs and plays them, and traces a clicked point with no server round trip.
"""
from __future__ import annotations

import json
import shutil
from collections import deque
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from .. import api
from ..toy import model as toy
from ..toy import render as toy_render
from ..errors import SettingsError
from ..media.player import PlayerCell, PlayerProps, start_props, step_props
from .store import RunStore
from .runs import UserError, url

MAX_SAMPLERS = 4
KEPT_RUNS = 32  # 2D runs whose files are kept for the players; older ones are deleted
TABS = ["schedule", "numbers"]  # the player's insight tabs that mean something for points


class Playground:
    def __init__(self, output_dir: Path):
        self.folder = Path(output_dir) / "toy"
        self._kept: deque[Path] = deque()

    def settings(self, pattern, samplers, steps, seed, label, guidance, points) -> list[toy.ToySettings]:
        samplers = list(samplers or [])
        if not 1 <= len(samplers) <= MAX_SAMPLERS:
            raise UserError(f"Pick 1 to {MAX_SAMPLERS} samplers (several move the same starting points side by side).")
        try:
            return [toy.ToySettings(pattern=pattern, sampler=s, num_inference_steps=steps, seed=seed,
                                    label=None if label in (None, "", "any") else label, guidance_scale=guidance,
                                    points=points).validate() for s in samplers]
        except SettingsError as error:
            raise UserError(str(error)) from None

    def initial_props(self) -> dict:
        """The player's props for a run of the default settings (what the tab opens with)."""
        return self.props(api.on_engine(toy.sample, [toy.ToySettings()]))

    def run(self, pattern, samplers, steps, seed, label, guidance, points):
        """Sample, write every frame, and update the player."""
        runs = api.on_engine(toy.sample, self.settings(pattern, samplers, steps, seed, label, guidance, points))
        return gr.update(**self.props(runs))

    def props(self, runs: list[toy.ToyRun], folder: Path | None = None) -> dict:
        """The player's props for `runs`, their frames written under `folder` (default: a new folder of the
        playground's, among the KEPT_RUNS newest)."""
        run_id = RunStore.new_id()
        if folder is None:
            folder = self.folder / run_id
            self._keep(folder)
        folder.mkdir(parents=True)
        colors = toy_render.point_colors(runs[0])
        cells = []
        for c, run in enumerate(runs):
            frames = {}
            for kind in toy_render.VIEWS:
                paths = []
                for position in range(len(run) + 1):
                    path = folder / f"{c}-{kind}-{position:04d}.png"
                    Image.fromarray(toy_render.frame(run, position, kind, colors)).save(path, compress_level=1)
                    paths.append(url(path))
                frames[kind] = paths
            trace = folder / f"{c}-trace.json"
            trace.write_text(json.dumps(toy_render.trace(run), separators=(",", ":")))
            cells.append(PlayerCell(label=run.settings.sampler, total=len(run) + 1, start=True, trace=url(trace),
                                    steps=[start_props(run.steps[0])] + [step_props(s) for s in run.steps], frames=frames))
        return PlayerProps(cells=cells, views=list(toy_render.VIEWS.items()), status=_status(runs), run=run_id,
                           tabs=TABS).as_props()

    def _keep(self, folder: Path) -> None:
        self._kept.append(folder)
        while len(self._kept) > KEPT_RUNS:
            shutil.rmtree(self._kept.popleft(), ignore_errors=True)


def _status(runs: list[toy.ToyRun]) -> str:
    s = runs[0].settings
    distance = toy.distance_ratio(runs[0])
    asked = ""
    if s.label is not None:
        share = np.mean(toy.final_clusters(runs[0]) == s.label_index)
        asked = f"; {share:.0%} ended on the {s.label}"
    return (f"{s.points} points, {len(runs[0])} steps: the median distance to the pattern fell to {distance:.0%} of the "
            f"noise's{asked}. Click a point to trace its path.")
