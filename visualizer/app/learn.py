"""The Learn tab's handlers: the guided tour (tour.py) built on a prompt and a model, then shown a chapter at a time,
its text beside the player with the runs, view, tab and position that chapter talks about.

A tour is built once per (prompt, model) and kept (TOURS_KEPT of them), so the tour of the page's default prompt
costs its first visitor only. Chapters are addressed by index in the page and by key in the URL (?chapter=<key>).
"""
from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, NamedTuple

import gradio as gr

from .. import api
from ..engine.models import family_of_reference
from ..engine.run import Run, Settings
from ..engine.samplers import DEFAULT_SAMPLER, valid_for
from ..errors import VisualizerError, user_message
from ..toy import model as toy
from .frame_files import RunFiles
from .playground import Playground
from .runs import Runs, UserError, player_props
from .store import RunStore
from .tour import GUIDANCE_SCALES, TITLES, TOUR_SAMPLERS, TOUR_STEPS, Chapter, TourRuns, chapters

TOURS_KEPT = 4


class LearnOutputs(NamedTuple):
    """What showing a chapter sets, by name (the layout wires the components in this order)."""
    player: dict  # gr.update of the tour player's props
    text: str  # the chapter's title and paragraph (markdown)
    chapter: str  # the chapter menu's value (its title)
    key: str  # the chapter's key, for the page's URL (?chapter=<key>)


@dataclass
class BuiltTour:
    tour_id: str
    chapters: list[Chapter]
    props: dict[str, dict]  # visual ("run", "toy", "guided", "samplers") -> the player's props


class LearnTab:
    def __init__(self, runs: Runs, playground: Playground):
        self.runs, self.playground = runs, playground
        self._tours: OrderedDict[tuple[str, str], BuiltTour] = OrderedDict()
        self._lock = threading.Lock()  # one build at a time: a second visitor waits for the first's tour

    # ---- building ---------------------------------------------------------------------------
    def _finished(self, settings: Settings, samplers: list[str] | None = None) -> list[Run]:
        """The finished runs of one generation on the app's engine (every frame, metrics)."""
        for item in self.runs.engine.stream(settings, samplers):
            if isinstance(item, (Run, list)):
                return item if isinstance(item, list) else [item]
        raise UserError("The tour's run ended without a result.")

    def compute(self, prompt: str, model: str) -> TourRuns:
        """Every run a tour shows, on `model` (samplers that fit its family)."""
        fitting = valid_for(family_of_reference(model).sampler_kind)
        sampler = DEFAULT_SAMPLER if DEFAULT_SAMPLER in fitting else fitting[0]
        settings = Settings(prompt=prompt, model=model, sampler=sampler, num_inference_steps=TOUR_STEPS,
                            attention=True).validate()
        run = self._finished(settings)[0]
        run.frames["forward"] = self.runs.engine.forward_noising(run, None)
        guided = [self._finished(replace(settings, guidance_scale=g))[0] for g in GUIDANCE_SCALES]
        compared = ([s for s in TOUR_SAMPLERS if s in fitting] + [s for s in fitting if s not in TOUR_SAMPLERS])[:4]
        samplers = self._finished(replace(settings, attention=False), compared)
        return TourRuns(run, guided, samplers, api.on_engine(toy.sample, [toy.ToySettings()])[0])

    def build(self, prompt: str | None, model: str | None) -> BuiltTour:
        """The tour of `prompt` on `model` (the app's default where empty), built now or kept from before."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("Type a prompt for the tour.")
        model = self.runs.check_model(model)
        with self._lock:
            if (prompt, model) in self._tours:
                self._tours.move_to_end((prompt, model))
                return self._tours[prompt, model]
            try:
                runs = self.compute(prompt, model)
            except VisualizerError as error:
                raise UserError(user_message(error) or str(error)) from None
            built = self._files(runs)
            self._tours[prompt, model] = built
            while len(self._tours) > TOURS_KEPT:
                shutil.rmtree(self._folder(self._tours.popitem(last=False)[1].tour_id), ignore_errors=True)
            return built

    def _folder(self, tour_id: str) -> Path:
        return self.runs.config.output_dir / "tour" / tour_id

    def _files(self, runs: TourRuns) -> BuiltTour:
        tour_id = RunStore.new_id()
        folder = self._folder(tour_id)
        main = RunFiles.of_runs(folder / "run", [runs.run])
        main.add_view(0, "forward", runs.run.frames["forward"])
        guided = RunFiles.of_runs(folder / "guided", runs.guided)
        for cell, scale in zip(guided.cells, GUIDANCE_SCALES):
            cell.label = f"guidance {scale:g}"
        samplers = RunFiles.of_runs(folder / "samplers", runs.samplers)
        props = {"run": player_props(main, tour_id), "guided": player_props(guided, tour_id),
                 "samplers": player_props(samplers, tour_id), "toy": self.playground.props([runs.toy], folder / "toy")}
        return BuiltTour(tour_id, chapters(runs), props)

    # ---- showing ----------------------------------------------------------------------------
    def show(self, prompt, model, chapter) -> Iterator[LearnOutputs]:
        """The page's handler: `chapter`, after a line saying the tour is being built where it is not yet."""
        if (str(prompt or "").strip(), self.runs.check_model(model)) not in self._tours:
            yield LearnOutputs(gr.update(status="Building the tour: a few runs of the model (this prompt's first "
                                                "visit only)…", live=True, progress=0.0),
                               "*Building the tour…*", gr.skip(), gr.skip())
        yield self.chapter(prompt, model, chapter)

    def chapter(self, prompt, model, chapter) -> LearnOutputs:
        """Chapter `chapter` (an index from 0, a title or a key) of the tour of `prompt` on `model`."""
        built = self.build(prompt, model)
        index = _index(chapter)
        page = built.chapters[index]
        # every key the player keeps between updates is set: a None would be left out, keeping the last chapter's
        props = {"tabs": [], **built.props[page.visual], "view": page.view, "tab": page.tab, "at": page.at or 0,
                 "run": f"{built.tour_id}-{page.key}", "status": f"Chapter {index + 1} of {len(built.chapters)}"}
        text = f"### {page.title}\n\n{page.text}\n\n[Link to this chapter](?chapter={page.key})"
        return LearnOutputs(gr.update(**props), text, page.title, page.key)

    def step(self, prompt, model, chapter, delta: int) -> Iterator[LearnOutputs]:
        """The chapter `delta` after (or before) `chapter`, staying within the tour."""
        yield from self.show(prompt, model, max(0, min(len(TITLES) - 1, _index(chapter) + delta)))


def _index(chapter) -> int:
    """A chapter's index from an index, a title or a key (anything else: the first)."""
    titles, keys = list(TITLES.values()), list(TITLES)
    if isinstance(chapter, int) and 0 <= chapter < len(titles):
        return chapter
    for names in (titles, keys):
        if chapter in names:
            return names.index(chapter)
    return 0
