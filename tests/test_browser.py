"""The app in a real headless Chromium: generate, scrub, compare, download; screenshots for a person to look at."""
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from test_app import launch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("SCREENSHOT_DIR", "")) if os.environ.get("SCREENSHOT_DIR") else None

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    process, url, log = launch(tmp, "--model", tiny_model)
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def shot(page, name):
    if SHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def image_src(page, selector):
    return page.locator(f"{selector} img").first.get_attribute("src")


def set_slider(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_generate_scrub_compare_download(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(server)
    page.locator("#prompt textarea").fill("a red circle on the left")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status')?.innerText.includes('Done')", timeout=60000)
    shot(page, "generate-1280")
    final_src = image_src(page, "#frame")
    assert final_src

    set_slider(page, "step", 2)
    page.wait_for_function("document.querySelector('#step-label')?.innerText.includes('Step 2 of 25')", timeout=20000)
    page.wait_for_function(f"document.querySelector('#frame img')?.src !== {final_src!r}", timeout=20000)
    step2_src = image_src(page, "#frame")
    page.wait_for_function("document.querySelector('#convergence-plot img')?.src", timeout=20000)
    plot_at_2 = image_src(page, "#convergence-plot")
    set_slider(page, "step", 20)
    page.wait_for_function("document.querySelector('#step-label')?.innerText.includes('Step 20 of 25')", timeout=20000)
    page.wait_for_function(f"document.querySelector('#frame img')?.src !== {step2_src!r}", timeout=20000)
    page.wait_for_function(f"document.querySelector('#convergence-plot img')?.src !== {plot_at_2!r}",
                           timeout=20000)  # the plot follows the slider
    shot(page, "scrubbed-1280")
    page.get_by_role("tab", name="Schedule").click()
    page.wait_for_function("document.querySelector('#step-numbers')?.innerText.includes('20 / 25')", timeout=20000)
    page.get_by_role("tab", name="Guidance").click()
    page.get_by_text("What guidance adds").wait_for(timeout=10000)
    shot(page, "guidance-1280")

    page.get_by_text("Downloads").click()
    page.locator("#dl-gif").click()
    link = page.locator("#download-file a").first
    link.wait_for(timeout=30000)
    href = link.get_attribute("href")
    data = urllib.request.urlopen(href if href.startswith("http") else server.rstrip("/") + href).read()
    (tmp_path / "d.gif").write_bytes(data)
    gif = Image.open(tmp_path / "d.gif")
    assert gif.format == "GIF" and gif.n_frames == 25

    page.get_by_role("tab", name="Compare samplers").click()
    page.locator("#compare").click()
    page.wait_for_function("document.querySelector('#c-status')?.innerText.includes('3 samplers')", timeout=60000)
    full_src = image_src(page, "#grid")
    set_slider(page, "c-progress", 30)
    page.wait_for_function(f"document.querySelector('#grid img')?.src !== {full_src!r}", timeout=20000)
    shot(page, "compare-1280")
    page.close()


def test_layout_reads_on_a_narrow_screen(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(server)
    page.locator("#generate").wait_for()
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 2, f"page scrolls sideways by {overflow}px on a phone"
    shot(page, "mobile-390")
    page.close()


def test_img2img_from_an_upload(server, browser, tmp_path):
    Image.new("RGB", (32, 32), (220, 200, 40)).save(tmp_path / "init.png")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    page.get_by_text("Start from an image (img2img)").click()
    page.locator("#init-image input[type=file]").set_input_files(str(tmp_path / "init.png"))
    page.locator("#init-image img").first.wait_for()
    set_slider(page, "strength", 0.4)
    page.locator("#prompt textarea").fill("a red circle on the left")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status')?.innerText.includes('Done')", timeout=60000)
    status = page.locator("#status").inner_text()
    assert "10 steps from the init image (strength 0.4: steps 16–25 of the schedule)" in status
    assert page.locator("#step input[type=number]").input_value() == "10"
    shot(page, "img2img-1280")
    page.close()
