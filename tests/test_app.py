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


def generate(client, tiny_model, prompt="a red circle", seed=3, steps=6, sampler="Euler", **kw):
    """/generate through gradio_client: the finished run's fields."""
    args = dict(prompt=prompt, negative_prompt="", seed=seed, num_inference_steps=steps, guidance_scale=7.5,
                sampler=sampler, width=0, height=0, model=tiny_model)
    args.update(kw)
    return client.predict(**args, api_name="/generate")


def test_generate_returns_one_frame_per_step(client, tiny_model, app):
    result = generate(client, tiny_model, steps=6)
    assert len(result["steps"]) == 6 and "Done: 6 steps" in result["status"] and "Tokenizer" in result["stages"]
    run_folder = app[1] / "outputs" / result["run_id"]
    assert run_folder.is_dir() and not (run_folder / "player").exists()  # an API caller has no player: no files
    seen = set()
    for step in range(1, 7):
        frame, label = client.predict(result["run_id"], step, X_T, api_name="/frame")
        assert label.startswith(f"Step {step} of 6")
        seen.add(Image.open(frame).tobytes())
    assert len(seen) == 6  # every step has its own frame
    from visualizer.media.export import upscale

    final = Image.open(result["final_image"])
    assert final.size == (32, 32)  # the final image at the model's own size
    assert upscale(np.asarray(final.convert("RGB"))).tobytes() in seen  # it is the last step's frame


def test_generate_streams_its_progress(client, tiny_model):
    job = client.submit(prompt="a red circle", num_inference_steps=40, model=tiny_model, api_name="/generate")
    updates = list(job)
    assert len(updates) >= 2 and updates[0]["run_id"] is None and "computing" in updates[0]["status"]
    assert updates[-1]["run_id"] and len(updates[-1]["steps"]) == 40


def _python_reprs(value) -> list[str]:
    """Every string in a JSON value that looks like a Python object's repr."""
    if isinstance(value, dict):
        return [r for v in value.values() for r in _python_reprs(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _python_reprs(v)]
    return [value] if isinstance(value, str) and ("<function" in value or "functools." in value or
                                                  " object at 0x" in value) else []


def test_every_endpoint_returns_plain_json(client, tiny_model):
    assert _python_reprs({"a": ["functools.partial(<function f>)"]})  # the check sees a repr
    single = generate(client, tiny_model, steps=4)
    grid = client.predict("a red circle", ["Euler", "DDIM"], num_inference_steps=4, model=tiny_model,
                          api_name="/compare")
    outputs = [single, grid, client.predict(single["run_id"], 2, "x0", api_name="/frame"),
               client.predict(grid["run_id"], 50, api_name="/grid_frame"),
               client.predict(single["run_id"], 2, api_name="/insight")]
    assert _python_reprs(outputs) == []
    assert isinstance(single["steps"][0][1], float) and grid["labels"] == ["Euler", "DDIM"]
    named = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert named == {"/generate", "/compare", "/frame", "/grid_frame", "/insight", "/noise_image", "/map_seeds",
                     "/download", "/download_grid", "/stop"}  # the page's own events are not public


def test_x0_view_differs_from_xt_early(client, tiny_model):
    run_id = generate(client, tiny_model, steps=6)["run_id"]
    early_xt, _ = client.predict(run_id, 1, X_T, api_name="/frame")
    early_x0, _ = client.predict(run_id, 1, "x0", api_name="/frame")
    assert Image.open(early_xt).tobytes() != Image.open(early_x0).tobytes()


def test_frame_step_0_is_the_start_the_initial_noise(client, tiny_model):
    run_id = generate(client, tiny_model, steps=4)["run_id"]
    start, line = client.predict(run_id, 0, X_T, api_name="/frame")
    first, _ = client.predict(run_id, 1, X_T, api_name="/frame")
    assert line.startswith("Start (before step 1 of 4): the initial noise x_T")
    assert Image.open(start).tobytes() != Image.open(first).tobytes()
    assert Image.open(client.predict(run_id, 0, "x0", api_name="/frame")[0]).tobytes() == Image.open(start).tobytes()


def test_downloads_are_valid_files_under_the_output_folder(client, tiny_model, app):
    run_id = generate(client, tiny_model, steps=5)["run_id"]
    gif = client.predict(run_id, "gif", "xt", api_name="/download")
    assert Image.open(gif).n_frames == 1 + 5  # the start, then every step
    mp4 = client.predict(run_id, "mp4", api_name="/download")
    assert open(mp4, "rb").read(12)[4:8] == b"ftyp"
    saved = client.predict(run_id, "run", api_name="/download")
    assert open(saved, "rb").read(2) == b"PK"
    written = list((app[1] / "outputs").rglob("denoising.gif"))
    assert written, "exports are written under the app's output folder"


def test_compare_returns_one_cell_per_sampler_and_a_shared_slider(client, tiny_model):
    result = client.predict("a red circle", ["Euler", "DDIM", "Heun"], seed=3, num_inference_steps=4,
                            guidance_scale=7.5, model=tiny_model, api_name="/compare")
    assert result["status"].startswith("Done: 3 samplers") and result["steps"] == [4, 4, 4]
    full = Image.open(result["grid_image"])
    half = Image.open(client.predict(result["run_id"], 50, X_T, api_name="/grid_frame"))
    assert half.size == full.size and half.tobytes() != full.tobytes()
    assert full.width > 3 * 256  # three cells side by side
    gif = client.predict(result["run_id"], "gif", api_name="/download_grid")
    assert Image.open(gif).n_frames == 1 + 4


@pytest.mark.parametrize("kw, words", [
    (dict(steps=0), "Steps must be"),
    (dict(steps=5000), "Steps must be"),
    (dict(guidance_scale=-1), "Guidance scale must be"),
    (dict(seed=-5), "Seed must be"),
    (dict(width=100), "multiple of 8"),
    (dict(width=-8), "Width must be from 8"),
    (dict(height=4096, width=4096), "too large"),
    (dict(sampler="Nope"), "Unknown sampler"),
    (dict(model="/etc"), "not a diffusers model"),
    (dict(model="../../etc/passwd"), "neither a folder"),
])
def test_bad_input_gets_a_message_and_the_app_keeps_serving(client, tiny_model, kw, words):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=words):
        generate(client, tiny_model, **kw)
    assert len(generate(client, tiny_model, steps=3)["steps"]) == 3


