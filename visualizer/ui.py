"""The Gradio layout: live denoising, the timestep slider, insight tabs, the sampler grid and downloads.

Plain functions (ui_handlers.App) first, then `with gr.Blocks()` layout, then wiring. Every event that
runs the model shares one concurrency id, so runs queue instead of fighting over it.
"""
from __future__ import annotations

import gradio as gr
import numpy as np

from . import views
from .models import ALIASES, EMBEDDED
from .run import DEFAULT_GUIDANCE
from .samplers import DEFAULT_SAMPLER, sampler_names
from .ui_handlers import App, AppConfig

MODEL_CONCURRENCY = "model"
EXAMPLES = ["a large red circle in the centre", "a small blue square on the left of a white background",
            "a yellow triangle on the top", "a large purple diamond on the right of a black background"]
PROSE = {
    "generate": "Type a prompt and press **Generate**. The model starts from pure noise and removes a little of it "
                "at every step; frames stream in while it works. **Stop** keeps what was computed.",
    "slider": "Drag the slider to see any step instantly. **x_t** is the noisy latent the sampler holds after the "
              "step, decoded by the VAE. **x0-hat** is the model's guess of the finished image at that step. "
              "Heun and DPM2 spend two model evaluations per step.",
    "convergence": "How far the model's guess (x0-hat) is from the final image at each step: 1 - SSIM (structure) "
                   "and the distance of the latents. The dotted line marks where structure appears: the first "
                   "step whose distance (1 - SSIM) has halved from step 1; the red ring is the slider's step.",
    "guidance": "Classifier-free guidance runs the model twice per step, without and with the prompt, and "
                "combines them: guided = uncond + scale × (cond − uncond). The images are the final image each "
                "branch predicts at this step; the heatmap is where guidance pushes hardest.",
    "change": "What changed in x0-hat since the previous step: bright = large change. Early steps change the "
              "layout, late steps only edges.",
    "forward": "The forward process, q(x_t | x_0): take an image, encode it, and add noise at this run's noise "
               "levels, step by step. Move the slider: denoising runs this film backwards.",
    "img2img": "Empty: start from pure noise. With an image: it is encoded by the VAE, noised to the point "
               "`1 - strength` of the way through the schedule, and only the remaining steps run (img2img). "
               "Low strength keeps the image; 1.0 keeps little of it.",
    "compare": "Pick 2 to 8 samplers. They share the prompt, seed and initial noise and run in one batch. "
               "The slider moves every cell to the same point of its schedule (0% = first step, 100% = last).",
}


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
    guidance = gr.Slider(0, 20, value=DEFAULT_GUIDANCE, step=0.5, label="Guidance scale (CFG)")
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
                    with gr.Accordion("Start from an image (img2img)", open=False):
                        gr.Markdown(PROSE["img2img"], elem_classes="explain")
                        init_image = gr.Image(label="Init image", type="numpy", sources=["upload"], height=160,
                                              elem_id="init-image")
                        strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength", elem_id="strength")
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
            app.generate, [prompt, negative, seed, steps, guidance, sampler, width, height, model, init_image,
                           strength],
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
