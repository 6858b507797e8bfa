"""The owned denoising loop against diffusers' own StableDiffusionPipeline."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from visualizer.decode import decode_run, vae_decode
from visualizer.denoise import generate, generate_many
from visualizer.run import Settings
from visualizer.samplers import SAMPLERS, TWO_EVALUATION_SAMPLERS, make_scheduler

PROMPT = "a red circle on the left"


def settings(tiny_model, sampler="Euler", steps=6, **kw):
    return Settings(prompt=PROMPT, model=tiny_model, sampler=sampler, num_inference_steps=steps, seed=11, **kw)


def diffusers_image(pipe, sampler, steps, guidance=7.5, seed=11, negative=None):
    reference = StableDiffusionPipeline(**{**pipe.components, "scheduler": make_scheduler(sampler, pipe.scheduler.config)})
    reference.set_progress_bar_config(disable=True)
    out = reference(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_captures_one_entry_per_step(tiny_model, tiny_pipe, sampler):
    run = generate(settings(tiny_model, sampler), tiny_pipe)
    assert [s.index for s in run.steps] == list(range(1, 7))
    for name in ("latents", "xt", "x0", "eps", "eps_cond", "eps_uncond"):
        assert run.tensors[name].shape[0] == 6, name
    evaluations = sum(s.evaluations for s in run.steps)
    scheduler = make_scheduler(sampler, tiny_pipe.scheduler.config)
    scheduler.set_timesteps(6)
    assert evaluations == run.info["unet_evaluations"] == len(scheduler.timesteps)
    if sampler in TWO_EVALUATION_SAMPLERS:
        assert evaluations == 11  # 2N - 1: the last step is a single Euler step to sigma 0
    sigmas = [s.sigma for s in run.steps]
    assert all(np.isfinite(sigmas)) and sigmas[0] > sigmas[-1]


@pytest.mark.parametrize("sampler", ["DDIM", "Euler", "Euler a", "DPM++ 2M", "Heun", "PNDM", "DPM2", "UniPC"])
def test_final_image_matches_diffusers_pipeline(tiny_model, tiny_pipe, sampler):
    run = generate(settings(tiny_model, sampler), tiny_pipe)
    ours = vae_decode(tiny_pipe.vae, run.tensors["latents"][-1:])[0].astype(np.float32) / 255
    theirs = diffusers_image(tiny_pipe, sampler, 6)
    assert np.abs(ours - theirs).max() <= 2 / 255


def test_negative_prompt_and_no_cfg_match_diffusers(tiny_model, tiny_pipe):
    run = generate(settings(tiny_model, "Euler", negative_prompt="blue square"), tiny_pipe)
    ours = vae_decode(tiny_pipe.vae, run.tensors["latents"][-1:])[0] / 255
    assert np.abs(ours - diffusers_image(tiny_pipe, "Euler", 6, negative="blue square")).max() <= 2 / 255
    run = generate(settings(tiny_model, "DDIM", guidance_scale=1.0), tiny_pipe)
    assert "eps_cond" not in run.tensors  # guidance 1 means no unconditional branch at all
    ours = vae_decode(tiny_pipe.vae, run.tensors["latents"][-1:])[0] / 255
    assert np.abs(ours - diffusers_image(tiny_pipe, "DDIM", 6, guidance=1.0)).max() <= 2 / 255


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DPM++ 2M", "Heun"])
def test_x0_hat_converges_to_the_final_latents(tiny_model, tiny_pipe, sampler):
    run = generate(settings(tiny_model, sampler, steps=12), tiny_pipe)
    final = run.tensors["latents"][-1]
    distances = [(x0 - final).norm().item() / final.norm().item() for x0 in run.tensors["x0"]]
    assert distances[-1] < 0.1 * distances[0]
    assert distances[-1] < 0.05


def test_guided_noise_is_the_cfg_combination_of_its_parts(tiny_model, tiny_pipe):
    run = generate(settings(tiny_model, "DDIM"), tiny_pipe)
    t = run.tensors
    expected = t["eps_uncond"] + 7.5 * (t["eps_cond"] - t["eps_uncond"])
    assert torch.allclose(t["eps"], expected, atol=1e-5)


def test_lockstep_batch_equals_each_sampler_alone(tiny_model, tiny_pipe):
    names = ["Euler", "DDIM", "Heun", "DPM++ 2M"]
    together = generate_many([settings(tiny_model, n) for n in names], tiny_pipe)
    assert together[0].info["lockstep_batch"] == 4
    for name, run in zip(names, together):
        alone = generate(settings(tiny_model, name), tiny_pipe)
        assert len(run) == len(alone) == 6
        assert torch.allclose(run.tensors["latents"], alone.tensors["latents"], atol=1e-4), name
        assert torch.equal(run.tensors["initial_noise"], together[0].tensors["initial_noise"])


def test_stop_keeps_the_steps_computed_so_far(tiny_model, tiny_pipe):
    seen = []
    run = generate(settings(tiny_model, "Euler", steps=10), tiny_pipe, callback=seen.append,
                   should_stop=lambda: len(seen) >= 3)
    assert len(run) == 3 and run.info["stopped"]
    decode_run(run, tiny_pipe.vae)
    assert len(run.frames["xt"]) == 3 and run.final_image is None


def test_same_seed_same_frames_other_seed_other_frames(tiny_model, tiny_pipe):
    a, b = generate(settings(tiny_model, "Euler a"), tiny_pipe), generate(settings(tiny_model, "Euler a"), tiny_pipe)
    assert torch.equal(a.tensors["latents"], b.tensors["latents"])
    c = generate(Settings(prompt=PROMPT, model=tiny_model, sampler="Euler a", num_inference_steps=6, seed=12), tiny_pipe)
    assert not torch.allclose(a.tensors["latents"], c.tensors["latents"])


def test_long_prompt_truncation_is_reported(tiny_model, tiny_pipe):
    run = generate(Settings(prompt=" ".join(["red circle"] * 20), model=tiny_model, num_inference_steps=2), tiny_pipe)
    assert run.info["truncated"] and "red" in run.info["dropped_text"]
    assert len(run.info["token_strings"]) == run.info["token_limit"]