def test_a_run_id_that_is_not_there_gets_a_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no longer in memory"):  # nor a path out of the store
        client.predict("../../etc", 1, api_name="/frame")


def test_insight_panels_follow_the_step(client, tiny_model):
    run_id = generate(client, tiny_model, steps=6)["run_id"]
    early = client.predict(run_id, 2, api_name="/insight")
    late = client.predict(run_id, 5, api_name="/insight")
    assert "| 5 / 6 |" in late["numbers"] and "| 2 / 6 |" in early["numbers"]
    assert Image.open(early["convergence"]).tobytes() != Image.open(late["convergence"]).tobytes()  # ring moved
    assert Image.open(early["schedule"]).tobytes() != Image.open(late["schedule"]).tobytes()  # marker moved
    for path in (*late["guidance"].values(), late["change"]):
        assert Image.open(path).width >= 160


def test_forward_noising_follows_the_slider(client, tiny_model):
    run_id = generate(client, tiny_model, steps=6)["run_id"]
    assert "6 noise levels" in client.predict(run_id, api_name="/noise_image")
    noisy, _ = client.predict(run_id, 1, "forward", api_name="/frame")
    clean, _ = client.predict(run_id, 6, "forward", api_name="/frame")
    assert Image.open(noisy).tobytes() != Image.open(clean).tobytes()


def test_a_persons_mistake_logs_one_line_not_a_traceback(client, tiny_model, app):
    from gradio_client.exceptions import AppError

    log = app[2]
    before = log.read_text()
    with pytest.raises(AppError, match="Pick 2 to 8 samplers"):
        client.predict("a red circle", ["Euler"], model=tiny_model, api_name="/compare")
    with pytest.raises(AppError, match="multiple of 8"):
        generate(client, tiny_model, width=100)
    added = log.read_text()[len(before):]
    assert "Traceback" not in added
    assert added.count("Pick 2 to 8 samplers") == 1 and added.count("multiple of 8") == 1


def test_the_documented_gradio_client_example_prints_real_values(app, capsys):
    text = (ROOT / "docs" / "usage.md").read_text()
    block = text.split("<!-- gradio_client example -->\n```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block.replace("http://127.0.0.1:7860/", app[0]), "usage.md", "exec"), {})
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("Loaded as API")]
    run_id, done, *_ = printed[0].split(" ", 2)
    assert run_id and done == "Done:" and " 25 " in printed[0] and printed[0].endswith(".png")
    assert printed[1].startswith("Step 5 of 25") and printed[1].endswith(".png")
    assert printed[2].startswith("['Euler', 'DDIM', 'Heun'] Done: 3 samplers")


@pytest.mark.parametrize("endpoint, args, words", [
    ("/grid_frame", (50, "/../../../../tmp/escaped"), "Unknown view"),
    ("/grid_frame", (150, "xt"), "progress must be"),
    ("/grid_frame", ("50", "xt"), "progress must be"),
    ("/frame", (-1, "xt"), "step must be a whole number from 1 to 3"),
    ("/frame", (0, "noise"), "Step 0, the start, has only the views"),
    ("/frame", (4, "xt"), "step must be a whole number from 1 to 3"),
    ("/frame", (2, "../../x"), "Unknown view"),
    ("/insight", (99,), "step must be"),
    ("/download", ("exe",), "Unknown export format"),
    ("/download_grid", ("exe",), "Unknown grid export format"),
])
def test_bad_api_input_gets_a_message_and_writes_nothing_outside(client, tiny_model, app, endpoint, args, words):
    from gradio_client.exceptions import AppError

    run_id = generate(client, tiny_model, steps=3)["run_id"]
    before = set(Path("/tmp").iterdir())
    with pytest.raises(AppError, match=words):
        client.predict(run_id, *args, api_name=endpoint)
    assert not [p for p in set(Path("/tmp").iterdir()) - before if "escaped" in p.name]
    assert "Traceback" not in app[2].read_text()
