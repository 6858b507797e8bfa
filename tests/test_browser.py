"""The app in a real headless Chromium, pressed as a person would: every control of the player, the
settings, the comparison and the downloads; screenshots (SCREENSHOT_DIR) for a person to look at."""
import io
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from test_app import launch
from visualizer.demo_model import emoji

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("SCREENSHOT_DIR", "")) if os.environ.get("SCREENSHOT_DIR") else None

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


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


def shot(page, name, full_page=False):
    if SHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def open_page(browser, server, width=1280, height=800):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(server)
    page.locator("#player .vp-cell img").first.wait_for()
    return page


class Player:
    """The in-page player of one tab, read and driven through its DOM."""

    def __init__(self, page, elem_id="player"):
        self.page, self.root = page, f"#{elem_id}"
        self.range = page.locator(f"{self.root} .vp-range")

    def label(self) -> str:
        return self.page.locator(f"{self.root} .vp-label").inner_text()

    def status(self) -> str:
        return self.page.locator(f"{self.root} .vp-status").inner_text()

    def position(self) -> int:
        return int(self.range.input_value())

    def srcs(self) -> list[str]:
        return self.page.eval_on_selector_all(f"{self.root} .vp-cell img:not(.vp-overlay)",
                                             "ims => ims.map(i => i.getAttribute('src'))")

    def move(self, value: int) -> None:
        self.range.fill(str(value))  # sets the value and fires input and change, as a drag does

    def view(self, kind: str) -> None:
        self.page.locator(f"{self.root} .vp-view").select_option(kind)

    def wait_status(self, words: str, timeout=60000) -> None:
        self.page.wait_for_function(
            f"document.querySelector('{self.root} .vp-status')?.innerText.includes({words!r})", timeout=timeout)


def set_slider(page, elem_id, value) -> None:
    """Type `value` into a gr.Slider's number box and press Enter, as a person does, until the slider shows it: a
    slider whose tab or accordion has just opened can drop a value typed at that moment (seen in CI)."""
    box, bar = page.locator(f"#{elem_id} input[type=number]"), page.locator(f"#{elem_id} input[type=range]")
    for _ in range(20):
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(100)
        if float(bar.input_value()) == float(value):
            return
    raise AssertionError(f"the {elem_id} slider did not take {value}: it shows {bar.input_value()}")


def generate(page, prompt="a red circle on the left", steps=None):
    page.locator("#prompt textarea").fill(prompt)
    if steps is not None:
        set_slider(page, "steps", steps)
    page.locator("#generate").click()


def test_the_page_opens_with_a_run_to_scrub_before_any_click(server, browser):
    page = open_page(browser, server)
    player = Player(page)
    assert player.label().startswith("Step 25 of 25") and "Example:" in player.status()
    assert re.search(r"Example: “(.+?)”", player.status()).group(1) in emoji.captions()  # a run of the emoji model
    last = player.srcs()[0]
    page.keyboard.press("Tab")  # no click anywhere: keyboard only
    player.range.focus()
    page.keyboard.press("Home")  # position 1: the start, the initial noise decoded (frames/xt_0000.png)
    assert player.label().startswith("Start: the initial noise, before step 1 · timestep t = 961")
    start = player.srcs()[0]
    assert "-start-" in start and start != last and page.locator("#player .vp-cell img").first.evaluate(
        "im => im.complete && im.naturalWidth > 0")
    page.keyboard.press("ArrowRight")
    assert player.label().startswith("Step 1 of 25") and player.srcs()[0] not in (start, last)
    curve = page.locator("#player .vp-convergence polyline")
    assert curve.count() == 1  # the convergence panel is filled
    page.get_by_role("tab", name="Compare samplers").click()
    grid = Player(page, "c-player")
    assert len(grid.srcs()) == 4 and all(grid.srcs())
    shot(page, "opened-compare-1280")
    page.close()


