"""The Generate tab's handlers: one run into the player, its panels (guidance, forward noising, image space,
pipeline, steps table) and its downloads."""
from __future__ import annotations

import shutil
from dataclasses import replace
from typing import NamedTuple

import gradio as gr
import numpy as np

from ..analysis import image_map
from ..analysis.noising import guidance_note
from ..analysis.stages import pipeline_stages
from ..errors import SettingsError
from ..media import views
from ..media.export import RUN_FORMATS, export_run, upscale
from .runs import Runs, UserError, player_props, step_index, steps_table, user_error, vocabulary_notice

MAX_MAP_SEEDS = 16  # seeds one image-space map draws at once
GUIDANCE_PARTS = ("uncond", "cond", "added", "guided")  # the guidance panel's images, in order


class GenerateOutputs(NamedTuple):
    """What a Generate update sets, by name (the layout wires the components in this order)."""
    player: dict  # gr.update of the player's props
    final_image: np.ndarray | None
    run_id: str | None
    steps_table: list | None
    status: str
    notice: str
    file: str | None  # the Downloads file: emptied by a new run
    guidance_uncond: np.ndarray | None  # the guidance panel: emptied by a new run, filled after it (`guidance`)
    guidance_cond: np.ndarray | None
    guidance_added: np.ndarray | None
    guidance_guided: np.ndarray | None
    guidance_note: str
    stages: str


class GuidancePanel(NamedTuple):
    """The guidance panel at one step: GUIDANCE_PARTS' images (None without a CFG branch) and a line on them."""
    uncond: np.ndarray | None
    cond: np.ndarray | None
    added: np.ndarray | None
    guided: np.ndarray | None
    note: str


class GenerateTab:
    def __init__(self, runs: Runs):
        self.runs = runs

    def generate(self, prompt, negative_prompt, seed, steps, guidance, sampler, width, height, model,
                 init_image=None, strength=None, attention=False, true_cfg=None, request: gr.Request = None,
                 player: bool = True):
        """Stream the run into the player; end with the final image, the steps table and the panels (`player=False`:
        an API caller's run, no player files, see Runs.stream).

        With an `init_image` it is img2img at `strength`; without one, strength is ignored. **Stop** ends the loop
        early and the steps computed so far stay on the player.
        """
        settings = self.runs.settings(prompt, negative_prompt, seed, steps, guidance, sampler, width, height, model,
                                      init_image, strength, attention, true_cfg)
        notice = vocabulary_notice(settings.prompt, settings.model)
        for props, run_id in self.runs.stream([(settings, None)], getattr(request, "session_hash", None), player):
            # While it streams, the previous run is gone from the page: its panels, downloads and run id are empty
            # until this run is done. Every output but the player gets a plain value: gr.skip() or gr.update() makes
            # Gradio build a new component and its config at each update (about 1 ms, a table 12 ms), in Python,
            # under the GIL the model's loop needs.
            if run_id is None:
                yield GenerateOutputs(gr.update(**props), None, None, None, props["status"], notice,
                                      None, None, None, None, None, "", "")
                continue
            run = self.runs.store.get(run_id)[0]
            if run.info.truncated:
                notice = (notice + " " if notice else "") + \
                         f"The prompt was cut at {run.info.token_limit} tokens; ignored: “{run.info.dropped_text}”."
            final = run.final_image if run.final_image is not None else run.frames["x0"][-1]
            yield GenerateOutputs(gr.update(**props), final, run_id, steps_table(run), props["status"], notice,
                                  None, None, None, None, None, "", pipeline_stages(run))  # guidance: filled after

    def guidance(self, run_id, step) -> GuidancePanel:
        """The guidance breakdown of a step (the last one when `step` is empty), and what it shows in words."""
        if not run_id:
            return GuidancePanel(None, None, None, None, "")
        run = self.runs.get(run_id)[0]
        index = step_index(run, step or len(run))
        parts = self.runs.engine.guidance_breakdown(run, index) or {}
        images = (np.asarray(upscale(parts[k], 160)) if k in parts else None for k in GUIDANCE_PARTS)
        return GuidancePanel(*images, guidance_note(run))

    def guidance_at(self, run_id, position) -> GuidancePanel:
        """The guidance panel at a player position (1-based; a run with a start frame starts there, before step 1)."""
        if not run_id:
            return GuidancePanel(None, None, None, None, "")
        run = self.runs.get(run_id)[0]
        step = position and int(position) - (run.start_frame is not None)
        if step == 0:
            return GuidancePanel(None, None, None, None, "The start: the initial noise, before the model has run. "
                                                         "Move to step 1 or later to see what guidance does.")
        return self.guidance(run_id, step)

    def noise_image(self, run_id, image):
        """Forward-noise an uploaded image (or the run's final image) at the run's noise levels; a player view."""
        if not run_id:
            raise UserError("No finished run yet, and its noise levels are the ones used: press Generate, or wait "
                            "for the run in progress to finish.")
        run = self.runs.get(run_id)[0]
        try:
            forward = self.runs.engine.forward_noising(run, image)
        except SettingsError as error:
            raise UserError(str(error)) from None
        files = self.runs.player_files(run_id)
        files.add_view(0, "forward", forward)
        props = player_props(files, run_id, status="Forward noising: pick the view “forward noising” and move "
                                                   "the slider; denoising runs this film backwards.")
        return gr.update(**props), f"Noised at the {len(run)} noise levels of this run; it is a view of the player now."

    def map_seeds(self, prompt, negative_prompt, seed, steps, guidance, sampler, model, count):
        """The Generate form's run from `count` seeds in a row (latents only, no frames), their paths on one map of
        image space, and which cluster each ended nearest."""
        count = int(count or 0)
        if not 2 <= count <= MAX_MAP_SEEDS:
            raise UserError(f"Map 2 to {MAX_MAP_SEEDS} seeds.")
        first = self.runs.settings(prompt, negative_prompt, seed, steps, guidance, sampler, None, None, model)
        runs = []
        try:
            for k in range(count):
                for item in self.runs.engine.stream(replace(first, seed=first.seed + k), frames=()):
                    result = item
                runs.append(result)
        except Exception as error:
            raise user_error(error) from error
        picture, summary = image_map.seeds_map(runs)
        return upscale(picture, 360), f"Seeds {first.seed}–{first.seed + count - 1}. {summary}"

    def download(self, run_id, fmt, view_label) -> str:
        """Write one export of the stored run into its folder under the output dir; return the path."""
        if fmt not in (*RUN_FORMATS, "run"):
            raise UserError(f"Unknown export format {fmt!r}: choose one of {', '.join((*RUN_FORMATS, 'run'))}.")
        runs = self.runs.get(run_id)
        folder = self.runs.store.folder(run_id)
        view = views.VIEWS.get(view_label, view_label)
        view = view if view in ("xt", "x0", "both") else "xt"
        try:
            if fmt == "run":
                runs[0].save(folder / "run")
                return shutil.make_archive(str(folder / "run"), "zip", folder / "run")
            return str(export_run(runs[0], folder, [fmt], view=view)[fmt])
        except OSError as error:
            raise UserError(f"Could not write the {fmt} file: {error.strerror or error}.") from error
