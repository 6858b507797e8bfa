"""Insight metrics on runs whose answers are known."""
import numpy as np
import pytest

from visualizer import api
from visualizer.analysis.metrics import change_heatmap, ssim, structure_step
from visualizer.analysis.noising import forward_noising, guidance_breakdown
from visualizer.analysis.stages import pipeline_stages


@pytest.fixture(scope="module")
def run(tiny_model):
    return api.run("a red circle", model=tiny_model, sampler="Euler", num_inference_steps=8, seed=2)


def test_ssim_is_one_for_identical_images_and_lower_otherwise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0


def test_distance_at_the_last_step_is_zero(run):
    metrics = run.info.metrics
    assert len(metrics) == 8 and metrics[0]["change_from_previous"] is None
    assert metrics[-1]["rmse_xt_to_final"] == 0 and metrics[-1]["ssim_x0_to_final"] > 0.9
    assert metrics[-1]["latent_distance_x0_to_final"] < metrics[0]["latent_distance_x0_to_final"]
    assert run.info.structure_step == structure_step(metrics)


def test_structure_step_rule():
    curve = [{"step": i + 1, "ssim_x0_to_final": s} for i, s in enumerate([0.2, 0.5, 0.55, 0.61, 0.9, 1.0])]
    assert structure_step(curve) == 4  # 1 - SSIM: 0.8 at step 1; first at or below 0.4 is step 4 (0.39)
    assert structure_step([]) is None
    assert structure_step([{"step": 1, "ssim_x0_to_final": 0.2}, {"step": 2, "ssim_x0_to_final": 0.3}]) is None


def test_change_heatmap_is_black_at_the_first_step(run):
    assert change_heatmap(run, 0).max() == 0
    assert change_heatmap(run, 1).shape == run.frames["x0"][1].shape


def test_guidance_breakdown_recombines_to_the_guided_prediction(run, tiny_pipe):
    parts = guidance_breakdown(run, 2, tiny_pipe.vae)
    assert (parts["guided"] == run.frames["x0"][2]).all()  # decoding the guided x0-hat gives the x0 frame
    assert not (parts["uncond"] == parts["cond"]).all()


def test_no_guidance_no_breakdown(tiny_model, tiny_pipe):
    plain = api.run("a red circle", model=tiny_model, num_inference_steps=3, guidance_scale=1.0)
    assert guidance_breakdown(plain, 1, tiny_pipe.vae) is None


def test_pipeline_stages_state_real_shapes(run):
    text = pipeline_stages(run)
    assert "[1, 16, 32]" in text and "[1, 4, 8, 8]" in text and "8 evaluations for 8 steps" in text
    assert "EulerDiscreteScheduler" in text and "32x32" in text


def test_forward_noising_goes_from_noise_to_the_image(run, tiny_pipe):
    import torch

    from visualizer.engine.decode import vae_decode

    frames = forward_noising(run, run.final_image, tiny_pipe.vae)
    assert len(frames) == 8
    x = torch.from_numpy(run.final_image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        clean = vae_decode(tiny_pipe.vae, tiny_pipe.vae.encode(x).latent_dist.mean * tiny_pipe.vae.config.scaling_factor)[0]
    errors = [np.abs(f.astype(int) - clean.astype(int)).mean() for f in frames]
    assert errors[-1] < 0.8 * errors[0]  # less noise, closer to the image's own VAE round trip
