"""The Gradio layout: one builder per tab (its components, then its wiring), and the public API beside them.

The handlers are plain methods of the tab modules (generate.py, compare.py, playground.py); each builder lays out
its tab and then wires it. Every event that runs the model shares one concurrency id, so runs queue instead of
fighting over it. The player (player.py) holds the
frames in the page. The page's own events are private; gradio_client users call the typed endpoints of
endpoints.py.
"""
from __future__ import annotations

from typing import NamedTuple

import gradio as gr
import numpy as np

from ..analysis.stages import pipeline_stages
from ..engine.families import StableDiffusion
from ..engine.models import ALIASES, EMBEDDED_MODELS, embedded_name
from ..engine.run import DEFAULTS, MAX_STEPS
from ..engine.samplers import sampler_names
from ..toy import model as toy
from ..media import player
from .compare import MAX_COMPARED_SAMPLERS, CompareOutputs
from .generate import MAX_MAP_SEEDS, GenerateOutputs
from .handlers import App
from .playground import MAX_SAMPLERS
from .learn import LearnOutputs
from .runs import EXAMPLE_SAMPLERS, AppConfig, steps_table
from .tour import TITLES

MODEL_CONCURRENCY = "model"
EXAMPLES = ["tropical fish", "red apple", "smiling face with sunglasses", "rocket", "jack-o-lantern"]
MODEL_INFO = ("emoji (the default): 1,151 emoji, asked for by their Unicode names. shapes: one coloured shape on a "
              "plain background, e.g. “a large red circle in the centre”; it composes colour, shape and position "
              "triples it never saw.")
PROSE = {
    "intro": "Type a prompt and press **Generate**: the model starts from random noise and removes a little of it at "
             "every step. Every step's frames arrive in the player as they are decoded; scrub them with the slider, "
             "the arrow keys or **Play**. **x_t** is the noisy latent after the step, **x0-hat** the model's guess "
             "of the finished image. Heun and DPM2 spend two model evaluations per step. New to diffusion? The "
             "**Learn** tab walks through a real run in eight short chapters.",
    "learn": "A guided tour through real runs of the model, in eight short chapters: each paragraph's numbers are "
             "those runs' own. **Next** and **Back** step through it; each chapter has a link of its own. The first "
             "visit builds it (a few runs of the model); tour another prompt below.",
    "guidance": "Classifier-free guidance runs the model twice per step, without and with the prompt, and combines "
                "them: guided = uncond + scale × (cond − uncond). The images are the final image each branch "
                "predicts at the step you settled on in the player; the heatmap is where guidance pushes hardest. "
                "Flux.1 has no unconditional branch (its guidance scale is an input of the model), so the panel "
                "stays empty for Flux runs unless the true CFG scale (under “Negative prompt, size and model”) is "
                "above 1.",
    "forward": "The forward process, q(x_t | x_0): take an image, encode it, and add noise at this run's noise "
               "levels, step by step. It becomes the player's “forward noising” view: denoising runs it backwards.",
    "img2img": "Empty: start from pure noise. With an image: it is encoded by the VAE, noised to the point "
               "`1 - strength` of the way through the schedule, and only the remaining steps run (img2img). "
               "Low strength keeps the image; 1.0 keeps little of it.",
    "toy": "The same diffusion in two dimensions, where you can see all of it. Each dot is one sample; the model "
           "(a small MLP trained on the pattern) is run by the same samplers and loop as the image models. Arrows: "
           "where the model sends a point at the current noise level (a third of the way to its x0-hat). Dots are "
           "coloured by where they end. Click a dot to trace its path; ask for a cluster of the shapes pattern and "
           "guidance (uncond + scale × (cond − uncond), as for images) bends every path toward it.",
    "map": "Every image is a point in latent space (8×8×4 numbers for the emoji model). The map is a fixed 2D "
           "projection of it (PCA of the model's training images, drawn as faint dots in clusters: for the emoji, "
           "their main colour; image space sorts by appearance, not meaning). Each path starts at its noise (a "
           "square), follows x_t (line) and x0-hat (dots) and ends in a cluster (ring). With an empty prompt the "
           "seeds end in different clusters; “blue heart” brings them all to the blue one. The player's View menu "
           "shows one run's path following the slider. Other models: the projection is fitted on the runs themselves.",
    "compare": "2 to 8 samplers on the same prompt, seed and initial noise, in one batch. The slider moves every "
               "cell to the same point of its own schedule. Or list 2 to 4 models (e.g. `embedded, sd15, sdxl`) to "
               "run the prompt on each in turn with the first picked sampler (Euler where it does not fit), "
               "aligned the same way, with their convergence curves on one plot.",
}
CSS = """
#title h2 { margin: 0; font-size: 1.25rem; }
.explain { color: var(--body-text-color-subdued); font-size: 0.9em; }
.frame img { image-rendering: pixelated; }
@media (min-width: 900px) { .player-first { flex-direction: row-reverse; } }
"""
PAGE = dict(api_visibility="private")  # the page's own events: not part of the public API (endpoints.py)


