"""`python -m visualizer bench --app`: what a person feels, measured in Chromium against the real app.

The app runs in its own process on the embedded model; this process times diffusers' plain
`StableDiffusionPipeline.__call__` with the same settings (while the app is idle), then drives the page:
- click -> first streamed frame on screen, click -> final image on screen (ratio to plain);
- a warm Generate through gradio_client that returns with every frame decoded and the insight ready, against a warm
  `api.run` with every x_t and x0-hat frame in this process (what serving adds);
- slider input event -> new frame painted (p95 over 60 moves), requests per slider move, Play's frame rate;
- the page's CPU per run (its renderer process, Chromium's ProcessTime, click to Done: work that shares the cores).
Needs Debian's chromium (or $CHROMIUM) and playwright.
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

PROMPT = "smiling face with sunglasses"
POLL_MS = 100  # how often the bench checks the page for the end of a run
STEPS = 25
ROOT = Path(__file__).resolve().parents[2]

# In the page: time from the slider's input event until the new frame is decoded and painted.
SCRUB_LATENCY_JS = """async (moves) => {
  const range = document.querySelector('#player .vp-range');
  const img = document.querySelector('#player .vp-cell img');
  const times = [];
  for (const p of moves) {
    const t0 = performance.now();
    range.value = p;
    range.dispatchEvent(new Event('input', {bubbles: true}));
    await img.decode();
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    times.push(performance.now() - t0);
  }
  return times;
}"""
# Record when the player's first frame element gets each new src, and when Generate is next clicked (in the page:
# Playwright's click() spends tens of ms on its own checks before the click happens).
WATCH_SRC_JS = """() => {
  window.__srcs = []; window.__clicked = null;
  document.querySelector('#generate').addEventListener('click', () => { window.__clicked = performance.now(); },
                                                        {once: true, capture: true});
  if (window.__watcher) window.__watcher.disconnect();
  const img = () => document.querySelector('#player .vp-cell img');
  window.__watcher = new MutationObserver(() => window.__srcs.push([performance.now(), img().getAttribute('src')]));
  window.__watcher.observe(document.querySelector('#player .vp-cells'), {subtree: true, attributes: true, attributeFilter: ['src']});
  return performance.now();
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(output: Path):
    port = _free_port()
    log = open(output / "app.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--output-dir",
                                str(output / "outputs")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None:
                raise RuntimeError((output / "app.log").read_text())
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the app did not start")


def _plain_seconds(repeats: int) -> float:
    from .. import api
    from ..engine.models import load_pipeline
    from ..engine.run import DEFAULTS
    from ..engine.samplers import make_scheduler

    pipe = api.on_engine(load_pipeline, "embedded")
    pipe.scheduler = make_scheduler(DEFAULTS["sampler"], pipe.scheduler.config)

    def once() -> float:
        started = time.perf_counter()
        pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=DEFAULTS["guidance_scale"],
             generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - started

    api.on_engine(once)  # on the engine thread, like all model work in this process (see api)
    return statistics.median(api.on_engine(once) for _ in range(repeats))


def _api_run_seconds(repeats: int) -> float:
    """A warm `api.run` in this process, same settings as the app's /generate: every x_t and x0-hat frame, metrics."""
    from .. import api

    api.run(PROMPT, num_inference_steps=STEPS)

    def once() -> float:
        started = time.perf_counter()
        api.run(PROMPT, num_inference_steps=STEPS)
        return time.perf_counter() - started

    return statistics.median(once() for _ in range(repeats))


def _api_seconds(url: str, repeats: int) -> float:
    from gradio_client import Client

    from ..engine.run import DEFAULTS

    client = Client(url, verbose=False)
    args = (PROMPT, "", 0, STEPS, DEFAULTS["guidance_scale"], DEFAULTS["sampler"], 0, 0, "embedded")
    client.predict(*args, api_name="/generate")

    def once() -> float:
        started = time.perf_counter()
        client.predict(*args, api_name="/generate")
        return time.perf_counter() - started

    return statistics.median(once() for _ in range(repeats))


def _browser_rows(url: str, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    rows: dict = {"first_frame_s": [], "final_on_screen_s": [], "page_cpu_s": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        devtools = page.context.new_cdp_session(page)
        devtools.send("Performance.enable")

        def cpu() -> float:  # CPU seconds the page's renderer process has used so far (NaN without the metric)
            return next((m["value"] for m in devtools.send("Performance.getMetrics")["metrics"]
                         if m["name"] == "ProcessTime"), float("nan"))

        page.goto(url)
        page.locator("#player .vp-cell img").first.wait_for()
        page.locator("#prompt textarea").fill(PROMPT)
        for attempt in range(repeats + 1):  # the first is a warm-up
            page.evaluate(WATCH_SRC_JS)
            cpu_before = cpu()
            page.locator("#generate").click()
            # polled every 100 ms, not every animation frame: a check per frame (innerText forces a layout) took
            # the page's renderer CPU the model shares the cores with; the times come from __srcs, not the polls
            page.wait_for_function(f"window.__srcs.some(([t, s]) => s && s.includes('0-xt-{STEPS:04d}.'))",
                                   timeout=120000, polling=POLL_MS)
            page.wait_for_function("document.querySelector('#player .vp-status').textContent.startsWith('Done')",
                                   timeout=120000, polling=POLL_MS)
            srcs, start = page.evaluate("[window.__srcs, window.__clicked]")
            final = next(t for t, src in srcs if src and f"0-xt-{STEPS:04d}." in src)
            if attempt:
                rows["page_cpu_s"].append(cpu() - cpu_before)
                rows["first_frame_s"].append((srcs[0][0] - start) / 1000)
                rows["final_on_screen_s"].append((final - start) / 1000)
            page.wait_for_timeout(500)
        result = {k: statistics.median(v) for k, v in rows.items()}
        for step in range(1, STEPS + 1):  # every frame loaded once
            page.locator("#player .vp-range").fill(str(step))
        page.wait_for_timeout(1000)
        moves = [1 + (k * 7) % STEPS for k in range(60)]
        times = sorted(page.evaluate(SCRUB_LATENCY_JS, moves))
        result["scrub_p95_ms"] = times[int(0.95 * (len(times) - 1))]
        result["scrub_median_ms"] = statistics.median(times)
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        for k in range(20):
            page.locator("#player .vp-range").fill(str(1 + (k * 5) % STEPS))
        page.wait_for_timeout(300)
        result["requests_per_20_moves"] = len(requests)
        page.locator("#player .vp-speed").select_option("48")
        page.evaluate(WATCH_SRC_JS)
        page.locator("#player .vp-play").click()
        page.wait_for_timeout(2000)
        page.locator("#player .vp-play").click()
        changes = [t for t, _ in page.evaluate("window.__srcs")]
        result["play_fps"] = (len(changes) - 1) / ((changes[-1] - changes[0]) / 1000) if len(changes) > 1 else 0.0
        browser.close()
    return result


def main(repeats: int = 3) -> dict:
    """The app rows (see the module docstring); one job at a time: the app idles while plain runs."""
    with tempfile.TemporaryDirectory() as tmp:
        process, url = _launch(Path(tmp))
        try:
            plain = _plain_seconds(repeats)
            api_run = _api_run_seconds(repeats)
            api = _api_seconds(url, repeats)
            browser = _browser_rows(url, repeats)
        finally:
            process.terminate()
            process.wait(10)
    return {"plain_s": plain, "api_run_s": api_run, "api_generate_s": api, "api_over_plain": api / plain,
            "api_generate_over_api_run": api / api_run,
            "final_on_screen_over_plain": browser["final_on_screen_s"] / plain, **browser}


def format_rows(r: dict) -> str:
    return "\n".join([
        f"| embedded, 64x64, {STEPS} Euler steps | plain {r['plain_s']:.3f} s | final image on screen "
        f"{r['final_on_screen_s']:.3f} s ({r['final_on_screen_over_plain']:.2f}x plain) | first frame "
        f"{r['first_frame_s']:.3f} s after the click | API generate with every frame and the insight "
        f"{r['api_generate_s']:.3f} s ({r['api_over_plain']:.2f}x plain, {r['api_generate_over_api_run']:.2f}x a warm "
        f"api.run with every frame, {r['api_run_s']:.3f} s) |",
        f"slider: p95 {r['scrub_p95_ms']:.1f} ms (median {r['scrub_median_ms']:.1f} ms) from input to painted "
        f"frame; {r['requests_per_20_moves']} requests in 20 moves; Play at {r['play_fps']:.1f} fps (asked 48); "
        f"the page's renderer used {r['page_cpu_s']:.2f} CPU-s per run",
    ])
