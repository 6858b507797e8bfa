"""Model replicas on Ray Serve: one front process, N `Engine` replicas that each hold the pipeline.

    replicas = start(2)                      # a local Ray and 2 replicas (or start(2, address="ray://..."))
    for item in replicas.stream(settings):   # the contract of api.stream: StepUpdate..., DecodeUpdate..., Run
        ...

`Replicas` offers api's engine functions (stream, redecode, forward_noising, guidance_breakdown) with the same
contract, so the app takes it in place of the `api` module (AppConfig.engine). A run streams from the replica
that runs it through a Serve handle: each item carries only the frames new since the one before, and the front
rebuilds the same StepUpdate / DecodeUpdate / Run objects. Stop reaches the replica through a small actor, the
stop board. The front loads no model; its live previews, where asked for, are the latent-colour approximation.
The only module that imports ray.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import uuid
from typing import Callable, Iterator, Sequence

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from . import api
from .api import DecodeUpdate, StepUpdate
from .engine.decode import Preview, latent_preview, latent_rgb_factors
from .errors import ReplicaLost
from .engine.models import EMBEDDED, load_pipeline
from .engine.run import FRAME_KINDS, START, Run, Settings

APP_NAME = "visualizer"  # the Serve application (and Ray namespace) of the replicas
STOP_POLL = 0.02  # seconds between the front's checks of a run's should_stop


def default_threads(replicas: int) -> int:
    """torch threads per replica on CPUs: this machine's cores shared out between the replicas."""
    return max(1, (os.cpu_count() or 1) // replicas)


@ray.remote(num_cpus=0)
class StopBoard:
    """Stop flags of the runs in flight, by run key: the front sets one, the replica running the run waits on it."""

    def __init__(self):
        self._flags: dict[str, asyncio.Event] = {}

    async def stop(self, key: str) -> None:
        self._flags.setdefault(key, asyncio.Event()).set()

    async def stopped(self, key: str) -> bool:
        """Returns once `key` is stopped or ended."""
        await self._flags.setdefault(key, asyncio.Event()).wait()
        return True

    async def end(self, key: str) -> None:
        """The front is done with `key`: release its waiter (a replica still running it stops) and forget it."""
        self._flags.pop(key, asyncio.Event()).set()


@serve.deployment(max_ongoing_requests=1)  # one run at a time per replica; the others queue at the handle
class Engine:
    """One replica: the pipeline(s) it has loaded, run through `api` with the torch threads its process was started
    with (OMP_NUM_THREADS: see Replicas)."""

    def __init__(self, model: str):
        api.warm_up(model)

    def stream(self, key: str, settings: Settings, samplers: list[str] | None, frames: tuple[str, ...],
               board) -> Iterator:
        """api.stream's items ready to send: tensors on the CPU, and each item's frames only those not sent before
        (the final runs without frames the front already holds)."""
        stopped = board.stopped.remote(key)
        cheap = LatentColours(api.on_engine(lambda: latent_rgb_factors(load_pipeline(settings.model))))
        items = api.stream(settings, samplers, should_stop=lambda: bool(ray.wait([stopped], timeout=0)[0]),
                           frames=frames)
        sent: dict[tuple[int, str, int], object] = {}
        runs_sent = False
        for item in items:
            if isinstance(item, StepUpdate):
                yield StepUpdate(_on_cpu(item.event), _new_frames(item.frames, sent), cheap)
                cheap = None  # the front keeps the first
            elif isinstance(item, DecodeUpdate):
                yield DecodeUpdate(None if runs_sent else item.runs, _new_frames(item.frames, sent), item.remaining)
                runs_sent = True
            else:
                yield _without_sent_frames(item, sent)

    def redecode(self, run: Run) -> tuple[dict, object]:
        api.redecode(run)
        return run.frames, run.final_image, run.start_frame

    def forward_noising(self, run: Run, image) -> list:
        return api.forward_noising(run, image)

    def guidance_breakdown(self, run: Run, index: int):
        return api.guidance_breakdown(run, index)


def _on_cpu(event):
    """The step event with its tensors copied to the CPU (a copy: a view would send the whole batch's storage)."""
    return dataclasses.replace(event, **{k: getattr(event, k).to("cpu", copy=True)
                                         for k in ("latents", "xt", "x0", "eps", "x_in")})


def _new_frames(frames: dict, sent: dict) -> dict:
    """The frames of `frames` (sampler -> kind -> step -> frame) not in `sent`, which gains them."""
    new: dict = {}
    for index, kinds in frames.items():
        for kind, steps in kinds.items():
            for step, frame in steps.items():
                if (index, kind, step) not in sent:
                    sent[index, kind, step] = frame
                    new.setdefault(index, {}).setdefault(kind, {})[step] = frame
    return new


def _without_sent_frames(result, sent: dict):
    """The finished run(s) with each kind of frames left out where every frame of it was sent already."""
    def light(index: int, run: Run) -> Run:
        kept = {kind: frames for kind, frames in run.frames.items()
                if not all(sent.get((index, kind, step)) is frame for step, frame in enumerate(frames))}
        return dataclasses.replace(run, frames=kept)

    return [light(i, r) for i, r in enumerate(result)] if isinstance(result, list) else light(0, result)


def _merge(into: dict, frames: dict) -> None:
    for index, kinds in frames.items():
        for kind, steps in kinds.items():
            into.setdefault(index, {}).setdefault(kind, {}).update(steps)


def _refill(run: Run, frames: dict) -> None:
    """Put back the frames the replica left out of a finished run (sent before, held in `frames`)."""
    for kind, steps in frames.items():
        if kind == START:
            run.start_frame = steps[0] if run.start_frame is None else run.start_frame
        else:
            run.frames.setdefault(kind, [steps[step] for step in sorted(steps)])


class LatentColours:
    """The front's cheap preview (decode.CheapPreview without a model): the linear latent -> RGB fit."""

    def __init__(self, factors):
        self.factors = factors

    def __call__(self, latents: torch.Tensor, step: int) -> Preview:
        return Preview(latent_preview(latents, *self.factors)[0], step, "approximate preview (latent colours)")


class Replicas:
    """The front's side of the replicas: api's engine functions, run on the Serve application `APP_NAME`."""

    def __init__(self, replicas: int, threads: int, model: str = EMBEDDED):
        """Deploy `replicas` Engine replicas on the Ray this process is connected to (one GPU each where the cluster
        has GPUs, else `threads` CPUs each); returns once every replica has loaded `model`."""
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        # torch's threads come from the replica process's environment: torch.set_num_threads(n >= 2) in the replica
        # would make every run on its engine thread 2x slower (see app.leave_a_core)
        options = {"num_gpus": 1} if gpus else {"num_cpus": threads}
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
        self.replicas = replicas
        self._handle = serve.run(Engine.options(num_replicas=replicas, ray_actor_options=options).bind(model),
                                 name=APP_NAME, route_prefix=None)
        self._board = StopBoard.remote()

    def stream(self, settings: Settings, samplers: Sequence[str] | None = None, *,
               should_stop: Callable[[], bool] | None = None,
               frames: Sequence[str] = FRAME_KINDS) -> Iterator[StepUpdate | DecodeUpdate | Run | list[Run]]:
        """api.stream, on a replica. `should_stop` is polled here every STOP_POLL s; closing the generator stops the
        replica's run too. A replica lost mid-run raises ReplicaLost. The request is sent on the first next()."""
        key = uuid.uuid4().hex
        response = self._handle.options(stream=True).stream.remote(
            key, settings, None if samplers is None else list(samplers), tuple(frames), self._board)
        done = threading.Event()
        if should_stop is not None:
            threading.Thread(target=self._watch, args=(key, should_stop, done), daemon=True).start()
        received: dict = {}  # sampler -> kind -> step -> frame, all that arrived
        runs, cheap = None, None
        try:
            for item in _replica_items(response):
                _merge(received, item.frames if isinstance(item, (StepUpdate, DecodeUpdate)) else {})
                if isinstance(item, StepUpdate):
                    cheap = item._cheap or cheap
                    yield StepUpdate(item.event, api.snapshot(received), cheap)
                elif isinstance(item, DecodeUpdate):
                    runs = item.runs or runs
                    yield DecodeUpdate(runs, api.snapshot(received), item.remaining)
                else:
                    for index, run in enumerate(item if isinstance(item, list) else [item]):
                        _refill(run, received.get(index, {}))
                    yield item
        finally:
            done.set()
            self._board.end.remote(key)

    def _watch(self, key: str, should_stop: Callable[[], bool], done: threading.Event) -> None:
        while not done.wait(STOP_POLL):
            if should_stop():
                self._board.stop.remote(key)
                return

    def redecode(self, run: Run) -> None:
        run.frames, run.final_image, run.start_frame = _result(self._handle.redecode.remote(
            dataclasses.replace(run, frames={}, start_frame=None)))

    def forward_noising(self, run: Run, image=None) -> list:
        run.frames["forward"] = _result(self._handle.forward_noising.remote(dataclasses.replace(run, frames={}), image))
        return run.frames["forward"]

    def guidance_breakdown(self, run: Run, index: int):
        return _result(self._handle.guidance_breakdown.remote(dataclasses.replace(run, frames={}), index))


def _replica_items(response) -> Iterator:
    """A streaming response's items, with the replica's own errors raised as they were and a lost replica as
    ReplicaLost; closing it cancels the request."""
    finished = False
    try:
        for item in response:
            yield item
        finished = True
    except RayTaskError as error:
        raise _cause(error) from None
    except RayActorError as error:
        raise ReplicaLost() from error
    finally:
        if not finished:
            response.cancel()


def _result(response):
    """A unary response's result, with the replica's own errors raised as they were."""
    try:
        return response.result()
    except RayTaskError as error:
        raise _cause(error) from None
    except RayActorError as error:
        raise ReplicaLost() from error


def _cause(error: RayTaskError) -> BaseException:
    """The exception the replica raised (a SettingsError stays a SettingsError, with its own message)."""
    return error.cause if isinstance(error.cause, Exception) else error


def start(replicas: int, threads: int | None = None, address: str | None = None, model: str = EMBEDDED) -> Replicas:
    """Connect to the Ray cluster at `address` (default: start a local Ray on this machine) and deploy the replicas."""
    threads = threads or default_threads(replicas)
    if not ray.is_initialized():
        local = {} if address else {"num_cpus": max(os.cpu_count() or 1, replicas * threads)}
        ray.init(address=address, namespace=APP_NAME, include_dashboard=False, **local)
    return Replicas(replicas, threads, model)
