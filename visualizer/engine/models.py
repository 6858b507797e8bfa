"""Resolve a model reference (embedded / alias / local folder / single-file checkpoint / hub id), load it once,
cache it.

The family (families.py) comes from model_index.json's pipeline class, read before loading, so a model of
a family this version cannot run is refused with a message naming it. A single-file checkpoint (.safetensors /
.ckpt / .pt, as A1111 and ComfyUI keep them) tells its family by its tensor names, and loads through its family's
`from_single_file` with a diffusers config folder: one given with `LoadOptions.configs` (--model-config), else
diffusers' default model for its kind from the Hugging Face cache (fetched, configs only, when online).

Device is picked cuda > mps > cpu. `LoadOptions` (set once per process by app.py or the CLI: a deployment
choice, not a per-run setting) picks the dtype, auto = the family's GPU dtype on a GPU (fp16 for SD 1.x / 2.x and
SDXL, bf16 for SD 3 and Flux, as diffusers' documentation runs them), fp32 on the CPU, and CPU offload. The
VAE always stays fp32 (fp16 VAE decodes can give NaN frames, and SDXL's VAE asks for it: force_upcast).
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .families import BY_KEY, BY_PIPELINE, StableDiffusion

_ASSETS = Path(__file__).resolve().parents[2] / "assets"
# the models that ship with the project, trained here (docs/embedded-model.md): name -> folder
EMBEDDED_MODELS = {"emoji": _ASSETS / "emoji-model", "shapes": _ASSETS / "shapes-model"}
EMBEDDED = "embedded"  # names the default embedded model, the first of EMBEDDED_MODELS
DEFAULT_EMBEDDED = next(iter(EMBEDDED_MODELS))
EMBEDDED_NAMES = (EMBEDDED, *EMBEDDED_MODELS)  # what a person may type for an embedded model
# short names a person may give instead of a hub id, each family's (families.py `aliases`): name -> hub id, and
# name -> its family's adapter
ALIASES = {name: hub_id for family in BY_KEY.values() for name, hub_id in family.aliases.items()}
ALIAS_FAMILIES = {name: family for family in BY_KEY.values() for name in family.aliases}
# model_index.json's pipeline class -> the family a person knows; those in families.BY_PIPELINE load
FAMILIES = {
    **{pipeline: family.name for pipeline, family in BY_PIPELINE.items()},
    "StableDiffusionXLImg2ImgPipeline": "Stable Diffusion XL refiner / img2img",
    "PixArtAlphaPipeline": "PixArt-alpha", "KandinskyV22Pipeline": "Kandinsky 2.2",
}
_NAMES = [family.name for family in BY_KEY.values()]
SUPPORTED_TEXT = f"{', '.join(_NAMES[:-1])} and {_NAMES[-1]}"
INDEX = "model_index.json"  # a diffusers model's table of contents: its pipeline class and parts
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_CACHE_SIZE = 2
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")  # single-file checkpoints
# diffusers' name for a checkpoint's kind (single_file_utils.infer_diffusers_model_type) -> the family adapter
# that loads it (families.py `checkpoint_kinds`)
CHECKPOINT_FAMILIES = {kind: family for family in BY_KEY.values() for kind in family.checkpoint_kinds}
CHECKPOINT_KINDS = {  # kinds a person may hold that do not run here, as a person knows them
    "xl_refiner": "an SDXL refiner", "playground-v2-5": "a Playground v2.5", "upscale": "an SD x4 upscaler",
    "inpainting": "an SD 1.x inpainting", "inpainting_v2": "an SD 2.x inpainting", "xl_inpaint": "an SDXL inpainting",
    "controlnet": "a ControlNet", "flux-fill": "a Flux.1 Fill", "flux-depth": "a Flux.1 Depth"}
CONFIG_FILES = ("*.json", "*.txt", "*.model")  # a diffusers model's configs and tokenizer files, no weights
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the person typed (an embedded model: its own name)
    source: str  # a local folder or checkpoint file path, or a hub id
    is_local: bool
    single_file: bool = False  # a checkpoint file (CHECKPOINT_SUFFIXES) rather than a diffusers folder or hub id


@dataclass(frozen=True)
class LoadOptions:
    """How this process loads models: a deployment choice (what the GPU holds), set once at startup (configure)."""
    dtype: str = "auto"  # DTYPE_CHOICES: auto = the family's gpu_dtype on a GPU, fp32 on the CPU; the VAE stays fp32
    offload: bool = False  # CUDA only: each part waits in CPU memory until it runs (enable_model_cpu_offload)
    configs: tuple[str, ...] = ()  # diffusers model folders, at most one per family, whose configs single-file
    # checkpoints of that family load with (offline, instead of the default model's configs in the HF cache)

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise ModelLoadError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}.")
        families = [_config_family(folder) for folder in self.configs]
        for family in set(families):
            if families.count(family) > 1:
                raise ModelLoadError(f"Give one config folder per family: several are {family.name} models.")

    def compute_dtype(self, device: torch.device, family: StableDiffusion) -> torch.dtype:
        """The dtype a model of `family`'s parts (but its VAE) run in on `device`."""
        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else family.gpu_dtype
        return DTYPES[self.dtype]


