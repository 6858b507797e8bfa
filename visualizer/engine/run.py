"""`Settings`, `Step` and `Run`: a denoising run as plain data, saved to and loaded from a folder.

A saved run folder holds `run.json` (format version, settings, one entry per step, `RunInfo`),
`tensors.safetensors` (latents, x0-hat and noise predictions of every step) and, once decoded,
`frames/xt_0001.png ...` (step 1 on) and `frames/xt_0000.png`, the start: the initial noise x_T decoded. Bundles written before the version field existed, or with older names of RunInfo
fields (RENAMED), still load.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..errors import SettingsError
from .samplers import DEFAULT_SAMPLER, check_sampler

RUN_FORMAT_VERSION = 2  # 1: the untyped info dict of early bundles
MAX_STEPS = 500  # beyond ~1000 DPM++ / UniPC give NaN images; 500 is plenty to look at
MAX_SIDE = 4096
MAX_PIXELS = 1024 * 1024
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0
FRAME_KINDS = ("xt", "x0")  # decoded latents after the step, predicted clean image
START = "start"  # the start frame's kind where frames are indexed by kind (decode.StreamingDecoder.frames)
START_FILE = "xt_0000.png"  # the start frame (Run.start_frame) in a run folder's frames/


@dataclass
class Settings:
    """Everything that decides a run; every default of the UI, CLI, API and tests is the one here."""
    prompt: str  # what to draw
    negative_prompt: str = ""  # what to steer away from (the unconditional branch of CFG)
    model: str = "embedded"  # embedded, an alias, a local folder or a hub id
    sampler: str = DEFAULT_SAMPLER  # a name from samplers.SAMPLERS (flow-matching models: samplers.FLOW_SAMPLERS)
    num_inference_steps: int = 25  # sampler steps (Heun / DPM2 evaluate the model twice per step)
    # classifier-free guidance; <= 1 turns CFG off. Far below SD's customary 7.5 (pass that for real SD
    # checkpoints): the emoji model draws the asked emoji at 1 to 2 and overshoots above 3 (docs/embedded-model.md)
    guidance_scale: float = 2.0
    true_cfg_scale: float = 1.0  # Flux only (where guidance_scale is an input of the model): > 1 runs true
    # classifier-free guidance with the negative prompt, as FluxPipeline's true_cfg_scale
    seed: int = 0  # seeds the initial noise and any sampler noise
    width: int | None = None  # pixels; None = the model's native size
    height: int | None = None  # pixels; None = the model's native size
    init_image: np.ndarray | None = field(default=None, repr=False, compare=False)  # img2img: uint8 HxWx3 (a PIL
    # image is accepted); None = start from pure noise
    strength: float = 0.8  # img2img only: share of the schedule run from the noised init image (1 = all of it)
    attention: bool = False  # also record each prompt token's cross-attention map at every step (image unchanged)

    def validate(self) -> "Settings":
        """Raise SettingsError with a message a person can act on; return self when all is well."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt or "", str):
            raise SettingsError("The prompt must be text.")
        self.negative_prompt = self.negative_prompt or ""
        check_sampler(self.sampler)
        if not isinstance(self.attention, bool):
            raise SettingsError(f"attention must be True or False, got {self.attention!r}.")
        self.num_inference_steps = whole_number("Steps", self.num_inference_steps, 1, MAX_STEPS)
        self.seed = whole_number("Seed", self.seed, 0, MAX_SEED)
        self.guidance_scale = _scale("Guidance scale", self.guidance_scale)
        self.true_cfg_scale = _scale("True CFG scale", self.true_cfg_scale)
        self.strength = finite_number("Strength", self.strength)
        if not 0 < self.strength <= 1:
            raise SettingsError(f"Strength must be above 0 and at most 1, got {self.strength}.")
        if self.init_image is not None:
            self.init_image = _rgb(self.init_image)
            if int(self.num_inference_steps * self.strength) < 1:
                raise SettingsError(f"Strength {self.strength} of {self.num_inference_steps} steps runs no step: "
                                    f"raise the strength to at least {1 / self.num_inference_steps:.2f} or add steps.")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            value = whole_number(name.capitalize(), value, 8, MAX_SIDE)
            if value % 8:
                raise SettingsError(f"{name.capitalize()} must be a multiple of 8 (the VAE downsamples by 8 "
                                    f"or 4), got {value}. Try {max(8, value // 8 * 8)}.")
            setattr(self, name, value)
        if self.width and self.height and self.width * self.height > MAX_PIXELS:
            raise SettingsError(f"{self.width}x{self.height} is too large: at most {MAX_PIXELS} pixels "
                                "(1024x1024) per image.")
        return self

    def to_dict(self) -> dict:
        """The settings as JSON-ready data (the init image is not included)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "init_image"}

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        known = {f.name for f in fields(cls)} - {"init_image"}
        return cls(**{k: v for k, v in data.items() if k in known})


DEFAULTS = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}  # for forms and flags


def finite_number(label: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{label} must be a number, got {value!r}.") from None
    if not math.isfinite(value):
        raise SettingsError(f"{label} must be a finite number, got {value}.")
    return value


def _scale(label: str, value) -> float:
    """A guidance scale: a number from 0 to MAX_GUIDANCE."""
    value = finite_number(label, value)
    if not 0 <= value <= MAX_GUIDANCE:
        raise SettingsError(f"{label} must be a finite number from 0 to {MAX_GUIDANCE:g}, got {value}.")
    return value


def whole_number(label: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a SettingsError naming `label`."""
    if isinstance(value, bool) or value is None:
        raise SettingsError(f"{label} must be a whole number, got {value!r}.")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise SettingsError(f"{label} must be a whole number, got {value}.")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise SettingsError(f"{label} must be a whole number, got {value!r}.") from None
    if not isinstance(value, int):
        raise SettingsError(f"{label} must be a whole number, got {value!r}.")
    if not low <= value <= high:
        raise SettingsError(f"{label} must be from {low} to {high}, got {value}.")
    return value


