"""The SD 3 family (families.py, flow matching) through the shared loop, against diffusers' own
StableDiffusion3Pipeline on a tiny random SD 3 model."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler, StableDiffusion3Pipeline, UniPCMultistepScheduler)

from visualizer import api
from visualizer.engine.decode import vae_decode
from visualizer.engine.families import BY_KEY
from visualizer.engine.denoise import generate, generate_many, predictions
from visualizer.errors import UnknownSamplerError
from visualizer.engine.families import family_of
from visualizer.analysis.stages import pipeline_stages, step_numbers
from visualizer.engine.models import ALIASES, ModelLoadError, load_pipeline, resolve
from visualizer.engine.run import Run, Settings
from visualizer.engine.samplers import FLOW_SAMPLERS, make_scheduler, valid_for

from conftest import (assert_same_image, check_latent_colour_preview, check_taesd_lookup, tiny_family_model,
                      trace_diffusers)
from test_img2img import init_image

PROMPT = "a red circle on the left"
SEED = 11
SHIFT = 3.0  # the tiny model's scheduler shift, as SD 3's
# diffusers' documented way to run each sampler on an SD 3 model (the reference side of the comparison)
REFERENCE_SCHEDULERS = {
    "Euler": lambda config: None,  # the pipeline's own FlowMatchEulerDiscreteScheduler, untouched
    "Heun": lambda config: FlowMatchHeunDiscreteScheduler.from_config(config),
    "DPM++ 2M": lambda config: DPMSolverMultistepScheduler.from_config(
        config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT),
    "UniPC": lambda config: UniPCMultistepScheduler.from_config(
        config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT),
    "DEIS": lambda config: DEISMultistepScheduler.from_config(
        config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT),
}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(folder, pipeline) of a tiny random SD 3 model."""
    return tiny_family_model(tmp_path_factory, "tiny_sd3_pipeline")


def settings(folder, sampler="Euler", steps=6, **kw):
    kw.setdefault("guidance_scale", 7.0)
    kw.setdefault("prompt", PROMPT)
    return Settings(model=folder, sampler=sampler, num_inference_steps=steps, seed=SEED, **kw)


def diffusers_image(pipe, sampler, steps=6, prompt=PROMPT, negative=None, guidance_scale=7.0):
    reference = StableDiffusion3Pipeline(**pipe.components)
    reference.scheduler = REFERENCE_SCHEDULERS[sampler](pipe.scheduler.config) or pipe.scheduler
    reference.set_progress_bar_config(disable=True)
    return reference(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=torch.Generator().manual_seed(SEED), height=32, width=32, output_type="np").images[0]


def final_image(pipe, run) -> np.ndarray:
    """The run's final image as the app shows it: uint8, through the model's own VAE."""
    return vae_decode(pipe.vae, run.tensors["latents"][-1:])[0]


def test_flow_predictions_invert_the_straight_path():
    x0, noise, sigma = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4), 0.3
    x_t, velocity = (1 - sigma) * x0 + sigma * noise, noise - x0
    got_x0, got_noise = predictions(x_t, velocity, sigma, "flow_prediction")
    assert torch.allclose(got_x0, x0, atol=1e-6) and torch.allclose(got_noise, noise, atol=1e-6)


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_final_image_matches_diffusers_sd3_pipeline(sd3, sampler):
    folder, pipe = sd3
    run = generate(settings(folder, sampler), pipe)
    assert run.info.family == "sd3" and run.info.prediction_type == "flow_prediction" and len(run) == 6
    assert run.info.denoiser_evaluations == (11 if sampler == "Heun" else 6)
    assert_same_image(final_image(pipe, run), diffusers_image(pipe, sampler))
    # Step.sigma is the flow sigma in [0, 1]: pure noise at the first step, and x_t is the latents as they are
    first = run.steps[0]
    assert first.sigma == pytest.approx(1.0, abs=1e-3) and all(s.flow and 0 < s.sigma <= 1 for s in run.steps)
    assert torch.equal(run.tensors["xt"], run.tensors["latents"])
    assert first.noise_share == pytest.approx(first.sigma ** 2 / ((1 - first.sigma) ** 2 + first.sigma ** 2)) and first.snr == pytest.approx((1 - first.sigma) ** 2 / first.sigma ** 2)


