"""What every tab shares: the app's config, the engine it calls, the runs it keeps, and how a generation streams.

A thin adapter: the engine computes and decodes, `RunFiles` writes each step's images once, and the page's player
(player.py) scrubs them with no server round trip. Handlers raise `UserError` for anything a person can fix; it
reaches the browser as a toast, the server logs one line, and the app keeps serving.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import gradio as gr
import numpy as np

from .. import api
from ..api import DecodeUpdate, StepUpdate
from ..demo_model import vocabulary
from ..engine.labels import comparison_labels, model_name
from ..engine.models import ALIASES, EMBEDDED, EMBEDDED_NAMES, embedded_name, family_of_reference
from ..engine.run import START, Run, Settings
from ..engine.samplers import valid_for
from ..errors import SettingsError, VisualizerError, user_message
from ..media import views
from .frame_files import START_LATENTS, RunFiles
from ..media.player import PlayerCell, PlayerProps, step_props
from .store import RunStore

log = logging.getLogger("visualizer")
# seconds between player updates during a run: each costs the browser a re-render, and on a small machine
# the browser shares the cores with the model (measured: 0.1 s made a 25-step run 2x slower than 0.25 s)
UPDATE_INTERVAL = 0.25
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "example"
EXAMPLE_SAMPLERS = ["Euler", "DDIM", "DPM++ 2M", "Euler a"]  # the example's order; the single player shows the first


class Engine(Protocol):
    """What runs the model for the app: the `api` module in this process, or serve.Replicas on Ray."""

    def stream(self, settings: Settings, samplers: Sequence[str] | None = None, *,
               should_stop: Callable[[], bool] | None = None, frames: tuple[str, ...] = ...) -> Iterator: ...

    def redecode(self, run: Run) -> None: ...

    def forward_noising(self, run: Run, image: np.ndarray | None = None) -> list[np.ndarray]: ...

    def guidance_breakdown(self, run: Run, index: int) -> dict[str, np.ndarray] | None: ...


@dataclass
class AppConfig:
    output_dir: Path  # the only folder the app writes exports to and serves files from
    default_model: str = EMBEDDED
    allow_any_model: bool = True  # local folders and hub ids typed in the UI
    run_capacity: int = 64  # finished runs kept for the slider (latents; small)
    frame_budget_mb: int = 512  # decoded frames kept in memory; older runs are re-decoded when revisited
    cache_ttl: int = 3600  # seconds Gradio keeps the files it serves before deleting them
    example_dir: Path | None = EXAMPLE_DIR  # a saved comparison shown on the players when the page opens
    engine: Engine = api  # what runs the model
    concurrent_runs: int = 1  # model events served at once (one per replica with serve.Replicas)


class UserError(gr.Error):
    """A message for the person, shown as a toast; the app keeps serving."""

    def __init__(self, message: str):
        log.info("refused: %s", message)  # one line in the server console, no traceback
        super().__init__(message, print_exception=False)


def url(path: Path) -> str:
    """The URL Gradio serves a file under the output folder at."""
    return f"/gradio_api/file={path}"


def player_props(files: RunFiles | None, run_id: str, *, live: bool = False, progress: float = 1.0,
                 status: str = "", view: str | None = None) -> dict:
    """The player's props for the runs `files` holds (see player.py for their meaning)."""
    cells = [] if files is None else [_player_cell(c) for c in files.cells]
    return PlayerProps(cells=cells, views=[(key, label) for label, key in views.VIEWS.items()], live=live,
                       progress=progress, status=status, run=run_id, view=view).as_props()


# a view -> its frame at the start, where it has one ("forward": the image noised to step 1's input level, the start's)
START_VIEWS = {"xt": START, "x0": START, "latents": START_LATENTS, "forward": "forward"}