def _brief(error: Exception) -> str:
    """An error's type and the first line of its message, for a one-line ModelLoadError."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200].rstrip('.')}" if lines else type(error).__name__


def _config_family(folder: str) -> StableDiffusion:
    """The family of a config folder given in LoadOptions.configs; ModelLoadError if it is not a model folder."""
    index = Path(folder, INDEX)
    if not index.is_file():
        raise ModelLoadError(f"Config folder {folder} has no {INDEX}: give a diffusers model folder (its weights "
                             "are not needed for parts the checkpoint holds).")
    return _check_family(folder, _pipeline_class(folder, index))


_options = LoadOptions()


def configure(options: LoadOptions) -> LoadOptions:
    """Load models from now on with `options` (app.py and the CLI call it once, at startup); returns the previous."""
    global _options
    previous, _options = _options, options
    return previous


def current_options() -> LoadOptions:
    """The options models load with now (configure)."""
    return _options


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def embedded_name(reference: str | None) -> str | None:
    """The embedded model a reference names ("embedded" and "" name the default), else None."""
    name = (reference or EMBEDDED).strip() or EMBEDDED
    if name not in EMBEDDED_NAMES:
        return None
    return DEFAULT_EMBEDDED if name == EMBEDDED else name


def resolve(reference: str | None) -> ModelRef:
    """Turn what a person typed into a folder or hub id, or raise ModelLoadError saying why not."""
    embedded = embedded_name(reference)
    if embedded:
        folder = EMBEDDED_MODELS[embedded]
        if not (folder / INDEX).exists():
            raise ModelLoadError(f"The embedded {embedded} model is missing from {folder}. Reinstall the project or "
                                 f"train it: python -m visualizer.demo_model.train --data {embedded}")
        return ModelRef(embedded, str(folder), True)
    name = reference.strip()
    if name in ALIASES:
        return ModelRef(name, ALIASES[name], False)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / INDEX).exists():
            raise ModelLoadError(f"{name} is a folder but not a diffusers model (no model_index.json). "
                                 "Point to a folder saved with save_pretrained.")
        _check_family(name, _pipeline_class(name, path / INDEX))
        return ModelRef(name, str(path.resolve()), True)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"No checkpoint file at {name}.")
        return ModelRef(name, str(path.resolve()), True, single_file=True)
    if path.is_file():
        raise ModelLoadError(f"{name} is a file but not a checkpoint: single-file models end in "
                             f"{', '.join(CHECKPOINT_SUFFIXES)}; a diffusers model is a folder.")
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return ModelRef(name, name, False)
    raise ModelLoadError(f"Model {name!r} is neither a folder on this machine, a hub id (owner/name), "
                         f"nor an alias ({', '.join([*EMBEDDED_NAMES, *ALIASES])}).")


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
                             "models only.")
    return BY_PIPELINE[pipeline]


def checkpoint_family(ref: ModelRef) -> tuple[StableDiffusion, str]:
    """(family adapter, diffusers' name for its kind) of a single-file checkpoint, told from its tensor names and
    shapes (no weights read); ModelLoadError naming what it is when it does not run here."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    shapes = _checkpoint_shapes(ref)
    try:
        kind = infer_diffusers_model_type(shapes)
    except Exception as error:  # a tensor name of one kind with the shape of none
        raise ModelLoadError(f"{ref.name} is not a checkpoint diffusers recognises ({_brief(error)}).") from error
    # "v1" is also diffusers' answer for any file it does not recognise; an SD checkpoint has the UNet's input conv
    if kind in ("v1", "v2") and CHECKPOINT_KEY_NAMES["inpainting"] not in shapes:
        raise ModelLoadError(f"{ref.name} holds no Stable Diffusion UNet (no model.diffusion_model.* tensors): it is "
                             "not a whole model (a LoRA, VAE or embedding file?).")
    if kind not in CHECKPOINT_FAMILIES:
        raise ModelLoadError(f"{ref.name} is {CHECKPOINT_KINDS.get(kind, f'a {kind!r}')} checkpoint; this version "
                             f"runs {SUPPORTED_TEXT} base models.")
    return CHECKPOINT_FAMILIES[kind], kind


def _checkpoint_shapes(ref: ModelRef) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name, as empty tensors of their shapes on the meta device."""
    try:
        if Path(ref.source).suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(ref.source, "pt") as f:
                return {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
        checkpoint = torch.load(ref.source, map_location="meta", weights_only=True)
        while isinstance(checkpoint, dict) and "state_dict" in checkpoint:  # Lightning checkpoints nest it
            checkpoint = checkpoint["state_dict"]
    except Exception as error:
        raise ModelLoadError(f"{ref.name} is not a readable checkpoint ({_brief(error)}).") from error
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{ref.name} holds a {type(checkpoint).__name__}, not a checkpoint's tensors.")
    return checkpoint


def _checkpoint_config(ref: ModelRef, family: StableDiffusion, kind: str, options: LoadOptions) -> str:
    """The diffusers config folder a single-file checkpoint loads with: the configured folder of its family, else
    diffusers' default model for its kind in the Hugging Face cache (configs only; fetched when online)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
    from huggingface_hub import constants, snapshot_download

    for folder in options.configs:
        if _config_family(folder) is family:
            return folder
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]
    try:
        return snapshot_download(repo, allow_patterns=list(CONFIG_FILES))
    except Exception as error:  # not cached and offline / unreachable / gated
        include = " ".join(f"--include '{pattern}'" for pattern in CONFIG_FILES)
        raise ModelLoadError(
            f"{ref.name} is a {family.name} checkpoint; loading it needs the diffusers configs of {repo} (a few MB, "
            f"no weights), which are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not be "
            f"fetched ({type(error).__name__}). Download them once with `hf download {repo} {include}` (add "
            f"--local-dir FOLDER for a folder of them), or pass --model-config FOLDER, a diffusers folder of this kind "
            "of model.") from error


