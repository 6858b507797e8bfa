"""Decoders: latents -> RGB frames.

- `vae_decode`: the exact frame, through the model's own VAE (batched, fp32).
- `latent_preview`: a cheap linear latent -> RGB approximation, for live previews only.
- `load_taesd`: the tiny TAESD decoder when its weights are on this machine (previews, labelled so).
- `StreamingDecoder`: exact frames of every step, decoded in batches while the run goes.
- `LivePreview`: what to show during a run: the newest exact frame, else a TAESD or latent-colour preview.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# rows = the 4 latent channels, columns = R, G, B; output in [-1, 1] (ComfyUI latent_formats.py)
SD15_LATENT_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                   [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
SDXL_LATENT_RGB = [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                   [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]
SDXL_LATENT_RGB_BIAS = [0.1084, -0.0175, -0.0011]
LATENT_RGB_FILE = "latent_rgb.json"  # optional, in a model folder: {"factors": 4x3, "bias": 3}
# On a CPU, batching VAE decodes pays up to about this many output pixels per batch; beyond it a batch is
# slower per frame than one frame at a time (measured: SD 1.5 VAE at 256x256, 2.5 s per frame alone,
# 2.8 s per frame in batches of 8). GPUs batch freely.
CPU_BATCH_PIXELS = 8 * 64 * 64
GPU_BATCH = 8


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (the same rounding as diffusers' postprocess)"""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def decode_batch_size(vae, latents: torch.Tensor) -> int:
    """How many frames of this size to decode per VAE call on the VAE's device."""
    if next(vae.parameters()).device.type != "cpu":
        return GPU_BATCH
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = latents.shape[-2] * latents.shape[-1] * factor * factor
    return max(1, min(GPU_BATCH, CPU_BATCH_PIXELS // pixels))


@torch.inference_mode()
def vae_decode(vae, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
    """Scaled latents [N, C, h, w] -> uint8 frames [N, H, W, 3], exactly as the pipeline decodes.
    `batch_size` None = `decode_batch_size`."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    batch_size = batch_size or decode_batch_size(vae, latents)
    frames = []
    for chunk in latents.split(batch_size):
        chunk = chunk.to(device=device, dtype=dtype) / vae.config.scaling_factor
        frames.append(to_uint8(vae.decode(chunk, return_dict=False)[0]))
    return np.concatenate(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def latent_rgb_factors(model_folder: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own latent -> RGB fit if its folder has one, else Stable Diffusion 1.x/2.x factors."""
    if model_folder:
        path = Path(model_folder) / LATENT_RGB_FILE
        if path.exists():
            fit = json.loads(path.read_text())
            return torch.tensor(fit["factors"]), torch.tensor(fit["bias"])
    return torch.tensor(SD15_LATENT_RGB), torch.zeros(3)


def latent_preview(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor, size: int | None = None) -> np.ndarray:
    """Cheap preview: scaled latents [N, 4, h, w] -> uint8 [N, h, w, 3] (nearest-upscaled to `size`)."""
    rgb = torch.einsum("nchw,cr->nrhw", latents.float().cpu(), factors) + bias[None, :, None, None]
    if size:
        rgb = torch.nn.functional.interpolate(rgb, size=(size, size), mode="nearest")
    return to_uint8(rgb)


def fit_latent_rgb(latents: torch.Tensor, images: torch.Tensor) -> dict:
    """Least-squares latent -> RGB factors from scaled latents [N, 4, h, w] and images [N, 3, h, w] in [-1, 1]."""
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = images.permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(x1, y).solution
    return {"factors": solution[:-1].tolist(), "bias": solution[-1].tolist()}


def load_taesd(device: torch.device):
    """AutoencoderTiny from $VISUALIZER_TAESD (a folder or hub id; default "madebyollin/taesd"): from the local
    Hub cache, or downloaded once when the Hub is reachable and HF_HUB_OFFLINE is not set; None if absent."""
    from diffusers import AutoencoderTiny

    source = os.environ.get("VISUALIZER_TAESD", "madebyollin/taesd")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return AutoencoderTiny.from_pretrained(source, local_files_only=offline).to(device).eval()
    except Exception:  # absent weights are the normal case offline
        return None


@torch.inference_mode()
def taesd_decode(taesd, latents: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """Scaled latents -> uint8 preview frames through TAESD."""
    device = next(taesd.parameters()).device
    images = taesd.decode(latents.to(device, torch.float32) / scaling_factor).sample
    return to_uint8(images)


class StreamingDecoder:
    """A step callback that VAE-decodes each finished step's x_t and x0-hat in batches during the run.

    Batching amortises the decoder's per-call cost where that pays (small frames, GPUs; see
    `decode_batch_size`); decoding as steps finish means the slider has exact frames while the run is
    still going. `finish` decodes what is left and hands the frames to the runs.
    """

    def __init__(self, vae, kinds: tuple[str, ...] = ("xt", "x0"), batch_size: int | None = None):
        self.vae, self.kinds, self.batch_size = vae, kinds, batch_size
        self.frames: dict[int, dict[str, list[np.ndarray]]] = {}
        self._pending: list[tuple[int, str, torch.Tensor]] = []

    def __call__(self, event) -> None:
        for kind in self.kinds:
            self._pending.append((event.sampler_index, kind, getattr(event, kind)))
        self.batch_size = self.batch_size or decode_batch_size(self.vae, event.latents)
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        decoded = vae_decode(self.vae, torch.cat([t for _, _, t in self._pending]), batch_size=len(self._pending))
        for (index, kind, _), frame in zip(self._pending, decoded):
            self.frames.setdefault(index, {}).setdefault(kind, []).append(frame)
        self._pending = []

    def latest(self, index: int, kind: str) -> tuple[int, np.ndarray] | None:
        """(step number, frame) of the newest decoded frame of run `index`, or None."""
        frames = self.frames.get(index, {}).get(kind)
        return (len(frames), frames[-1]) if frames else None

    def finish(self, runs) -> None:
        """Decode what is left and attach frames (and final images) to `runs`, in sampler order."""
        self.flush()
        for index, run in enumerate(runs):
            run.frames.update(self.frames.get(index, {}))
            decode_run(run, self.vae, self.kinds)


def decode_run(run, vae, kinds: tuple[str, ...] = ("xt", "x0"), batch_size: int | None = None) -> None:
    """Decode every step of `run` for each kind in place (run.frames) and set run.final_image."""
    for kind in kinds:
        if kind not in run.frames or len(run.frames[kind]) != len(run):
            run.frames[kind] = list(vae_decode(vae, run.tensors[kind], batch_size))
    if len(run) and not run.info.stopped:
        run.final_image = run.frames["xt"][-1] if "xt" in run.frames else vae_decode(vae, run.tensors["latents"][-1:])[0]


@dataclass
class Preview:
    image: np.ndarray  # uint8 HxWx3
    step: int  # the step it shows (1-based)
    label: str  # what it is: "exact VAE decode", "TAESD preview", ...

    @property
    def exact(self) -> bool:
        return self.label == EXACT


EXACT = "exact VAE decode"
_TAESD: dict = {}


def _taesd(device):
    """TAESD on `device`, loaded once per process (None where its weights are absent)."""
    if device not in _TAESD:
        _TAESD[device] = load_taesd(device)
    return _TAESD[device]


class LivePreview:
    """x0-hat during a run: the newest exact frame the StreamingDecoder has, or until its first batch, a cheap
    preview: TAESD for SD models where its weights are on this machine, else the linear latent -> RGB fit."""

    def __init__(self, pipe, decoder: StreamingDecoder, use_taesd: bool = True):
        self.decoder = decoder
        taesd = _taesd(pipe.unet.device) if use_taesd else None
        if taesd is not None:
            scaling = pipe.vae.config.scaling_factor
            self._cheap = lambda x0: (taesd_decode(taesd, x0, scaling)[0], "TAESD preview")
        else:
            factors = latent_rgb_factors(pipe.config.get("_name_or_path"))
            self._cheap = lambda x0: (latent_preview(x0, *factors)[0], "approximate preview (latent colours)")

    def __call__(self, event, kind: str = "x0") -> Preview:
        latest = self.decoder.latest(event.sampler_index, kind)
        if latest is not None:
            return Preview(latest[1], latest[0], EXACT)
        image, label = self._cheap(getattr(event, kind))
        return Preview(image, event.step.index, label)
