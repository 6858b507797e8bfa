"""Many users, cancels, disconnects, bad input, bounded memory and no exposed files."""
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from test_app import ROOT, X_T, generate, launch
from visualizer.bench.load import run_load_test


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    process, url, log = launch(tmp, "--model", tiny_model, "--cache-ttl", "4")
    yield url, process, log, tmp
    process.terminate()
    process.wait(10)


def client_for(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_eight_concurrent_sessions_match_their_lone_twins(server, tiny_model):
    url, _, log, _ = server
    result = run_load_test(url, sessions=8, model=tiny_model, steps=6)
    assert result["completed"] == 8 and result["mismatches"] == []
    assert set(result["kinds"]) == {"generate", "compare"}
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text


def status_of(url, path):
    try:
        return urllib.request.urlopen(url.rstrip("/") + path, timeout=10).status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize("path", [
    "/gradio_api/file=/etc/passwd",
    "/gradio_api/file=../../../../etc/passwd",
    "/gradio_api/file=%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/gradio_api/file=..%2F..%2F..%2Fetc%2Fpasswd",
    "/gradio_api/file=" + urllib.parse.quote(str(ROOT / "app.py")),
    "/gradio_api/file=" + urllib.parse.quote(str(ROOT / "visualizer" / "ui.py")),
    "/gradio_api/file=app.py",
    "/file=/etc/passwd",
    "/monitoring",
])
def test_files_outside_the_output_folder_are_refused(server, path):
    assert status_of(server[0], path) in (403, 404, 405)


def test_exports_are_served(server, tiny_model):
    client = client_for(server[0])
    run_id = generate(client, tiny_model, steps=3)["run_id"]
    gif = client.predict(run_id, "gif", api_name="/download")
    assert Path(gif).stat().st_size > 0  # downloaded through the file route


def test_upload_over_the_limit_is_refused(server):
    body = b"x" * (11 * 1024 * 1024)
    boundary = "visualizer-test"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
               f"Content-Type: application/octet-stream\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server[0].rstrip("/") + "/gradio_api/upload", data=payload, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 413


@pytest.fixture(scope="module")
def long_run_seconds(server, tiny_model):
    """How long a full 250-step run takes on this server (the yardstick for 'halted early')."""
    started = time.time()
    generate(client_for(server[0]), tiny_model, steps=250)
    return time.time() - started


def test_cancel_halts_the_run_and_the_next_one_starts(server, tiny_model, long_run_seconds):
    url, process, log, _ = server
    client = client_for(url)
    job = client.submit("a red circle", "", 1, 250, 7.5, "Euler", 0, 0, tiny_model, api_name="/generate")
    deadline = time.time() + 30
    while not job.outputs() and time.time() < deadline:  # wait for the first live frame
        time.sleep(0.05)
    assert job.outputs(), "no live preview arrived"
    job.cancel()
    started = time.time()
    assert len(generate(client_for(url), tiny_model, steps=3)["steps"]) == 3
    assert time.time() - started < 0.6 * long_run_seconds  # the cancelled run no longer holds the queue
    assert psutil.Process(process.pid).num_threads() < 200


def test_killed_client_process_frees_the_queue(server, tiny_model, tmp_path, long_run_seconds):
    url = server[0]
    script = tmp_path / "client.py"
    script.write_text(
        "import sys\nfrom gradio_client import Client\n"
        f"c = Client({url!r}, verbose=False)\n"
        f"job = c.submit('a red circle', '', 2, 250, 7.5, 'Euler', 0, 0, {tiny_model!r}, api_name='/generate')\n"
        "import time\nwhile not job.outputs(): time.sleep(0.05)\nprint('streaming', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "streaming"
    child.kill()
    child.wait()
    started = time.time()
    result = generate(client_for(url), tiny_model, steps=3)
    assert len(result["steps"]) == 3 and time.time() - started < 0.6 * long_run_seconds


def test_full_queue_says_busy(tiny_model, tmp_path):
    process, url, _ = launch(tmp_path, "--model", tiny_model, "--max-queue", "1")
    try:
        clients = [client_for(url) for _ in range(4)]
        jobs = [c.submit("a red circle", "", i, 250, 7.5, "Euler", 0, 0, tiny_model, api_name="/generate")
                for i, c in enumerate(clients)]
        messages = []
        for job in jobs:
            try:
                job.result(timeout=120)
            except Exception as error:  # the refused ones
                messages.append(str(error))
        assert any("queue is full" in m.lower() for m in messages), messages
    finally:
        process.terminate()
        process.wait(10)


def test_nan_model_output_gets_a_clear_message(tiny_model, tmp_path):
    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.startswith("conv_out") and k.endswith("bias"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights))
    result = subprocess.run([sys.executable, "-m", "visualizer", "run", "--prompt", "a red circle", "--model",
                             str(broken), "--steps", "4", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode != 0 and "NaN or infinite values at step 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_failed_export_write_is_reported(tiny_model, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig, UserError

    app = App(AppConfig(output_dir=tmp_path / "out", default_model=tiny_model))
    *_, last = app.generate_tab.generate("a red circle", "", 1, 3, 7.5, "Euler", 0, 0, tiny_model)
    run_id = last.run_id
    (app.runs.store.folder(run_id) / "denoising.gif").mkdir()  # the file cannot be written
    with pytest.raises(UserError, match="Could not write the gif file"):
        app.generate_tab.download(run_id, "gif", X_T)
    assert Path(app.generate_tab.download(run_id, "mp4", X_T)).exists()  # the app goes on


def test_remote_servers_refuse_arbitrary_model_folders(tiny_model, tmp_path):
    from app import is_loopback
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig, UserError

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    app = App(AppConfig(output_dir=tmp_path, default_model=tiny_model, allow_any_model=False))
    with pytest.raises(UserError, match="only serves its built-in models"):
        next(app.generate_tab.generate("a red circle", "", 1, 3, 7.5, "Euler", 0, 0, "/etc"))


def test_streamed_updates_make_gradio_rebuild_only_the_player(tiny_model, tmp_path):
    """gr.skip() or gr.update() for an output makes Gradio build a new component and its config at every streamed
    update, in Python, under the GIL the model's loop needs: while a run streams, only the player is updated that
    way; every other output gets a plain value, and the run id is empty until the run is done."""
    from gradio.utils import is_prop_update

    from visualizer.app.handlers import App

    from visualizer.app.runs import AppConfig, UserError

    app = App(AppConfig(output_dir=tmp_path, default_model=tiny_model, example_dir=None))
    runs = {"generate": app.generate_tab.generate("a red circle", "", 1, 6, 7.5, "Euler", 0, 0, tiny_model),
            "compare": app.compare_tab.compare("a red circle", "", 1, 6, 7.5, ["Euler", "DDIM"], 0, 0, tiny_model)}
    for name, updates in runs.items():
        *streamed, last = updates
        assert streamed, name
        for outputs in streamed:
            assert [k for k, value in enumerate(outputs) if is_prop_update(value)] == [0], name
            assert outputs[2] is None  # no run to download or break down while this one computes
        with pytest.raises(UserError, match="No finished run yet"):  # a download pressed meanwhile
            app.generate_tab.download(streamed[-1].run_id, "gif", X_T)
        assert last.run_id and not is_prop_update(last.run_id)  # the finished run's id


def test_stop_closes_the_generator_within_a_step(tiny_model, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    app = App(AppConfig(output_dir=tmp_path, default_model=tiny_model))
    stream = app.generate_tab.generate("a red circle", "", 1, 500, 7.5, "Euler", 0, 0, tiny_model)
    next(stream)
    started = time.time()
    stream.close()  # what Gradio does on Stop or a closed tab
    assert time.time() - started < 2


def test_two_hundred_runs_keep_memory_and_files_bounded(tiny_model, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    app = App(AppConfig(output_dir=tmp_path / "out", default_model=tiny_model, run_capacity=8, example_dir=None))
    process = psutil.Process()

    def one(i):
        *_, last = app.generate_tab.generate("a red circle", "", i, 4, 7.5, "Euler", 0, 0, tiny_model)
        app.generate_tab.download(last.run_id, "gif", X_T)

    for i in range(20):
        one(i)
    baseline = process.memory_info().rss
    for i in range(20, 200):
        one(i)
    growth = (process.memory_info().rss - baseline) / 2**20
    assert growth < 60, f"memory grew by {growth:.0f} MiB over 180 runs"
    assert len(app.runs.store) == 8
    assert len(list((tmp_path / "out").iterdir())) <= 8  # each run's exports and player frames go with it


def test_stop_keeps_the_steps_computed_so_far(server, tiny_model):
    client = client_for(server[0])
    job = client.submit("a red circle", "", 4, 250, 7.5, "Euler", 0, 0, tiny_model, api_name="/generate")
    deadline = time.time() + 30
    while not job.outputs() and time.time() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/stop")
    result = job.result(timeout=60)
    final, status, run_id, computed = result["final_image"], result["status"], result["run_id"], len(result["steps"])
    assert status.startswith("Stopped early") and 1 <= computed < 250
    assert "x0-hat of step" in status and "best guess" in status  # the result stays, and says what it is
    x0, _ = client.predict(run_id, computed, "x0", api_name="/frame")
    from visualizer.media.export import upscale

    final_frame = upscale(np.asarray(Image.open(final).convert("RGB")))
    assert final_frame.tobytes() == Image.open(x0).convert("RGB").tobytes()  # a stopped run shows its latest x0-hat
    frame, label = client.predict(run_id, computed, X_T, api_name="/frame")  # what was computed is there
    assert label.startswith(f"Step {computed} of")
