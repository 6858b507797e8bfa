"""Comparing models (issue 14): one prompt on several models of different families and sizes, aligned by progress
through their own schedules, in the API, the exports and the app."""
import numpy as np
import pytest
import torch
from PIL import Image

from visualizer import api
from visualizer.errors import ModelLoadError, SettingsError
from visualizer.media.export import export_grid
from visualizer.engine.run import Settings
from visualizer.media.views import grid_frame

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from visualizer.demo_model.architecture import tiny_sd3_pipeline

    return str(tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3"))


@pytest.fixture(scope="module")
def runs(sd3_folder):
    """The embedded model (64x64, v-prediction, 6 DDIM steps) and a tiny SD 3 (32x32, flow matching: DDIM does not
    fit it, so Euler), one prompt and seed."""
    return api.compare_models(Settings(prompt=PROMPT, sampler="DDIM", num_inference_steps=6, seed=5),
                              ["embedded", sd3_folder])


def test_each_model_runs_as_it_would_alone_with_a_sampler_that_fits_it(runs, sd3_folder):
    embedded, sd3 = runs
    assert (embedded.settings.model, embedded.settings.sampler) == ("embedded", "DDIM")
    assert (sd3.settings.model, sd3.settings.sampler) == (sd3_folder, "Euler")
    assert embedded.final_image.shape == (64, 64, 3) and sd3.final_image.shape == (32, 32, 3)  # native sizes
    assert (embedded.info.family, sd3.info.family) == ("sd", "sd3")
    for run in runs:
        alone = api.run(run.settings)
        assert torch.equal(run.tensors["latents"], alone.tensors["latents"])
        assert run.info.metrics and len(run.frames["x0"]) == 6


def test_the_grid_aligns_models_by_progress_and_names_them(runs, sd3_folder, tmp_path):
    half = grid_frame(runs, 0.5)
    assert half.shape[1] > 2 * 256  # two cells, the 32x32 model's frames resized to the 64x64 model's cells
    assert not np.array_equal(half, grid_frame(runs, 1.0))
    written = export_grid(runs, tmp_path, ["png", "gif"])
    sheet = Image.open(written["png"])
    gif = Image.open(written["gif"])
    assert sheet.width == half.shape[1] and gif.n_frames == 1 + 6
    from visualizer.engine.labels import comparison_labels

    assert comparison_labels([r.settings for r in runs]) == ["embedded · DDIM", "tiny-sd3 · Euler"]


@pytest.mark.parametrize("models, words", [(["embedded"], "List 2 to 4 different models"),
                                           (["embedded", "embedded"], "List 2 to 4 different models"),
                                           (["a", "b", "c", "d", "e"], "List 2 to 4")])
def test_a_comparison_needs_two_to_four_different_models(models, words):
    with pytest.raises(SettingsError, match=words):
        api.model_settings(Settings(prompt=PROMPT), models)


def test_an_unknown_model_is_refused_before_anything_runs():
    with pytest.raises(ModelLoadError, match="neither a folder"):
        api.model_settings(Settings(prompt=PROMPT), ["embedded", "./no/such/model"])


def test_the_app_streams_a_model_comparison_into_one_grid(sd3_folder, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig, UserError

    app = App(AppConfig(output_dir=tmp_path, example_dir=None))
    updates = list(app.compare_tab.compare(PROMPT, "", 5, 4, 5.0, ["DPM++ 2M"], 0, 0, "embedded", False,
                               f"embedded, {sd3_folder}"))
    live = [u.player["status"] for u in updates[:-1] if "status" in u.player]
    assert any(s.startswith("Model 1 of 2 (embedded)") for s in live)
    assert any(s.startswith("Model 2 of 2 (tiny-sd3)") for s in live)
    props, picture, run_id, status, _ = updates[-1]
    assert status.startswith("Done: 2 models")
    cells = props["cells"]
    assert [c["label"] for c in cells] == ["embedded · DPM++ 2M", "tiny-sd3 · DPM++ 2M"]  # both have DPM++ 2M
    assert all(c["start"] and len(c["frames"]["x0"]) == 1 + 4 and c["curve"] for c in cells)  # curves for one plot
    from visualizer.media import views

    stored = app.runs.store.get(run_id)
    assert [r.settings.model for r in stored] == ["embedded", sd3_folder]
    assert picture.shape == views.grid_frame(stored, 1.0).shape
    assert all(len(c["frames"]["map"]) == 1 + 4 for c in cells)  # each model's path on a map of its own latents
    with pytest.raises(UserError, match="List 2 to 4"):
        list(app.compare_tab.compare(PROMPT, "", 5, 4, 5.0, ["Euler"], 0, 0, "embedded", False, "embedded"))
