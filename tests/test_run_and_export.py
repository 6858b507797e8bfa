"""Settings validation, run save / load, and every export read back."""
import math
import zipfile

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from visualizer import api
from visualizer.media.export import aligned_indices, export_grid, export_run
from visualizer.engine.run import Run, Settings


@pytest.fixture(scope="module")
def decoded_run(tiny_model, tiny_pipe):
    return api.run("a red circle", model=tiny_model, sampler="DDIM", num_inference_steps=7, seed=5)


@pytest.mark.parametrize("field, value, words", [
    ("num_inference_steps", 0, "Steps must be from 1"),
    ("num_inference_steps", -3, "Steps must be from 1"),
    ("num_inference_steps", 2.5, "whole number"),
    ("num_inference_steps", 5000, "Steps must be from 1 to 500"),
    ("guidance_scale", float("nan"), "finite"),
    ("guidance_scale", float("inf"), "finite"),
    ("guidance_scale", -1, "from 0 to 50"),
    ("true_cfg_scale", 51, "True CFG scale must be a finite number from 0 to 50"),
    ("true_cfg_scale", "strong", "True CFG scale must be a number"),
    ("seed", 1.5, "whole number"),
    ("seed", -1, "Seed must be from 0"),
    ("seed", 2**70, "Seed must be from 0"),
    ("width", 0, "Width must be from 8"),
    ("width", -64, "Width must be from 8"),
    ("height", 100, "multiple of 8"),
    ("sampler", "Nope", "Valid samplers"),
])
def test_bad_settings_are_refused_with_a_clear_message(field, value, words):
    settings = Settings(prompt="a red circle")
    setattr(settings, field, value)
    with pytest.raises(ValueError, match=words):
        settings.validate()


def test_too_large_is_refused():
    with pytest.raises(ValueError, match="too large"):
        Settings(prompt="x", width=4096, height=4096).validate()


def test_save_and_load_round_trip(decoded_run, tmp_path):
    decoded_run.save(tmp_path / "r")
    loaded = Run.load(tmp_path / "r")
    assert loaded.settings == decoded_run.settings and loaded.steps == decoded_run.steps
    for name, tensor in decoded_run.tensors.items():
        assert (loaded.tensors[name] == tensor).all(), name
    for kind in ("xt", "x0"):
        assert all((a == b).all() for a, b in zip(loaded.frames[kind], decoded_run.frames[kind]))
    assert (loaded.final_image == decoded_run.final_image).all()
    assert (loaded.start_frame == decoded_run.start_frame).all() and len(loaded.frames["xt"]) == 7
    names = sorted(p.name for p in (tmp_path / "r" / "frames").iterdir())
    assert names[:2] == ["x0_0001.png", "x0_0002.png"] and names[7:9] == ["xt_0000.png", "xt_0001.png"]


def test_the_start_frame_is_the_initial_noise_decoded(decoded_run, tiny_pipe):
    """Position 0 of the player and the exports: x_T, the model input of step 1, through the VAE (DDIM's input is
    the seed's noise itself; Euler's is it at unit variance, the scale of its x_t frames)."""
    from visualizer.engine.decode import vae_decode

    x_in = decoded_run.tensors["x_in"]
    assert torch.equal(x_in[0], decoded_run.tensors["initial_noise"][0])
    assert (decoded_run.start_frame == vae_decode(tiny_pipe.vae, x_in[:1])[0]).all()
    assert not (decoded_run.start_frame == decoded_run.frames["xt"][0]).all()  # not step 1's frame
    euler = api.run("a red circle", model=decoded_run.settings.model, num_inference_steps=3, seed=5)
    scale = euler.info.init_noise_sigma / (1 + euler.steps[0].sigma ** 2) ** 0.5  # scale_model_input's
    assert euler.info.init_noise_sigma > 2 and torch.allclose(euler.tensors["x_in"][0],
                                                               euler.tensors["initial_noise"][0] * scale, atol=1e-5)