def test_every_player_control_does_what_its_label_says(server, browser):
    page = open_page(browser, server)
    player = Player(page)
    generate(page, steps=12)
    player.wait_status("Done: 12 steps")
    assert player.position() == 13 and player.label().startswith("Step 12 of 12")  # the start, then 12 steps
    shot(page, "generated-1280")

    seen = set()
    for step in (1, 6, 12):  # the slider
        player.move(step + 1)
        assert player.label().startswith(f"Step {step} of 12")
        seen.add(player.srcs()[0])
    player.move(1)
    assert player.label().startswith("Start: the initial noise")
    seen.add(player.srcs()[0])
    assert len(seen) == 4
    player.range.focus()
    page.keyboard.press("End")
    page.keyboard.press("ArrowLeft")  # arrow keys: one step
    assert player.position() == 12
    page.keyboard.press("ArrowRight")
    assert player.position() == 13
    page.keyboard.press("Home")
    assert player.position() == 1
    page.keyboard.press("End")
    assert player.position() == 13

    page.locator("#player .vp-speed").select_option("48")  # Play, at a speed, looping, then Pause
    page.locator("#player .vp-play").click()
    page.wait_for_timeout(150)
    assert "Pause" in page.locator("#player .vp-play").inner_text()
    positions = set()
    for _ in range(12):
        positions.add(player.position())
        page.wait_for_timeout(40)
    assert len(positions) >= 4  # it moves on its own, and wrapped from the end to step 1 (loop)
    page.locator("#player .vp-play").click()
    paused = player.position()
    page.wait_for_timeout(300)
    assert player.position() == paused and "Play" in page.locator("#player .vp-play").inner_text()

    page.locator("#player .vp-loop").uncheck()  # without Loop, Play stops at the last step
    player.move(9)
    page.locator("#player .vp-play").click()
    page.wait_for_function("document.querySelector('#player .vp-play').innerText.includes('Play')", timeout=5000)
    assert player.position() == 13

    player.move(5)  # step 4
    for kind in ("x0", "latents", "noise", "xt"):  # every view shows that kind's frame of the step
        player.view(kind)
        assert all(f"-{kind}-0004." in src for src in player.srcs()), (kind, player.srcs())
    player.view("both")
    srcs = player.srcs()
    assert len(srcs) == 2 and "-xt-0004." in srcs[0] and "-x0-0004." in srcs[1]
    shot(page, "both-1280")
    player.view("xt")

    for tab, check in (("schedule", "#player .vp-mark-line"), ("numbers", "#player .vp-numbers"),
                       ("change", "#player .vp-change img"), ("convergence", "#player .vp-mark")):
        page.locator(f"#player .vp-tabs button[data-tab={tab}]").click()
        assert page.locator(f"#player .vp-panel[data-panel={tab}]").is_visible()
        before = page.locator(check).first.evaluate("e => e.outerHTML")
        player.move(3)
        after = page.locator(check).first.evaluate("e => e.outerHTML")
        player.move(5)  # step 4
        assert before != after, f"the {tab} panel does not follow the slider"
    assert "4 / 12" in page.locator("#player .vp-numbers").inner_text()

    guidance = page.locator("#guidance img").first  # the server-side panel follows where the slider settles,
    guidance.scroll_into_view_if_needed()  # while it is on screen
    page.wait_for_function("document.querySelector('#guidance img')?.src", timeout=20000)
    before = guidance.get_attribute("src")
    player.move(1)
    page.wait_for_function(f"document.querySelector('#guidance img')?.src !== {before!r}", timeout=20000)
    page.close()


def test_slider_moves_make_no_network_requests_once_frames_are_loaded(server, browser):
    page = open_page(browser, server)
    player = Player(page)
    for view in ("xt", "x0", "latents", "noise"):  # every frame of these views loaded once
        player.view(view)
        for step in range(1, 26):
            player.move(step)
    page.wait_for_timeout(1000)  # the last preloads land
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    for k in range(20):
        player.move(1 + (k * 7) % 25)
    page.wait_for_timeout(500)
    assert requests == [], requests
    page.close()


def test_the_frame_is_not_covered_while_the_run_computes(server, browser):
    page = open_page(browser, server)
    player = Player(page)
    generate(page, steps=300)
    page.wait_for_function("document.querySelector('#player .vp-status')?.innerText.includes('computing')",
                           timeout=30000)
    page.wait_for_timeout(300)
    box = page.locator("#player .vp-cell img").first.bounding_box()
    top = page.evaluate(f"document.elementFromPoint({box['x'] + box['width'] / 2}, {box['y'] + box['height'] / 2})"
                        ".tagName")
    assert top == "IMG"  # no progress overlay on the frame
    assert page.locator("#player .vp-bar").is_visible()  # the progress is a slim bar above it
    first = player.srcs()[0]
    shot(page, "midrun-1280")
    page.wait_for_function(f"document.querySelector('#player .vp-cell img').getAttribute('src') !== {first!r}",
                           timeout=30000)  # frames keep arriving
    player.move(3)  # finished steps can be scrubbed during the run
    assert player.label().startswith("Step 2 of 300")
    page.locator("#stop").click()
    player.wait_status("Stopped early")
    assert page.locator("#player .vp-view").input_value() == "x0"  # the best guess so far, and it says so
    assert "best guess" in player.status()
    # nothing of the run kept in the browser: Gradio's run history rewrote every run's outputs at each update
    assert page.evaluate("Object.keys(localStorage).filter(k => k.includes('run-history'))") == []
    assert page.evaluate("JSON.stringify(localStorage).length") < 5000
    shot(page, "stopped-1280")
    page.close()


