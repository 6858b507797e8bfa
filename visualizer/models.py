"""Resolve a model reference (embedded / alias / local folder / hub id), load it once, cache it.

The family (families.py) comes from model_index.json's pipeline class, read before loading, so a model of
a family this version cannot run is refused with a message naming it.

Device is picked cuda > mps > cpu; GPUs run fp16 with the VAE kept in fp32 (fp16 VAE decodes can give NaN
frames, and SDXL's VAE asks for it: force_upcast); the CPU runs fp32.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .families import BY_KEY, BY_PIPELINE, StableDiffusion

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
EMBEDDED = "embedded"
ALIASES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
}
# model_index.json's pipeline class -> the family a person knows; those in families.BY_PIPELINE load
FAMILIES = {
    **{pipeline: family.name for pipeline, family in BY_PIPELINE.items()},
    "StableDiffusionXLImg2ImgPipeline": "Stable Diffusion XL refiner / img2img",
    "FluxPipeline": "Flux.1",
    "PixArtAlphaPipeline": "PixArt-alpha", "KandinskyV22Pipeline": "Kandinsky 2.2",
}
_NAMES = [family.name for family in BY_KEY.values()]
SUPPORTED_TEXT = f"{', '.join(_NAMES[:-1])} and {_NAMES[-1]}"
INDEX = "model_index.json"  # a diffusers model's table of contents: its pipeline class and parts
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_CACHE_SIZE = 2


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the person typed (or "embedded")
    source: str  # a local folder path or a hub id
    is_local: bool


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve(reference: str | None) -> ModelRef:
    """Turn what a person typed into a folder or hub id, or raise ModelLoadError saying why not."""
    name = (reference or EMBEDDED).strip()
    if name in ("", EMBEDDED):
        if not (EMBEDDED_MODEL_DIR / INDEX).exists():
            raise ModelLoadError(f"The embedded model is missing from {EMBEDDED_MODEL_DIR}. "
                                 "Reinstall the project or train it: python -m visualizer.demo_model.train")
        return ModelRef(EMBEDDED, str(EMBEDDED_MODEL_DIR), True)
    if name in ALIASES:
        return ModelRef(name, ALIASES[name], False)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / INDEX).exists():
            raise ModelLoadError(f"{name} is a folder but not a diffusers model (no model_index.json). "
                                 "Point to a folder saved with save_pretrained.")
        _check_family(name, _pipeline_class(name, path / INDEX))
        return ModelRef(name, str(path.resolve()), True)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return ModelRef(name, name, False)
    raise ModelLoadError(f"Model {name!r} is neither a folder on this machine, a hub id (owner/name), "
                         f"nor an alias ({', '.join([EMBEDDED, *ALIASES])}).")


def _pipeline_class(name: str, index: Path) -> str:
    """The pipeline class a model folder's model_index.json names ("" if none)."""
    try:
        return json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        raise ModelLoadError(f"{name}: its model_index.json is not readable JSON.") from None


def _check_family(name: str, pipeline: str) -> StableDiffusion:
    """The family adapter of a model whose model_index.json names `pipeline` (none named: SD 1.x / 2.x, as
    always); raise ModelLoadError naming the family when this version cannot run it."""
    if not pipeline:
        return BY_KEY["sd"]
    if pipeline not in BY_PIPELINE:
        family = FAMILIES.get(pipeline, "another")
        raise ModelLoadError(f"{name} is a {family} model ({pipeline}); this version runs {SUPPORTED_TEXT} "
                             "models only (Flux is planned).")
    return BY_PIPELINE[pipeline]


class _PipelineCache:
    """Loaded pipelines by (source, device, dtype); least recently used dropped beyond `size`."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef, device: torch.device):
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        key = (ref.source, str(device), dtype)
        with self._lock:  # one load at a time; concurrent callers wait and share the result
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pipe = _load(ref, device, dtype)
            self._items[key] = pipe
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return pipe


ALIAS_FAMILIES = {"sd3.5-medium": "sd3", "sdxl": "sdxl", "sdxl-turbo": "sdxl"}  # aliases not of SD 1.x / 2.x


def family_of_reference(reference: str | None) -> StableDiffusion:
    """The family adapter of a model reference, read without loading it or touching the network: an alias's
    known family, a local folder's model_index.json, a hub id's cached one; SD 1.x / 2.x when it cannot be
    told. Raises ModelLoadError for a reference resolve() refuses."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    ref = resolve(reference)
    if ref.name in ALIAS_FAMILIES:
        return BY_KEY[ALIAS_FAMILIES[ref.name]]
    if ref.is_local:
        return _check_family(ref.name, _pipeline_class(ref.name, Path(ref.source, INDEX)))
    try:
        index = Path(hf_hub_download(ref.source, INDEX, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return BY_KEY["sd"]
    return _check_family(ref.name, _pipeline_class(ref.name, index))


def _load(ref: ModelRef, device: torch.device, dtype: torch.dtype):
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import hf_hub_download

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # hides the safety-checker notice: this tool shows raw frames
    family = None
    try:
        index = Path(ref.source, INDEX) if ref.is_local else Path(hf_hub_download(ref.source, INDEX))
        family = _check_family(ref.name, _pipeline_class(ref.name, index))  # before fetching any weights
        pipe = family.pipeline_class().from_pretrained(
            ref.source, dtype=dtype, local_files_only=ref.is_local, **family.load_kwargs)
    except ModelLoadError:
        raise
    except Exception as error:  # hub / disk / format errors all reach the person as one message
        where = "folder" if ref.is_local else "Hugging Face Hub id"
        hint = (f"Check that it is a {family.name if family else SUPPORTED_TEXT} model in diffusers format."
                if ref.is_local else
                "Check the id and your network; offline, download it once elsewhere and pass its local folder.")
        raise ModelLoadError(f"Could not load {ref.name!r} ({where} {ref.source}): "
                             f"{type(error).__name__}: {str(error).splitlines()[0][:200]}. {hint}") from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
    family.check(pipe)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


_CACHE = _PipelineCache(_CACHE_SIZE)


def load_pipeline(reference: str | None = None, device: torch.device | None = None):
    """The diffusers pipeline for `reference` (its family's class), loaded once and cached."""
    return _CACHE.get(resolve(reference), device or pick_device())