def _rgb(image) -> np.ndarray:
    """A PIL image or an image array -> uint8 HxWx3."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise SettingsError("The init image must be an RGB picture (uint8 height x width x 3).")
    return np.asarray(Image.fromarray(array).convert("RGB"))


@dataclass
class Step:
    index: int  # 1-based sampler step
    timestep: float  # UNet timestep of the step's first model evaluation
    sigma: float  # noise level of that evaluation: x = x0 + sigma * eps; flow runs: sigma in [0, 1] of
    # x = (1 - sigma) x0 + sigma * eps (the flow scheduler's own sigma)
    progress: float  # how far through the sampler's whole schedule this step ends (1.0 = the last step)
    evaluations: int  # model evaluations spent on this step (2 for Heun / DPM2)
    flow: bool = False  # a flow-matching run (SD 3): sigma is a flow sigma, as above

    @property
    def noise_share(self) -> float:
        """The share of the model input's variance that is noise, 1 / (1 + SNR): one definition for every family
        (for SD it is 1 - alpha_bar; two steps at equal SNR read the same, whatever their family)."""
        return 1.0 / (1.0 + self.snr)

    @property
    def snr(self) -> float:
        """Signal-to-noise ratio of the model input: 1 / sigma^2, or (1 - sigma)^2 / sigma^2 for a flow run."""
        if self.sigma == 0:
            return math.inf
        return ((1.0 - self.sigma) if self.flow else 1.0) ** 2 / self.sigma ** 2


@dataclass
class Img2ImgInfo:
    strength: float  # share of the schedule that ran
    skipped_steps: int  # schedule steps replaced by the noised init image
    start_timestep: float  # timestep of the first step that ran


RENAMED = {"unet_evaluations": "denoiser_evaluations"}  # RunInfo keys of older run.json files -> their names now


@dataclass
class RunInfo:
    """Facts about how a run was computed, for the pipeline-stages view and run.json."""
    model_source: str  # the folder or hub id that was loaded (an embedded model: its name, "emoji" or "shapes")
    device: str  # where the model ran
    dtype: str  # the model's compute dtype
    scheduler: str  # the scheduler class
    scheduler_config: dict  # its full config, as built from the model's own
    prediction_type: str  # epsilon, v_prediction or flow_prediction (a velocity)
    init_noise_sigma: float  # scale of the initial noise
    text_embedding_shape: list[int]  # the prompt embedding
    latent_shape: list[int]  # the initial noise
    image_size: list[int]  # [height, width] in pixels
    vae_scale_factor: int  # image pixels per latent pixel
    vae_scaling_factor: float  # latents are divided by it before decoding
    tokens: int  # prompt tokens, start and end included
    token_limit: int  # the tokenizer's limit
    token_strings: list[str]  # the tokens the text encoder saw
    dropped_text: str = ""  # what truncation cut from the prompt ("" = nothing)
    denoiser_evaluations: int = 0  # model calls of this sampler (UNet or transformer; older bundles: RENAMED)
    lockstep_batch: int = 1  # samplers run together in one batch
    seconds: float = 0.0  # wall time of the denoising loop
    stopped: bool = False  # ended early: fewer steps than asked, no final image
    img2img: Img2ImgInfo | None = None
    metrics: list[dict] | None = None  # per-step distances to the final image (insight.step_metrics)
    structure_step: int | None = None  # where structure appears (insight.structure_step)
    attention: dict | None = None  # with Settings.attention: {"tokens": the prompt's tokens, one per map,
    # "resolutions": the UNet resolutions of the per-resolution maps}
    family: str = "sd"  # the model family (families.py): sd (1.x / 2.x; every bundle written before SDXL), sdxl, sd3, flux
    pooled_embedding_shape: list[int] | None = None  # SDXL: the second text encoder's pooled embedding; SD 3: both
    # CLIP encoders' pooled embeddings, concatenated (pooled_projections)
    time_ids: list[float] | None = None  # SDXL size conditioning: original h, w, crop top, left, target h, w
    vae_shift_factor: float = 0.0  # then added to them (SD 3's VAE; 0 for SD 1.x / 2.x and SDXL)
    zero_negative: bool = False  # SDXL force_zeros_for_empty_prompt: no negative prompt -> an all-zero uncond branch
    guidance: str = "cfg"  # what guidance_scale meant (families.guidance_kind): cfg, distilled (an input of the
    # model: LCM, Flux.1-dev) or none (Flux.1-schnell)

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_text)

    @classmethod
    def from_dict(cls, data: dict) -> "RunInfo":
        """From run.json's info (either format version, and old keys: RENAMED); unknown keys are ignored."""
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for old, new in RENAMED.items():
            if old in data and new not in values:
                values[new] = data[old]
        for name in ("model_source", "device", "dtype", "scheduler", "prediction_type"):
            values.setdefault(name, "?")
        for name in ("scheduler_config",):
            values.setdefault(name, {})
        for name in ("text_embedding_shape", "latent_shape", "image_size", "token_strings"):
            values.setdefault(name, [])
        for name in ("init_noise_sigma", "vae_scaling_factor"):
            values.setdefault(name, 1.0)
        for name in ("vae_scale_factor", "tokens", "token_limit"):
            values.setdefault(name, 0)
        if isinstance(values.get("img2img"), dict):
            values["img2img"] = Img2ImgInfo(**values["img2img"])
        return cls(**values)