def test_layout_fits_one_screen_and_puts_the_frame_first_on_a_phone(server, browser):
    page = open_page(browser, server)
    boxes = {name: page.locator(sel).first.bounding_box() for name, sel in
             [("prompt", "#prompt textarea"), ("generate", "#generate"), ("frame", "#player .vp-cell img"),
              ("slider", "#player .vp-range"), ("label", "#player .vp-label")]}
    for name, b in boxes.items():
        assert b["y"] >= 0 and b["y"] + b["height"] <= 800, f"{name} is not on the first screen: {b}"
    assert max(boxes["frame"]["width"], boxes["frame"]["height"]) >= 384
    shot(page, "layout-1280")
    page.get_by_role("tab", name="Compare samplers").click()
    size = page.locator("#c-player .vp-cell figcaption").first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
    assert size >= 12
    page.close()
    phone = open_page(browser, server, 390, 844)
    overflow = phone.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 2, f"page scrolls sideways by {overflow}px on a phone"
    frame = phone.locator("#player .vp-cell img").first.bounding_box()
    slider = phone.locator("#player .vp-range").bounding_box()
    prompt = phone.locator("#prompt textarea").bounding_box()
    assert frame["y"] < prompt["y"] and slider["y"] < prompt["y"] and slider["y"] + slider["height"] <= 844
    shot(phone, "phone-390")
    phone.close()


def test_settings_downloads_and_forward_noising(server, browser, tmp_path):
    page = open_page(browser, server)
    player = Player(page)
    seed = page.locator("#randomize").locator("xpath=..").locator("input[type=number]")
    before = seed.input_value()
    page.locator("#randomize").click()
    page.wait_for_function(f"document.querySelector('#randomize').parentElement.querySelector('input').value "
                           f"!== {before!r}", timeout=5000)
    page.get_by_text("rocket", exact=True).click()  # an example fills the prompt
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'rocket'",
                           timeout=5000)
    page.locator("#generate").click()
    player.wait_status("Done: 25 steps")
    generate(page, steps=8)
    player.wait_status("Done: 8 steps")
    page.get_by_role("tab", name="Downloads").click()
    page.locator("#dl-gif").click()
    link = page.locator("#download-file a").first
    link.wait_for(timeout=30000)
    href = link.get_attribute("href")
    data = urllib.request.urlopen(href if href.startswith("http") else server.rstrip("/") + href).read()
    (tmp_path / "d.gif").write_bytes(data)
    gif = Image.open(tmp_path / "d.gif")
    assert gif.format == "GIF" and gif.n_frames == 1 + 8  # the start, then every step
    page.locator("#dl-html").click()  # the player as one page (tests/test_page.py opens such a page offline)
    page.wait_for_function("document.querySelector('#download-file a')?.href.includes('player.html')", timeout=30000)
    href = page.locator("#download-file a").first.get_attribute("href")
    text = urllib.request.urlopen(href if href.startswith("http") else server.rstrip("/") + href).read().decode()
    assert text.count("data:image/webp;base64,") == 2 * (1 + 8) and "“a red circle on the left”" in text
    generate(page, steps=5)  # a new run clears the previous run's download
    player.wait_status("Done: 5 steps")
    assert page.locator("#download-file a").count() == 0
    page.get_by_role("tab", name="Forward noising").click()
    page.locator("#noise-it").click()
    page.wait_for_function("document.querySelector('#forward-status')?.innerText.includes('5 noise levels')",
                           timeout=30000)
    player.view("forward")
    player.move(2)  # step 1
    noisy = player.srcs()[0]
    player.move(6)
    assert "-forward-0001." in noisy and player.srcs()[0] != noisy
    player.move(1)  # the start: the image noised to step 1's input level, as step 1's frame
    assert player.srcs()[0] == noisy
    page.close()


