"""A diffusion you can watch whole: 2D points, a tiny MLP denoiser, the image models' samplers and loop.

Each pattern (a ring, a spiral, three labelled shapes) has its own small denoiser, trained by
`python -m visualizer.toy.train` in about a minute and shipped in assets/toy/. Sampling uses the same
sampler registry, the same `SamplerLoop` capture and the same classifier-free guidance formula as the
image models: the "image" is one tensor of shape [1, points, 2], so every scheduler works on it unchanged.

Points are shown in the model-input (variance-preserving) scale, like the image views' x_t: the initial
noise is a unit Gaussian cloud and the last step lands on the pattern.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..engine.denoise import SamplerLoop, guide, predictions
from ..errors import SettingsError
from ..engine.run import MAX_SEED, Step, finite_number, whole_number
from ..engine.samplers import check_sampler, make_scheduler

TOY_DIR = Path(__file__).resolve().parents[2] / "assets" / "toy"
MAX_POINTS = 8192
MAX_TOY_STEPS = 200
FIELD_GRID = 17  # arrows per side of the vector-field grid
VIEW_RADIUS = 3.2  # the plots show [-VIEW_RADIUS, VIEW_RADIUS]^2
# the image models' schedule (SD 1.x's scaled-linear betas), with epsilon prediction
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                    "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


# ---- patterns ---------------------------------------------------------------------------------
def _ring(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = 1.8 + 0.04 * rng.standard_normal(n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1), np.zeros(n, int)


def _spiral(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = np.sqrt(rng.uniform(0, 1, n))  # uniform along the arc, roughly
    angle, radius = 0.5 + 4.5 * np.pi * s, 0.3 + 1.9 * s
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    return points + 0.03 * rng.standard_normal((n, 2)), np.zeros(n, int)


def _outline(shape: str, t: np.ndarray) -> np.ndarray:
    """Points on the outline of a unit-size `shape` at positions t in [0, 1)."""
    if shape == "circle":
        return np.stack([np.cos(2 * np.pi * t), np.sin(2 * np.pi * t)], 1)
    corners = {"square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
               "triangle": [(0, 1.15), (-1.05, -0.75), (1.05, -0.75)]}[shape]
    corners = np.array(corners + corners[:1], float) * (0.85 if shape == "square" else 1.0)
    side = np.minimum((t * (len(corners) - 1)).astype(int), len(corners) - 2)
    frac = (t * (len(corners) - 1) - side)[:, None]
    return corners[side] * (1 - frac) + corners[side + 1] * frac


SHAPES = {"circle": (-1.45, -1.0), "square": (1.45, -1.0), "triangle": (0.0, 1.45)}  # label -> centre


def _shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(SHAPES), n)
    points = np.zeros((n, 2))
    for k, (shape, centre) in enumerate(SHAPES.items()):
        mine = labels == k
        points[mine] = 0.7 * _outline(shape, rng.uniform(0, 1, mine.sum())) + centre
    return points + 0.03 * rng.standard_normal((n, 2)), labels


PATTERNS = {"ring": (_ring, ()), "spiral": (_spiral, ()), "shapes": (_shapes, tuple(SHAPES))}  # name -> (sampler, labels)


def check_pattern(name: str) -> str:
    if name not in PATTERNS:
        raise SettingsError(f"Unknown pattern {name!r}. Patterns: {', '.join(PATTERNS)}.")
    return name


def sample_pattern(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points of pattern `name` ([n, 2] float32) and their cluster labels ([n] int; all 0 without labels)."""
    points, labels = PATTERNS[check_pattern(name)][0](n, np.random.default_rng(seed))
    return points.astype(np.float32), labels


REFERENCE_POINTS = 4000  # points of a pattern that distances to it and clusters on it are measured against


