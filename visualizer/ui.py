"""The Gradio app: live denoising, the timestep slider, the sampler grid and downloads.

Handlers are thin: they validate, call the core (`api`, `views`, `export`) and format the result.
Every event that runs the model shares one concurrency id, so runs queue instead of fighting.
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
from .samplers import DEFAULT_SAMPLER, sampler_names
from .store import RunExpired, RunStore

MODEL_CONCURRENCY = "model"
PREVIEW_INTERVAL = 0.25  # seconds between live preview frames sent to the browser
EXAMPLES = ["a large red circle in the centre", "a small blue square on the left of a white background",
            "a yellow triangle on the top", "a large purple diamond on the right of a black background"]
PROSE = {
    "generate": "Type a prompt and press **Generate**. The model starts from pure noise and removes a little of it "
                "at every step; frames stream in while it works. **Stop** keeps what was computed.",
    "slider": "Drag the slider to see any step instantly. **x_t** is the noisy latent the sampler holds after the "
              "step, decoded by the VAE. **x0-hat** is the model's guess of the finished image at that step. "
              "Heun and DPM2 spend two model evaluations per step.",
    "convergence": "How far the model's guess (x0-hat) is from the final image at each step: 1 - SSIM (structure) "
                   "and the distance of the latents. The dotted line marks the first step whose guess shares "
                   "half its structure with the final image (SSIM >= 0.5); the red ring is the slider's step.",
    "guidance": "Classifier-free guidance runs the model twice per step, without and with the prompt, and "
                "combines them: guided = uncond + scale × (cond − uncond). The images are the final image each "
                "branch predicts at this step; the heatmap is where guidance pushes hardest.",
    "change": "What changed in x0-hat since the previous step: bright = large change. Early steps change the "
              "layout, late steps only edges.",
    "forward": "The forward process, q(x_t | x_0): take an image, encode it, and add noise at this run's noise "
               "levels, step by step. Move the slider: denoising runs this film backwards.",
    "compare": "Pick 2 to 8 samplers. They share the prompt, seed and initial noise and run in one batch. "
               "The slider moves every cell to the same point of its schedule (0% = first step, 100% = last).",
}


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
                 request: gr.Request = None):
        """Stream (preview, status) while the run goes; end with the decoded run on the slider.

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
                    height=_size(height), callback=events.put, should_stop=stop.is_set, decoder=decoder)
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
        status = ("Stopped early: " if run.info.get("stopped") else "Done: ") + \
                 f"{len(run)} steps in {run.info['seconds']:.1f} s ({run.info['unet_evaluations']} UNet evaluations)."
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
    total = round(event.step.index / event.step.progress)
    if latest is None:
        image, what = previewer(event.x0)
        return np.asarray(upscale(image)), f"Step {event.step.index} of {total} · {what} of x0-hat"
    index, image = latest
    return (np.asarray(upscale(image)),
            f"Step {event.step.index} of {total} · showing x0-hat of step {index} (exact VAE decode)")


def _steps_table(run) -> list[list]:
    return [[s.index, round(s.timestep, 1), round(s.sigma, 4), round(s.noise_share, 4), s.evaluations]
            for s in run.steps]


# ---- layout -------------------------------------------------------------------------------------
CSS = """
.frame img { image-rendering: pixelated; }
.explain { color: var(--body-text-color-subdued); font-size: 0.92em; }
"""


def _settings_controls(default_model: str, allow_any: bool):
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, scale=3)
        randomize = gr.Button("Random seed", scale=1, min_width=80, elem_id="randomize")
    randomize.click(lambda: int(np.random.randint(0, 2**31 - 1)), None, seed, api_visibility="private")
    steps = gr.Slider(1, 250, value=25, step=1, label="Steps")
    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale (CFG)")
    with gr.Accordion("Size and model", open=False):
        with gr.Row():
            width = gr.Number(value=0, precision=0, label="Width (0 = model's native)")
            height = gr.Number(value=0, precision=0, label="Height (0 = native)")
        model = gr.Dropdown([EMBEDDED, *ALIASES], value=default_model, label="Model",
                            allow_custom_value=allow_any,
                            info="A local diffusers folder or hub id can be typed in" if allow_any else None)
    return seed, steps, guidance, width, height, model