def test_the_true_cfg_slider_reaches_the_run_and_a_wrong_use_is_explained(server, browser):
    """True CFG is Flux's: on the server's SD model, setting it above 1 gets a message, and the player keeps its run."""
    page = open_page(browser, server)
    player = Player(page)
    before = player.srcs()
    page.get_by_text("Negative prompt, size and model").first.click()
    set_slider(page, "true-cfg", 3)
    page.locator("#generate").click()
    page.get_by_text("True CFG is for Flux models").first.wait_for(timeout=30000)
    assert player.srcs() == before
    set_slider(page, "true-cfg", 1)
    generate(page, steps=4)
    player.wait_status("Done: 4 steps")
    page.close()


def compare(browser, server, prompt, steps=None, word_maps=False):
    """Open the page, run a comparison of the default 4 samplers from the Compare tab; (page, its player)."""
    page = open_page(browser, server)
    page.get_by_role("tab", name="Compare samplers").click()
    grid = Player(page, "c-player")
    page.locator("#c-prompt textarea").fill(prompt)
    if word_maps:
        page.locator("#c-attention input[type=checkbox]").check()
    if steps is not None:
        set_slider(page, "c-steps", steps)
    page.locator("#compare").click()
    grid.wait_status("Done: 4 samplers")
    return page, grid


def test_compare_grid_runs_and_its_shared_slider_moves_every_cell(server, browser):
    page, grid = compare(browser, server, "a blue square")
    end = grid.srcs()
    grid.move(3)
    moved = grid.srcs()
    assert len(end) == len(moved) == 4 and all(a != b for a, b in zip(end, moved))
    captions = page.locator("#c-player .vp-cell figcaption").all_inner_texts()
    assert [c.split(" · ")[0] for c in captions] == ["Euler", "DDIM", "DPM++ 2M", "Euler a"]
    shot(page, "compare-1280")
    for fmt, check in (("gif", lambda data: Image.open(io.BytesIO(data)).n_frames > 10),  # (repeats merge)
                       ("mp4", lambda data: data[4:8] == b"ftyp"),
                       ("png", lambda data: Image.open(io.BytesIO(data)).width > 4 * 256),
                       ("html", lambda data: data.decode().count("data:image/webp;base64,") == 4 * 2 * (1 + 25))):
        page.locator(f"#c-dl-{fmt}").click()  # every download button of the comparison
        page.wait_for_function(f"document.querySelector('#c-download-file a')?.href.includes('grid.{fmt}') || "
                               f"document.querySelector('#c-download-file a')?.href.includes('player.{fmt}')",
                               timeout=60000)
        href = page.locator("#c-download-file a").first.get_attribute("href")
        assert check(urllib.request.urlopen(href if href.startswith("http") else server.rstrip("/") + href).read()), fmt
    page.close()


def test_compare_models_fills_one_grid_aligned_by_progress(server, browser, tiny_model):
    """The embedded model (64x64) and the server's tiny model (32x32) on one prompt: one cell each, named by model,
    on one slider, with both convergence curves on one plot."""
    page = open_page(browser, server)
    page.get_by_role("tab", name="Compare samplers").click()
    grid = Player(page, "c-player")
    page.locator("#c-prompt textarea").fill("a blue square")
    page.locator("#c-models textarea, #c-models input").first.fill(f"embedded, {tiny_model}")
    page.locator("#compare").click()
    grid.wait_status("Done: 2 models")
    captions = page.locator("#c-player .vp-cell figcaption").all_inner_texts()
    assert [c.split(" · ")[:2] for c in captions] == [["embedded", "Euler"], [Path(tiny_model).name, "Euler"]]
    end = grid.srcs()
    grid.move(1)
    assert all(a != b for a, b in zip(end, grid.srcs())) and len(end) == 2
    page.locator("#c-player .vp-tabs button[data-tab=convergence]").click()
    assert page.locator("#c-player .vp-convergence polyline").count() == 2  # one curve per model
    shot(page, "compare-models-1280")
    page.close()


def test_img2img_from_an_upload(server, browser, tmp_path):
    Image.new("RGB", (32, 32), (220, 200, 40)).save(tmp_path / "init.png")
    page = open_page(browser, server, 1280, 900)
    player = Player(page)
    page.get_by_text("Start from an image (img2img)").click()
    page.locator("#init-image input[type=file]").set_input_files(str(tmp_path / "init.png"))
    page.locator("#init-image img").first.wait_for()
    set_slider(page, "strength", 0.4)
    generate(page)
    player.wait_status("Done")
    assert "10 steps from the init image (strength 0.4: steps 16–25 of the schedule)" in player.status()
    assert player.position() == 11  # the noised init image, then 10 steps
    player.move(1)
    assert player.label().startswith("Start:") and "timestep t = " in player.label()
    shot(page, "img2img-1280")
    page.close()


