"""The player: an HTML template whose JavaScript holds every frame URL of the runs it shows, in the app (a
`gr.HTML`) and in a one-file page (page.py): the same three files, one source.

Its HTML, CSS and JavaScript are the static files beside this module (static/player.*), read once at import;
player.js is the body of `gr.HTML`'s `js_on_load` (it sees `element`, `props` and `watch`); page.py calls it the
same way.

The app sends frame URLs (files written once, see app/frame_files.py; a page: data URIs) and per-step numbers as props; the
page preloads each frame as it arrives, and the slider, arrow keys, Home/End and Play swap frames with no
request to the server. The insight plots are drawn once per update in SVG and only their marker moves
with the slider. One cell is a single run; several cells are a sampler comparison on one shared slider,
each cell showing the step at the same progress through its own schedule.

Props (all plain JSON; `PlayerProps` and `PlayerCell` below are their one type):
- `cells`: one per run: {label, total (steps it will have), steps: [{index, t, sigma, share, evals}],
  frames: {kind: [url or null per step]}, curve: [1 - SSIM per step] or null, structure: step or null}
- `views`: [[kind, label], ...] the View menu offers (kinds missing from a cell are skipped)
- `live`: a run is computing; `progress`: 0..1 of it; `status`: one line; `run`: an id that changes per run
- `view`: a view to switch to when it changes (a stopped run shows x0-hat, its best guess so far)
- a cell may also hold `start: true` (its first position is the initial noise, before step 1, as index 0 of
  `steps`) and `trace`: the URL of {size, points: [[[x, y] per point] per position]} in frame pixels; clicking
  a frame then traces the nearest point's path in every cell (2D runs: toy/render.py, trace)
- `tabs`: the insight tabs to offer (default or []: all); `tab`, `at`: the tab and position (0: the end) to open on
  for a new `run`
- a cell's frame is outlined, and its caption says so, at its `structure` step (where structure appears)
- `panel`: the elem_id of a server-side panel that follows the step the person settles on (or null)
- `value`: that step, sent to Python only while the panel is on screen: scrubbing makes no requests
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
TEMPLATE = (STATIC / "player.html").read_text(encoding="utf-8")
CSS = (STATIC / "player.css").read_text(encoding="utf-8")
JS = (STATIC / "player.js").read_text(encoding="utf-8")


VIEWS = {  # the View menu: label -> key (views.frame draws each, the app's player and page.py offer them)
    "x_t (noisy latents, decoded)": "xt",
    "x0-hat (predicted final image)": "x0",
    "both side by side": "both",
    "latent channels": "latents",
    "noise prediction": "noise",
    "forward noising q(x_t | x_0) of an image": "forward",
    "image space: the run's path on a 2D map of latents": "map",
}


@dataclass
class PlayerCell:
    """One run on the player."""
    label: str  # the sampler (or run) name on the cell
    total: int  # positions the run will have (steps, plus the start when `start`)
    steps: list[dict]  # step_props of each position so far
    frames: dict[str, list[str | None]]  # view kind -> a URL per position (None: not written yet)
    curve: list[float] | None = None  # 1 - SSIM of x0-hat to the final image, per step (finished runs)
    structure: int | None = None  # the step where structure appears
    words: dict | None = None  # word maps: {"tokens": [...], "shares": [...]} (see frame_files.Cell)
    start: bool = False  # position 0 is the initial noise, before step 1
    trace: str | None = None  # URL of the points' paths (2D runs): clicking a frame traces one
    prediction: str | None = None  # what the model outputs: epsilon, v_prediction or flow_prediction (None: unknown)

    def with_start(self, first_step, starts: dict[str, str | None]) -> "PlayerCell":
        """This cell (one position per step) with the start as position 0: `starts` is each view kind's frame there
        (missing: none); `first_step` the run's step 1 (None: not finished yet). A word's map over all steps (kinds
        ending "-all") is one image and stays as it is."""
        frames = {kind: items if kind.endswith("-all") else [starts.get(kind), *items]
                  for kind, items in self.frames.items()}
        steps = ([start_props(first_step)] if first_step is not None else []) + self.steps
        return replace(self, total=self.total + 1, steps=steps, frames=frames, start=True)


@dataclass
class PlayerProps:
    """Everything the player shows; `as_props()` gives the keywords of gr.HTML / gr.update."""
    cells: list[PlayerCell] = field(default_factory=list)
    views: list[tuple[str, str]] = field(default_factory=list)  # (kind, label) the View menu offers
    live: bool = False  # a run is computing
    progress: float = 1.0  # 0..1 of the run
    status: str = ""  # one line under the player
    run: str = ""  # an id that changes per run
    view: str | None = None  # a view to switch to when it changes
    tabs: list[str] | None = None  # the insight tabs to offer (None: all)
    tab: str | None = None  # an insight tab to open when `run` changes (None: as it is)
    at: int | None = None  # a position (1-based) to open on when `run` changes (None: follow the run to its end)

    def as_props(self) -> dict:
        props = asdict(self)
        props["views"] = [list(v) for v in self.views]
        for name in ("tabs", "tab", "at"):
            if props[name] is None:
                del props[name]
        return props


def start_props(first) -> dict:
    """The player's position 0 (a cell with `start`): the initial noise, at the noise level of step 1's input."""
    return {**step_props(first), "index": 0, "evals": 0}


def step_props(step) -> dict:
    """A run.Step as the player's per-step numbers."""
    return {"index": step.index, "t": step.timestep, "sigma": step.sigma, "share": step.noise_share,
            "snr": step.snr if math.isfinite(step.snr) else None, "evals": step.evaluations}
