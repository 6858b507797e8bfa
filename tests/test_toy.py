"""The 2D playground: the shipped denoisers carry noise onto their patterns through the same samplers and
loop as the image models; guidance picks a cluster; the CLI writes the arrays and films the issue names."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from visualizer.toy import model as toy
from visualizer.toy import render as toy_render
from visualizer.errors import SettingsError
from visualizer.engine.samplers import make_scheduler


def distance_ratio(run) -> float:
    """Median distance of the final points to the pattern, over that of the initial noise."""
    pattern = toy.sample_pattern(run.settings.pattern, 4000, seed=1)[0]
    return float(np.median(toy.nearest(run.points[-1], pattern)[0]) / np.median(toy.nearest(run.points[0], pattern)[0]))


@pytest.mark.parametrize("pattern", list(toy.PATTERNS))
def test_every_pattern_is_reached_from_noise_by_ddim_and_euler_a(pattern):
    runs = toy.sample([toy.ToySettings(pattern=pattern, sampler=s, num_inference_steps=40) for s in ("DDIM", "Euler a")])
    for run in runs:
        assert run.points.shape == (41, 1024, 2) and run.x0.shape == (40, 1024, 2)
        assert distance_ratio(run) <= 0.25, (run.settings.sampler, distance_ratio(run))
    assert np.array_equal(runs[0].points[0], runs[1].points[0])  # the same starting points, side by side
    assert not np.allclose(runs[0].points[-1], runs[1].points[-1])


@pytest.mark.parametrize("label", list(toy.SHAPES))
def test_guidance_on_a_label_brings_the_points_to_the_asked_cluster(label):
    pattern, labels = toy.sample_pattern("shapes", 4000, seed=1)
    asked = list(toy.SHAPES).index(label)
    shares = {}
    for sampler in ("Euler", "DDIM"):
        run = toy.run(pattern="shapes", sampler=sampler, label=label, guidance_scale=3.0)
        shares[sampler] = np.mean(labels[toy.nearest(run.points[-1], pattern)[1]] == asked)
    unguided = toy.run(pattern="shapes")
    free = np.mean(labels[toy.nearest(unguided.points[-1], pattern)[1]] == asked)
    assert all(share >= 0.9 for share in shares.values()), shares
    assert free < 0.6  # without a label the points spread over the three shapes


def test_the_toy_loop_is_the_plain_scheduler_loop():
    """The captured points are exactly what diffusers' scheduler computes, step by step (no capture artefact)."""
    settings = toy.ToySettings(pattern="ring", sampler="Euler a", num_inference_steps=12, points=256, seed=3)
    run = toy.sample([settings])[0]
    model = toy.load_denoiser("ring")
    scheduler = make_scheduler("Euler a", toy.SCHEDULER_CONFIG)
    scheduler.set_timesteps(12)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 256, 2), generator=generator) * scheduler.init_noise_sigma
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(latents, t)
            eps = model(x_in[0], t.expand(256), torch.full((256,), model.labels))[None]
            latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    assert torch.equal(torch.from_numpy(run.points[-1]), latents[0])


def test_the_field_points_to_the_centre_early_and_onto_the_pattern_late():
    run = toy.run(pattern="ring", num_inference_steps=30)
    inward = np.sum((run.field[0] - run.grid) * run.grid, 1)
    assert np.mean(inward < 0) > 0.95  # at pure noise the best guess for any point is near the data's mean
    pattern = toy.sample_pattern("ring", 4000, seed=1)[0]
    late = toy.nearest(run.field[-1], pattern)[0]
    near = toy.nearest(run.grid, pattern)[0] < 0.3
    assert np.median(late[near]) < 0.1  # close to the ring, x0-hat lands on it


def test_bad_settings_get_clear_messages():
    with pytest.raises(SettingsError, match="no labelled clusters"):
        toy.run(pattern="ring", label="circle")
    with pytest.raises(SettingsError, match="Patterns: ring, spiral, shapes"):
        toy.run(pattern="heart")
    with pytest.raises(SettingsError, match="Points must be from 1"):
        toy.run(points=0)
    with pytest.raises(SettingsError, match="share pattern, seed"):
        toy.sample([toy.ToySettings(seed=1), toy.ToySettings(seed=2, sampler="DDIM")])


def test_runs_save_and_load(tmp_path):
    run = toy.run(pattern="spiral", num_inference_steps=8, points=64)
    again = toy.ToyRun.load(run.save(tmp_path / "run"))
    assert again.settings == run.settings and again.steps == run.steps
    assert np.array_equal(again.points, run.points) and np.array_equal(again.field, run.field)


def test_frames_show_the_points_moving_and_traces_follow_them():
    run = toy.run(pattern="shapes", num_inference_steps=10, points=300)
    colors = toy_render.point_colors(run)
    start, end = toy_render.frame(run, 0, "points", colors), toy_render.frame(run, 10, "points", colors)
    assert start.shape == (toy_render.SIZE, toy_render.SIZE, 3) and np.abs(start.astype(int) - end).mean() > 2
    assert len({tuple(c) for c in colors}) == 3  # coloured by the cluster each point ends in
    trace = toy_render.trace(run)
    assert len(trace["points"]) == 11 and len(trace["points"][0]) == 300
    x, y = trace["points"][10][0]
    assert tuple(end[y, x]) == tuple(colors[0])  # the trace's pixel is where the frame drew that point


def test_cli_writes_points_pattern_run_json_and_films(tmp_path):
    out = tmp_path / "toy"
    done = subprocess.run([sys.executable, "-m", "visualizer", "toy", "--pattern", "shapes", "--steps", "12",
                           "--sampler", "DDIM", "--label", "circle", "--guidance", "3", "--out", str(out), "--gif",
                           "--mp4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    points, pattern = np.load(out / "points.npy"), np.load(out / "pattern.npy")
    assert points.shape == (13, 1024, 2) and pattern.shape[1] == 2
    meta = json.loads((out / "run.json").read_text())
    assert meta["settings"]["label"] == "circle" and len(meta["steps"]) == 12
    gif = Image.open(out / "points.gif")
    assert sum(1 for _ in ImageSequence.Iterator(gif)) == 13
    assert (out / "points.mp4").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "visualizer", "toy", "--pattern", "ring", "--label", "circle",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: Pattern 'ring' has no labelled clusters; got label 'circle'."


def test_the_training_command_learns_a_pattern_from_scratch(tmp_path):
    done = subprocess.run([sys.executable, "-m", "visualizer.toy.train", "--out", str(tmp_path), "--patterns", "ring",
                           "--iterations", "400"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = toy.sample([toy.ToySettings(pattern="ring", points=512)], folder=tmp_path)[0]
    assert distance_ratio(run) < 0.35
