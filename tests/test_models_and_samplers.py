"""Model references, loading errors and the sampler registry."""
import json

import pytest

from visualizer.engine.models import ALIASES, ModelLoadError, family_of_reference, load_pipeline, resolve
from visualizer.engine.samplers import SAMPLERS, UnknownSamplerError, check_sampler, make_scheduler

NAMES_USERS_KNOW = ["DDIM", "DDPM", "PNDM", "LMS", "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M",
                    "DPM++ 2M Karras", "DPM++ 2M SDE", "UniPC", "DEIS", "LCM"]


def test_registry_has_the_names_users_know():
    assert list(SAMPLERS) == NAMES_USERS_KNOW


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(UnknownSamplerError) as error:
        check_sampler("Euler b")
    assert "Euler b" in str(error.value) and all(n in str(error.value) for n in NAMES_USERS_KNOW)


def test_each_run_gets_a_fresh_scheduler(tiny_pipe):
    a, b = make_scheduler("DPM++ 2M", tiny_pipe.scheduler.config), make_scheduler("DPM++ 2M", tiny_pipe.scheduler.config)
    assert a is not b and type(a).__name__ == "DPMSolverMultistepScheduler"
    assert make_scheduler("DPM++ 2M Karras", tiny_pipe.scheduler.config).config.use_karras_sigmas
    # the model's config decides, as in diffusers: SD's (PNDM) config says clip_sample false; a config
    # without the key gives DDIM its own default, which clips
    assert not make_scheduler("DDIM", tiny_pipe.scheduler.config).config.clip_sample
    without = {k: v for k, v in tiny_pipe.scheduler.config.items() if k != "clip_sample"}
    assert make_scheduler("DDIM", without).config.clip_sample


def test_aliases_resolve_to_hub_ids():
    assert resolve("sd15").source == ALIASES["sd15"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve("sd21").source == "stabilityai/stable-diffusion-2-1-base"
    assert {family_of_reference(a).key for a in ("sd15", "sd21", "sd-turbo")} == {"sd"}  # no loading, no network
    assert not resolve("sd-turbo").is_local


def test_local_folder_loads_through_from_pretrained(tiny_model):
    pipe = load_pipeline(tiny_model)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.dtype.is_floating_point
    assert load_pipeline(tiny_model) is pipe  # cached


@pytest.mark.parametrize("reference, words", [
    ("/no/such/folder", "neither a folder"),
    ("not a model!", "neither a folder"),
])
def test_bad_references_say_what_to_do(reference, words):
    with pytest.raises(ModelLoadError, match=words):
        resolve(reference)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve(str(tmp_path))


def test_broken_folder_gives_one_clear_message(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="Could not load"):
        load_pipeline(str(tmp_path))


def test_unreachable_hub_gives_one_clear_message():
    with pytest.raises(ModelLoadError) as error:  # HF_HUB_OFFLINE=1 in conftest: nothing is fetched
        load_pipeline("nobody-here/no-such-model")
    message = str(error.value)
    assert "nobody-here/no-such-model" in message and "local folder" in message and "\n" not in message


def test_taesd_loads_from_a_local_folder_and_decodes(tmp_path, monkeypatch, tiny_pipe):
    import torch
    from diffusers import AutoencoderTiny

    from visualizer.engine.decode import load_taesd, taesd_decode

    monkeypatch.setenv("VISUALIZER_TAESD", str(tmp_path / "missing"))
    assert load_taesd(torch.device("cpu")) is None  # absent weights: no preview decoder, no error
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)
                    ).save_pretrained(tmp_path / "taesd")
    monkeypatch.setenv("VISUALIZER_TAESD", str(tmp_path / "taesd"))
    taesd = load_taesd(torch.device("cpu"))
    frames = taesd_decode(taesd, torch.randn(2, 4, 8, 8), scaling_factor=0.18215)
    assert frames.shape == (2, 64, 64, 3) and frames.dtype.name == "uint8"


@pytest.mark.parametrize("pipeline, family", [
    ("StableDiffusionXLImg2ImgPipeline", "Stable Diffusion XL refiner / img2img"),
    ("PixArtAlphaPipeline", "PixArt-alpha"),
    ("SomeoneElsesPipeline", "another"),
])
def test_a_folder_of_another_family_says_which_family_it_is(tmp_path, pipeline, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(ModelLoadError) as error:
        resolve(str(tmp_path))
    message = str(error.value)
    assert f"is a {family} model ({pipeline})" in message
    assert "1.x / 2.x, Stable Diffusion XL, Stable Diffusion 3.x and Flux.1 models only" in message


def test_an_unreadable_model_index_is_said_plainly(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not readable JSON"):
        resolve(str(tmp_path))
