"""The app's handlers: validate, call the core (`api`, `views`, `insight`, `export`), format the result.

Kept apart from the layout (ui.py) so each can be read alone. Handlers raise `UserError` for anything a
person can fix; it reaches the browser as a toast and the app keeps serving.
"""
from __future__ import annotations

import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np

from . import api, insight, views
from .decode import (StreamingDecoder, decode_run, latent_preview, latent_rgb_factors, load_taesd,
                     taesd_decode)
from .demo_model import scenes
from .denoise import NonFiniteError
from .export import export_grid, export_run, upscale
from .models import ALIASES, EMBEDDED, ModelLoadError, load_pipeline
from .store import RunExpired, RunStore

PREVIEW_INTERVAL = 0.25  # seconds between live preview frames sent to the browser


@dataclass
class AppConfig:
    output_dir: Path  # the only folder the app writes exports to and serves files from
    default_model: str = EMBEDDED
    allow_any_model: bool = True  # local folders and hub ids typed in the UI
    run_capacity: int = 64  # finished runs kept for the slider (latents; small)
    frame_budget_mb: int = 512  # decoded frames kept in memory; older runs are re-decoded when revisited
    cache_ttl: int = 3600  # seconds Gradio keeps the files it serves (previews, frames) before deleting them


class UserError(gr.Error):
    """A message for the person, shown as a toast; the app keeps serving."""


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


def _size(value) -> int | None:
    return None if value in (None, "", 0) else value


class App:
    def __init__(self, config: AppConfig):
        self.config = config
        self.store = RunStore(config.output_dir, config.run_capacity, config.frame_budget_mb * 2**20)
        self._stops: dict[str, threading.Event] = {}  # browser session -> its running generation's stop flag

    # ---- handlers -------------------------------------------------------------------------
    def generate(self, prompt, negative_prompt, seed, steps, guidance, sampler, width, height, model,
                 init_image=None, strength=1.0, request: gr.Request = None, progress=gr.Progress()):
        """Stream (preview, status) while the run goes; end with the decoded run on the slider.

        With an `init_image` it is img2img at `strength`; without one, strength is ignored.

        **Stop** (see `stop`) ends the loop early and the steps computed so far are shown; a closed tab
        closes this generator, whose `finally` halts the loop within one step.
        """
        model = _check_model(model, self.config)
        try:
            pipe = load_pipeline(model)
        except ModelLoadError as error:
            raise UserError(str(error)) from None
        decoder = StreamingDecoder(pipe.vae)
        previewer = _previewer(pipe, model)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        session = getattr(request, "session_hash", None)
        if session:
            self._stops[session] = stop
        result: dict = {}

        def work():
            try:
                result["run"] = api.run(
                    prompt, negative_prompt=negative_prompt, sampler=sampler, model=model,
                    num_inference_steps=steps, guidance_scale=guidance, seed=seed, width=_size(width),
                    height=_size(height), init_image=init_image, strength=1.0 if init_image is None else strength,
                    callback=events.put, should_stop=stop.is_set, decoder=decoder)
            except Exception as error:  # handed to the request thread, which reports it
                result["error"] = error
            finally:
                events.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        notice = _vocabulary_notice(prompt or "", model)
        last_sent = 0.0
        try:
            while True:
                event = events.get()
                if event is None:
                    break
                progress((event.step.index, event.total_steps), desc="Denoising", unit="steps")
                now = time.monotonic()
                if now - last_sent >= PREVIEW_INTERVAL:
                    last_sent = now
                    image, status_line = _live_preview(decoder, event, previewer)
                    yield image, gr.update(), gr.update(), gr.update(), status_line, notice
        finally:  # a closed tab lands here: halt the loop within one step
            stop.set()
            thread.join()
            if session and self._stops.get(session) is stop:
                del self._stops[session]
        if "error" in result:
            raise _user_error(result["error"])
        run = result["run"]
        if not len(run):
            raise UserError("Stopped before the first step finished: nothing to show.")
        run_id = self.store.add([run])
        last = len(run) - 1
        img2img = run.info.get("img2img")
        start = (f" from the init image (strength {img2img['strength']}: steps {img2img['skipped_steps'] + 1}–"
                 f"{run.settings.num_inference_steps} of the schedule)") if img2img else ""
        status = ("Stopped early: " if run.info.get("stopped") else "Done: ") + \
                 f"{len(run)} steps{start} in {run.info['seconds']:.1f} s ({run.info['unet_evaluations']} UNet evaluations)."
        if run.info.get("truncated"):
            notice = (notice + " " if notice else "") + \
                     f"The prompt was cut at {run.info['token_limit']} tokens; ignored: “{run.info['dropped_text']}”."
        yield (views.frame(run, last, "xt"), gr.update(minimum=1, maximum=max(1, len(run)), value=len(run), step=1,
                                                       interactive=True),
               run_id, _steps_table(run), status + " Drag the slider to revisit any step.", notice)

    def stop(self, request: gr.Request = None):
        """Ask this browser session's running generation to stop after the current step."""
        flag = self._stops.get(getattr(request, "session_hash", None))
        if flag is not None:
            flag.set()

    def show_step(self, run_id, step, view_label):
        """Slider / view change: the stored frame, no recomputation."""
        if not run_id:
            return None, ""
        run = self._runs(run_id)[0]
        index = int(min(max(1, step), len(run))) - 1
        try:
            image = views.frame(run, index, views.VIEWS.get(view_label, "xt"))
        except ValueError as error:
            raise UserError(str(error)) from None
        return image, views.describe(run, index)

    def insight(self, run_id, step):
        """The insight panels for a step: convergence and schedule plots, numbers, guidance, change, stages."""
        if not run_id:
            return (None,) * 9
        run = self._runs(run_id)[0]
        index = int(min(max(1, step), len(run))) - 1
        convergence = insight.figure_png(insight.convergence_plot([run], current=index + 1))
        schedule = insight.figure_png(insight.schedule_plot(run, current=index + 1))
        parts = insight.guidance_breakdown(run, index, load_pipeline(run.settings.model).vae)
        big = lambda a: np.asarray(upscale(a, 160)) if a is not None else None  # noqa: E731
        parts = parts or {}
        return (convergence, schedule, insight.step_numbers(run, index), big(parts.get("uncond")),
                big(parts.get("cond")), big(parts.get("added")), big(parts.get("guided")),
                big(insight.change_heatmap(run, index)), insight.pipeline_stages(run))

    def noise_image(self, run_id, image, step):
        """Forward-noise an uploaded image (or the run's final image) at the run's noise levels."""
        if not run_id:
            raise UserError("Generate a run first: its noise levels are the ones used.")
        run = self._runs(run_id)[0]
        source = image if image is not None else run.final_image
        if source is None:
            raise UserError("This run was stopped before its final image: upload an image to noise.")
        run.frames["forward"] = insight.forward_noising(run, source, load_pipeline(run.settings.model).vae)
        index = int(min(max(1, step), len(run))) - 1
        return (views.frame(run, index, "forward"), gr.update(value=list(views.VIEWS)[-1]),
                f"Noised at the {len(run)} noise levels of this run; the slider moves through them.")

    def compare(self, prompt, negative_prompt, seed, steps, guidance, samplers, width, height, model):
        model = _check_model(model, self.config)
        samplers = list(samplers or [])
        if not 2 <= len(samplers) <= 8:
            raise UserError(f"Pick 2 to 8 samplers to compare (you picked {len(samplers)}).")
        try:
            runs = api.compare(prompt, samplers, negative_prompt=negative_prompt, model=model,
                               num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                               width=_size(width), height=_size(height))
        except Exception as error:
            raise _user_error(error) from error
        run_id = self.store.add(runs)
        finals = views.grid_frame(runs, 1.0)
        curves = insight.figure_png(insight.convergence_plot(runs))
        return (finals, gr.update(value=100), run_id, f"{len(runs)} samplers, one batched UNet call per round.",
                curves)

    def show_grid(self, run_id, progress, view_label):
        if not run_id:
            return None
        runs = self._runs(run_id)
        return views.grid_frame(runs, max(1.0, float(progress)) / 100, views.VIEWS.get(view_label, "xt"))

    def download(self, run_id, fmt, view_label):
        """Write one export of the stored run into its folder under the output dir; return the path."""
        runs = self._runs(run_id)
        folder = self.store.folder(run_id)
        view = views.VIEWS.get(view_label, "xt")
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
        try:
            return self.store.get(run_id, redecode=lambda run: decode_run(run, load_pipeline(run.settings.model).vae))
        except RunExpired as error:
            raise UserError(str(error)) from None


