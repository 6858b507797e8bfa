"""The player as one HTML file (media/page.py), opened from disk in Chromium with every request that is not the
file itself blocked: it must scrub, play and switch views on what it holds."""
import re
from pathlib import Path

import pytest

from test_browser import browser, shot  # noqa: F401  (the browser fixture)
from visualizer import api
from visualizer.engine.run import Run
from visualizer.media import player
from visualizer.media.export import export_grid, export_run
from visualizer.media.page import PAGE_NAME, player_page

EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "example"
SAMPLERS = ("euler", "ddim", "dpm-2m", "euler-a")


@pytest.fixture(scope="module")
def example_runs():
    return [Run.load(EXAMPLE / name) for name in SAMPLERS]


def open_offline(browser, path: Path, width=1280, height=800):
    """A page on `path` where any request but file:// is refused (and counted)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    refused = []
    page.route(re.compile(r"^(?!file:).*"), lambda route: (refused.append(route.request.url), route.abort()))
    page.goto(path.as_uri())
    page.locator("#player .vp-cell img").first.wait_for()
    return page, refused


def loaded(page) -> bool:
    return page.locator("#player .vp-cell img").first.evaluate("im => im.complete && im.naturalWidth > 0")


def test_the_page_is_one_file_with_the_players_own_code(example_runs, tmp_path):
    text = player_page(example_runs[:1])
    assert player.JS in text and player.CSS in text and player.TEMPLATE in text  # the same source, not a copy
    markup = text[:text.index("<script>")]
    assert not re.search(r"""(src|href)=["'](?!data:)""", markup)  # nothing to load beside it
    assert set(re.findall(r"https?://[^\s'\"`)]+", text)) == {"http://www.w3.org/2000/svg"}  # a namespace, not a request
    assert text.count("data:image/webp;base64,") == 2 * (25 + 1)  # x_t and x0-hat: the start and 25 steps
    assert "“tropical fish” · emoji · Euler · 25 steps · seed 0 · guidance 2" in text
    size = len(text.encode())
    assert size <= 3 * 2**20, size  # 25 steps of the embedded model, both kinds: under 3 MB


def test_the_page_scrubs_plays_and_switches_views_offline(browser, example_runs, tmp_path):  # noqa: F811
    path = export_run(example_runs[0], tmp_path, ["html"])["html"]
    assert path.name == PAGE_NAME
    page, refused = open_offline(browser, path)
    label = page.locator("#player .vp-label")
    range_ = page.locator("#player .vp-range")
    src = lambda: page.locator("#player .vp-cell img").first.get_attribute("src")  # noqa: E731
    assert label.inner_text().startswith("Step 25 of 25") and loaded(page)
    last = src()
    range_.fill("1")
    assert label.inner_text().startswith("Start: the initial noise") and src() != last and loaded(page)
    start = src()
    range_.focus()
    page.keyboard.press("ArrowRight")  # arrow keys: one step
    assert label.inner_text().startswith("Step 1 of 25") and src() not in (start, last) and loaded(page)
    mark = page.locator("#player .vp-mark").first  # the convergence curve's marker follows the slider
    before = mark.get_attribute("cx")
    range_.fill("13")
    assert label.inner_text().startswith("Step 12 of 25") and mark.get_attribute("cx") != before
    assert page.locator("#player .vp-convergence polyline").count() == 1

    page.locator("#player .vp-speed").select_option("48")  # Play, at a speed; without Loop it stops at the end
    page.locator("#player .vp-loop").uncheck()
    page.locator("#player .vp-play").click()
    page.wait_for_function("document.querySelector('#player .vp-play').innerText.includes('Play')", timeout=5000)
    assert range_.input_value() == "26" and src() == last

    page.locator("#player .vp-view").select_option("both")
    srcs = page.eval_on_selector_all("#player .vp-cell img:not(.vp-overlay)", "ims => ims.map(i => i.src)")
    assert len(srcs) == 2 and srcs[0] != srcs[1]
    page.locator("#player .vp-view").select_option("x0")
    assert src() not in srcs[:1] and loaded(page)
    tabs = page.locator("#player .vp-tabs button:not([hidden])").all_inner_texts()
    assert tabs == ["Convergence", "Schedule", "Numbers"]  # the ones drawn from numbers alone
    shot(page, "page-1280")
    assert refused == []  # nothing was asked of any network
    page.close()


def test_a_comparison_page_fits_a_blog_column_in_an_iframe(browser, example_runs, tmp_path):  # noqa: F811
    path = export_grid(example_runs, tmp_path, ["html"])["html"]
    host = tmp_path / "post.html"
    host.write_text(f'<!doctype html><body style="margin:0"><article style="width:700px">'
                    f'<iframe src="{path.name}" style="width:100%;height:900px;border:0"></iframe></article>')
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    refused = []
    page.route(re.compile(r"^(?!file:).*"), lambda route: (refused.append(route.request.url), route.abort()))
    page.goto(host.as_uri())
    inner = page.frame_locator("iframe")
    inner.locator("#player .vp-cell img").first.wait_for()
    assert inner.locator("#player .vp-cell").count() == 4
    frame = page.frames[1]
    assert frame.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    widths = frame.eval_on_selector_all("#player .vp-cell img:not(.vp-overlay)", "ims => ims.map(i => i.getBoundingClientRect().width)")
    assert all(80 < w <= 350 for w in widths), widths  # four cells, two by two, inside the column
    inner.locator("#player .vp-range").fill("1")
    captions = inner.locator("#player .vp-cell figcaption").all_inner_texts()
    assert all("start (initial noise)" in c for c in captions), captions  # every sampler starts from the same noise
    shot(page, "page-iframe-700")
    assert refused == []
    page.close()


def test_the_cli_writes_the_page_for_a_run(tiny_model, tmp_path):
    from visualizer import cli

    cli.main(["run", "--prompt", "a red circle", "--model", tiny_model, "--steps", "3", "--html", "--out",
              str(tmp_path)])
    text = (tmp_path / PAGE_NAME).read_text()
    assert text.count("data:image/webp;base64,") == 2 * (3 + 1)


def test_a_page_needs_decoded_frames(tiny_model):
    run = api.run("a red circle", model=tiny_model, num_inference_steps=2, frames=())
    with pytest.raises(ValueError, match="decode them first"):
        player_page([run])