class SettingsControls(NamedTuple):
    """The settings both image tabs share."""
    negative: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Number
    height: gr.Number
    model: gr.Dropdown
    attention: gr.Checkbox
    true_cfg: gr.Slider


def _settings_controls(config: AppConfig, prefix: str = "") -> SettingsControls:
    steps = gr.Slider(1, MAX_STEPS, value=DEFAULTS["num_inference_steps"], step=1, label="Steps",
                      elem_id=f"{prefix}steps")
    guidance = gr.Slider(1, 20, value=DEFAULTS["guidance_scale"], step=0.5, label=StableDiffusion.guidance_label,
                         info="Classifier-free guidance is off at 1 (and below, as in diffusers): the prompt's prediction alone")
    with gr.Row():
        seed = gr.Number(value=DEFAULTS["seed"], precision=0, label="Seed", minimum=0, scale=3)
        randomize = gr.Button("Random seed", scale=1, min_width=80, elem_id=f"{prefix}randomize")
    randomize.click(lambda: int(np.random.randint(0, 2**31 - 1)), None, seed, **PAGE)
    attention = gr.Checkbox(value=DEFAULTS["attention"], label="Word maps: record where each word of the prompt "
                            "acts, at every step", elem_id=f"{prefix}attention")
    with gr.Accordion("Negative prompt, size and model", open=False):
        negative = gr.Textbox(label="Negative prompt", value=DEFAULTS["negative_prompt"])
        with gr.Row():
            width = gr.Number(value=0, precision=0, label="Width (0 = model's native)")
            height = gr.Number(value=0, precision=0, label="Height (0 = native)")
        model = gr.Dropdown([*EMBEDDED_MODELS, *ALIASES], value=embedded_name(config.default_model) or config.default_model,
                            label="Model", allow_custom_value=config.allow_any_model,
                            info=MODEL_INFO + (" A local diffusers folder, checkpoint file or hub id can be typed in."
                                               if config.allow_any_model else ""))
        true_cfg = gr.Slider(1, 20, value=DEFAULTS["true_cfg_scale"], step=0.5, elem_id=f"{prefix}true-cfg",
                             label="True CFG scale (Flux only: above 1 adds a negative branch, from the negative "
                                   "prompt, every step)")
    return SettingsControls(negative, seed, steps, guidance, width, height, model, attention, true_cfg)


def _player(props: dict, elem_id: str) -> gr.HTML:
    return gr.HTML(value=None, html_template=player.TEMPLATE, css_template=player.CSS, js_on_load=player.JS,
                   elem_id=elem_id, **props)


def _follow_model(app: App, controls: SettingsControls, samplers: gr.components.Component) -> None:
    """A model picked in `controls` narrows the sampler menu and renames the guidance slider to fit its family."""
    controls.model.change(app.runs.sampler_choices, [controls.model, samplers], samplers, show_progress="hidden",
                          **PAGE)
    controls.model.change(app.runs.guidance_label, controls.model, controls.guidance, show_progress="hidden", **PAGE)