def _user_error(error: Exception) -> gr.Error:
    if isinstance(error, (ValueError, ModelLoadError, NonFiniteError)):
        return UserError(str(error))
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return UserError("Out of memory: try a smaller size, fewer samplers or fewer steps.")
    return UserError(f"The run failed: {type(error).__name__}: {str(error)[:200]}")


def _previewer(pipe, model: str):
    """A cheap x0-hat preview for the first steps: TAESD where its weights are on this machine (SD models),
    else the linear latent -> RGB approximation. Returns fn(latents) -> (uint8 frame, what it is)."""
    taesd = None if model == EMBEDDED else _taesd(pipe.unet.device)
    if taesd is not None:
        return lambda x0: (taesd_decode(taesd, x0, pipe.vae.config.scaling_factor)[0], "TAESD preview")
    factors = latent_rgb_factors(pipe.config.get("_name_or_path"))
    return lambda x0: (latent_preview(x0, *factors)[0], "approximate preview (latent colours)")


_TAESD: dict = {}


def _taesd(device):
    if device not in _TAESD:
        _TAESD[device] = load_taesd(device)
    return _TAESD[device]


def _live_preview(decoder, event, previewer) -> tuple[np.ndarray, str]:
    """(image, status line) during a run: the newest exact VAE frame of x0-hat, or until the first
    batch is decoded, a cheap preview (labelled as such)."""
    latest = decoder.latest(0, "x0")
    total = event.total_steps
    if latest is None:
        image, what = previewer(event.x0)
        return np.asarray(upscale(image)), f"Step {event.step.index} of {total} · {what} of x0-hat"
    index, image = latest
    return (np.asarray(upscale(image)),
            f"Step {event.step.index} of {total} · showing x0-hat of step {index} (exact VAE decode)")


def _steps_table(run) -> list[list]:
    return [[s.index, round(s.timestep, 1), round(s.sigma, 4), round(s.noise_share, 4), s.evaluations]
            for s in run.steps]