def build(config: AppConfig) -> gr.Blocks:
    app = App(config)
    ttl = max(2, config.cache_ttl)
    with gr.Blocks(title="Denoising visualizer", delete_cache=(ttl // 2, ttl)) as demo:
        gr.Markdown("# Denoising visualizer\nWatch a diffusion model turn noise into an image, one step at a time.")
        with gr.Tab("Generate"):
            gr.Markdown(PROSE["generate"], elem_classes="explain")
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", value="")
                    sampler = gr.Dropdown(sampler_names(), value=DEFAULT_SAMPLER, label="Sampler")
                    seed, steps, guidance, width, height, model = _settings_controls(config.default_model,
                                                                                     config.allow_any_model)
                    with gr.Row():
                        run_button = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                    gr.Examples(EXAMPLES, inputs=prompt)
                with gr.Column(scale=2, min_width=320):
                    image = gr.Image(label="Frame", elem_id="frame", elem_classes="frame", format="png",
                                     interactive=False, height=420)
                    status = gr.Markdown(elem_id="status")
                    notice = gr.Markdown(elem_id="notice")
                    step_slider = gr.Slider(1, 25, value=1, step=1, label="Step", interactive=False, elem_id="step")
                    step_label = gr.Markdown(elem_id="step-label")
                    view = gr.Radio(list(views.VIEWS), value=list(views.VIEWS)[0], label="View", elem_id="view")
                    gr.Markdown(PROSE["slider"], elem_classes="explain")
                    with gr.Row():
                        play = gr.Button("Play", size="sm", elem_id="play")
                        pause = gr.Button("Pause", size="sm")
                    with gr.Accordion("Downloads", open=False):
                        with gr.Row():
                            buttons = {fmt: gr.Button(label, size="sm", elem_id=f"dl-{fmt}") for fmt, label in
                                       [("gif", "GIF"), ("mp4", "MP4"), ("webp", "WebP"), ("zip", "Frames (ZIP)"),
                                        ("run", "Saved run (ZIP)")]}
                        file_out = gr.File(label="File", elem_id="download-file")
                    with gr.Tabs(elem_id="insight"):
                        with gr.Tab("Convergence"):
                            gr.Markdown(PROSE["convergence"], elem_classes="explain")
                            convergence_plot = gr.Image(label="Distance to the final image", format="png",
                                                        interactive=False, elem_id="convergence-plot")
                        with gr.Tab("Schedule"):
                            schedule_plot = gr.Image(label="Noise schedule", format="png", interactive=False,
                                                     elem_id="schedule-plot")
                            numbers = gr.Markdown(elem_id="step-numbers")
                        with gr.Tab("Guidance"):
                            gr.Markdown(PROSE["guidance"], elem_classes="explain")
                            with gr.Row():
                                g_uncond = gr.Image(label="Without the prompt", format="png", interactive=False)
                                g_cond = gr.Image(label="With the prompt", format="png", interactive=False)
                                g_added = gr.Image(label="What guidance adds", format="png", interactive=False)
                                g_guided = gr.Image(label="Guided (x0-hat)", format="png", interactive=False)
                        with gr.Tab("Change"):
                            gr.Markdown(PROSE["change"], elem_classes="explain")
                            change = gr.Image(label="Change since the previous step", format="png",
                                              interactive=False, elem_id="change")
                        with gr.Tab("Forward noising"):
                            gr.Markdown(PROSE["forward"], elem_classes="explain")
                            with gr.Row():
                                upload = gr.Image(label="Image (empty = this run's final image)", type="numpy",
                                                  sources=["upload"], height=200)
                                noise_button = gr.Button("Noise it", elem_id="noise-it")
                            forward_status = gr.Markdown()
                        with gr.Tab("Pipeline"):
                            stages = gr.Markdown(elem_id="stages")
                        with gr.Tab("Steps table"):
                            steps_table = gr.Dataframe(headers=["step", "t", "sigma", "noise share", "evals"],
                                                       label="Steps", interactive=False, max_height=240)
            run_id = gr.State(None)
            timer = gr.Timer(0.3, active=False)

        with gr.Tab("Compare samplers"):
            gr.Markdown(PROSE["compare"], elem_classes="explain")
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    c_prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], elem_id="c-prompt")
                    c_negative = gr.Textbox(label="Negative prompt", value="")
                    c_samplers = gr.CheckboxGroup(sampler_names(), value=["Euler", "DDIM", "DPM++ 2M"],
                                                  label="Samplers (2 to 8)", elem_id="c-samplers")
                    c_seed, c_steps, c_guidance, c_width, c_height, c_model = _settings_controls(
                        config.default_model, config.allow_any_model)
                    c_button = gr.Button("Compare", variant="primary", elem_id="compare")
                with gr.Column(scale=2, min_width=320):
                    c_image = gr.Image(label="Grid", elem_id="grid", elem_classes="frame", format="png",
                                       interactive=False)
                    c_status = gr.Markdown(elem_id="c-status")
                    c_slider = gr.Slider(1, 100, value=100, step=1, label="Progress through the schedule (%)",
                                         elem_id="c-progress")
                    c_view = gr.Radio(list(views.VIEWS)[:2], value=list(views.VIEWS)[0], label="View")
                    with gr.Row():
                        c_buttons = {fmt: gr.Button(label, size="sm", elem_id=f"c-dl-{fmt}") for fmt, label in
                                     [("gif", "Grid GIF"), ("mp4", "Grid MP4"), ("png", "Final images (PNG)")]}
                    c_file = gr.File(label="File", elem_id="c-download-file")
                    c_curves = gr.Image(label="Convergence of each sampler", format="png", interactive=False,
                                        elem_id="c-convergence")
            c_run_id = gr.State(None)

        # ---- wiring -------------------------------------------------------------------------
        model_event = dict(concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1)
        run_button.click(
            app.generate, [prompt, negative, seed, steps, guidance, sampler, width, height, model],
            [image, step_slider, run_id, steps_table, status, notice], api_name="generate", **model_event)
        stop_button.click(app.stop, None, None, queue=False, api_name="stop")
        step_slider.change(app.show_step, [run_id, step_slider, view], [image, step_label], api_name="frame",
                           show_progress="hidden", trigger_mode="always_last")
        insight_outputs = [convergence_plot, schedule_plot, numbers, g_uncond, g_cond, g_added, g_guided, change, stages]
        step_slider.change(app.insight, [run_id, step_slider], insight_outputs, api_name="insight",
                           show_progress="hidden", trigger_mode="always_last")
        noise_button.click(app.noise_image, [run_id, upload, step_slider], [image, view, forward_status],
                           api_name="noise_image", **model_event)
        view.change(app.show_step, [run_id, step_slider, view], [image, step_label], show_progress="hidden",
                    api_visibility="private")
        play.click(lambda: gr.Timer(active=True), None, timer, api_visibility="private")
        pause.click(lambda: gr.Timer(active=False), None, timer, api_visibility="private")
        timer.tick(lambda s, m: 1 if s >= m else s + 1, [step_slider, step_slider], step_slider,
                   show_progress="hidden", api_visibility="private")
        for fmt, button in buttons.items():
            button.click(lambda rid, v, fmt=fmt: app.download(rid, fmt, v), [run_id, view], file_out,
                         api_name=f"download_{fmt}")
        c_button.click(app.compare, [c_prompt, c_negative, c_seed, c_steps, c_guidance, c_samplers, c_width,
                                     c_height, c_model], [c_image, c_slider, c_run_id, c_status, c_curves],
                       api_name="compare", **model_event)
        c_slider.change(app.show_grid, [c_run_id, c_slider, c_view], c_image, api_name="grid_frame",
                        show_progress="hidden", trigger_mode="always_last")
        c_view.change(app.show_grid, [c_run_id, c_slider, c_view], c_image, show_progress="hidden",
                      api_visibility="private")
        for fmt, button in c_buttons.items():
            button.click(lambda rid, fmt=fmt: app.download_grid(rid, fmt), c_run_id, c_file,
                         api_name=f"download_grid_{fmt}")
    demo.app_state = app  # for tests and the launcher
    return demo
