"""The Python API: one `Settings` in, step events and then the decoded `Run` out.

    from visualizer import Settings, api
    for item in api.stream(Settings(prompt="red apple")):
        ...  # StepUpdate per finished step (with a live preview on demand), then the Run

The CLI, the app, the bench and notebooks all go through here; only this module wires the loop, the
decoders and the insight metrics together.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .analysis import metrics
from .analysis import noising
from .engine.decode import EXACT, CheapPreview, Preview, StreamingDecoder, decode_run, frame_vae
from .engine.denoise import StepCallback, StepEvent, denoise_steps
from .errors import SettingsError
from .engine.models import embedded_name, family_of_reference, load_pipeline
from .engine.run import FRAME_KINDS, Run, Settings
from .engine.samplers import fitting


# All torch work runs on this one thread (the model's, and the 2D playground's), but for the frames decoded after a
# run's loop where torch runs one thread per thread (decode.use_cores). torch's CPU thread pool
# (OpenMP) is per calling thread: once a second thread has run a parallel torch op, every later run on this one
# is about 2x slower on a 2-core machine, for good (measured: 0.84 s -> 1.78 s for the same 25-step run after one
# 2D-playground sample in another thread; 1.03 s -> 2.0 s with work spread over a server's worker threads).
ENGINE_THREAD = "visualizer-engine"
_ENGINE = ThreadPoolExecutor(max_workers=1, thread_name_prefix=ENGINE_THREAD)


def on_engine(fn, *args):
    """fn(*args) on the engine thread (directly when already there)."""
    if threading.current_thread().name.startswith(ENGINE_THREAD):
        return fn(*args)
    return _ENGINE.submit(fn, *args).result()


def _run_on_engine(items: Iterator) -> Iterator:
    """Run a generator to its end on the engine thread, handing its items to the caller's thread as they come.

    The engine never waits for the caller (showing the frames overlaps the next steps); closing this
    generator stops the engine's after the item it is computing.
    """
    if threading.current_thread().name.startswith(ENGINE_THREAD):
        yield from items
        return
    handed: queue.Queue = queue.Queue()
    closed = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                handed.put((item, None))
                if closed.is_set():
                    break
            handed.put((done, None))
        except BaseException as error:  # handed to the caller, raised there
            handed.put((done, error))
        finally:
            items.close()

    finished = _ENGINE.submit(produce)
    try:
        while True:
            item, error = handed.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        closed.set()
        finished.result()


@dataclass
class StepUpdate:
    """One finished step of a running generation."""
    event: StepEvent  # the step, its latents and x0-hat (on the model's device)
    frames: dict[int, dict[str, dict[int, np.ndarray]]]  # exact frames decoded so far: sampler -> kind -> step
    # (0-based) -> frame; during the run only some steps are decoded (decode.StreamingDecoder)
    _cheap: CheapPreview | None = None

    def preview(self, kind: str = "x0") -> Preview:
        """The newest exact frame of `kind` for this sampler, else a labelled cheap preview of this step
        (computed on demand, in the caller's thread)."""
        frames = self.frames.get(self.event.sampler_index, {}).get(kind)
        if frames:
            return Preview(frames[max(frames)], max(frames) + 1, EXACT)
        return self._cheap(getattr(self.event, kind), self.event.step.index)


@dataclass
class DecodeUpdate:
    """After the loop: exact frames still arriving, each finished run's final image first."""
    runs: list[Run]  # the runs, complete but for their frames and metrics
    frames: dict[int, dict[str, dict[int, np.ndarray]]]  # exact frames decoded so far (as in StepUpdate)
    remaining: int  # frames still to decode


def _settings(settings: Settings | str, changes: dict) -> Settings:
    if isinstance(settings, str):
        return Settings(prompt=settings, **changes)
    return dataclasses.replace(settings, **changes) if changes else settings


def stream(settings: Settings, samplers: Sequence[str] | None = None, *, should_stop: Callable[[], bool] | None = None,
           frames: Sequence[str] = FRAME_KINDS) -> Iterator[StepUpdate | DecodeUpdate | Run | list[Run]]:
    """Generate, yielding a StepUpdate after every finished step, a DecodeUpdate per batch of frames decoded
    after the loop (the final image first; one with `remaining` 0 if all were decoded during it), then the Run
    (or, with `samplers`, the list of Runs, one per sampler in lockstep on the same noise). The work runs on
    the engine thread (see _ENGINE).

    Every step's `frames` (x_t and x0-hat; () for none) are VAE-decoded exactly (decode.StreamingDecoder: some
    during the run, the rest after it), and the runs end with their frames, final image and (with both
    kinds) convergence metrics. `should_stop` ends the loop early, keeping the steps computed so far; closing
    the generator halts it at once.
    """
    return _run_on_engine(_stream(settings, samplers, should_stop, frames))


def _stream(settings, samplers, should_stop, frames):
    settings_list = [settings] if samplers is None else [dataclasses.replace(settings, sampler=n) for n in samplers]
    for s in settings_list:
        s.validate()
    pipe = load_pipeline(settings.model)
    decoder = StreamingDecoder(pipe.vae, tuple(frames), frames_vae=frame_vae(pipe)) if frames else None
    cheap = CheapPreview(pipe, use_taesd=embedded_name(settings.model) is None)
    steps = denoise_steps(settings_list, pipe, should_stop)
    try:
        while True:
            try:
                event = next(steps)
            except StopIteration as finished:
                runs = finished.value
                break
            if decoder is not None:
                decoder(event)
            yield StepUpdate(event, snapshot(decoder.frames) if decoder else {}, cheap)
    finally:
        steps.close()
    if decoder is not None:
        with closing(decoder.drain(runs)) as drained:  # closed early: its decoding threads stop with it
            for remaining in drained:
                yield DecodeUpdate(runs, snapshot(decoder.frames), remaining)
        decoder.finish(runs)
        for r in runs:
            metrics.attach_metrics(r)
    yield runs if samplers is not None else runs[0]


def snapshot(frames: dict) -> dict:
    """A copy of the decoded-frames index (not the frames) that the engine thread will not change under the
    caller."""
    return {index: {kind: dict(steps) for kind, steps in kinds.items()} for index, kinds in frames.items()}


def _consume(items, callback: StepCallback | None):
    for item in items:
        if isinstance(item, StepUpdate):
            if callback is not None:
                callback(item.event)
        elif not isinstance(item, DecodeUpdate):
            return item


def run(settings: Settings | str, *, callback: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None, frames: Sequence[str] = FRAME_KINDS, **changes) -> Run:
    """Generate one run, capture every step and decode its `frames` (x_t and x0-hat by default).

    `settings` may be a prompt, with any Settings field as a keyword: `run("red apple", sampler="DDIM")`.
    """
    return _consume(stream(_settings(settings, changes), should_stop=should_stop, frames=frames), callback)


def compare(settings: Settings | str, samplers: Sequence[str], *, callback: StepCallback | None = None,
            should_stop: Callable[[], bool] | None = None, frames: Sequence[str] = FRAME_KINDS, **changes) -> list[Run]:
    """Several samplers on the same settings and initial noise, in lockstep (one UNet batch per round)."""
    return _consume(stream(_settings(settings, changes), list(samplers), should_stop=should_stop, frames=frames),
                    callback)


MAX_MODELS = 4  # models in one comparison


def model_settings(settings: Settings, models: Sequence[str]) -> list[Settings]:
    """One Settings per model of a comparison of models: `settings` with each model, and its sampler where it fits
    that model's family, else Euler. SettingsError unless 2 to MAX_MODELS different models are given."""
    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not 2 <= len(models) <= MAX_MODELS:
        raise SettingsError(f"List 2 to {MAX_MODELS} different models to compare (got {len(models)}).")
    return [dataclasses.replace(settings, model=m, sampler=fitting(settings.sampler, family_of_reference(m).sampler_kind))
            .validate() for m in models]


def compare_models(settings: Settings | str, models: Sequence[str], *, callback: StepCallback | None = None,
                   should_stop: Callable[[], bool] | None = None, frames: Sequence[str] = FRAME_KINDS,
                   **changes) -> list[Run]:
    """The same prompt, seed, steps, guidance and size on several models, one after another (model_settings); each
    starts from its own noise of that seed (the latents' shapes differ). Compare them aligned by progress through
    their schedules (views.grid_frame, export.export_grid)."""
    runs = []
    for s in model_settings(_settings(settings, changes), models):
        if should_stop is not None and should_stop():
            break
        runs.append(_consume(stream(s, should_stop=should_stop, frames=frames), callback))
    return runs


def redecode(run: Run) -> None:
    """Restore a run's frames (and final image) from its latents through its model's VAE."""
    def decode() -> None:
        pipe = load_pipeline(run.settings.model)
        decode_run(run, pipe.vae, frames_vae=frame_vae(pipe))

    on_engine(decode)


def forward_noising(run: Run, image: np.ndarray | None = None) -> list[np.ndarray]:
    """q(x_t | x_0) at the run's noise levels of `image` (default: the run's final image), one frame per step;
    kept as the run's "forward" frames (a view of the slider) and returned."""
    source = image if image is not None else run.final_image
    if source is None:
        raise SettingsError("This run was stopped before its final image: give an image to noise.")
    run.frames["forward"] = on_engine(lambda: noising.forward_noising(run, source, load_pipeline(run.settings.model).vae))
    return run.frames["forward"]


def guidance_breakdown(run: Run, index: int) -> dict[str, np.ndarray] | None:
    """What step `index` (0-based) predicts without the prompt, with it, and what guidance adds (insight)."""
    return on_engine(lambda: noising.guidance_breakdown(run, index, load_pipeline(run.settings.model).vae))


def warm_up(model: str) -> None:
    """Load `model` and run one step on the engine thread, so that the first run streams as fast as later ones."""
    run(Settings(prompt="", model=model, num_inference_steps=1), frames=("x0",))
