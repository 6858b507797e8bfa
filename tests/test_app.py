"""The Gradio app, launched for real on localhost, driven through gradio_client."""
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
X_T, X0 = "x_t (noisy latents, decoded)", "x0-hat (predicted final image)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *args):
    port = free_port()
    log = open(tmp_path / f"app-{port}.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                                "--output-dir", str(tmp_path / "outputs"), *args],
                               cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url, tmp_path / f"app-{port}.log"
        except OSError:
            if process.poll() is not None:
                raise RuntimeError((tmp_path / f"app-{port}.log").read_text())
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("app did not start")


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    process, url, log = launch(tmp, "--model", tiny_model)
    yield url, tmp, log
    process.terminate()
    process.wait(10)


@pytest.fixture
def client(app):
    from gradio_client import Client

    return Client(app[0], verbose=False)


GENERATE_OUTPUTS = ("player", "final", "table", "status", "notice", "file", "g_uncond", "g_cond", "g_added",
                    "g_guided", "stages")


def generate(client, tiny_model, prompt="a red circle", seed=3, steps=6, sampler="Euler", **kw):
    """/generate through gradio_client; its outputs by name."""
    args = dict(prompt=prompt, negative_prompt="", seed=seed, steps=steps, guidance=7.5, sampler=sampler,
                width=0, height=0, model=tiny_model)
    args.update(kw)
    return dict(zip(GENERATE_OUTPUTS, client.predict(*args.values(), api_name="/generate")))


def steps_of(result) -> int:
    return len(result["table"]["data"])


def test_generate_returns_one_frame_per_step(client, tiny_model):
    result = generate(client, tiny_model, steps=6)
    image, status = result["final"], result["status"]
    assert steps_of(result) == 6 and "Done: 6 steps" in status
    assert result["file"] is None and "Tokenizer" in result["stages"]  # the previous run's download is cleared
    seen = set()
    for step in range(1, 7):
        frame, label = client.predict(step, X_T, api_name="/frame")
        assert label.startswith(f"Step {step} of 6")
        seen.add(Image.open(frame).tobytes())
    assert len(seen) == 6  # every step has its own frame
    from visualizer.media.export import upscale

    final = Image.open(image)
    assert final.size == (32, 32)  # the final image at the model's own size
    assert upscale(np.asarray(final.convert("RGB"))).tobytes() in seen  # it is the last step's frame


def test_x0_view_differs_from_xt_early_and_agrees_late(client, tiny_model):
    generate(client, tiny_model, steps=6)
    early_xt, _ = client.predict(1, X_T, api_name="/frame")
    early_x0, _ = client.predict(1, X0, api_name="/frame")
    assert Image.open(early_xt).tobytes() != Image.open(early_x0).tobytes()


def test_downloads_are_valid_files_under_the_output_folder(client, tiny_model, app):
    generate(client, tiny_model, steps=5)
    gif = client.predict("xt", api_name="/download_gif")
    assert Image.open(gif).n_frames == 5
    mp4 = client.predict("xt", api_name="/download_mp4")
    assert open(mp4, "rb").read(12)[4:8] == b"ftyp"
    saved = client.predict("xt", api_name="/download_run")
    assert open(saved, "rb").read(2) == b"PK"
    written = list((app[1] / "outputs").rglob("denoising.gif"))
    assert written, "exports are written under the app's output folder"


def test_compare_returns_one_cell_per_sampler_and_a_shared_slider(client, tiny_model):
    _, grid, status, _ = client.predict("a red circle", "", 3, 4, 7.5, ["Euler", "DDIM", "Heun"], 0, 0,
                                        tiny_model, api_name="/compare")
    assert status.startswith("Done: 3 samplers")
    full = Image.open(grid)
    half = Image.open(client.predict(50, X_T, api_name="/grid_frame"))
    assert half.size == full.size and half.tobytes() != full.tobytes()
    assert full.width > 3 * 256  # three cells side by side
    gif = client.predict(api_name="/download_grid_gif")
    assert Image.open(gif).n_frames == 4


@pytest.mark.parametrize("kw, words", [
    (dict(steps=0), "less than minimum"),
    (dict(steps=5000), "greater than maximum"),
    (dict(guidance=-1), "less than minimum"),
    (dict(seed=-5), "less than minimum"),
    (dict(width=100), "multiple of 8"),
    (dict(width=-8), "Width must be from 8"),
    (dict(height=4096, width=4096), "too large"),
    (dict(sampler="Nope"), "not in the list of choices"),
    (dict(model="/etc"), "not a diffusers model"),
    (dict(model="../../etc/passwd"), "neither a folder"),
])
def test_bad_input_gets_a_message_and_the_app_keeps_serving(client, tiny_model, kw, words):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=words):
        generate(client, tiny_model, **kw)
    assert steps_of(generate(client, tiny_model, steps=3)) == 3


def test_insight_panels_follow_the_step(client, tiny_model):
    generate(client, tiny_model, steps=6)
    early = client.predict(2, api_name="/insight")
    late = client.predict(5, api_name="/insight")
    convergence, schedule, numbers, uncond, cond, added, guided, change, stages = late
    assert "| 5 / 6 |" in numbers and "| 2 / 6 |" in early[2]
    assert Image.open(early[0]).tobytes() != Image.open(convergence).tobytes()  # the ring moved
    assert Image.open(early[1]).tobytes() != Image.open(schedule).tobytes()  # the marker moved
    for path in (uncond, cond, added, guided, change):
        assert Image.open(path).width >= 160
    assert "Tokenizer" in stages and "6 evaluations for 6 steps" in stages


def test_forward_noising_follows_the_slider(client, tiny_model):
    generate(client, tiny_model, steps=6)
    _, status = client.predict(None, api_name="/noise_image")
    assert "6 noise levels" in status
    forward = "forward noising q(x_t | x_0) of an image"
    noisy, _ = client.predict(1, forward, api_name="/frame")
    clean, _ = client.predict(6, forward, api_name="/frame")
    assert Image.open(noisy).tobytes() != Image.open(clean).tobytes()


def test_img2img_from_an_uploaded_image(client, tiny_model, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    result = generate(client, tiny_model, steps=10, init_image=handle_file(str(path)), strength=0.5)
    assert steps_of(result) == 5
    assert "from the init image (strength 0.5: steps 6–10 of the schedule)" in result["status"]
    stages = client.predict(1, api_name="/insight")[-1]
    assert "Init image (img2img)" in stages and "the first 5 steps are skipped" in stages
    full = generate(client, tiny_model, steps=10)  # no image: strength is ignored, all 10 steps run
    assert steps_of(full) == 10


def test_a_persons_mistake_logs_one_line_not_a_traceback(client, tiny_model, app):
    from gradio_client.exceptions import AppError

    log = app[2]
    before = log.read_text()
    with pytest.raises(AppError, match="Pick 2 to 8 samplers"):
        client.predict("a red circle", "", 3, 4, 7.5, ["Euler"], 0, 0, tiny_model, api_name="/compare")
    with pytest.raises(AppError, match="multiple of 8"):
        generate(client, tiny_model, width=100)
    added = log.read_text()[len(before):]
    assert "Traceback" not in added
    assert added.count("Pick 2 to 8 samplers") == 1 and added.count("multiple of 8") == 1
