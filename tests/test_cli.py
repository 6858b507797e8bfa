"""The command line, run as a person would: a real subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "visualizer", *args], capture_output=True, text=True, timeout=timeout)


def test_run_writes_every_frame_and_the_exports(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = cli("run", "--prompt", "a red circle", "--model", tiny_model, "--sampler", "DPM++ 2M", "--steps", "6",
                 "--out", str(out), "--gif", "--mp4", "--webp", "--zip", "--sheet", "--view", "both")
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "run.json").read_text())
    assert [s["index"] for s in doc["steps"]] == [1, 2, 3, 4, 5, 6]
    assert all({"timestep", "sigma"} <= set(s) for s in doc["steps"])
    for kind in ("xt", "x0"):
        assert sorted(p.name for p in (out / "frames").glob(f"{kind}_*.png"))[-1] == f"{kind}_0006.png"
    for name in ("final.png", "denoising.gif", "denoising.mp4", "denoising.webp", "frames.zip", "sheet.png",
                 "convergence.png", "schedule.png"):
        assert (out / name).stat().st_size > 0, name
    assert Image.open(out / "denoising.gif").n_frames == 1 + 6  # the start, then every step


def test_compare_and_reexport(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", "--prompt", "a red circle", "--samplers", "Euler,DDIM,DPM++ 2M", "--model", tiny_model,
                 "--steps", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"grid.png", "grid.gif", "convergence.png", "euler", "ddim", "dpm-2m"}
    assert Image.open(out / "convergence.png").width > 0 and not (out / "schedule.png").exists()
    (out / "euler" / "denoising.gif").unlink(missing_ok=True)
    result = cli("export", str(out / "euler"), "--gif", "--view", "x0")
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "euler" / "denoising.gif").n_frames == 1 + 4


def test_compare_models_writes_one_folder_per_model_and_one_grid(tiny_model, tmp_path):
    out = tmp_path / "models"
    result = cli("compare", "--prompt", "a red circle", "--models", f"embedded,{tiny_model}", "--samplers", "DDIM",
                 "--steps", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    folders = {"embedded-ddim", f"{Path(tiny_model).name}-ddim"}
    assert {p.name for p in out.iterdir()} >= {"grid.png", "grid.gif", "convergence.png", *folders}
    sizes = {json.loads((out / f / "run.json").read_text())["info"]["image_size"][0] for f in folders}
    assert sizes == {64, 32} and Image.open(out / "grid.gif").n_frames == 1 + 4  # each model's native size, aligned
    result = cli("compare", "--prompt", "a red circle", "--out", str(tmp_path / "none"))
    assert result.returncode != 0 and "--samplers" in result.stderr and "Traceback" not in result.stderr


def test_run_img2img_from_an_image_file(tiny_model, tmp_path):
    Image.new("RGB", (48, 40), (30, 90, 200)).save(tmp_path / "init.png")  # resized and cropped to 32x32
    out = tmp_path / "img2img"
    result = cli("run", "--prompt", "a red circle", "--model", tiny_model, "--steps", "10", "--init-image",
                 str(tmp_path / "init.png"), "--strength", "0.3", "--out", str(out), "--gif")
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "run.json").read_text())
    assert len(doc["steps"]) == 3 and doc["settings"]["strength"] == 0.3
    assert doc["info"]["img2img"]["skipped_steps"] == 7 and doc["steps"][-1]["progress"] == 1.0
    assert Image.open(out / "denoising.gif").n_frames == 1 + 3  # the noised init image first


def test_samplers_lists_the_registry():
    result = cli("samplers")
    assert result.returncode == 0 and "DPM++ 2M Karras" in result.stdout and "Heun" in result.stdout
    flux = result.stdout.split("for Flux models")[1]
    assert "FlowMatchEulerDiscreteScheduler" in flux and "Heun" not in flux and "flow sigmas" in flux


def test_installed_commands_work_from_any_folder(tmp_path):
    """`pip install -r requirements.txt` installs the package: both entry points run outside the repository."""
    script = Path(sys.executable).parent / "denoising-visualizer"
    for command in ([sys.executable, "-m", "visualizer", "samplers"], [str(script), "samplers"]):
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 0 and "DPM++ 2M Karras" in result.stdout, result.stderr


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "Steps must be from 1"),
    (["--steps", "abc"], "--steps must be a whole number"),
    (["--guidance", "nan"], "finite"),
    (["--seed", "1.5"], "--seed must be a whole number"),
    (["--width", "100"], "multiple of 8"),
    (["--sampler", "Nope"], "Valid samplers"),
    (["--model", "/no/such/dir"], "neither a folder"),
    (["--strength", "0.5"], "give an --init-image too"),
    (["--init-image", "/no/such.png"], "Could not read the init image"),
    (["--init-image", __file__], "Could not read the init image"),
])
def test_bad_arguments_exit_nonzero_with_one_line(tiny_model, tmp_path, args, words):
    base = ["run", "--prompt", "a red circle", "--out", str(tmp_path / "x")]
    if "--model" not in args:
        base += ["--model", tiny_model]
    result = cli(*base, *args)
    assert result.returncode != 0
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_prompt_is_a_usage_error():
    result = cli("run", "--out", "x")
    assert result.returncode == 2 and "--prompt" in result.stderr and "Traceback" not in result.stderr


def test_help_comes_from_settings_and_the_alias_table(monkeypatch):
    from visualizer.engine.models import ALIASES
    from visualizer.engine.run import DEFAULTS

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps (and breaks words at hyphens) to the terminal's width
    text = cli("run", "--help").stdout
    assert all(alias in text for alias in ALIASES), text
    assert f"sampler steps (default {DEFAULTS['num_inference_steps']})" in text
    assert f"default {DEFAULTS['sampler']}; see `samplers`" in text
