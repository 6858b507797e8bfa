"""The app's public API for gradio_client users, declared with `gr.api`: typed functions returning plain JSON.

Images come back as files (gradio_client downloads them and hands back a local path); every other value is a
number, a string or a list. A run is named by the `run_id` that /generate and /compare return (no session state, but for
/stop, which stops the calling client's own run). Steps are 1-based as everywhere else; /frame's step 0 is the start, the
initial noise x_T decoded (position 0 of the player and the exports), the one place the API addresses it. The page's own events are private: this is the one public surface.

    from gradio_client import Client
    c = Client("http://127.0.0.1:7860/")
    result = c.predict("red apple", api_name="/generate")        # the finished run (c.submit streams)
    image, label = c.predict(result["run_id"], 5, "x0", api_name="/frame")
"""
import math
from collections import deque
from pathlib import Path

import gradio as gr
import numpy as np
from gradio.data_classes import FileData
from PIL import Image

from ..analysis.plots import convergence_plot, figure_png, schedule_plot
from ..analysis.metrics import change_heatmap
from ..analysis.stages import step_numbers
from ..engine.labels import comparison_labels
from ..engine.run import DEFAULTS
from ..media import views
from ..media.export import upscale
from .compare import CompareTab
from .generate import GUIDANCE_PARTS, GenerateTab
from .runs import Runs, UserError

_D = DEFAULTS
KEPT_MAPS = 32  # /map_seeds pictures kept under the output folder; older ones are deleted