def _generate_tab(app: App, model_event: dict) -> tuple[gr.State, list[gr.Image]]:
    """The Generate tab; returns what the page's load event fills (the run id and the guidance panel)."""
    example_single = (app.runs.example or (None, None))[0]
    example_run = app.runs.store.get(example_single)[0] if example_single else None
    with gr.Row(elem_classes="player-first"):
        with gr.Column(scale=3, min_width=320):
            play = _player({**app.runs.initial_props(0), "panel": "guidance"}, "player")
            notice = gr.Markdown(elem_id="notice")
        with gr.Column(scale=2, min_width=300):
            prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=2, elem_id="prompt")
            with gr.Row():
                run_button = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            sampler = gr.Dropdown(sampler_names(), value=DEFAULTS["sampler"], label="Sampler", elem_id="sampler")
            controls = _settings_controls(app.config)
            with gr.Accordion("Start from an image (img2img)", open=False):
                gr.Markdown(PROSE["img2img"], elem_classes="explain")
                init_image = gr.Image(label="Init image", type="numpy", sources=["upload"], height=160,
                                      elem_id="init-image")
                strength = gr.Slider(0.05, 1.0, value=DEFAULTS["strength"], step=0.05, label="Strength",
                                     elem_id="strength")
            gr.Examples(EXAMPLES, inputs=prompt)
            gr.Markdown(PROSE["intro"], elem_classes="explain")
    with gr.Tabs(elem_id="panels"):
        with gr.Tab("Guidance"):
            gr.Markdown(PROSE["guidance"], elem_classes="explain")
            with gr.Row(elem_id="guidance"):
                guidance_images = [gr.Image(label=text, format="png", interactive=False, height=200, buttons=[],
                                            elem_classes="frame") for text in
                                   ("Without the prompt", "With the prompt", "What guidance adds", "Guided (x0-hat)")]
            guidance_note = gr.Markdown(elem_id="guidance-note")
            guidance_panel = [*guidance_images, guidance_note]
        with gr.Tab("Downloads"):
            with gr.Row():
                download_view = gr.Radio([("x_t", "xt"), ("x0-hat", "x0"), ("both", "both")], value="xt",
                                         label="Animation shows", elem_id="dl-view")
            with gr.Row():
                buttons = {fmt: gr.Button(label, size="sm", elem_id=f"dl-{fmt}") for fmt, label in
                           [("gif", "GIF"), ("mp4", "MP4"), ("webp", "WebP"), ("zip", "Frames (ZIP)"),
                            ("html", "Interactive page (HTML)"), ("run", "Saved run (ZIP)")]}
            file_out = gr.File(label="File", elem_id="download-file")
        with gr.Tab("Forward noising"):
            gr.Markdown(PROSE["forward"], elem_classes="explain")
            with gr.Row():
                upload = gr.Image(label="Image (empty = this run's final image)", type="numpy",
                                  sources=["upload"], height=200)
                noise_button = gr.Button("Noise it", elem_id="noise-it")
            forward_status = gr.Markdown(elem_id="forward-status")
        with gr.Tab("Image space"):
            gr.Markdown(PROSE["map"], elem_classes="explain")
            with gr.Row():
                map_seeds = gr.Slider(2, MAX_MAP_SEEDS, value=8, step=1, label="Seeds", elem_id="map-seeds")
                map_button = gr.Button("Map these seeds", elem_id="map-button")
            with gr.Row():
                map_image = gr.Image(label="Paths through image space", format="png", interactive=False,
                                     height=360, buttons=[], elem_id="map-image")
                map_summary = gr.Markdown(elem_id="map-summary")
        with gr.Tab("Pipeline"):
            stages = gr.Markdown(pipeline_stages(example_run) if example_run else "", elem_id="stages")
        with gr.Tab("Steps table"):
            table = gr.Dataframe(steps_table(example_run) if example_run else None,
                                 headers=["step", "t", "sigma", "noise share", "evals"],
                                 label="Steps", interactive=False, max_height=240)
    run_id = gr.State(example_single)
    status = gr.Markdown(visible=False, elem_id="status")  # the run's status line (the player shows it too)
    final_image = gr.Image(format="png", visible=False)  # the final image, for the outputs' named order

    tab = app.generate_tab
    outputs = GenerateOutputs(play, final_image, run_id, table, status, notice, file_out, *guidance_panel, stages)
    run_button.click(
        tab.generate, [prompt, controls.negative, controls.seed, controls.steps, controls.guidance, sampler,
                       controls.width, controls.height, controls.model, init_image, strength, controls.attention,
                       controls.true_cfg],
        list(outputs), **model_event, **PAGE,
    ).then(lambda rid: tab.guidance(rid, None), run_id, guidance_panel, show_progress="hidden", **PAGE)

    def stop(request: gr.Request):
        app.runs.stop(request.session_hash)

    stop_button.click(stop, None, None, queue=False, **PAGE)
    play.change(tab.guidance_at, [run_id, play], guidance_panel, show_progress="hidden", trigger_mode="always_last",
                **PAGE)
    noise_button.click(tab.noise_image, [run_id, upload], [play, forward_status], **model_event, **PAGE)
    map_button.click(tab.map_seeds, [prompt, controls.negative, controls.seed, controls.steps, controls.guidance,
                                     sampler, controls.model, map_seeds], [map_image, map_summary],
                     **model_event, **PAGE)
    for fmt, button in buttons.items():
        button.click(lambda rid, view, fmt=fmt: tab.download(rid, fmt, view), [run_id, download_view], file_out,
                     **PAGE)
    _follow_model(app, controls, sampler)
    return run_id, guidance_panel


