"""The Compare tab's handlers: samplers in lockstep, or models in turn, on one shared slider; the grid's
downloads."""
from __future__ import annotations

from typing import NamedTuple

import gradio as gr
import numpy as np

from .. import api
from ..engine.samplers import DEFAULT_SAMPLER
from ..errors import VisualizerError, user_message
from ..media import views
from ..media.export import GRID_FORMATS, export_grid
from .runs import Runs, UserError

MAX_COMPARED_SAMPLERS = 8


class CompareOutputs(NamedTuple):
    """What a Compare update sets, by name (the layout wires the components in this order)."""
    player: dict  # gr.update of the grid player's props
    grid_image: np.ndarray | None  # every cell's final image, side by side
    run_id: str | None
    status: str
    file: str | None  # the grid's download: emptied by a new comparison


class CompareTab:
    def __init__(self, runs: Runs):
        self.runs = runs

    def compare(self, prompt, negative_prompt, seed, steps, guidance, samplers, width, height, model,
                attention=False, models="", true_cfg=None, request: gr.Request = None, player: bool = True):
        """Stream a comparison into the grid player: 2 to 8 samplers in lockstep on `model`, or, when `models` lists
        2 to 4 models (comma-separated), each of them in turn with the first picked sampler (Euler where it does
        not fit the model)."""
        samplers, models = list(samplers or []), [m for m in (models or "").split(",") if m.strip()]
        if not models and not 2 <= len(samplers) <= MAX_COMPARED_SAMPLERS:
            raise UserError(f"Pick 2 to {MAX_COMPARED_SAMPLERS} samplers to compare (you picked {len(samplers)}).")
        settings = self.runs.settings(prompt, negative_prompt, seed, steps, guidance,
                                      samplers[0] if samplers else DEFAULT_SAMPLER, width, height, model,
                                      attention=attention, true_cfg=true_cfg)
        jobs = [(settings, samplers)]
        if models:
            try:
                jobs = [(s, None) for s in api.model_settings(settings, [self.runs.check_model(m) for m in models])]
            except VisualizerError as error:
                raise UserError(user_message(error) or str(error)) from None
        for props, run_id in self.runs.stream(jobs, getattr(request, "session_hash", None), player):
            if run_id is None:  # plain values while it streams (see GenerateTab.generate)
                yield CompareOutputs(gr.update(**props), None, None, props["status"], None)
                continue
            yield CompareOutputs(gr.update(**props), views.grid_frame(self.runs.store.get(run_id), 1.0), run_id,
                                 props["status"], None)

    def download_grid(self, run_id, fmt) -> str:
        """Write one export of the stored comparison (grid GIF / MP4, final images PNG); return the path."""
        if fmt not in GRID_FORMATS:
            raise UserError(f"Unknown grid export format {fmt!r}: choose one of {', '.join(GRID_FORMATS)}.")
        runs = self.runs.get(run_id)
        try:
            return str(export_grid(runs, self.runs.store.folder(run_id), [fmt])[fmt])
        except OSError as error:
            raise UserError(f"Could not write the {fmt} file: {error.strerror or error}.") from error
