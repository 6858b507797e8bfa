"""The app's handlers: form values -> `Settings` -> `api.stream` -> player props and panels.

A thin adapter: the engine computes and decodes, `RunFiles` writes each step's images once, and the
page's player (player.py) scrubs them with no server round trip. Handlers raise `UserError` for anything a
person can fix; it reaches the browser as a toast, the server logs one line, and the app keeps serving.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from .. import api
from ..analysis import image_map
from ..media import views
from ..analysis import metrics
from ..analysis import plots
from ..analysis import stages
from ..api import DecodeUpdate, StepUpdate
from ..demo_model import scenes
from ..errors import SettingsError, VisualizerError, user_message
from ..engine.labels import comparison_labels, model_name
from ..media.export import export_grid, export_run, upscale
from .frame_files import RunFiles
from ..engine.models import ALIASES, EMBEDDED, family_of_reference
from .player import PlayerCell, PlayerProps, step_props
from ..engine.run import Run, Settings
from ..engine.samplers import DEFAULT_SAMPLER, valid_for
from .store import RunStore

log = logging.getLogger("visualizer")
# seconds between player updates during a run: each costs the browser a re-render, and on a small machine
# the browser shares the cores with the model (measured: 0.1 s made a 25-step run 2x slower than 0.25 s)
UPDATE_INTERVAL = 0.25
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "example"
MAX_MAP_SEEDS = 16  # seeds one image-space map draws at once
EXAMPLE_SAMPLERS = ["Euler", "DDIM", "DPM++ 2M", "Euler a"]  # the example's order; the single player shows the first


@dataclass
class AppConfig:
    output_dir: Path  # the only folder the app writes exports to and serves files from
    default_model: str = EMBEDDED
    allow_any_model: bool = True  # local folders and hub ids typed in the UI
    run_capacity: int = 64  # finished runs kept for the slider (latents; small)
    frame_budget_mb: int = 512  # decoded frames kept in memory; older runs are re-decoded when revisited
    cache_ttl: int = 3600  # seconds Gradio keeps the files it serves before deleting them
    example_dir: Path | None = EXAMPLE_DIR  # a saved comparison shown on the players when the page opens
    engine: Any = api  # what runs the model: `api` in this process, or serve.Replicas (the same four functions)
    concurrent_runs: int = 1  # model events served at once (one per replica with serve.Replicas)


class UserError(gr.Error):
    """A message for the person, shown as a toast; the app keeps serving."""

    def __init__(self, message: str):
        log.info("refused: %s", message)  # one line in the server console, no traceback
        super().__init__(message, print_exception=False)


def _check_model(model: str, config: AppConfig) -> str:
    model = (model or config.default_model).strip()
    if not config.allow_any_model and model not in (EMBEDDED, config.default_model, *ALIASES):
        raise UserError("This server only serves its built-in models. Choose one from the list.")
    return model


def _vocabulary_notice(prompt: str, model: str) -> str:
    if model != EMBEDDED:
        return ""
    unknown = scenes.unknown_words(prompt)
    if not unknown:
        return ""
    return (f"The embedded model does not know: *{', '.join(unknown)}*. It understands: "
            f"{', '.join(scenes.vocabulary())}.")


def url(path: Path) -> str:
    """The URL Gradio serves a file under the output folder at."""
    return f"/gradio_api/file={path}"


def player_props(files: RunFiles | None, run_id: str, *, live: bool = False, progress: float = 1.0,
                 status: str = "", view: str | None = None) -> dict:
    """The player's props for the runs `files` holds (see player.py for their meaning)."""
    cells = [] if files is None else [
        PlayerCell(label=c.label, total=c.total, steps=[step_props(s) for s in c.steps],
                   frames={kind: [url(p) if p else None for p in paths] for kind, paths in c.paths.items()},
                   curve=c.curve, structure=c.structure, words=c.words) for c in files.cells]
    return PlayerProps(cells=cells, views=[(key, label) for label, key in views.VIEWS.items()], live=live,
                       progress=progress, status=status, run=run_id, view=view).as_props()