@dataclass
class Run:
    settings: Settings
    steps: list[Step]
    tensors: dict[str, torch.Tensor]  # per step [N, C, h, w] float32 CPU: latents, xt, x0, eps, x_in (the model
    # input at the step's start)[, eps_cond, eps_uncond[, x0_cond, x0_uncond (flow runs)]]; plus initial_noise
    # [1, C, h, w][, init_latents]
    info: RunInfo
    frames: dict[str, list[np.ndarray]] = field(default_factory=dict)  # kind -> uint8 HxWx3 per step
    final_image: np.ndarray | None = None  # uint8 HxWx3, the decoded final latents
    start_frame: np.ndarray | None = None  # uint8 HxWx3, the start before step 1: step 1's model input decoded (the
    # initial noise x_T; img2img: the noised init image). Position 0 of the player and the exports, not a step

    def __len__(self) -> int:
        return len(self.steps)

    def save(self, folder: str | Path) -> Path:
        """Write the run (and any decoded frames) to `folder`; return it."""
        folder = Path(folder)
        (folder / "frames").mkdir(parents=True, exist_ok=True)
        doc = {"version": RUN_FORMAT_VERSION, "settings": self.settings.to_dict(),
               "steps": [{**asdict(s), "noise_share": s.noise_share} for s in self.steps], "info": asdict(self.info)}
        (folder / "run.json").write_text(json.dumps(doc, indent=2))
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(folder / "tensors.safetensors"))
        for kind, frames in self.frames.items():
            for i, frame in enumerate(frames, start=1):
                Image.fromarray(frame).save(folder / "frames" / f"{kind}_{i:04d}.png")
        if self.start_frame is not None:
            Image.fromarray(self.start_frame).save(folder / "frames" / START_FILE)
        if self.final_image is not None:
            Image.fromarray(self.final_image).save(folder / "final.png")
        if self.settings.init_image is not None:
            Image.fromarray(self.settings.init_image).save(folder / "init.png")
        if "attention" in self.tensors:  # [steps, tokens, h, w] on the latent grid
            np.save(folder / "attention.npy", self.tensors["attention"].numpy().astype(np.float16))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Run":
        """Read a run written by `save`, frames included."""
        folder = Path(folder)
        if not (folder / "run.json").exists():
            raise FileNotFoundError(f"{folder} holds no saved run (run.json is missing).")
        doc = json.loads((folder / "run.json").read_text())
        settings = Settings.from_dict(doc["settings"])
        if (folder / "init.png").exists():
            settings.init_image = np.asarray(Image.open(folder / "init.png").convert("RGB"))
        step_fields = {f.name for f in fields(Step)}
        steps = [Step(**{k: v for k, v in s.items() if k in step_fields}) for s in doc["steps"]]
        tensors = load_file(str(folder / "tensors.safetensors")) if (folder / "tensors.safetensors").exists() else {}
        frames = {}
        for kind in FRAME_KINDS:
            paths = [p for p in sorted((folder / "frames").glob(f"{kind}_*.png")) if p.name != START_FILE]
            if paths:
                frames[kind] = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        final = folder / "final.png"
        final_image = np.asarray(Image.open(final).convert("RGB")) if final.exists() else None
        start = folder / "frames" / START_FILE
        start_frame = np.asarray(Image.open(start).convert("RGB")) if start.exists() else None
        return cls(settings, steps, tensors, RunInfo.from_dict(doc.get("info", {})), frames, final_image, start_frame)