def test_word_maps_overlay_the_frame_and_follow_the_slider(server, browser):
    page = open_page(browser, server)
    player = Player(page)
    page.locator("#attention input[type=checkbox]").check()
    generate(page, prompt="a red circle on the left", steps=6)
    player.wait_status("Done: 6 steps")
    chips = page.locator("#player .vp-chips button")
    assert chips.all_inner_texts() == ["a", "red", "circle", "on", "the", "left"]
    overlay = page.locator("#player .vp-overlay").first
    assert overlay.is_hidden()  # nothing picked: the plain frame
    chips.nth(2).click()
    assert overlay.is_visible() and "-attn2-0006." in overlay.get_attribute("src")
    player.move(3)  # step 2
    assert "-attn2-0002." in overlay.get_attribute("src")  # the word's map follows the slider
    page.locator("#player .vp-opacity").fill("0.2")
    assert overlay.evaluate("e => e.style.opacity") == "0.2"
    shot(page, "word-map-1280")
    page.locator("#player .vp-tabs button[data-tab=words]").click()
    assert page.locator("#player .vp-shares polyline").count() == 6  # one share curve per word
    assert "-attn2-all-" in page.locator("#player .vp-all img").get_attribute("src")
    chips.nth(2).click()  # picking it again takes the map away
    assert overlay.is_hidden()
    page.close()


def test_the_comparison_shows_each_samplers_own_map_of_the_picked_word(server, browser):
    page, _ = compare(browser, server, "a red circle", steps=4, word_maps=True)
    page.locator("#c-player .vp-chips button").nth(2).click()  # "circle"
    maps = page.eval_on_selector_all("#c-player .vp-overlay", "ims => ims.map(i => i.getAttribute('src'))")
    assert [src.rsplit("/", 1)[-1] for src in maps] == [f"{cell}-attn2-0004.png" for cell in range(4)]
    page.close()


def _pixels(server, src) -> "np.ndarray":
    import numpy as np

    with urllib.request.urlopen(server.rstrip("/") + src) as response:
        return np.asarray(Image.open(response).convert("RGB"), dtype=float)


def test_the_2d_playground_moves_the_points_traces_a_click_and_guides_to_a_cluster(server, browser):
    page = open_page(browser, server)
    page.get_by_role("tab", name="2D playground").click()
    toy = Player(page, "t-player")
    page.locator("#t-player .vp-cell img").first.wait_for()
    assert toy.label().startswith("Step 40 of 40") and toy.position() == 41  # opens on a finished run
    end = toy.srcs()[0]
    toy.move(1)
    assert toy.label().startswith("Start: the initial noise")
    start = toy.srcs()[0]
    assert start != end and abs(_pixels(server, start) - _pixels(server, end)).mean() > 2  # points and arrows moved

    box = page.locator("#t-player .vp-cell img").first.bounding_box()  # click a point: its path is traced
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.wait_for_selector("#t-player .vp-trace circle")
    assert page.locator("#t-player .vp-trace polyline").count() == 2
    ring = lambda: page.locator("#t-player .vp-trace circle").first.get_attribute("cx")
    before = ring()
    toy.move(41)
    assert ring() != before  # the ring follows the slider along the path
    shot(page, "toy-1280")

    page.locator("#t-samplers").get_by_label("DDIM", exact=True).check()  # two samplers, same starting points
    page.locator("#t-run").click()
    toy.wait_status("Click a point")
    page.wait_for_function("document.querySelectorAll('#t-player .vp-cell').length === 2")
    captions = page.locator("#t-player .vp-cell figcaption").all_inner_texts()
    assert [c.split(" · ")[0] for c in captions] == ["Euler", "DDIM"]
    toy.move(1)
    first_frames = toy.srcs()
    assert (_pixels(server, first_frames[0]) == _pixels(server, first_frames[1])).mean() > 0.95  # same start
    # the traced point, in both cells (their traces are fetched after the new run arrives)
    page.wait_for_function("document.querySelectorAll('#t-player .vp-trace circle').length === 2")

    page.locator("#t-pattern").get_by_label("shapes").check()  # ask for a cluster: guidance bends the paths
    page.locator("#t-label input").click()
    page.get_by_role("option", name="triangle").click()
    page.locator("#t-run").click()
    toy.wait_status("ended on the triangle")
    share = int(re.search(r"(\d+)% ended on the triangle", toy.status()).group(1))
    assert share >= 90
    toy.view("x0")
    assert all("x0" in src for src in toy.srcs())
    shot(page, "toy-shapes-1280")
    page.close()