def _file(path: Path, image: np.ndarray) -> dict:
    """Save `image` at `path` and return it as a file for the client (Gradio copies it into its cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image)).save(path)
    return FileData(path=str(path)).model_dump()


def _step(run, step) -> int:
    """A 1-based step of `run` from a caller, as a 0-based index; UserError unless it is a whole step of the run."""
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= len(run):
        raise UserError(f"step must be a whole number from 1 to {len(run)} (/frame: or 0, the start), got {step!r}.")
    return step - 1


def _view(view, allowed) -> str:
    """A view key (or its menu label) among `allowed`, or a UserError naming them."""
    key = views.VIEWS.get(view, view) if isinstance(view, str) else view
    if key not in allowed:
        raise UserError(f"Unknown view {view!r}: choose one of {', '.join(allowed)}.")
    return key


class Endpoints:
    """One method per endpoint; `register` declares them all in the current gr.Blocks."""

    def __init__(self, runs: Runs, generate_tab: GenerateTab, compare_tab: CompareTab):
        self.runs, self.generate_tab, self.compare_tab = runs, generate_tab, compare_tab
        self._maps: deque[Path] = deque()

    def register(self, concurrency: dict) -> None:
        """Declare every endpoint; `concurrency` (concurrency_id, concurrency_limit) goes to those that run the
        model, so API calls queue with the page's runs."""
        for fn in (self.generate, self.compare, self.noise_image, self.map_seeds):
            gr.api(fn, api_name=fn.__name__, **concurrency)
        for fn in (self.frame, self.grid_frame, self.insight, self.download, self.download_grid):
            gr.api(fn, api_name=fn.__name__)
        gr.api(self.stop, api_name="stop", queue=False)

    def _folder(self, run_id: str) -> Path:
        return self.runs.store.folder(run_id) / "api"

    def generate(self, prompt: str, negative_prompt: str = _D["negative_prompt"], seed: int = _D["seed"],
                 num_inference_steps: int = _D["num_inference_steps"], guidance_scale: float = _D["guidance_scale"],
                 sampler: str = _D["sampler"], width: int = 0, height: int = 0, model: str = "",
                 attention: bool = _D["attention"], true_cfg_scale: float = _D["true_cfg_scale"],
                 request: gr.Request = None) -> dict:
        """Run the model and stream its progress; the last update is the finished run.

        Width/height 0: the model's native size; model "": the server's default. Updates while it runs:
        {run_id: None, status}. The last: {run_id, status, notice, final_image (a file), steps: [[step, t, sigma,
        noise share, evaluations]], stages (markdown)}.
        """
        for out in self.generate_tab.generate(prompt, negative_prompt, seed, num_inference_steps, guidance_scale,
                                              sampler, width, height, model, attention=attention,
                                              true_cfg=true_cfg_scale, request=request, player=False):
            if out.run_id is None:
                yield {"run_id": None, "status": out.status}
                continue
            yield {"run_id": out.run_id, "status": out.status, "notice": out.notice,
                   "final_image": _file(self._folder(out.run_id) / "final.png", out.final_image),
                   "steps": out.steps_table, "stages": out.stages}

    def compare(self, prompt: str, samplers: list[str], negative_prompt: str = _D["negative_prompt"],
                seed: int = _D["seed"], num_inference_steps: int = _D["num_inference_steps"],
                guidance_scale: float = _D["guidance_scale"], width: int = 0, height: int = 0, model: str = "",
                models: str = "", true_cfg_scale: float = _D["true_cfg_scale"], request: gr.Request = None) -> dict:
        """2 to 8 samplers in lockstep on one noise, or (`models`: 2 to 4, comma-separated) models in turn with the
        first sampler; streams like /generate. The last update: {run_id, status, labels, grid_image (a file)}."""
        for out in self.compare_tab.compare(prompt, negative_prompt, seed, num_inference_steps, guidance_scale,
                                            samplers, width, height, model, models=models, true_cfg=true_cfg_scale,
                                            request=request, player=False):
            if out.run_id is None:
                yield {"run_id": None, "status": out.status}
                continue
            runs = self.runs.store.get(out.run_id)
            yield {"run_id": out.run_id, "status": out.status, "labels": comparison_labels([r.settings for r in runs]),
                   "steps": [len(r) for r in runs],
                   "grid_image": _file(self._folder(out.run_id) / "grid.png", out.grid_image)}

    def frame(self, run_id: str, step: int, view: str = "xt") -> tuple[FileData, str]:
        """The image of a step (1-based) in a view (xt, x0, both, latents, noise, forward, map) and its line; step 0
        is the start (the initial noise, decoded; views xt, x0 and both show it)."""
        run = self.runs.get(run_id)[0]
        key = _view(view, tuple(views.VIEWS.values()))
        if step == 0 and not isinstance(step, bool) and run.start_frame is not None and len(run):
            if key not in ("xt", "x0", "both"):
                raise UserError(f"Step 0, the start, has only the views xt, x0 and both, not {key!r}.")
            return (_file(self._folder(run_id) / f"frame-{key}-0000.png", views.start_frame(run, key)),
                    views.describe_start(run))
        index = _step(run, step)
        try:
            image = views.frame(run, index, key)
        except ValueError as error:
            raise UserError(str(error)) from None
        return _file(self._folder(run_id) / f"frame-{key}-{index + 1:04d}.png", image), views.describe(run, index)

    def grid_frame(self, run_id: str, progress: int = 100, view: str = "xt") -> FileData:
        """The comparison at `progress` percent (a whole number, 1 to 100) through every run's own schedule, one
        labelled cell each; view xt or x0."""
        runs = self.runs.get(run_id)
        key = _view(view, ("xt", "x0"))
        if not isinstance(progress, (int, float)) or isinstance(progress, bool) or not math.isfinite(progress) \
                or not 1 <= progress <= 100:
            raise UserError(f"progress must be a number from 1 to 100 (percent), got {progress!r}.")
        percent = round(progress)
        image = views.grid_frame(runs, percent / 100, key)
        return _file(self._folder(run_id) / f"grid-{key}-{percent:03d}.png", image)

    def insight(self, run_id: str, step: int) -> dict:
        """Every insight panel of a step: {convergence, schedule, change (files), numbers (markdown),
        guidance: {uncond, cond, added, guided} (files, or None without CFG), guidance_note: what they show}."""
        run = self.runs.get(run_id)[0]
        index = _step(run, step)
        folder = self._folder(run_id) / f"insight-{index + 1:04d}"
        guidance = self.generate_tab.guidance(run_id, index + 1)
        return {
            "convergence": _file(folder / "convergence.png", figure_png(convergence_plot([run], current=index + 1))),
            "schedule": _file(folder / "schedule.png", figure_png(schedule_plot(run, current=index + 1))),
            "change": _file(folder / "change.png", np.asarray(upscale(change_heatmap(run, index), 160))),
            "numbers": step_numbers(run, index),
            "guidance": {part: None if image is None else _file(folder / f"guidance-{part}.png", image)
                         for part, image in zip(GUIDANCE_PARTS, guidance)},
            "guidance_note": guidance.note,
        }

    def noise_image(self, run_id: str) -> str:
        """Forward-noise the run's final image at its noise levels: the view "forward" of /frame from then on."""
        return self.generate_tab.noise_image(run_id, None)[1]

    def map_seeds(self, prompt: str, count: int = 8, negative_prompt: str = _D["negative_prompt"],
                  seed: int = _D["seed"], num_inference_steps: int = _D["num_inference_steps"],
                  guidance_scale: float = _D["guidance_scale"], sampler: str = _D["sampler"],
                  model: str = "") -> dict:
        """`count` seeds from `seed` on one map of image space: {image (a file), summary}."""
        picture, summary = self.generate_tab.map_seeds(prompt, negative_prompt, seed, num_inference_steps,
                                                       guidance_scale, sampler, model, count)
        path = self.runs.config.output_dir / "maps" / f"{self.runs.store.new_id()}.png"
        image = _file(path, np.asarray(picture))
        self._maps.append(path)
        while len(self._maps) > KEPT_MAPS:
            self._maps.popleft().unlink(missing_ok=True)
        return {"image": image, "summary": summary}

    def download(self, run_id: str, format: str = "gif", view: str = "xt") -> FileData:
        """One export of a run: gif, mp4, webp, zip (frames), sheet, or run (the saved run, zipped)."""
        return FileData(path=self.generate_tab.download(run_id, format, view)).model_dump()

    def download_grid(self, run_id: str, format: str = "gif") -> FileData:
        """One export of a comparison: gif, mp4, webp (the grid animated) or png (the final images)."""
        return FileData(path=self.compare_tab.download_grid(run_id, format)).model_dump()

    def stop(self, request: gr.Request = None) -> None:
        """Stop this client's running /generate or /compare after the current step (what it computed stays)."""
        self.runs.stop(getattr(request, "session_hash", None))
