"""`Settings`, `Step` and `Run`: a denoising run as plain data, saved to and loaded from a folder.

A saved run folder holds `run.json` (settings, one entry per step, model facts), `tensors.safetensors`
(latents, x0-hat and noise predictions of every step) and, once decoded, `frames/xt_0001.png ...`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .samplers import DEFAULT_SAMPLER, check_sampler

MAX_STEPS = 500  # beyond ~1000 DPM++ / UniPC give NaN images; 500 is plenty to look at
MAX_PIXELS = 1024 * 1024
MAX_SEED = 2**63 - 1
FRAME_KINDS = ("xt", "x0")  # decoded latents after the step, predicted clean image
# Classifier-free guidance unless one is given. Below SD's customary 7.5: the embedded model follows
# prompts best from 2 to 5 and distorts its shapes at 7.5 (README, "How good it is").
DEFAULT_GUIDANCE = 5.0


@dataclass
class Settings:
    prompt: str  # what to draw
    negative_prompt: str = ""  # what to steer away from (the unconditional branch of CFG)
    model: str = "embedded"  # embedded, an alias, a local folder or a hub id
    sampler: str = DEFAULT_SAMPLER  # a name from samplers.SAMPLERS
    num_inference_steps: int = 25  # sampler steps (Heun / DPM2 evaluate the model twice per step)
    guidance_scale: float = DEFAULT_GUIDANCE  # classifier-free guidance; <= 1 turns CFG off
    seed: int = 0  # seeds the initial noise and any sampler noise
    width: int | None = None  # pixels; None = the model's native size
    height: int | None = None
    strength: float = 1.0  # img2img: share of the schedule run from the noised init image (1 = all of it)

    def validate(self) -> "Settings":
        """Raise ValueError with a message a person can act on; return self when all is well."""
        if not isinstance(self.prompt, str):
            raise ValueError("The prompt must be text.")
        check_sampler(self.sampler)
        self.num_inference_steps = _whole("Steps", self.num_inference_steps, 1, MAX_STEPS)
        self.seed = _whole("Seed", self.seed, 0, MAX_SEED)
        try:
            self.guidance_scale = float(self.guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"Guidance scale must be a number, got {self.guidance_scale!r}.") from None
        if not math.isfinite(self.guidance_scale) or not 0 <= self.guidance_scale <= 50:
            raise ValueError(f"Guidance scale must be a finite number from 0 to 50, got {self.guidance_scale}.")
        try:
            self.strength = float(self.strength)
        except (TypeError, ValueError):
            raise ValueError(f"Strength must be a number, got {self.strength!r}.") from None
        if not math.isfinite(self.strength) or not 0 < self.strength <= 1:
            raise ValueError(f"Strength must be above 0 and at most 1, got {self.strength}.")
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(f"Strength {self.strength} of {self.num_inference_steps} steps runs no step: "
                             f"raise the strength to at least {1 / self.num_inference_steps:.2f} or add steps.")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                value = _whole(name.capitalize(), value, 8, 4096)
                if value % 8:
                    raise ValueError(f"{name.capitalize()} must be a multiple of 8 (the VAE downsamples by 8 "
                                     f"or 4), got {value}. Try {max(8, value // 8 * 8)}.")
                setattr(self, name, value)
        if self.width and self.height and self.width * self.height > MAX_PIXELS:
            raise ValueError(f"{self.width}x{self.height} is too large: at most {MAX_PIXELS} pixels "
                             "(1024x1024) per image.")
        return self


def _whole(label: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a ValueError naming `label`."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{label} must be a whole number, got {value!r}.")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{label} must be a whole number, got {value}.")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{label} must be a whole number, got {value!r}.") from None
    if not isinstance(value, int):
        raise ValueError(f"{label} must be a whole number, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{label} must be from {low} to {high}, got {value}.")
    return value


@dataclass
class Step:
    index: int  # 1-based sampler step
    timestep: float  # UNet timestep of the step's first model evaluation
    sigma: float  # noise level of that evaluation (x = x0 + sigma * eps convention)
    noise_share: float  # sigma / sqrt(1 + sigma^2): share of the model input that is noise
    progress: float  # how far through the sampler's whole schedule this step ends (1.0 = the last step)
    evaluations: int  # UNet evaluations spent on this step (2 for Heun / DPM2)


@dataclass
class Run:
    settings: Settings
    steps: list[Step]
    tensors: dict[str, torch.Tensor]  # per step [N, C, h, w] float32 CPU: latents, xt, x0, eps, x_in (the model
    # input at the step's start)[, eps_cond, eps_uncond]; plus initial_noise [1, C, h, w]
    info: dict = field(default_factory=dict)  # model / scheduler / prompt facts for the pipeline-stages view
    frames: dict[str, list[np.ndarray]] = field(default_factory=dict)  # kind -> uint8 HxWx3 per step
    final_image: np.ndarray | None = None  # uint8 HxWx3, the decoded final latents

    def __len__(self) -> int:
        return len(self.steps)

    def save(self, folder: str | Path) -> Path:
        """Write the run (and any decoded frames) to `folder`; return it."""
        folder = Path(folder)
        (folder / "frames").mkdir(parents=True, exist_ok=True)
        doc = {"settings": asdict(self.settings), "steps": [asdict(s) for s in self.steps], "info": self.info}
        (folder / "run.json").write_text(json.dumps(doc, indent=2))
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(folder / "tensors.safetensors"))
        for kind, frames in self.frames.items():
            for i, frame in enumerate(frames, start=1):
                Image.fromarray(frame).save(folder / "frames" / f"{kind}_{i:04d}.png")
        if self.final_image is not None:
            Image.fromarray(self.final_image).save(folder / "final.png")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Run":
        """Read a run written by `save`, frames included."""
        folder = Path(folder)
        if not (folder / "run.json").exists():
            raise FileNotFoundError(f"{folder} holds no saved run (run.json is missing).")
        doc = json.loads((folder / "run.json").read_text())
        known = {f.name for f in fields(Settings)}
        settings = Settings(**{k: v for k, v in doc["settings"].items() if k in known})
        steps = [Step(**s) for s in doc["steps"]]
        tensors = load_file(str(folder / "tensors.safetensors")) if (folder / "tensors.safetensors").exists() else {}
        frames = {}
        for kind in FRAME_KINDS:
            paths = sorted((folder / "frames").glob(f"{kind}_*.png"))
            if paths:
                frames[kind] = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        final = folder / "final.png"
        final_image = np.asarray(Image.open(final).convert("RGB")) if final.exists() else None
        return cls(settings, steps, tensors, doc.get("info", {}), frames, final_image)
