"""The run store: bounded runs, bounded decoded frames, re-decoding on demand."""
import pytest

from visualizer import api
from visualizer.engine.decode import decode_run
from visualizer.app.store import RunExpired, RunStore


def test_frames_over_budget_are_dropped_and_redecoded_identically(tiny_model, tiny_pipe, tmp_path):
    runs = [api.run("a red circle", model=tiny_model, num_inference_steps=5, seed=s) for s in range(3)]
    one_run = sum(f.nbytes for frames in runs[0].frames.values() for f in frames)
    originals = [[f.copy() for f in r.frames["xt"]] for r in runs]
    store = RunStore(tmp_path, capacity=10, frame_budget=int(1.5 * one_run))
    ids = [store.add([r]) for r in runs]
    assert store.frame_bytes() <= 1.5 * one_run
    assert runs[0].frames == {} and runs[1].frames == {} and runs[2].frames  # least recently used go first
    redecode = lambda run: decode_run(run, tiny_pipe.vae)  # noqa: E731
    again = store.get(ids[0], redecode=redecode)[0]
    assert all((a == b).all() for a, b in zip(again.frames["xt"], originals[0]))
    assert store.frame_bytes() <= 1.5 * one_run and runs[2].frames == {}  # the older one gave way
    assert len(again.tensors["latents"]) == 5  # latents are always kept


def test_runs_beyond_capacity_expire_with_their_export_folder(tiny_model, tmp_path):
    store = RunStore(tmp_path, capacity=2)
    run = api.run("a red circle", model=tiny_model, num_inference_steps=2)
    first = store.add([run])
    store.folder(first)
    store.add([run]), store.add([run])
    with pytest.raises(RunExpired, match="Generate it again"):
        store.get(first)
    assert not (tmp_path / first).exists()


def test_pinned_runs_stay_and_keep_their_frames(tiny_model, tmp_path):
    """The example the page opens with is pinned: never evicted, its frames never dropped (it may have no
    latents to re-decode them from)."""
    run = api.run("a red circle", model=tiny_model, num_inference_steps=2)
    store = RunStore(tmp_path, capacity=1, frame_budget=1)
    example = store.add([api.run("a blue square", model=tiny_model, num_inference_steps=2)], pinned=True)
    for _ in range(3):
        store.add([run])
    assert example in store and store.get(example)[0].frames["xt"]
    assert len(store) == 2  # the pinned one and the newest