class _PipelineCache:
    """Loaded pipelines by (source, device, load options); least recently used dropped beyond `size`."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef, device: torch.device, options: LoadOptions):
        key = (ref.source, str(device), options)
        with self._lock:  # one load at a time; concurrent callers wait and share the result
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pipe = _load(ref, device, options)
            self._items[key] = pipe
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return pipe


def family_of_reference(reference: str | None) -> StableDiffusion:
    """The family adapter of a model reference, read without loading it or touching the network: an alias's
    known family, a local folder's model_index.json, a hub id's cached one; SD 1.x / 2.x when it cannot be
    told. Raises ModelLoadError for a reference resolve() refuses."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    ref = resolve(reference)
    if ref.name in ALIAS_FAMILIES:
        return ALIAS_FAMILIES[ref.name]
    if ref.single_file:
        return checkpoint_family(ref)[0]
    if ref.is_local:
        return _check_family(ref.name, _pipeline_class(ref.name, Path(ref.source, INDEX)))
    try:
        index = Path(hf_hub_download(ref.source, INDEX, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return BY_KEY["sd"]
    return _check_family(ref.name, _pipeline_class(ref.name, index))


def _load(ref: ModelRef, device: torch.device, options: LoadOptions):
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import hf_hub_download

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # hides the safety-checker notice: this tool shows raw frames
    family = config = None
    try:
        if ref.single_file:
            family, kind = checkpoint_family(ref)
            config = _checkpoint_config(ref, family, kind, options)
            pipe = family.pipeline_class().from_single_file(
                ref.source, config=config, dtype=options.compute_dtype(device, family), local_files_only=True,
                **family.load_kwargs)
            for part in pipe.components.values():  # diffusers 0.42 leaves a T5 read from a file in training
                if isinstance(part, torch.nn.Module):  # mode: its dropout would blur every text embedding
                    part.eval()
        else:
            index = Path(ref.source, INDEX) if ref.is_local else Path(hf_hub_download(ref.source, INDEX))
            family = _check_family(ref.name, _pipeline_class(ref.name, index))  # before fetching any weights
            pipe = family.pipeline_class().from_pretrained(
                ref.source, dtype=options.compute_dtype(device, family), local_files_only=ref.is_local,
                **family.load_kwargs)
        if pipe.vae.dtype != torch.float32:
            pipe.vae.to(torch.float32)
    except ModelLoadError:
        raise
    except Exception as error:  # hub / disk / format errors all reach the person as one message
        where = "checkpoint" if ref.single_file else "folder" if ref.is_local else "Hugging Face Hub id"
        if ref.single_file:
            hint = (f"Check that it is a whole {family.name} checkpoint (every part in the one file) of the same "
                    f"architecture as the config folder {config}.")
        elif ref.is_local:
            hint = f"Check that it is a {family.name if family else SUPPORTED_TEXT} model in diffusers format."
        else:
            hint = "Check the id and your network; offline, download it once elsewhere and pass its local folder."
        raise ModelLoadError(f"Could not load {ref.name!r} ({where} {ref.source}): {_brief(error)}. {hint}") from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
    family.check(pipe)
    pipe.set_progress_bar_config(disable=True)
    if options.offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    if options.offload:
        log.warning("Offload has no effect on %s (it moves parts between CPU and GPU memory): %s loads as usual.",
                    device.type, ref.name)
    return pipe.to(device)


_CACHE = _PipelineCache(_CACHE_SIZE)


def load_pipeline(reference: str | None = None, device: torch.device | None = None):
    """The diffusers pipeline for `reference` (its family's class), loaded once (with this process's LoadOptions)
    and cached."""
    return _CACHE.get(resolve(reference), device or pick_device(), _options)