def reference_pattern(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed sample of pattern `name` (and its labels) that runs are measured against."""
    return sample_pattern(name, REFERENCE_POINTS, seed=1)


def nearest(points: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `points` [n, 2]: the distance to the nearest of `reference` [m, 2], and its index."""
    d = np.linalg.norm(points[:, None, :] - reference[None, :, :], axis=-1)
    index = d.argmin(1)
    return d[np.arange(len(points)), index], index


# ---- the denoiser -----------------------------------------------------------------------------
def sinusoidal(values: torch.Tensor, size: int, scale: float) -> torch.Tensor:
    """[n] -> [n, size] sin/cos features of values * scale at geometric frequencies 1 .. 1/10000."""
    half = size // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = values.float()[:, None] * scale * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], 1)


class Denoiser(nn.Module):
    """eps-hat(x_t, t, label): an MLP on sinusoidal features of the point's coordinates (plain MLPs learn
    thin shapes slowly: spectral bias) and of the timestep, plus a label embedding (index `labels` = no
    label, the unconditional branch of classifier-free guidance)."""

    def __init__(self, labels: int = 0, hidden: int = 128, layers: int = 3, embed: int = 32):
        super().__init__()
        self.labels, self.embed = labels, embed
        self.label_embedding = nn.Embedding(labels + 1, embed)
        blocks, width = [], 4 * embed
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.net = nn.Sequential(*blocks, nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        features = [sinusoidal(x[:, 0], self.embed, 25.0), sinusoidal(x[:, 1], self.embed, 25.0),
                    sinusoidal(t, self.embed, 1.0), self.label_embedding(label)]
        return self.net(torch.cat(features, 1))


@lru_cache(maxsize=None)
def load_denoiser(pattern: str, folder: Path = TOY_DIR) -> Denoiser:
    """The trained denoiser of `pattern` from `folder` (assets/toy by default)."""
    path = Path(folder) / f"{check_pattern(pattern)}.safetensors"
    if not path.is_file():
        raise SettingsError(f"No trained model for pattern {pattern!r} in {folder}: run "
                            "`python -m visualizer.toy.train` to train the 2D models (about a minute).")
    config = json.loads((Path(folder) / f"{pattern}.json").read_text())
    model = Denoiser(**config["model"])
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


# ---- sampling ---------------------------------------------------------------------------------
@dataclass
class ToySettings:
    """Everything that decides a 2D run."""
    pattern: str = "spiral"  # a key of PATTERNS
    sampler: str = "Euler"  # a name from samplers.SAMPLERS
    num_inference_steps: int = 40  # sampler steps
    seed: int = 0  # seeds the starting points and any sampler noise
    points: int = 1024  # how many points flow
    label: str | None = None  # a cluster to ask for (patterns with labels); None = any
    guidance_scale: float = 3.0  # classifier-free guidance toward `label`; <= 1 turns CFG off

    def validate(self) -> "ToySettings":
        check_pattern(self.pattern)
        check_sampler(self.sampler)
        self.num_inference_steps = whole_number("Steps", self.num_inference_steps, 1, MAX_TOY_STEPS)
        self.seed = whole_number("Seed", self.seed, 0, MAX_SEED)
        self.points = whole_number("Points", self.points, 1, MAX_POINTS)
        self.guidance_scale = finite_number("Guidance scale", self.guidance_scale)
        if not 0 <= self.guidance_scale <= 50:
            raise SettingsError(f"Guidance scale must be from 0 to 50, got {self.guidance_scale}.")
        labels = PATTERNS[self.pattern][1]
        if self.label in ("", "any"):
            self.label = None
        if self.label is not None and self.label not in labels:
            raise SettingsError(f"Pattern {self.pattern!r} has " + (f"the clusters {', '.join(labels)}" if labels else
                                "no labelled clusters") + f"; got label {self.label!r}.")
        return self

    @property
    def label_index(self) -> int | None:
        return None if self.label is None else PATTERNS[self.pattern][1].index(self.label)


TOY_DEFAULTS = {f.name: f.default for f in fields(ToySettings)}  # for the playground's form and the CLI


@dataclass
class ToyRun:
    """A 2D run: every point after every step, the model's x0-hat and vector field, as plain arrays."""
    settings: ToySettings
    steps: list[Step]
    points: np.ndarray  # [steps + 1, n, 2]: the initial noise, then the points after each step (VP scale)
    x0: np.ndarray  # [steps, n, 2]: x0-hat of each step (where the model expects each point to end)
    grid: np.ndarray  # [g * g, 2]: where the field's arrows start
    field: np.ndarray  # [steps + 1, g * g, 2]: x0-hat of each grid point at the noise level of points[k]
    scheduler: str = ""
    evaluations: int = 0
    pattern: np.ndarray = field(default=None, repr=False)  # [m, 2] points of the pattern itself

    def __len__(self) -> int:
        return len(self.steps)

    def save(self, folder: Path) -> Path:
        """run.json (settings, steps), points.npy, x0.npy, field.npy, grid.npy and pattern.npy in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("points", "x0", "field", "grid", "pattern"):
            np.save(folder / f"{name}.npy", getattr(self, name).astype(np.float32))
        (folder / "run.json").write_text(json.dumps({
            "kind": "toy", "settings": asdict(self.settings), "scheduler": self.scheduler,
            "evaluations": self.evaluations, "steps": [asdict(s) for s in self.steps],
            "arrays": {"points.npy": "[steps + 1, points, 2]: the initial noise, then the points after each step",
                       "x0.npy": "[steps, points, 2]: x0-hat of each step",
                       "field.npy": "[steps + 1, grid, 2]: x0-hat of each grid point at the points' noise level",
                       "pattern.npy": "[m, 2]: points sampled from the pattern itself"}}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path) -> "ToyRun":
        folder = Path(folder)
        meta = json.loads((folder / "run.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy") for name in ("points", "x0", "field", "grid", "pattern")}
        known = {f.name for f in fields(Step)}
        return cls(settings=ToySettings(**meta["settings"]), scheduler=meta["scheduler"],
                   evaluations=meta["evaluations"], steps=[Step(**{k: v for k, v in s.items() if k in known})
                                                            for s in meta["steps"]], **arrays)


def field_grid(size: int = FIELD_GRID, radius: float = VIEW_RADIUS * 0.9) -> np.ndarray:
    axis = np.linspace(-radius, radius, size, dtype=np.float32)
    return np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)


def _evaluate(model: Denoiser, x: torch.Tensor, t: torch.Tensor, label: int | None, scale: float) -> tuple:
    """(guided, cond, uncond) noise predictions for rows x at timestep t (cond/uncond None without CFG)."""
    none = torch.full((len(x),), model.labels)
    if label is None or scale <= 1:
        return model(x, t.expand(len(x)), none if label is None else torch.full((len(x),), label)), None, None
    out = model(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([none, torch.full((len(x),), label)]))
    uncond, cond = out.chunk(2)
    return guide(uncond, cond, scale), cond, uncond


@torch.inference_mode()
def sample(settings_list: list[ToySettings], folder: Path = TOY_DIR) -> list[ToyRun]:
    """Run several samplers on the same starting points (same pattern, seed, points, label); one ToyRun each."""
    if not settings_list:
        raise SettingsError("Pick at least one sampler.")
    for s in settings_list:
        s.validate()
    first = settings_list[0]
    for s in settings_list:
        if (s.pattern, s.seed, s.points, s.label) != (first.pattern, first.seed, first.points, first.label):
            raise SettingsError("2D runs compared side by side must share pattern, seed, points and label.")
    model = load_denoiser(first.pattern, folder)
    runs = []
    for s in settings_list:
        scheduler = make_scheduler(s.sampler, SCHEDULER_CONFIG)
        scheduler.set_timesteps(s.num_inference_steps)
        generator = torch.Generator().manual_seed(s.seed)
        noise = torch.randn((1, s.points, 2), generator=generator)
        loop = SamplerLoop(settings=s, scheduler=scheduler, latents=noise * scheduler.init_noise_sigma,
                           generator=generator,
                           cfg_scale=s.guidance_scale if s.label is not None and s.guidance_scale > 1 else None)
        label = s.label_index
        while not loop.done:
            x_in, t = loop.model_input()
            guided, cond, uncond = _evaluate(model, x_in[0], t, label, s.guidance_scale)
            loop.advance(guided[None], None if cond is None else cond[None], None if uncond is None else uncond[None])
        points = torch.cat([noise, *loop.captured["xt"]]).numpy()
        x0 = torch.cat(loop.captured["x0"]).numpy()
        runs.append(ToyRun(settings=s, steps=loop.steps, points=points, x0=x0, grid=field_grid(),
                           field=_field(model, loop, label, s.guidance_scale), scheduler=type(scheduler).__name__,
                           evaluations=loop.evaluations, pattern=reference_pattern(s.pattern)[0]))
    return runs


def _field(model: Denoiser, loop: SamplerLoop, label: int | None, scale: float) -> np.ndarray:
    """x0-hat of every grid point at the noise level the points have before each step (the last step's for the
    final points): the arrows that will move them next."""
    grid = torch.from_numpy(field_grid())
    out = []
    for k in range(len(loop.steps) + 1):
        step = loop.steps[min(k, len(loop.steps) - 1)]
        eps = _evaluate(model, grid, torch.tensor(step.timestep), label, scale)[0]
        out.append(predictions(grid, eps, step.sigma, "epsilon")[0])
    return torch.stack(out).numpy()


def distance_ratio(run: ToyRun) -> float:
    """Median distance of the final points to the pattern, over that of the initial noise."""
    return float(np.median(nearest(run.points[-1], run.pattern)[0]) / np.median(nearest(run.points[0], run.pattern)[0]))


def final_clusters(run: ToyRun) -> np.ndarray:
    """[n] the cluster label (an index into the pattern's labels; 0 without labels) each point ends nearest."""
    pattern, labels = reference_pattern(run.settings.pattern)
    return labels[nearest(run.points[-1], pattern)[1]]


def run(settings: ToySettings | None = None, **changes) -> ToyRun:
    """One 2D run: `run(pattern="ring", sampler="DDIM")`."""
    settings = settings or ToySettings(**changes)
    return sample([settings])[0]
