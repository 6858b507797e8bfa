"""img2img: the owned loop against diffusers' StableDiffusionImg2ImgPipeline, and its step accounting."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from visualizer.engine.decode import vae_decode
from visualizer.engine.denoise import generate, generate_many
from visualizer.engine.run import DEFAULTS, Settings
from visualizer.engine.samplers import make_scheduler

from test_denoise import swapped
from conftest import IMAGE_TOLERANCE

PROMPT = "a red circle on the left"


def init_image(size=32) -> Image.Image:
    """A deterministic test picture: a gradient with a bright square."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    pixels[8:20, 10:22] = (250, 40, 40)
    return Image.fromarray(pixels)


def settings(tiny_model, sampler="Euler", steps=10, strength=0.6, image=True, **kw):
    return Settings(prompt=PROMPT, model=tiny_model, sampler=sampler, num_inference_steps=steps, seed=5,
                    strength=strength, init_image=init_image() if image else None, **kw)


def diffusers_img2img(pipe, sampler, steps, strength, seed=5):
    reference = swapped(pipe, make_scheduler(sampler, pipe.scheduler.config), StableDiffusionImg2ImgPipeline)
    out = reference(PROMPT, image=init_image(), strength=strength, num_inference_steps=steps,
                    guidance_scale=DEFAULTS["guidance_scale"], generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


@pytest.mark.parametrize("sampler", ["DDIM", "Euler", "Euler a", "DPM++ 2M", "Heun", "PNDM", "UniPC"])
def test_img2img_final_image_matches_diffusers(tiny_model, tiny_pipe, sampler):
    run = generate(settings(tiny_model, sampler), tiny_pipe)
    ours = vae_decode(tiny_pipe.vae, run.tensors["latents"][-1:])[0].astype(np.float32) / 255
    assert np.abs(ours - diffusers_img2img(tiny_pipe, sampler, 10, 0.6)).max() <= IMAGE_TOLERANCE


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM"])
def test_img2img_runs_the_last_share_of_the_schedule(tiny_model, tiny_pipe, sampler):
    full = generate(settings(tiny_model, sampler, image=False), tiny_pipe)
    part = generate(settings(tiny_model, sampler, strength=0.6), tiny_pipe)
    assert len(part) == 6 and len(full) == 10
    assert [s.timestep for s in part.steps] == [s.timestep for s in full.steps[4:]]
    assert [round(s.progress, 6) for s in part.steps] == [round(s.progress, 6) for s in full.steps[4:]]
    assert part.info.img2img.skipped_steps == 4 and part.info.stopped is False
    assert part.tensors["init_latents"].shape == part.tensors["initial_noise"].shape


def test_pndm_img2img_counts_its_two_evaluation_first_step_once(tiny_model, tiny_pipe):
    run = generate(settings(tiny_model, "PNDM", strength=0.6), tiny_pipe)
    assert len(run) == 6 and run.steps[0].evaluations == 2 and run.info.denoiser_evaluations == 7


def test_lockstep_img2img_equals_each_sampler_alone(tiny_model, tiny_pipe):
    names = ["Euler", "DDIM", "Heun"]
    together = generate_many([settings(tiny_model, n) for n in names], tiny_pipe)
    for name, run in zip(names, together):
        alone = generate(settings(tiny_model, name), tiny_pipe)
        assert torch.allclose(run.tensors["latents"], alone.tensors["latents"], atol=1e-4), name


def test_step_events_report_the_img2img_step_count(tiny_model, tiny_pipe):
    totals = []
    as_array = dataclasses.replace(settings(tiny_model, "Euler", strength=0.3), init_image=np.asarray(init_image()))
    generate(as_array, tiny_pipe, callback=lambda e: totals.append(e.total_steps))
    assert totals == [3, 3, 3]


@pytest.mark.parametrize("strength, message", [
    (0.0, "above 0"), (1.5, "at most 1"), (float("nan"), "finite"), ("x", "must be a number"),
    (0.05, "runs no step"),
])
def test_bad_strength_is_refused_with_a_message(tiny_model, strength, message):
    with pytest.raises(ValueError, match=message):
        settings(tiny_model, strength=strength).validate()


def test_strength_without_an_image_is_ignored(tiny_model, tiny_pipe):
    run = generate(settings(tiny_model, strength=0.5, image=False), tiny_pipe)
    assert len(run) == 10 and run.info.img2img is None


def test_the_generate_tab_runs_img2img_from_an_uploaded_image(tiny_model, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    tab = App(AppConfig(output_dir=tmp_path, default_model=tiny_model, example_dir=None)).generate_tab
    image = np.full((32, 32, 3), (200, 30, 30), np.uint8)
    *_, last = tab.generate("a red circle", "", 3, 10, 7.5, "Euler", 0, 0, tiny_model, image, 0.5)
    assert len(last.steps_table) == 5
    assert "from the init image (strength 0.5: steps 6–10 of the schedule)" in last.status
    assert "Init image (img2img)" in last.stages and "the first 5 steps are skipped" in last.stages
    *_, full = tab.generate("a red circle", "", 3, 10, 7.5, "Euler", 0, 0, tiny_model, None, 0.5)
    assert len(full.steps_table) == 10  # no image: strength is ignored, all 10 steps run