def test_euler_captures_the_schedulers_own_sigmas_and_x0_hat(sd3):
    folder, pipe = sd3
    run = generate(settings(folder), pipe)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    assert [s.sigma for s in run.steps] == pytest.approx(scheduler.sigmas[:-1].tolist())
    assert [s.timestep for s in run.steps] == pytest.approx(scheduler.timesteps.tolist())
    # Euler's last step goes to sigma 0: x_final = x - sigma * v, which is that step's x0-hat
    assert torch.allclose(run.tensors["x0"][-1], run.tensors["latents"][-1], atol=1e-5)


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_x_t_and_x0_hat_are_what_diffusers_sd3_pipeline_computes(sd3, sampler):
    """x_t: the latents StableDiffusion3Pipeline hands its callback_on_step_end at the end of each step (steps as
    conftest.trace_diffusers counts them; Heun: the callback after each step's correcting evaluation, and the last).
    x0-hat: the schedulers' own prediction x0 = x - sigma * v (FlowMatchEuler's step is x + (sigma_next - sigma) v,
    the flow solvers' x0 is sample - sigma_t * output), with v the guided velocity that diffusers' transformer returned
    at the step's first evaluation in diffusers' own run (hooked): nothing of ours in the reference. The branches'
    x0-hat and the noise estimate x + (1 - sigma) v likewise."""
    folder, pipe = sd3
    run = generate(settings(folder, sampler), pipe)
    reference = StableDiffusion3Pipeline(**pipe.components)
    reference.scheduler = REFERENCE_SCHEDULERS[sampler](pipe.scheduler.config) or pipe.scheduler
    reference.set_progress_bar_config(disable=True)
    theirs = trace_diffusers(reference, reference.transformer, prompt=PROMPT, num_inference_steps=6, guidance_scale=7.0,
                             generator=torch.Generator().manual_seed(SEED), height=32, width=32, output_type="np")
    assert theirs["evaluations"] == sum(s.evaluations for s in run.steps) == (11 if sampler == "Heun" else 6)
    t = run.tensors
    assert theirs["latents"].shape == t["xt"].shape == (6, 16, 8, 8)
    assert torch.allclose(t["xt"], theirs["latents"], rtol=0, atol=1e-5)
    assert [s.sigma for s in run.steps] == pytest.approx(theirs["sigmas"].tolist(), rel=1e-6)
    x, sigma = theirs["model_input"][:, 1], theirs["sigmas"][:, None, None, None]  # CFG batch: [negative, positive]
    v_uncond, v_cond = theirs["model_output"].unbind(1)
    v = v_uncond + 7.0 * (v_cond - v_uncond)
    assert torch.allclose(t["x_in"], x, rtol=0, atol=1e-5)
    assert torch.allclose(t["x0"], x - sigma * v, rtol=0, atol=1e-5)
    assert torch.allclose(t["eps"], x + (1 - sigma) * v, rtol=0, atol=1e-5)
    assert torch.allclose(t["x0_cond"], x - sigma * v_cond, rtol=0, atol=1e-5)
    assert torch.allclose(t["x0_uncond"], x - sigma * v_uncond, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt, negative, guidance", [(PROMPT, "blue square", 7.0), ("", "", 7.0), (PROMPT, "", 1.0)])
def test_negative_prompt_and_no_cfg_match_diffusers(sd3, prompt, negative, guidance):
    folder, pipe = sd3
    run = generate(settings(folder, prompt=prompt, negative_prompt=negative, guidance_scale=guidance), pipe)
    assert ("eps_cond" in run.tensors) == (guidance > 1)
    theirs = diffusers_image(pipe, "Euler", prompt=prompt, negative=negative or None, guidance_scale=guidance)
    assert_same_image(final_image(pipe, run), theirs)


def test_lockstep_batch_equals_each_sampler_alone(sd3):
    folder, pipe = sd3
    names = ["Euler", "DPM++ 2M"]
    together = generate_many([settings(folder, n) for n in names], pipe)
    assert together[0].info.lockstep_batch == 2
    for name, run in zip(names, together):
        alone = generate(settings(folder, name), pipe)
        assert torch.allclose(run.tensors["latents"], alone.tensors["latents"], rtol=1e-4, atol=1e-4), name


def test_api_run_end_to_end_saves_and_loads(sd3, tmp_path):
    folder, pipe = sd3
    run = api.run(settings(folder, "Euler", steps=4))
    assert len(run.frames["xt"]) == len(run.frames["x0"]) == 4 and run.final_image.shape == (32, 32, 3)
    assert (run.final_image == run.frames["xt"][-1]).all() and run.info.metrics
    assert np.abs(run.frames["x0"][-1].astype(int) - run.final_image).max() <= 2  # x0-hat ends at the image
    i = run.info
    assert i.latent_shape == [1, 16, 8, 8] and i.pooled_embedding_shape == [1, 64]
    assert i.text_embedding_shape == [1, 16 + 256, 64]  # CLIP tokens, then T5's 256
    assert i.vae_shift_factor == pytest.approx(0.0609) and i.init_noise_sigma == 1.0
    stages = pipeline_stages(run)
    for words in ("text_encoder_2", "text_encoder_3", "T5", "pooled_projections", "Transformer", "MMDiT",
                  "16 latent channels", "+ 0.0609", "shift=3.0"):
        assert words in stages, words
    assert "SNR | noise share" in step_numbers(run, 0) and "| 0 | 100.0% |" in step_numbers(run, 0)
    parts = api.guidance_breakdown(run, 1)  # the branches' own x0-hat, captured for flow runs
    assert set(parts) == {"uncond", "cond", "guided", "added"} and parts["guided"].shape == (32, 32, 3)
    assert (parts["guided"] == run.frames["x0"][1]).all()  # the guided x0-hat is the step's x0-hat frame
    t, sigma, scale = run.tensors, run.steps[1].sigma, run.settings.guidance_scale
    v_cond, v_uncond = ((t["x_in"][1] - t[f"x0_{b}"][1]) / sigma for b in ("cond", "uncond"))
    assert torch.allclose(t["x0_uncond"][1] - sigma * scale * (v_cond - v_uncond), t["x0"][1], atol=1e-4)  # CFG on v
    forward = api.forward_noising(run)
    assert len(forward) == 4 and forward[0].shape == (32, 32, 3)
    loaded = Run.load(run.save(tmp_path / "run"))
    assert loaded.info == run.info and (loaded.final_image == run.final_image).all()
    assert loaded.steps == run.steps and loaded.steps[0].flow


def test_a_sampler_that_does_not_fit_sd3_names_the_valid_ones(sd3):
    folder, pipe = sd3
    assert valid_for("flow") == list(FLOW_SAMPLERS) == ["Euler", "Heun", "DPM++ 2M", "UniPC", "DEIS"]
    with pytest.raises(UnknownSamplerError) as error:
        generate(settings(folder, "DDIM"), pipe)
    message = str(error.value)
    assert "DDIM" in message and "flow-matching models (SD 3)" in message
    assert "Euler, Heun, DPM++ 2M, UniPC, DEIS" in message
    assert make_scheduler("DPM++ 2M", pipe.scheduler.config, "flow").config.flow_shift == SHIFT
    assert type(make_scheduler("Euler", pipe.scheduler.config, "flow")).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_word_maps_read_the_joint_attention_and_leave_the_image_untouched(sd3):
    folder, pipe = sd3
    plain, mapped = (generate(settings(folder, attention=a), pipe) for a in (False, True))
    assert torch.equal(plain.tensors["latents"], mapped.tensors["latents"])
    assert mapped.info.attention["tokens"] == PROMPT.split()  # CLIP's tokens of the prompt, start and end dropped
    assert mapped.info.attention["resolutions"] == [4]  # the transformer's one grid: 8x8 latents in 2x2 patches
    raw = mapped.tensors["attention_4"]  # [steps, words, 4, 4]: each image token's softmax share per word
    assert raw.shape == (6, 6, 4, 4) and (raw >= 0).all() and (raw.sum(1) <= 1).all()
    assert not torch.allclose(raw[:, 0], raw[:, 1]) and mapped.tensors["attention"].shape == (6, 6, 8, 8)


@pytest.mark.parametrize("steps, strength", [(6, 0.8), (10, 0.5)])
def test_img2img_matches_diffusers_sd3_img2img_pipeline(sd3, steps, strength):
    """The shift-aware VAE encode, scale_noise and SD 3's own step count (6 x 0.8 = 4.8: 5 steps run, where SD 1.x
    would run 4)."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    folder, pipe = sd3
    run = generate(settings(folder, steps=steps, init_image=init_image(), strength=strength), pipe)
    assert len(run) == steps - int(steps - steps * strength) and run.info.img2img.skipped_steps == steps - len(run)
    reference = StableDiffusion3Img2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, image=init_image(), strength=strength, num_inference_steps=steps, guidance_scale=7.0,
                       generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert_same_image(final_image(pipe, run), theirs)
    assert run.steps[0].sigma < 1 and run.tensors["init_latents"].shape == (1, 16, 8, 8)


def test_sd3_alias_folder_and_layouts(sd3, tmp_path):
    assert resolve("sd3.5-medium").source == ALIASES["sd3.5-medium"] == "stabilityai/stable-diffusion-3.5-medium"
    folder, pipe = sd3
    assert resolve(folder).is_local and load_pipeline(folder) is pipe
    assert family_of(pipe).size_multiple(pipe) == 4 * 2  # the VAE's factor x the transformer's patch size
    copy = shutil.copytree(folder, tmp_path / "model")
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(ModelLoadError, match="use_dynamic_shifting"):
        load_pipeline(str(copy))


def test_sd3_previews_use_sd3_latent_colours_and_taesd3(sd3, tmp_path, monkeypatch):
    _, pipe = sd3
    assert len(BY_KEY["sd3"].latent_rgb_factors) == 16
    check_latent_colour_preview(pipe, BY_KEY["sd3"].latent_rgb_factors, BY_KEY["sd3"].latent_rgb_bias)
    check_taesd_lookup("sd3", "VISUALIZER_TAESD3", tmp_path / "taesd3", monkeypatch)


def test_the_apps_sampler_menus_offer_only_the_samplers_that_fit_the_model(sd3, tmp_path):
    from visualizer.engine.models import family_of_reference
    from visualizer.engine.samplers import valid_for
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    folder, _ = sd3
    assert family_of_reference(folder).key == "sd3" and family_of_reference("sd3.5-medium").key == "sd3"
    app = App(AppConfig(output_dir=tmp_path, example_dir=None))
    menu = app.runs.sampler_choices(folder, "DDIM")  # DDIM does not fit a flow model: the menu falls back to Euler
    assert menu["choices"] == valid_for("flow") and menu["value"] == "Euler"
    grid = app.runs.sampler_choices(folder, ["Euler", "DDIM", "Heun"])
    assert grid["value"] == ["Euler", "Heun"]
    back = app.runs.sampler_choices("embedded", "Heun")  # back to an SD model: all 15, the pick kept
    assert len(back["choices"]) == 15 and back["value"] == "Heun"
    assert app.runs.sampler_choices("/no/such/folder", "Euler") == {"__type__": "update"}  # gr.skip(): left as it is
