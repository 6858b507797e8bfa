"""Per-token cross-attention maps: where each word of the prompt acts, at every step."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from visualizer import api
from visualizer.engine.attention import centroid
from visualizer.engine.run import Run, Settings


def shape_word_centroid(prompt: str, word: str = "circle") -> tuple[float, float]:
    run = api.run(Settings(prompt=prompt, attention=True, seed=0, model="shapes"))
    return centroid(run.tensors["attention"][-1, run.info.attention["tokens"].index(word)])


def test_the_shape_word_sits_where_the_prompt_puts_it():
    """On the shapes model (which places shapes where it is told), the shape word's combined map at the
    last step has its mass on the asked side of each pair (measured: x 0.36 vs 0.64, y 0.40 vs 0.58)."""
    left, right = (shape_word_centroid(f"a large red circle on the {side}") for side in ("left", "right"))
    top, bottom = (shape_word_centroid(f"a large red circle on the {side}") for side in ("top", "bottom"))
    assert right[0] - left[0] >= 0.15, (left, right)
    assert bottom[1] - top[1] >= 0.1, (top, bottom)


def test_capturing_leaves_the_image_bit_identical(tiny_model):
    settings = Settings(prompt="a red circle on the left", model=tiny_model, sampler="Heun", num_inference_steps=5)
    plain = api.run(settings)
    captured = api.run(Settings(**{**settings.to_dict(), "attention": True}))
    assert torch.equal(plain.tensors["latents"], captured.tensors["latents"])
    assert np.array_equal(plain.final_image, captured.final_image)
    assert "attention" not in plain.tensors and plain.info.attention is None


def test_maps_per_step_token_and_resolution_are_saved_and_load_back(tiny_model, tmp_path):
    run = api.run(Settings(prompt="a red circle on the left", model=tiny_model, sampler="Heun", num_inference_steps=5,
                           attention=True))
    tokens = run.info.attention["tokens"]
    assert tokens == ["a", "red", "circle", "on", "the", "left"]  # start, end and padding excluded
    assert run.tensors["attention"].shape == (5, 6, 8, 8)  # one map per step (Heun: its first evaluation)
    for resolution in run.info.attention["resolutions"]:
        assert run.tensors[f"attention_{resolution}"].shape == (5, 6, resolution, resolution)
    raw = run.tensors[f"attention_{run.info.attention['resolutions'][-1]}"]
    assert (raw >= 0).all() and (raw.sum(dim=(2, 3)) > 0).all()  # probabilities, every token attended somewhere
    folder = run.save(tmp_path / "run")
    saved = np.load(folder / "attention.npy")
    assert saved.dtype == np.float16 and saved.shape == (5, 6, 8, 8)
    assert json.loads((folder / "run.json").read_text())["info"]["attention"]["tokens"] == tokens
    loaded = Run.load(folder)
    assert loaded.info.attention["tokens"] == tokens and torch.equal(loaded.tensors["attention"], run.tensors["attention"])


def test_each_sampler_of_a_comparison_gets_its_own_maps(tiny_model):
    runs = api.compare(Settings(prompt="a blue square", model=tiny_model, num_inference_steps=4, attention=True),
                       ["Euler", "DDIM"])
    assert all(r.tensors["attention"].shape[:2] == (4, 3) for r in runs)
    assert not torch.equal(runs[0].tensors["attention"], runs[1].tensors["attention"])


@pytest.mark.parametrize("flag", [True, False])
def test_cli_writes_attention_npy_when_asked(tiny_model, tmp_path, flag):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "visualizer", "run", "--prompt", "a red circle", "--model", tiny_model,
                             "--steps", "3", "--out", str(out), *(["--attention"] if flag else [])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "attention.npy").exists() == flag


def test_shares_are_a_distribution_over_the_words_at_every_step(tiny_model):
    from visualizer.analysis.word_maps import shares

    run = api.run(Settings(prompt="a red circle", model=tiny_model, num_inference_steps=4, attention=True))
    rows = shares(run)
    assert len(rows) == 4 and all(len(r) == 3 and abs(sum(r) - 1) < 1e-5 and min(r) > 0 for r in rows)


def test_a_words_map_exports_as_a_gif_and_a_contact_sheet(tiny_model, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    args = [sys.executable, "-m", "visualizer", "run", "--prompt", "a red circle", "--model", tiny_model,
            "--steps", "4", "--out", str(out)]
    result = subprocess.run([*args, "--attention-token", "circle"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    gif = Image.open(out / "attention-circle.gif")
    assert gif.n_frames == 4 and Image.open(out / "attention-circle-sheet.png").width > 0
    result = subprocess.run([*args, "--attention-token", "square"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "its tokens are: a, red, circle" in result.stderr
    assert "Traceback" not in result.stderr