def _compare_tab(app: App, model_event: dict) -> None:
    with gr.Row(elem_classes="player-first"):
        with gr.Column(scale=3, min_width=320):
            play = _player(app.runs.initial_props(1), "c-player")
        with gr.Column(scale=2, min_width=300):
            prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=2, elem_id="c-prompt")
            button = gr.Button("Compare", variant="primary", elem_id="compare")
            samplers = gr.CheckboxGroup(sampler_names(), value=EXAMPLE_SAMPLERS,
                                        label=f"Samplers (2 to {MAX_COMPARED_SAMPLERS})", elem_id="c-samplers")
            controls = _settings_controls(app.config, prefix="c-")
            models = gr.Textbox(label="…or compare models (2 to 4, comma-separated)", value="",
                                placeholder="embedded, sd15, sdxl", elem_id="c-models")
            gr.Markdown(PROSE["compare"], elem_classes="explain")
            with gr.Row():
                buttons = {fmt: gr.Button(label, size="sm", elem_id=f"c-dl-{fmt}") for fmt, label in
                           [("gif", "Grid GIF"), ("mp4", "Grid MP4"), ("png", "Final images (PNG)"),
                            ("html", "Interactive page (HTML)")]}
            file_out = gr.File(label="File", elem_id="c-download-file")
    run_id = gr.State((app.runs.example or (None, None))[1])
    status = gr.Markdown(visible=False, elem_id="c-status")
    grid_image = gr.Image(format="png", visible=False)

    tab = app.compare_tab
    outputs = CompareOutputs(play, grid_image, run_id, status, file_out)
    button.click(tab.compare, [prompt, controls.negative, controls.seed, controls.steps, controls.guidance, samplers,
                               controls.width, controls.height, controls.model, controls.attention, models,
                               controls.true_cfg],
                 list(outputs), **model_event, **PAGE)
    for fmt, fmt_button in buttons.items():
        fmt_button.click(lambda rid, fmt=fmt: tab.download_grid(rid, fmt), run_id, file_out, **PAGE)
    _follow_model(app, controls, samplers)


def _playground_tab(app: App) -> None:
    with gr.Row(elem_classes="player-first"):
        with gr.Column(scale=3, min_width=320):
            play = _player(app.playground.initial_props(), "t-player")
        with gr.Column(scale=2, min_width=300):
            pattern = gr.Radio(list(toy.PATTERNS), value=toy.TOY_DEFAULTS["pattern"], label="Pattern",
                               elem_id="t-pattern")
            button = gr.Button("Run", variant="primary", elem_id="t-run")
            samplers = gr.CheckboxGroup(sampler_names(), value=[toy.TOY_DEFAULTS["sampler"]],
                                        label=f"Samplers (1 to {MAX_SAMPLERS}, same starting points)",
                                        elem_id="t-samplers")
            steps = gr.Slider(1, toy.MAX_TOY_STEPS, value=toy.TOY_DEFAULTS["num_inference_steps"], step=1,
                              label="Steps", elem_id="t-steps")
            with gr.Row():
                label = gr.Dropdown(["any"], value="any", label="Ask for a cluster", elem_id="t-label",
                                    info="shapes pattern only")
                guidance = gr.Slider(0, 10, value=toy.TOY_DEFAULTS["guidance_scale"], step=0.5,
                                     label="Guidance toward it", elem_id="t-guidance")
            with gr.Row():
                seed = gr.Number(value=toy.TOY_DEFAULTS["seed"], precision=0, minimum=0, label="Seed",
                                 elem_id="t-seed")
                points = gr.Slider(64, toy.MAX_POINTS, value=toy.TOY_DEFAULTS["points"], step=64, label="Points",
                                   elem_id="t-points")
            gr.Markdown(PROSE["toy"], elem_classes="explain")
    pattern.change(lambda p: gr.Dropdown(choices=["any", *toy.PATTERNS[p][1]], value="any"), pattern, label, **PAGE)
    button.click(app.playground.run, [pattern, samplers, steps, seed, label, guidance, points], play,
                 show_progress="hidden", **PAGE)


