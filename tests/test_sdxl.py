"""The SDXL family (families.py) through the shared loop, against diffusers' own StableDiffusionXLPipeline."""
import json

import numpy as np
import diffusers
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from visualizer import api
from visualizer.engine.decode import vae_decode
from visualizer.engine.families import BY_KEY
from visualizer.engine.denoise import generate, generate_many
from visualizer.analysis.stages import pipeline_stages
from visualizer.engine.models import ALIASES, ModelLoadError, family_of_reference, load_pipeline, resolve
from visualizer.engine.run import Run, RunInfo, Settings
from visualizer.engine.samplers import SAMPLERS

from conftest import assert_same_image, check_latent_colour_preview, tiny_family_model
from test_img2img import init_image

PROMPT = "a red circle on the left"
SEED = 11


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(folder, pipeline) of a tiny random SDXL model."""
    return tiny_family_model(tmp_path_factory, "tiny_sdxl_pipeline")


def settings(folder, sampler="Euler", steps=6, **kw):
    kw.setdefault("guidance_scale", 7.5)
    kw.setdefault("prompt", PROMPT)
    return Settings(model=folder, sampler=sampler, num_inference_steps=steps, seed=SEED, **kw)


def reference(pipe, sampler, cls=StableDiffusionXLPipeline, force_zeros=None):
    """diffusers' own pipeline on `pipe`'s modules, its scheduler swapped the documented way."""
    force_zeros = pipe.config.force_zeros_for_empty_prompt if force_zeros is None else force_zeros
    out = cls(**pipe.components, force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    class_name, overrides = SAMPLERS[sampler]
    scheduler_cls = getattr(diffusers, class_name)
    out.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    out.set_progress_bar_config(disable=True)
    return out


def diffusers_image(pipe, sampler, steps=6, prompt=PROMPT, negative=None, force_zeros=None, **kw):
    out = reference(pipe, sampler, force_zeros=force_zeros)(
        prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(SEED), height=32, width=32, output_type="np", **kw)
    return out.images[0]


def final_image(pipe, run) -> np.ndarray:
    """The run's final image as the app shows it: uint8, through the model's own VAE."""
    return vae_decode(pipe.vae, run.tensors["latents"][-1:])[0]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "Heun", "UniPC",
                                     "PNDM", "LMS", "DPM2"])
def test_final_image_matches_diffusers_sdxl_pipeline(sdxl, sampler):
    folder, pipe = sdxl
    run = generate(settings(folder, sampler), pipe)
    assert run.info.family == "sdxl" and len(run) == 6
    assert_same_image(final_image(pipe, run), diffusers_image(pipe, sampler))


@pytest.mark.parametrize("prompt, negative, force_zeros", [
    ("", "", True),  # empty prompt, no negative: the unconditional branch is all zeros
    (PROMPT, "blue square", True),  # a negative prompt is encoded whatever force_zeros says
    (PROMPT, "", False),  # without force_zeros the empty negative prompt is encoded
])
def test_negative_branch_follows_force_zeros_for_empty_prompt_like_diffusers(sdxl, prompt, negative, force_zeros):
    folder, pipe = sdxl
    model = reference(pipe, "Euler", force_zeros=force_zeros)  # a pipeline with this config, run by our loop
    run = generate(settings(folder, prompt=prompt, negative_prompt=negative), model)
    assert run.info.zero_negative == (force_zeros and not negative)
    theirs = diffusers_image(pipe, "Euler", prompt=prompt, negative=negative or None, force_zeros=force_zeros)
    assert_same_image(final_image(pipe, run), theirs)
    stages = pipeline_stages(run)
    assert ("all-zero unconditional twin" in stages) == run.info.zero_negative
    assert run.info.zero_negative or f"from the {'negative' if negative else 'empty'} prompt" in stages


def test_lockstep_batch_equals_each_sampler_alone(sdxl):
    folder, pipe = sdxl
    names = ["Euler", "DPM++ 2M"]
    together = generate_many([settings(folder, n) for n in names], pipe)
    assert together[0].info.lockstep_batch == 2
    for name, run in zip(names, together):
        alone = generate(settings(folder, name), pipe)
        assert torch.allclose(run.tensors["latents"], alone.tensors["latents"], rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_img2img_matches_diffusers_sdxl_img2img_pipeline(sdxl, sampler):
    folder, pipe = sdxl
    run = generate(settings(folder, sampler, steps=10, strength=0.6, init_image=init_image()), pipe)
    assert len(run) == 6 and run.info.img2img.skipped_steps == 4
    theirs = reference(pipe, sampler, StableDiffusionXLImg2ImgPipeline)(
        PROMPT, image=init_image(), strength=0.6, num_inference_steps=10, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert_same_image(final_image(pipe, run), theirs)


def test_api_run_end_to_end_saves_and_loads(sdxl, tmp_path):
    folder, pipe = sdxl
    run = api.run(settings(folder, "Euler", steps=4, attention=True))
    assert len(run.frames["xt"]) == len(run.frames["x0"]) == 4 and run.final_image.shape == (32, 32, 3)
    assert (run.final_image == run.frames["xt"][-1]).all() and run.info.metrics
    assert run.tensors["attention"].shape[:2] == (4, len(run.info.attention["tokens"]))
    assert run.info.pooled_embedding_shape == [1, 24] and run.info.time_ids == [32, 32, 0, 0, 32, 32]
    stages = pipeline_stages(run)
    assert "text_encoder_2" in stages and "pooled embedding" in stages and "[1, 16, 64]" in stages
    loaded = Run.load(run.save(tmp_path / "run"))
    assert loaded.info == run.info and (loaded.final_image == run.final_image).all()
    assert len(loaded.frames["x0"]) == 4


def test_bundles_written_before_sdxl_load_as_sd():
    info = RunInfo.from_dict({"model_source": "x", "scheduler": "EulerDiscreteScheduler"})
    assert info.family == "sd" and info.pooled_embedding_shape is None and not info.zero_negative


def test_sdxl_previews_use_sdxl_latent_colours(sdxl):
    _, pipe = sdxl
    check_latent_colour_preview(pipe, BY_KEY["sdxl"].latent_rgb_factors, BY_KEY["sdxl"].latent_rgb_bias)


def test_taesdxl_is_looked_up_separately(sdxl, tmp_path, monkeypatch):
    from diffusers import AutoencoderTiny

    from visualizer.engine.decode import load_taesd

    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)
                    ).save_pretrained(tmp_path / "taesdxl")
    monkeypatch.setenv("VISUALIZER_TAESD", str(tmp_path / "missing"))
    monkeypatch.setenv("VISUALIZER_TAESDXL", str(tmp_path / "taesdxl"))
    assert load_taesd(torch.device("cpu")) is None and load_taesd(torch.device("cpu"), "sdxl") is not None


def test_sdxl_aliases_and_folders_resolve(sdxl, tmp_path):
    assert resolve("sdxl").source == ALIASES["sdxl"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert resolve("sdxl-turbo").source == "stabilityai/sdxl-turbo" and not resolve("sdxl-turbo").is_local
    assert family_of_reference("sdxl").key == family_of_reference("sdxl-turbo").key == "sdxl"  # no loading, no network
    folder, pipe = sdxl
    assert resolve(folder).is_local and load_pipeline(folder) is pipe
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(ModelLoadError, match="is a Stable Diffusion XL refiner / img2img model"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("edit, words", [
    (lambda f: _edit_json(f / "vae" / "config.json", latents_mean=[0.0] * 4, latents_std=[1.0] * 4), "latents_mean"),
    (lambda f: _edit_json(f / "model_index.json", text_encoder=[None, None], tokenizer=[None, None]),
     "no first text encoder"),
])
def test_sdxl_layouts_this_version_cannot_run_are_refused_plainly(sdxl, tmp_path, edit, words):
    import shutil

    folder = shutil.copytree(sdxl[0], tmp_path / "model")
    edit(folder)
    with pytest.raises(ModelLoadError, match=words):
        load_pipeline(str(folder))


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
