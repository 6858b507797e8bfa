"""The emoji model, the default embedded model: its data, its folder, its loading names, its vocabulary notice and
a floor under how often it draws the emoji it is asked for."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from visualizer import api
from visualizer.demo_model import emoji, evaluate, vocabulary
from visualizer.engine.models import DEFAULT_EMBEDDED, EMBEDDED_MODELS, ModelLoadError, load_pipeline, resolve
from visualizer.engine.run import DEFAULTS
from conftest import IMAGE_TOLERANCE

FOLDER = EMBEDDED_MODELS["emoji"]


def test_the_data_is_every_single_codepoint_emoji_the_font_draws_named_in_lower_case():
    drawn = emoji.emoji()
    assert len(drawn) >= 1151 and len({c for c, _ in drawn}) == len(drawn)
    captions = dict(drawn)
    assert captions["\U0001F34E"] == "red apple" and captions["\U0001F680"] == "rocket"
    assert all(c == c.lower() and not c.startswith("emoji modifier") for c in captions.values())
    images = emoji.images()
    assert images.shape == (len(drawn), 3, 64, 64) and images.dtype == np.uint8
    assert (images[:, :, 0, 0] == 255).all()  # composited on white
    assert np.array_equal(np.asarray(emoji.render("\U0001F680")).transpose(2, 0, 1),
                          images[[c for c, _ in drawn].index("\U0001F680")])  # deterministic


def test_the_scorer_finds_each_training_emoji_itself():
    picks = np.random.default_rng(0).choice(len(emoji.emoji()), 40, replace=False)
    pictures = [emoji.images()[i].transpose(1, 2, 0) for i in picks]
    assert (emoji.nearest(pictures, k=1)[:, 0] == picks).all()


def test_the_folder_is_a_diffusers_sd_model_under_40_mb_with_its_captions():
    names = {p.name for p in FOLDER.iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "captions.json"} <= names
    assert sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()) <= 40 * 2**20
    assert json.loads((FOLDER / "captions.json").read_text()) == emoji.captions()


def test_both_embedded_models_load_by_name_and_embedded_names_the_emoji_model():
    assert DEFAULT_EMBEDDED == "emoji" and DEFAULTS["model"] == "embedded"
    assert resolve("embedded") == resolve("emoji") == resolve(None)
    assert resolve("emoji").source == str(FOLDER) and resolve("shapes").source == str(EMBEDDED_MODELS["shapes"])
    assert load_pipeline("embedded") is load_pipeline("emoji")
    assert load_pipeline("shapes").unet.config.sample_size == 16 and load_pipeline("emoji").unet.config.sample_size == 8
    with pytest.raises(ModelLoadError, match="emoji, shapes"):
        resolve("no-such-model")


def test_diffusers_loads_it_and_our_loop_matches_diffusers():
    pipe = StableDiffusionPipeline.from_pretrained(FOLDER, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("red apple", num_inference_steps=10, guidance_scale=DEFAULTS["guidance_scale"],
                  generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    ours = api.run("red apple", sampler="PNDM", num_inference_steps=10, seed=0).final_image
    assert np.abs(ours / 255 - theirs).max() <= IMAGE_TOLERANCE


def test_it_draws_the_emoji_it_is_asked_for():
    """A floor under the shipped model's recall (docs/embedded-model.md: the 200-caption figures), on 12 captions
    at the default settings, so a worse model cannot ship unnoticed."""
    score, _ = evaluate.engine_recall(load_pipeline("emoji"), evaluate.sample_captions(12, seed=3))
    assert score["top5"] >= 0.75, score


def test_unknown_words_get_the_captions_that_hold_them():
    assert vocabulary.unknown_words("a crimson apple", "emoji") == ["crimson"]
    assert vocabulary.unknown_words("red apple", "emoji") == []
    assert emoji.suggestions("dog")[:3] == ["dog", "hot dog", "dog face"]
    notice = vocabulary.notice("puppy dogs", "emoji")
    assert "*puppy, dogs*" in notice and "“dog”" in notice and "“dog face”" in notice
    assert vocabulary.notice("red apple", "emoji") == ""
    assert "It understands:" in vocabulary.notice("a red apple", "shapes")


def test_the_cli_and_the_api_run_it_by_default(tmp_path):
    result = subprocess.run([sys.executable, "-m", "visualizer", "run", "--prompt", "rocket", "--steps", "8",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "run.json").read_text())["info"]
    assert info["model_source"] == "emoji" and info["latent_shape"] == [1, 4, 8, 8]
    assert api.run("rocket", num_inference_steps=2, frames=()).info.model_source == "emoji"
