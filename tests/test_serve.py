"""Model replicas on Ray Serve (a real local Ray started here): the same results as in this process, the app's
handlers on the replicas, Stop, and a replica killed mid-run."""
import threading
import time

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray import serve as ray_serve

from visualizer import api
from visualizer import serve
from visualizer.api import DecodeUpdate, StepUpdate
from visualizer.errors import ReplicaLost, SettingsError
from visualizer.engine.run import Settings

THREADS = 1  # torch threads of each replica, and of the runs here they are compared with
SETTINGS = Settings(prompt="a large red circle in the centre", sampler="Euler a", num_inference_steps=8, seed=5)


@pytest.fixture(scope="module")
def replicas():
    ray.init(num_cpus=2, include_dashboard=False, namespace=serve.APP_NAME, log_to_driver=False)
    try:
        yield serve.Replicas(2, THREADS)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def here(settings, threads, samplers=None):
    """api.run (api.compare with `samplers`) in this process with `threads` torch threads."""
    before = torch.get_num_threads()
    api.on_engine(torch.set_num_threads, threads)
    try:
        return api.run(settings) if samplers is None else api.compare(settings, samplers)
    finally:
        api.on_engine(torch.set_num_threads, before)


def test_the_app_runs_on_replicas_with_its_flags(tmp_path):
    from test_app import generate, launch

    process, url, log = launch(tmp_path, "--replicas", "2", "--replica-threads", str(THREADS))
    try:
        from gradio_client import Client

        result = generate(Client(url, verbose=False), "embedded", prompt=SETTINGS.prompt, seed=SETTINGS.seed,
                          steps=8, sampler=SETTINGS.sampler, guidance_scale=SETTINGS.guidance_scale)
        assert len(result["steps"]) == 8 and result["status"].startswith("Done: 8 steps")
        assert np.array_equal(np.asarray(Image.open(result["final_image"]).convert("RGB")),
                              here(SETTINGS, THREADS).final_image)
    finally:
        process.terminate()
        process.wait(30)
    assert "Traceback" not in log.read_text()


def assert_identical(a, b):
    assert [s.sigma for s in a.steps] == [s.sigma for s in b.steps]
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.frames.keys() == b.frames.keys() == {"xt", "x0"}
    assert all(np.array_equal(x, y) for k in a.frames for x, y in zip(a.frames[k], b.frames[k], strict=True))
    assert np.array_equal(a.final_image, b.final_image) and a.info.metrics == b.info.metrics
    assert a.start_frame is not None and np.array_equal(a.start_frame, b.start_frame)


def test_a_run_on_a_replica_is_bit_identical_to_the_same_run_here(replicas):
    items = list(replicas.stream(SETTINGS))
    steps = [i for i in items if isinstance(i, StepUpdate)]
    assert [s.event.step.index for s in steps] == list(range(1, 9))
    assert steps[-1].event.xt.device.type == "cpu" and steps[0].preview("x0").image.ndim == 3
    decoded = [i for i in items if isinstance(i, DecodeUpdate)]
    assert decoded and decoded[-1].remaining == 0 and all(len(d.runs[0]) == 8 for d in decoded)
    assert sum(len(f) for f in decoded[-1].frames[0].values()) == 1 + 16  # every frame and the start, each once
    remote = items[-1]
    assert_identical(remote, here(SETTINGS, THREADS))
    other = here(SETTINGS, 2)  # another thread count: float reductions differ, frames within one level
    assert max(np.abs(x.astype(int) - y).max() for x, y in zip(remote.frames["x0"], other.frames["x0"])) <= 1


def test_a_comparison_on_a_replica_matches_and_errors_keep_their_message(replicas):
    samplers = ["Euler", "DDIM"]
    remote = list(replicas.stream(SETTINGS, samplers))[-1]
    for a, b in zip(remote, here(SETTINGS, THREADS, samplers), strict=True):
        assert_identical(a, b)
    with pytest.raises(SettingsError, match="Steps must be from 1 to 500"):
        list(replicas.stream(Settings(prompt="x", num_inference_steps=0)))


def test_the_apps_handlers_run_on_the_replicas(replicas, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    app = App(AppConfig(output_dir=tmp_path, example_dir=None, engine=replicas, concurrent_runs=2))
    *_, last = app.generate_tab.generate(SETTINGS.prompt, "", SETTINGS.seed, 8, SETTINGS.guidance_scale, SETTINGS.sampler, 0, 0,
                            "embedded")
    run_id = last.run_id
    run = app.runs.store.get(run_id)[0]
    assert len(run) == 8 and len(list(tmp_path.glob(f"{run_id}/player/0-x0-*"))) == 8
    frames = {k: list(v) for k, v in run.frames.items()}
    run.frames = {}  # as when the frame budget dropped them: re-decoded on a replica
    assert_identical(app.runs.get(run_id)[0], here(SETTINGS, THREADS))
    assert all(np.array_equal(x, y) for k in frames for x, y in zip(frames[k], run.frames[k], strict=True))
    assert all(img is not None for img in app.generate_tab.guidance(run_id, 4))
    _, note = app.generate_tab.noise_image(run_id, None)
    assert len(run.frames["forward"]) == 8 and "Noised" in note


def test_stop_reaches_the_replica_within_a_step(replicas):
    stop = threading.Event()
    for item in replicas.stream(Settings(prompt="a blue square", num_inference_steps=400), should_stop=stop.is_set):
        if isinstance(item, StepUpdate) and item.event.step.index == 3:
            stop.set()
    run = item
    assert run.info.stopped and len(run.frames["x0"]) == len(run) and run.final_image is None
    # the replica may be a step ahead of what has arrived here; the flag reaches it before the step after that
    assert 3 <= len(run) <= 5, len(run)


def test_a_killed_replica_fails_only_its_own_run_and_the_next_run_works(replicas, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig, UserError

    app = App(AppConfig(output_dir=tmp_path, example_dir=None, engine=replicas, concurrent_runs=2))
    *_, last = app.generate_tab.generate("a red circle", "", 1, 4, 5.0, "Euler", 0, 0, "embedded")
    kept = last.run_id
    outcomes, started = {}, [threading.Event(), threading.Event()]

    def one(index):
        try:
            for update in app.generate_tab.generate("a green circle", "", index, 150, 5.0, "Euler", 0, 0, "embedded"):
                started[index].set()
            outcomes[index] = app.runs.store.get(update.run_id)[0]
        except UserError as error:  # the toast
            outcomes[index] = error
            started[index].set()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert all(s.wait(60) for s in started)  # both replicas are running a run
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    for t in threads:
        t.join(120)
    lost = [o for o in outcomes.values() if isinstance(o, UserError)]
    finished = [o for o in outcomes.values() if not isinstance(o, UserError)]
    assert len(lost) == 1 and len(finished) == 1, outcomes
    assert lost[0].message == str(ReplicaLost())
    assert len(finished[0]) == 150 and not finished[0].info.stopped
    assert len(app.runs.get(kept)[0]) == 4  # the store lost nothing
    started_next = time.monotonic()
    assert_identical(list(replicas.stream(SETTINGS))[-1], here(SETTINGS, THREADS))  # on the live replica
    assert time.monotonic() - started_next < 30