def test_gif_loops_holds_the_last_frame_and_has_the_start_and_one_frame_per_step(decoded_run, tmp_path):
    path = export_run(decoded_run, tmp_path, ["gif"], fps=10)["gif"]
    gif = Image.open(path)
    assert gif.n_frames == 1 + 7 and gif.info["loop"] == 0
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert durations[:-1] == [100] * 7 and durations[-1] >= 1000
    assert gif.size[0] >= 256  # 32x32 frames upscaled to stay visible


def test_gif_frames_show_the_decoded_steps(decoded_run, tmp_path):
    path = export_run(decoded_run, tmp_path, ["gif"], captions=False)["gif"]
    gif = Image.open(path)
    shown = []
    for i in (0, 7):
        gif.seek(i)
        shown.append(np.asarray(gif.convert("RGB").resize((32, 32), Image.Resampling.NEAREST)).astype(int))
    for image, expected in zip(shown, (decoded_run.start_frame, decoded_run.frames["xt"][-1])):
        assert np.abs(image - expected.astype(int)).mean() < 12  # palette quantization only


def test_mp4_webp_zip_and_sheet_read_back(decoded_run, tmp_path):
    written = export_run(decoded_run, tmp_path, ["mp4", "webp", "zip", "sheet"], fps=8)
    reader = imageio_ffmpeg.read_frames(str(written["mp4"]))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    assert frames == 1 + 7 + round(1.5 * 8) - 1 and meta["fps"] == 8
    webp = Image.open(written["webp"])
    assert webp.n_frames == 1 + 7 and webp.info.get("loop") == 0
    with zipfile.ZipFile(written["zip"]) as archive:
        names = archive.namelist()
    assert len(names) == 1 + 14 and {"xt_0000.png", "xt_0007.png", "x0_0001.png"} <= set(names)
    assert Image.open(written["sheet"]).width > Image.open(written["sheet"]).height


def test_unknown_format_is_refused(decoded_run, tmp_path):
    with pytest.raises(ValueError, match="Unknown export format"):
        export_run(decoded_run, tmp_path, ["avi"])


def test_grid_aligns_runs_by_progress(tiny_model, tmp_path):
    assert aligned_indices([4, 8]) == [[0, 0], [0, 1], [1, 2], [1, 3], [2, 4], [2, 5], [3, 6], [3, 7]]
    runs = api.compare("a blue square", ["Euler", "DDIM", "Heun"], model=tiny_model, num_inference_steps=5)
    written = export_grid(runs, tmp_path, ["png", "gif"])
    gif = Image.open(written["gif"])
    assert gif.n_frames == 1 + 5  # the shared start (the same initial noise), then the aligned steps
    single = Image.open(export_run(runs[0], tmp_path / "one", ["gif"])["gif"])
    assert gif.width > 2.5 * single.width
    assert math.isclose(Image.open(written["png"]).width, gif.width, rel_tol=0.01)


def test_a_bundle_written_before_the_format_version_still_loads(decoded_run, tmp_path):
    """Early run.json files had no version, an untyped info dict (with keys since dropped) and a noise_share
    per step; they load, and their facts land in RunInfo."""
    import json

    folder = decoded_run.save(tmp_path / "old")
    doc = json.loads((folder / "run.json").read_text())
    del doc["version"]
    doc["info"] = {**{k: v for k, v in doc["info"].items() if k != "img2img"}, "model": "embedded", "sampler": "DDIM",
                   "guidance_scale": 5.0, "seed": 5, "truncated": False, "structure_rule": "old words"}
    doc["settings"]["strength"] = 1.0
    (folder / "run.json").write_text(json.dumps(doc))
    loaded = Run.load(folder)
    assert loaded.info.scheduler == decoded_run.info.scheduler and loaded.info.img2img is None
    assert [s.sigma for s in loaded.steps] == [s.sigma for s in decoded_run.steps]
    assert loaded.steps[3].noise_share == decoded_run.steps[3].noise_share and len(loaded.frames["xt"]) == 7