def test_image_space_map_follows_the_slider_and_maps_several_seeds(server, browser):
    page = open_page(browser, server)
    player = Player(page)
    generate(page, prompt="a cat", steps=6)
    player.wait_status("Done: 6 steps")
    player.view("map")  # offered once the run is done: its path through image space, step by step
    end = player.srcs()[0]
    player.move(2)
    assert "-map-" in end and "-map-" in player.srcs()[0] and player.srcs()[0] != end
    page.get_by_role("tab", name="Image space").click()
    set_slider(page, "map-seeds", 3)
    page.locator("#map-button").click()
    page.wait_for_function("document.querySelector('#map-summary')?.innerText.includes('Seeds 0–')", timeout=60000)
    assert "Seeds 0–2" in page.locator("#map-summary").inner_text()
    page.wait_for_function("document.querySelector('#map-image img')?.naturalWidth >= 360")
    page.locator("#map-image").scroll_into_view_if_needed()
    shot(page, "image-space-1280")
    page.close()


def test_the_tour_steps_through_every_chapter_with_its_runs_numbers(server, browser, tiny_model, tmp_path):
    """A deep link opens the Learn tab on its chapter; Next walks all eight, each changing the visual, its text
    the one the same runs give in this process (the numbers are the run's), its key in the address bar."""
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig
    from visualizer.app.tour import TITLES

    expected = App(AppConfig(output_dir=tmp_path, default_model=tiny_model, example_dir=None)).learn_tab
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(server + "?chapter=noise")
    text = page.locator("#l-text")
    page.wait_for_function("document.querySelector('#l-text')?.innerText.startsWith('1 ·')", timeout=120000)
    tour = Player(page, "l-player")
    seen = []
    for k, key in enumerate(TITLES):
        page.wait_for_function(f"location.search === '?chapter={key}'", timeout=10000)  # the address bar follows
        want = expected.chapter("tropical fish", tiny_model, k).text.split("\n\n")[1]
        assert want in text.inner_text().replace("\n", " "), key
        page.wait_for_function("[...document.querySelectorAll('#l-player .vp-cell img')].every(i => i.complete)")
        look = (tuple(tour.srcs()), page.locator("#l-player .vp-view").input_value(), tour.label())
        assert look not in seen, f"chapter {key} shows what the one before did"
        seen.append(look)
        shot(page, f"tour-{k + 1}-{key}")
        if k < len(TITLES) - 1:
            page.locator("#l-next").click()
            page.wait_for_function(f"document.querySelector('#l-text')?.innerText.startsWith('{k + 2} ·')",
                                   timeout=60000)
    assert "Step" in tour.label() and page.locator("#l-player .vp-view").input_value() == "map"
    page.locator("#l-back").click()
    page.wait_for_function("document.querySelector('#l-text')?.innerText.startsWith('7 ·')", timeout=60000)
    assert len(tour.srcs()) == 4  # the samplers, side by side
    page.locator("#l-chapter input").click()  # the chapter menu
    page.get_by_role("option", name=TITLES["click"]).click()
    page.wait_for_function("document.querySelector('#l-text')?.innerText.startsWith('4 ·')", timeout=60000)
    page.wait_for_function("location.search === '?chapter=click'", timeout=10000)
    assert "structure appears here" in page.locator("#l-player .vp-cell figcaption").inner_text()
    page.close()


def test_a_deep_link_to_a_chapter_and_a_tour_of_another_prompt(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(server + "?chapter=samplers")
    page.wait_for_function("document.querySelector('#l-text')?.innerText.startsWith('7 ·')", timeout=120000)
    assert page.locator("#learn-tab").is_visible()
    shot(page, "tour-samplers-390")
    before = page.locator("#l-text").inner_text()
    page.get_by_text("Tour another prompt or model").click()
    page.locator("#l-prompt textarea").fill("a blue square")
    page.locator("#l-build").click()
    page.wait_for_function("document.querySelector('#l-text')?.innerText.startsWith('1 ·')", timeout=120000)
    page.wait_for_function("location.search === '?chapter=noise'", timeout=10000)
    assert page.locator("#l-text").inner_text() != before
    page.close()