def _status(run: Run) -> str:
    img2img = run.info.img2img
    start = (f" from the init image (strength {img2img.strength}: steps {img2img.skipped_steps + 1}–"
             f"{run.settings.num_inference_steps} of the schedule)") if img2img else ""
    if run.info.stopped:
        return (f"Stopped early: {len(run)} steps{start}. The frame shows x0-hat of step {len(run)}, the model's "
                "best guess so far.")
    return (f"Done: {len(run)} steps{start} in {run.info.seconds:.1f} s ({run.info.unet_evaluations} UNet "
            "evaluations). Drag the slider, use the arrow keys or press Play.")


class App:
    def __init__(self, config: AppConfig):
        self.config = config
        self.store = RunStore(config.output_dir, config.run_capacity, config.frame_budget_mb * 2**20)
        self._stops: dict[str, threading.Event] = {}  # browser session -> its running generation's stop flag
        self._files: dict[str, RunFiles] = {}  # run id -> the player's files
        self.example = self._load_example()  # (single run id, comparison run id) or None

    # ---- opening the page -------------------------------------------------------------------
    def _load_example(self) -> tuple[str, str] | None:
        folder = self.config.example_dir
        if folder is None or not folder.is_dir():
            return None
        runs = [Run.load(p.parent) for p in sorted(folder.glob("*/run.json"))]
        if not runs:
            return None
        order = {name: k for k, name in enumerate(EXAMPLE_SAMPLERS)}
        runs.sort(key=lambda r: order.get(r.settings.sampler, len(order)))
        single = self.store.add([runs[0]], pinned=True)
        grid = self.store.add(runs, pinned=True)
        self._files[single] = RunFiles.of_runs(self.store.folder(single) / "player", [runs[0]])
        self._files[grid] = RunFiles.of_runs(self.store.folder(grid) / "player", runs)
        return single, grid

    def initial_props(self, which: int) -> dict:
        """Props the players open with: the shipped example (0: single run, 1: comparison), or empty."""
        if self.example is None:
            return player_props(None, "")
        run_id = self.example[which]
        runs = self.store.get(run_id)
        note = (f"Example: “{runs[0].settings.prompt}”, {len(runs[0])} steps, seed {runs[0].settings.seed}. "
                "Scrub it, or press " + ("Generate" if which == 0 else "Compare") + " for your own.")
        return player_props(self._files[run_id], run_id, status=note)

    # ---- handlers ---------------------------------------------------------------------------
    def settings(self, prompt, negative_prompt, seed, steps, guidance, sampler, width, height, model,
                 init_image=None, strength=None, attention=False, true_cfg=None) -> Settings:
        """The form's values as validated Settings (the form's size 0 means the model's native size; no true CFG
        scale means Settings' default)."""
        extra = {} if init_image is None else {"init_image": init_image, **({} if strength is None else
                                                                              {"strength": strength})}
        try:
            return Settings(prompt=prompt or "", negative_prompt=negative_prompt or "", seed=seed,
                            num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
                            width=width or None, height=height or None, model=_check_model(model, self.config),
                            attention=bool(attention), **extra,
                            **({} if true_cfg is None else {"true_cfg_scale": true_cfg})).validate()
        except SettingsError as error:
            raise UserError(str(error)) from None

    def _stream(self, jobs: list[tuple[Settings, list[str] | None]], request: gr.Request | None):
        """Run one generation: each job (settings, samplers in lockstep or None) in turn, its runs filling the next
        cells of one player (several jobs: a comparison of models). Yield (player props, None) while it goes, then
        (player props, run id)."""
        stop = threading.Event()
        session = getattr(request, "session_hash", None)
        if session:
            self._stops[session] = stop
        cell_settings = [replace(s, sampler=name) for s, samplers in jobs for name in samplers or [s.sampler]]
        run_id = self.store.new_id()
        files = RunFiles(self.store.output_dir / run_id / "player", comparison_labels(cell_settings),
                         [s.num_inference_steps for s in cell_settings])  # img2img: fewer, told by the steps
        runs, last_sent = [], 0.0
        try:
            for number, (settings, samplers) in enumerate(jobs):
                if stop.is_set():
                    break
                first_cell, final_shown = len(runs), False
                model = f"Model {number + 1} of {len(jobs)} ({model_name(settings.model)}): " if len(jobs) > 1 else ""
                for item in self.config.engine.stream(settings, samplers, should_stop=stop.is_set):
                    if isinstance(item, StepUpdate):
                        files.add_step(item.event, first_cell)
                        done, total = item.event.step.index, item.event.total_steps
                        status = f"{model}step {done} of {total}: computing… scrub the finished steps any time."
                        progress = (number + done / total) / len(jobs)
                    elif isinstance(item, DecodeUpdate):
                        for k, run in enumerate(item.runs):
                            cell = files.cells[first_cell + k]
                            cell.steps, cell.total = list(run.steps), len(run)
                        status = f"{model}denoised; " + (f"decoding the remaining frames ({item.remaining} left)…"
                                                         if item.remaining else "computing the insight…")
                        progress = (number + 1) / len(jobs)
                    else:
                        runs += item if isinstance(item, list) else [item]
                        break
                    now = time.monotonic()
                    first_after_loop = isinstance(item, DecodeUpdate) and not final_shown
                    if now - last_sent >= UPDATE_INTERVAL or first_after_loop:  # the final image at once
                        last_sent, final_shown = now, final_shown or first_after_loop
                        files.add_decoded(item.frames, first_cell)
                        yield player_props(files, run_id, live=True, progress=progress,
                                           status=status[0].upper() + status[1:]), None
        except Exception as error:
            raise _user_error(error) from error
        finally:  # a closed tab lands here: the engine's generator is closed with this one
            if session and self._stops.get(session) is stop:
                del self._stops[session]
        if not runs or not len(runs[0]):
            raise UserError("Stopped before the first step finished: nothing to show.")
        files.cells = files.cells[:len(runs)]  # models a stop left unrun
        for cell, run in enumerate(runs):
            files.add_run(cell, run)
        files.add_maps(runs)
        self.store.add(runs, run_id=run_id)
        self._files = {k: v for k, v in self._files.items() if k in self.store}
        self._files[run_id] = files
        stopped = any(run.info.stopped for run in runs) or len(runs) < len(cell_settings)
        what = (f"{len(runs)} samplers, one batched UNet call per round" if len(jobs) == 1 else
                f"{len(runs)} models, one after another, aligned by progress through their own schedules")
        yield player_props(files, run_id, status=_status(runs[0]) if len(runs) == 1 else
                           f"{'Stopped early' if stopped else 'Done'}: {what}.", view="x0" if stopped else None), run_id

    def generate(self, prompt, negative_prompt, seed, steps, guidance, sampler, width, height, model,
                 init_image=None, strength=None, attention=False, true_cfg=None, request: gr.Request = None):
        """Stream the run into the player; end with the final image, the steps table and the panels.

        With an `init_image` it is img2img at `strength`; without one, strength is ignored. **Stop** (see
        `stop`) ends the loop early and the steps computed so far stay on the player.
        """
        settings = self.settings(prompt, negative_prompt, seed, steps, guidance, sampler, width, height, model,
                                 init_image, strength, attention, true_cfg)
        notice = _vocabulary_notice(settings.prompt, settings.model)
        for props, run_id in self._stream([(settings, None)], request):
            # While it streams, the previous run is gone from the page: its panels, downloads and run id are empty
            # until this run is done. Every output but the player gets a plain value: gr.skip() or gr.update() makes
            # Gradio build a new component and its config at each update (about 1 ms, a table 12 ms), in Python,
            # under the GIL the model's loop needs.
            if run_id is None:
                yield (gr.update(**props), None, None, None, props["status"], notice,
                       None, None, None, None, None, "")
                continue
            run = self.store.get(run_id)[0]
            if run.info.truncated:
                notice = (notice + " " if notice else "") + \
                         f"The prompt was cut at {run.info.token_limit} tokens; ignored: “{run.info.dropped_text}”."
            final = run.final_image if run.final_image is not None else run.frames["x0"][-1]
            yield (gr.update(**props), final, run_id, steps_table(run), props["status"], notice,
                   None, None, None, None, None, stages.pipeline_stages(run))  # guidance: filled by .then

    def map_seeds(self, prompt, negative_prompt, seed, steps, guidance, sampler, model, count):
        """The Generate form's run from `count` seeds in a row (latents only, no frames), their paths on one map of
        image space, and which cluster each ended nearest."""
        count = int(count or 0)
        if not 2 <= count <= MAX_MAP_SEEDS:
            raise UserError(f"Map 2 to {MAX_MAP_SEEDS} seeds.")
        first = self.settings(prompt, negative_prompt, seed, steps, guidance, sampler, None, None, model)
        runs = []
        try:
            for k in range(count):
                for item in self.config.engine.stream(replace(first, seed=first.seed + k), frames=()):
                    result = item
                runs.append(result)
        except Exception as error:
            raise _user_error(error) from error
        picture, summary = image_map.seeds_map(runs)
        return upscale(picture, 360), f"Seeds {first.seed}–{first.seed + count - 1}. {summary}"

    def sampler_choices(self, model, picked):
        """The sampler menu for `model`: only the samplers that fit its family; `picked` (one name, or a list for
        the comparison) is kept where it fits. A model that cannot be told leaves the menu as it is (Generate
        will say what is wrong with it)."""
        try:
            names = valid_for(family_of_reference(_check_model(model, self.config)).sampler_kind)
        except (VisualizerError, gr.Error):
            return gr.skip()
        if isinstance(picked, list):
            kept = [name for name in picked if name in names]
            return gr.update(choices=names, value=kept if len(kept) >= 2 else names[:max(2, len(kept))])
        return gr.update(choices=names, value=picked if picked in names else names[0])

    def guidance_label(self, model):
        """The guidance slider's label for `model`'s family (Flux's guidance is not CFG); left as it is for a model
        that cannot be told."""
        try:
            return gr.update(label=family_of_reference(_check_model(model, self.config)).guidance_label)
        except (VisualizerError, gr.Error):
            return gr.skip()

    def stop(self, request: gr.Request = None):
        """Ask this browser session's running generation to stop after the current step."""
        flag = self._stops.get(getattr(request, "session_hash", None))
        if flag is not None:
            flag.set()

    def show_step(self, run_id, step, view_label):
        """API: the frame of a step in a view (by label or key) and its description."""
        run = self._runs(run_id)[0]
        index = _step_index(run, step)
        try:
            image = views.frame(run, index, views.VIEWS.get(view_label, view_label))
        except ValueError as error:
            raise UserError(str(error)) from None
        return image, views.describe(run, index)

    def guidance(self, run_id, step):
        """The guidance breakdown of a step (the last one when `step` is empty)."""
        if not run_id:
            return (None,) * 4
        run = self._runs(run_id)[0]
        index = _step_index(run, step or len(run))
        parts = self.config.engine.guidance_breakdown(run, index) or {}
        return tuple(np.asarray(upscale(parts[k], 160)) if k in parts else None
                     for k in ("uncond", "cond", "added", "guided"))

    def insight(self, run_id, step):
        """API: every insight panel of a step as images and text (the page draws its own)."""
        run = self._runs(run_id)[0]
        index = _step_index(run, step)
        convergence = plots.figure_png(plots.convergence_plot([run], current=index + 1))
        schedule = plots.figure_png(plots.schedule_plot(run, current=index + 1))
        return (convergence, schedule, stages.step_numbers(run, index), *self.guidance(run_id, index + 1),
                np.asarray(upscale(metrics.change_heatmap(run, index), 160)), stages.pipeline_stages(run))

    def noise_image(self, run_id, image):
        """Forward-noise an uploaded image (or the run's final image) at the run's noise levels; a player view."""
        if not run_id:
            raise UserError("No finished run yet, and its noise levels are the ones used: press Generate, or wait "
                            "for the run in progress to finish.")
        run = self._runs(run_id)[0]
        try:
            forward = self.config.engine.forward_noising(run, image)
        except SettingsError as error:
            raise UserError(str(error)) from None
        files = self._player_files(run_id)
        files.add_view(0, "forward", forward)
        props = player_props(files, run_id, status="Forward noising: pick the view “forward noising” and move "
                                                   "the slider; denoising runs this film backwards.")
        return gr.update(**props), f"Noised at the {len(run)} noise levels of this run; it is a view of the player now."

    def compare(self, prompt, negative_prompt, seed, steps, guidance, samplers, width, height, model,
                attention=False, models="", true_cfg=None, request: gr.Request = None):
        """Stream a comparison into the grid player: 2 to 8 samplers in lockstep on `model`, or, when `models` lists
        2 to 4 models (comma-separated), each of them in turn with the first picked sampler (Euler where it does
        not fit the model)."""
        samplers, models = list(samplers or []), [m for m in (models or "").split(",") if m.strip()]
        if not models and not 2 <= len(samplers) <= 8:
            raise UserError(f"Pick 2 to 8 samplers to compare (you picked {len(samplers)}).")
        settings = self.settings(prompt, negative_prompt, seed, steps, guidance,
                                 samplers[0] if samplers else DEFAULT_SAMPLER, width, height, model, attention=attention,
                                 true_cfg=true_cfg)
        jobs = [(settings, samplers)]
        if models:
            try:
                jobs = [(s, None) for s in api.model_settings(settings, [_check_model(m, self.config) for m in models])]
            except VisualizerError as error:
                raise UserError(user_message(error) or str(error)) from None
        for props, run_id in self._stream(jobs, request):
            if run_id is None:
                yield gr.update(**props), None, None, props["status"], None  # plain values (see generate)
                continue
            yield gr.update(**props), views.grid_frame(self.store.get(run_id), 1.0), run_id, props["status"], None

    def show_grid(self, run_id, progress, view_label):
        """API: the comparison at `progress` percent through every sampler's schedule."""
        runs = self._runs(run_id)
        return views.grid_frame(runs, max(1.0, float(progress or 100)) / 100, views.VIEWS.get(view_label, view_label))

    def download(self, run_id, fmt, view_label):
        """Write one export of the stored run into its folder under the output dir; return the path."""
        runs = self._runs(run_id)
        folder = self.store.folder(run_id)
        view = views.VIEWS.get(view_label, view_label)
        view = view if view in ("xt", "x0", "both") else "xt"
        try:
            if fmt == "run":
                runs[0].save(folder / "run")
                return shutil.make_archive(str(folder / "run"), "zip", folder / "run")
            return str(export_run(runs[0], folder, [fmt], view=view)[fmt])
        except OSError as error:
            raise UserError(f"Could not write the {fmt} file: {error.strerror or error}.") from error

    def download_grid(self, run_id, fmt):
        runs = self._runs(run_id)
        try:
            return str(export_grid(runs, self.store.folder(run_id), [fmt])[fmt])
        except OSError as error:
            raise UserError(f"Could not write the {fmt} file: {error.strerror or error}.") from error

    def _runs(self, run_id):
        if not run_id:
            raise UserError("No finished run yet: press Generate, or wait for the run in progress to finish.")
        try:
            return self.store.get(run_id, redecode=self.config.engine.redecode)
        except VisualizerError as error:
            raise UserError(str(error)) from None

    def _player_files(self, run_id) -> RunFiles:
        if run_id not in self._files:  # dropped with its folder: write them again
            self._files[run_id] = RunFiles.of_runs(self.store.folder(run_id) / "player", self._runs(run_id))
        return self._files[run_id]


def _user_error(error: Exception) -> gr.Error:
    """The one message a person sees for a failed run; bugs keep their traceback in the log as well."""
    message = user_message(error)
    if message is None:
        log.exception("run failed")
        message = f"The run failed: {type(error).__name__}: {str(error)[:200]}"
    return UserError(message)


def _step_index(run, step) -> int:
    """A 1-based step from a form or API call (empty = the first) as a 0-based index into `run`."""
    return int(min(max(1, step or 1), len(run))) - 1


def steps_table(run) -> list[list]:
    """The steps as rows for the steps-table panel."""
    return [[s.index, round(s.timestep, 1), round(s.sigma, 4), round(s.noise_share, 4), s.evaluations]
            for s in run.steps]