def _player_cell(cell) -> PlayerCell:
    """A frame_files.Cell on the player: with its start (position 0, the initial noise) where it has one."""
    frames = {kind: [url(p) if p else None for p in paths] for kind, paths in cell.paths.items()
              if kind not in (START, START_LATENTS)}
    shown = PlayerCell(label=cell.label, total=cell.total, steps=[step_props(s) for s in cell.steps], frames=frames,
                       curve=cell.curve, structure=cell.structure, words=cell.words, prediction=cell.prediction)
    if not cell.start:
        return shown
    starts = {kind: url(paths[0]) for kind, source in START_VIEWS.items()
              if (paths := cell.paths.get(source)) and paths[0]}
    return shown.with_start(cell.steps[0] if cell.steps else None, starts)


def vocabulary_notice(prompt: str, model: str) -> str:
    """For an embedded model: the prompt's words it never saw, and what it knows ("" for other models)."""
    name = embedded_name(model)
    return vocabulary.notice(prompt, name) if name else ""


def run_status(run: Run) -> str:
    """The status line of a finished single run."""
    img2img = run.info.img2img
    start = (f" from the init image (strength {img2img.strength}: steps {img2img.skipped_steps + 1}–"
             f"{run.settings.num_inference_steps} of the schedule)") if img2img else ""
    if run.info.stopped:
        return (f"Stopped early: {len(run)} steps{start}. The frame shows x0-hat of step {len(run)}, the model's "
                "best guess so far.")
    return (f"Done: {len(run)} steps{start} in {run.info.seconds:.1f} s ({run.info.denoiser_evaluations} denoiser "
            "evaluations). Drag the slider, use the arrow keys or press Play.")


def steps_table(run: Run) -> list[list]:
    """The steps as rows for the steps-table panel: step, t, sigma, noise share, evaluations."""
    return [[s.index, round(s.timestep, 1), round(s.sigma, 4), round(s.noise_share, 4), s.evaluations]
            for s in run.steps]


def step_index(run: Run, step) -> int:
    """A 1-based step from a form or API call (empty = the first) as a 0-based index into `run`."""
    return int(min(max(1, step or 1), len(run))) - 1


def user_error(error: Exception) -> gr.Error:
    """The one message a person sees for a failed run; bugs keep their traceback in the log as well."""
    message = user_message(error)
    if message is None:
        log.exception("run failed")
        message = f"The run failed: {type(error).__name__}: {str(error)[:200]}"
    return UserError(message)


