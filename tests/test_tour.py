"""The guided tour (app/tour.py, app/learn.py): eight chapters whose numbers are their runs' own."""
import dataclasses
import re

import pytest

from visualizer.app.handlers import App
from visualizer.app.runs import AppConfig
from visualizer.app.tour import GUIDANCE_SCALES, TITLES, TOUR_STEPS, chapters


@pytest.fixture(scope="module")
def tour(tiny_model, tmp_path_factory):
    app = App(AppConfig(output_dir=tmp_path_factory.mktemp("tour"), default_model=tiny_model, example_dir=None))
    runs = app.learn_tab.compute("a red circle", tiny_model)
    return app, runs


def test_eight_chapters_each_with_its_own_visual(tour, tiny_model):
    app, runs = tour
    pages = chapters(runs)
    assert [p.key for p in pages] == list(TITLES) and len(pages) == 8
    shown = [app.learn_tab.chapter("a red circle", tiny_model, k) for k in range(8)]
    assert [o.key for o in shown] == list(TITLES) and all(o.text.startswith(f"### {TITLES[o.key]}") for o in shown)
    assert all(f"(?chapter={o.key})" in o.text for o in shown)  # a deep link per chapter
    looks = [(o.player["run"], o.player["view"], tuple(c["label"] for c in o.player["cells"])) for o in shown]
    assert len(set(looks)) == 8  # each chapter changes what the player shows
    assert shown[1].player["cells"][0]["trace"]  # chapter 2 is the 2D playground's run
    assert [c["label"] for c in shown[4].player["cells"]] == [f"guidance {g:g}" for g in GUIDANCE_SCALES]
    assert len(shown[6].player["cells"]) == 4 and shown[2].player["at"] == 1  # denoising opens on the start
    assert all(url for url in shown[0].player["cells"][0]["frames"]["forward"][1:])


def test_the_numbers_are_the_runs_own(tour):
    _, runs = tour
    run, first = runs.run, runs.run.steps[0]
    h, w = run.info.image_size
    c, lh, lw = run.info.latent_shape[1:]
    text = {p.key: p.text for p in chapters(runs)}
    assert f"{h}×{w} pixels × 3 colours: {h * w * 3:,} numbers" in text["noise"] and len(run) == TOUR_STEPS
    assert f"noise share {first.noise_share:.1%} at timestep t = {first.timestep:.0f}" in text["denoising"]
    assert f"{run.info.denoiser_evaluations} model evaluations" in text["denoising"]
    assert f"{c}×{lh}×{lw} latent ({c * lh * lw:,} numbers, {h * w * 3 / (c * lh * lw):g}× fewer)" in text["latents"]
    assert "786,432" in text["latents"] and "16,384), 48× fewer" in text["latents"]  # SD 1.5, as the comparison
    if run.info.structure_step:
        assert "where it has halved" in text["click"] and f"at step {run.info.structure_step}," in text["click"]
    for sampler in runs.samplers:
        assert f"{sampler.settings.sampler}: " in text["samplers"]
        assert f"{sampler.info.denoiser_evaluations} evaluations" in text["samplers"]
    ratio = re.search(r"falls to (\d+)% of the noise's", text["way-back"]).group(1)
    from visualizer.toy import model as toy

    assert int(ratio) == round(100 * toy.distance_ratio(runs.toy))


def test_other_runs_give_other_text(tour):
    """Nothing is written in: change a run's facts and the paragraph follows."""
    _, runs = tour
    before = {p.key: p.text for p in chapters(runs)}
    step = (runs.run.info.structure_step or 1) % 20 + 2  # another step than the run's
    info = dataclasses.replace(runs.run.info, structure_step=step, denoiser_evaluations=99)
    moved = dataclasses.replace(runs, run=dataclasses.replace(runs.run, info=info))
    after = {p.key: p.text for p in chapters(moved)}
    assert f"at step {step}, where it has halved" in after["click"] and after["click"] != before["click"]
    assert "99 model evaluations" in after["denoising"]
    wider = dataclasses.replace(runs.run.info, latent_shape=[1, 4, 16, 16])
    text = chapters(dataclasses.replace(runs, run=dataclasses.replace(runs.run, info=wider)))[5].text
    assert "4×16×16 latent (1,024 numbers" in text


def test_chapters_are_found_by_index_title_or_key_and_next_stays_inside(tour, tiny_model):
    app, _ = tour
    tab = app.learn_tab
    assert tab.chapter("a red circle", tiny_model, "samplers").key == "samplers"
    assert tab.chapter("a red circle", tiny_model, TITLES["latents"]).key == "latents"
    assert [o.key for o in tab.step("a red circle", tiny_model, "image-space", 1)][-1] == "image-space"
    assert [o.key for o in tab.step("a red circle", tiny_model, "noise", -1)][-1] == "noise"
    assert [o.key for o in tab.step("a red circle", tiny_model, "noise", 1)][-1] == "way-back"


def test_a_tour_is_built_once_per_prompt_and_model(tour, tiny_model):
    app, _ = tour
    tab = app.learn_tab
    first = tab.build("a red circle", tiny_model)
    assert tab.build(" a red circle ", tiny_model) is first
    shown = list(tab.show("a red circle", tiny_model, 0))
    assert len(shown) == 1  # kept: no "building" line before the chapter
    with pytest.raises(Exception, match="Type a prompt"):
        tab.build("  ", tiny_model)