def _learn_tab(app: App, model_event: dict) -> tuple[LearnOutputs, gr.Textbox, gr.Dropdown]:
    """The Learn tab (the guided tour); returns its outputs and the prompt and model it is built on, for the
    page's load (a deep link) and the tab's select."""
    with gr.Row(elem_classes="player-first"):
        with gr.Column(scale=3, min_width=320):
            play = _player(player.PlayerProps(status="The tour is built when this tab opens.").as_props(), "l-player")
        with gr.Column(scale=2, min_width=300):
            text = gr.Markdown(elem_id="l-text")
            with gr.Row():
                back = gr.Button("← Back", elem_id="l-back", size="sm")
                forward = gr.Button("Next →", elem_id="l-next", variant="primary", size="sm")
            chapter = gr.Dropdown(list(TITLES.values()), value=next(iter(TITLES.values())), label="Chapter",
                                  elem_id="l-chapter")
            key = gr.Textbox(visible=False)
            gr.Markdown(PROSE["learn"], elem_classes="explain")
            with gr.Accordion("Tour another prompt or model", open=False):
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], elem_id="l-prompt")
                model = gr.Dropdown([*EMBEDDED_MODELS, *ALIASES], label="Model", elem_id="l-model",
                                    value=embedded_name(app.config.default_model) or app.config.default_model,
                                    allow_custom_value=app.config.allow_any_model)
                build_button = gr.Button("Build the tour", elem_id="l-build")
    outputs = LearnOutputs(play, text, chapter, key)
    tab = app.learn_tab
    # the chapter's key goes into the page's URL (?chapter=<key>), so that the address bar links to it
    to_url = dict(fn=None, inputs=key, outputs=None, js="(k) => { const u = new URL(window.location.href); "
                  "u.searchParams.set('chapter', k); window.history.replaceState(null, '', u); }")
    def stepper(delta: int):
        def step(prompt_, model_, chapter_):
            yield from tab.step(prompt_, model_, chapter_, delta)
        return step

    def first(prompt_, model_):
        yield from tab.show(prompt_, model_, 0)

    for button, delta in ((back, -1), (forward, 1)):
        button.click(stepper(delta), [prompt, model, chapter], list(outputs), **model_event, **PAGE).then(
            **to_url, **PAGE)
    chapter.input(tab.show, [prompt, model, chapter], list(outputs), **model_event, **PAGE).then(**to_url, **PAGE)
    build_button.click(first, [prompt, model], list(outputs), **model_event, **PAGE).then(**to_url, **PAGE)
    return outputs, prompt, model


def build(config: AppConfig) -> gr.Blocks:
    app = App(config)
    ttl = max(2, config.cache_ttl)
    model_event = dict(concurrency_id=MODEL_CONCURRENCY, concurrency_limit=config.concurrent_runs,
                       show_progress="hidden")
    with gr.Blocks(title="Denoising visualizer", delete_cache=(ttl // 2, ttl)) as demo:
        gr.Markdown("## Denoising visualizer: watch a diffusion model turn noise into an image", elem_id="title")
        # first, so the endpoints own their names (a private page event of the same function name gets a suffix)
        app.endpoints.register(dict(concurrency_id=MODEL_CONCURRENCY, concurrency_limit=config.concurrent_runs))
        with gr.Tabs(elem_id="main-tabs") as tabs:
            with gr.Tab("Generate", id="generate"):
                run_id, guidance_panel = _generate_tab(app, model_event)
            with gr.Tab("Compare samplers / models", id="compare"):
                _compare_tab(app, model_event)
            with gr.Tab("2D playground", id="playground"):
                _playground_tab(app)
            with gr.Tab("Learn", id="learn", elem_id="learn-tab") as learn:
                learn_outputs, learn_prompt, learn_model = _learn_tab(app, model_event)
        demo.load(lambda rid: app.generate_tab.guidance(rid, None), run_id, guidance_panel, show_progress="hidden",
                  **PAGE)
        learn.select(app.learn_tab.show, [learn_prompt, learn_model, learn_outputs.chapter], list(learn_outputs),
                     **model_event, **PAGE)

        def deep_link(prompt, model, request: gr.Request):
            """A page opened on ?chapter=<key>: the Learn tab, on that chapter."""
            chapter = (request.query_params.get("chapter") if request else None) or None
            if chapter is None:
                yield gr.skip(), *[gr.skip()] * len(learn_outputs)
                return
            for outputs in app.learn_tab.show(prompt, model, chapter):
                yield gr.Tabs(selected="learn"), *outputs

        demo.load(deep_link, [learn_prompt, learn_model], [tabs, *learn_outputs], **model_event, **PAGE)
    return demo