class Runs:
    """The runs the app keeps (store, player files, stop flags) and the one way a generation streams."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.engine = config.engine
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

    # ---- forms ------------------------------------------------------------------------------
    def check_model(self, model: str) -> str:
        """The model a form names (empty: the default), refused where this server serves only its own."""
        model = (model or self.config.default_model).strip()
        if not self.config.allow_any_model and model not in (*EMBEDDED_NAMES, self.config.default_model, *ALIASES):
            raise UserError("This server only serves its built-in models. Choose one from the list.")
        return model

    def settings(self, prompt, negative_prompt, seed, steps, guidance, sampler, width, height, model,
                 init_image=None, strength=None, attention=False, true_cfg=None) -> Settings:
        """The form's values as validated Settings (the form's size 0 means the model's native size; no true CFG
        scale means Settings' default)."""
        extra = {} if init_image is None else {"init_image": init_image, **({} if strength is None else
                                                                              {"strength": strength})}
        try:
            return Settings(prompt=prompt or "", negative_prompt=negative_prompt or "", seed=seed,
                            num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
                            width=width or None, height=height or None, model=self.check_model(model),
                            attention=bool(attention), **extra,
                            **({} if true_cfg is None else {"true_cfg_scale": true_cfg})).validate()
        except SettingsError as error:
            raise UserError(str(error)) from None

    def sampler_choices(self, model, picked):
        """The sampler menu for `model`: only the samplers that fit its family; `picked` (one name, or a list for
        the comparison) is kept where it fits. A model that cannot be told leaves the menu as it is (Generate
        will say what is wrong with it)."""
        try:
            names = valid_for(family_of_reference(self.check_model(model)).sampler_kind)
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
            return gr.update(label=family_of_reference(self.check_model(model)).guidance_label)
        except (VisualizerError, gr.Error):
            return gr.skip()

    # ---- running ----------------------------------------------------------------------------
    def stream(self, jobs: list[tuple[Settings, list[str] | None]], session: str | None, player: bool = True):
        """Run one generation: each job (settings, samplers in lockstep or None) in turn, its runs filling the next
        cells of one player (several jobs: a comparison of models). Yield (player props, None) while it goes, then
        (player props, run id). `session` (a browser or client session) can stop it with `stop`. `player=False`
        (an API caller, who has no player): no frame files are written and the props hold no cells, only the
        status; `player_files` writes them later if a page asks for the run."""
        stop = threading.Event()
        if session:
            self._stops[session] = stop
        cell_settings = [replace(s, sampler=name) for s, samplers in jobs for name in samplers or [s.sampler]]
        run_id = self.store.new_id()
        files = RunFiles(self.store.output_dir / run_id / "player", comparison_labels(cell_settings),
                         [s.num_inference_steps for s in cell_settings]) if player else None  # img2img: fewer
        runs, last_sent = [], 0.0
        try:
            for number, (settings, samplers) in enumerate(jobs):
                if stop.is_set():
                    break
                first_cell, final_shown = len(runs), False
                model = f"Model {number + 1} of {len(jobs)} ({model_name(settings.model)}): " if len(jobs) > 1 else ""
                for item in self.engine.stream(settings, samplers, should_stop=stop.is_set):
                    if isinstance(item, StepUpdate):
                        if files is not None:
                            files.add_step(item.event, first_cell)
                        done, total = item.event.step.index, item.event.total_steps
                        status = f"{model}step {done} of {total}: computing… scrub the finished steps any time."
                        progress = (number + done / total) / len(jobs)
                    elif isinstance(item, DecodeUpdate):
                        if files is not None:
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
                        if files is not None:
                            files.add_decoded(item.frames, first_cell)
                        yield player_props(files, run_id, live=True, progress=progress,
                                           status=status[0].upper() + status[1:]), None
        except Exception as error:
            raise user_error(error) from error
        finally:  # a closed tab lands here: the engine's generator is closed with this one
            if session and self._stops.get(session) is stop:
                del self._stops[session]
        if not runs or not len(runs[0]):
            raise UserError("Stopped before the first step finished: nothing to show.")
        self.store.add(runs, run_id=run_id)
        self._files = {k: v for k, v in self._files.items() if k in self.store}
        if files is not None:
            files.cells = files.cells[:len(runs)]  # models a stop left unrun
            for cell, run in enumerate(runs):
                files.add_run(cell, run)
            files.add_maps(runs)
            self._files[run_id] = files
        stopped = any(run.info.stopped for run in runs) or len(runs) < len(cell_settings)
        what = (f"{len(runs)} samplers, one batched denoiser call per round" if len(jobs) == 1 else
                f"{len(runs)} models, one after another, aligned by progress through their own schedules")
        yield player_props(files, run_id, status=run_status(runs[0]) if len(runs) == 1 else
                           f"{'Stopped early' if stopped else 'Done'}: {what}.", view="x0" if stopped else None), run_id

    def stop(self, session: str | None) -> None:
        """Ask `session`'s running generation to stop after the current step."""
        flag = self._stops.get(session)
        if flag is not None:
            flag.set()

    def get(self, run_id) -> list[Run]:
        """The stored runs of `run_id` (frames re-decoded if they were dropped), or a UserError."""
        if not run_id:
            raise UserError("No finished run yet: press Generate, or wait for the run in progress to finish.")
        if not isinstance(run_id, str):
            raise UserError(f"A run id is text, as /generate and /compare return it; got {type(run_id).__name__}.")
        try:
            return self.store.get(run_id, redecode=self.engine.redecode)
        except VisualizerError as error:
            raise UserError(str(error)) from None

    def player_files(self, run_id) -> RunFiles:
        """The player's files of `run_id`, written again if they were dropped with their folder."""
        if run_id not in self._files:
            self._files[run_id] = RunFiles.of_runs(self.store.folder(run_id) / "player", self.get(run_id))
        return self._files[run_id]
