"""Image space: the embedded models' shipped maps (PCA of their training images' latents) and runs' paths on them."""
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from visualizer import api
from visualizer.analysis import image_map
from visualizer.media import views
from visualizer.app.frame_files import RunFiles
from visualizer.engine.models import resolve
from visualizer.demo_model import emoji
from visualizer.engine.run import Settings

WHITE_PROMPT = "a small purple circle on the right of a white background"
EMOJI_OWN_CLUSTER = 0.65  # 72% measured (docs/insight.md)


@pytest.fixture(scope="module")
def shipped():
    return image_map.shipped(resolve("shapes").source)


def ends(prompt, seeds=8, model="shapes"):
    runs = [api.run(Settings(prompt=prompt, seed=s, model=model), frames=()) for s in range(seeds)]
    m = image_map.for_runs(runs)
    return [m.cluster(image_map.path(r, m).end) for r in runs]


def test_the_shipped_map_is_what_the_documented_command_builds_and_its_clusters_hold(shipped):
    rebuilt = image_map.build("shapes", scenes_count=900)
    assert np.allclose(rebuilt.axes, shipped.axes, atol=1e-5) and np.allclose(rebuilt.points, shipped.points, atol=0.02)
    assert shipped.groups == ("black background", "white background", "gray background")
    own = [shipped.cluster(p) == shipped.groups[k] for p, k in zip(shipped.points, shipped.labels)]
    assert np.mean(own) > 0.95  # the training scenes sit in their caption's cluster


def test_the_emoji_map_is_what_the_documented_command_builds_and_its_colour_clusters_hold():
    shipped = image_map.shipped(resolve("emoji").source)
    rebuilt = image_map.build("emoji")
    assert np.allclose(rebuilt.axes, shipped.axes, atol=1e-5) and np.allclose(rebuilt.points, shipped.points, atol=0.02)
    assert shipped.groups == emoji.COLOUR_GROUPS and len(shipped.points) == len(emoji.emoji())
    own = [shipped.cluster(p) == shipped.groups[k] for p, k in zip(shipped.points, shipped.labels)]
    assert np.mean(own) > EMOJI_OWN_CLUSTER  # most emoji sit among emoji of their colour


def test_emoji_prompts_bring_the_seeds_to_their_colour():
    asked = ends("blue heart", model="emoji")
    assert Counter(asked)["blue & purple"] >= 6, asked


def test_empty_prompts_end_in_several_clusters_and_a_prompt_brings_them_to_its_own():
    free = ends("")
    assert len(set(free)) >= 2, free
    asked = ends(WHITE_PROMPT)
    assert Counter(asked)["white background"] >= 7, asked


def test_a_path_starts_at_the_noise_and_follows_every_step(shipped):
    run = api.run(Settings(prompt=WHITE_PROMPT, num_inference_steps=10, model="shapes"), frames=())
    p = image_map.path(run, shipped)
    assert p.xt.shape == (11, 2) and p.x0.shape == (10, 2)
    assert np.allclose(p.xt[0], shipped.project(run.tensors["initial_noise"])[0])
    frames = image_map.step_frames([run])[0]
    assert len(frames) == 10 and frames[0].shape == (image_map.SIZE, image_map.SIZE, 3)
    assert not np.array_equal(frames[0], frames[-1])  # the path grows with the slider
    assert np.array_equal(views.frame(run, 9, "map"), frames[-1])


def test_other_models_get_a_map_fitted_on_their_runs(tiny_model, tmp_path):
    runs = api.compare(Settings(prompt="a cat", model=tiny_model, num_inference_steps=4), ["Euler", "DDIM"], frames=())
    m = image_map.for_runs(runs)
    assert len(m.points) == 0 and m.cluster(np.zeros(2)) is None
    files = RunFiles(tmp_path, ["Euler", "DDIM"], [4, 4])
    files.add_maps(runs)
    assert all(len(c.paths["map"]) == 4 and all(p.is_file() for p in c.paths["map"]) for c in files.cells)
    picture, summary = image_map.seeds_map(runs)
    assert picture.shape == (image_map.SIZE, image_map.SIZE, 3) and "fitted to these runs" in summary


def test_cli_writes_the_map_of_several_seeds(tmp_path):
    done = subprocess.run([sys.executable, "-m", "visualizer", "run", "--prompt", WHITE_PROMPT, "--steps", "12", "--map",
                           "--map-seeds", "4", "--model", "shapes", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "map.png").is_file() and "Ended nearest: white background 4 of 4" in done.stdout
