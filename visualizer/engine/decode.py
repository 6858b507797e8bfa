"""Decoders: latents -> RGB frames.

- `vae_decode`: the exact frame, through the model's own VAE (batched, fp32); its config says how the latents
  are scaled: decoded = decoder(latents / scaling_factor + shift_factor) (shift_factor: SD 3; 0 before).
- `latent_preview`: a cheap linear latent -> RGB approximation, for live previews only.
- `load_taesd`: the tiny TAESD decoder of the model's family (TAESD, TAESDXL, TAESD3, TAEF1: its adapter's
  taesd_repo, families.py) when its weights are on this machine (previews, labelled so).
- `StreamingDecoder`: exact frames of every step, decoded in batches while the run goes.
- `CheapPreview`: a labelled TAESD or latent-colour preview, for when no exact frame exists yet.
"""
from __future__ import annotations

import copy
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .families import BY_KEY, family_of
from .run import START

# each family's latent -> RGB factors and bias and its TAESD are its adapter's (families.py)
LATENT_RGB_FILE = "latent_rgb.json"  # optional, in a model folder: {"factors": channels x 3, "bias": 3}
# On a CPU, batching VAE decodes pays up to about this many output pixels per batch; beyond it a batch is
# slower per frame than one frame at a time (measured: SD 1.5 VAE at 256x256, 2.5 s per frame alone,
# 2.8 s per frame in batches of 8). GPUs batch up to GPU_BATCH frames, as many as fit in GPU_DECODE_SHARE of
# the GPU's free memory at GPU_DECODE_BYTES_PER_PIXEL (fp32 decodes through SD's VAE: 8 frames of 512x512
# peaked at 8.4 GiB on an H200, with --offload so that the VAE was alone on the GPU; SDXL's and Flux's 1024x1024
# frames take 4x that each).
CPU_BATCH_PIXELS = 8 * 64 * 64
GPU_BATCH = 8
GPU_DECODE_BYTES_PER_PIXEL = 4500
GPU_DECODE_SHARE = 0.5
# During a run, decode a block of steps only while decoding it too keeps decoding within this share of the
# run's time: the live frames after step 1 (always decoded at once) then slow the denoising by at most 10%, and the
# rest is decoded in batches after it.
LIVE_DECODE_BUDGET = 0.10


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (the same rounding as diffusers' postprocess)"""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def module_device(module) -> torch.device:
    """Where `module` runs: its offload hook's device (enable_model_cpu_offload keeps its weights on the CPU until
    it runs), else its weights' device."""
    hook = getattr(module, "_hf_hook", None)
    return getattr(hook, "execution_device", None) or next(module.parameters()).device


def decode_batch_size(vae, latents: torch.Tensor) -> int:
    """How many frames of this size to decode per VAE call on the VAE's device."""
    device = module_device(vae)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = latents.shape[-2] * latents.shape[-1] * factor * factor
    if device.type == "cuda":  # free: the device's, and what torch's allocator holds cached but unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return gpu_batch(torch.cuda.mem_get_info(device)[0] + cached, pixels)
    if device.type != "cpu":
        return GPU_BATCH
    return max(1, min(GPU_BATCH, CPU_BATCH_PIXELS // pixels))


_decode_cores = 1  # cores the frames left after a run's loop may be decoded on (use_cores)


def use_cores(cores: int) -> None:
    """Let the frames left after each run's loop be decoded on up to `cores` threads, one block each, where torch
    runs one thread on the CPU (app.py: the cores of its machine; Ray replicas keep 1, their cores are shared)."""
    global _decode_cores
    _decode_cores = max(1, cores)


def decode_workers(vae) -> int:
    """Threads to decode a run's remaining frames with after its loop: up to `use_cores` where the VAE is on the CPU
    and torch runs one thread (app.py's OMP_NUM_THREADS on a 2-core machine), else 1 (torch's own threads already
    fill the cores, and a second thread's parallel torch ops would slow the engine thread for good: see api)."""
    if module_device(vae).type != "cpu" or torch.get_num_threads() != 1:
        return 1
    return _decode_cores


def gpu_batch(free_bytes: int, pixels: int) -> int:
    """Frames of `pixels` output pixels to decode at once on a CUDA GPU with `free_bytes` free: 1 to GPU_BATCH,
    as many as fit in GPU_DECODE_SHARE of the free memory."""
    return max(1, min(GPU_BATCH, int(free_bytes * GPU_DECODE_SHARE) // (pixels * GPU_DECODE_BYTES_PER_PIXEL)))


def shift_factor(vae) -> float:
    """What the VAE's config adds to latents / scaling_factor before decoding (SD 3's VAE; none before: 0)."""
    return float(vae.config.get("shift_factor") or 0.0)


def frame_vae(pipe, dtype: torch.dtype | None = None):
    """The VAE that decodes a run's intermediate frames (x_t, x0-hat, the start): `pipe.vae` itself where the
    family's pipeline decodes in its dtype (families.frame_dtype; always on the CPU), else a copy in that dtype
    (an fp16 SD VAE on a GPU), made once per pipeline. `dtype` overrides the family's choice (tests)."""
    dtype = dtype or family_of(pipe).frame_dtype(pipe)
    if dtype == pipe.vae.dtype or getattr(pipe.vae, "_hf_hook", None) is not None:  # offloaded: no second copy
        return pipe.vae
    copies = pipe.__dict__.setdefault("_visualizer_frame_vaes", {})
    if dtype not in copies:
        copies[dtype] = copy.deepcopy(pipe.vae).to(dtype)
    return copies[dtype]


def to_vae_space(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (what the sampler sees) -> the VAE decoder's input."""
    return latents / vae.config.scaling_factor + shift_factor(vae)


def from_vae_space(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's latents -> scaled latents (the inverse of to_vae_space)."""
    return (latents - shift_factor(vae)) * vae.config.scaling_factor


@torch.inference_mode()
def vae_decode(vae, latents: torch.Tensor, batch_size: int | None = None, fallback=None) -> np.ndarray:
    """Scaled latents [N, C, h, w] -> uint8 frames [N, H, W, 3], exactly as the pipeline decodes.
    `batch_size` None = `decode_batch_size`. `fallback`: a VAE (the fp32 one) to decode a batch again with where
    `vae` (an fp16 copy) gives NaN or infinite values."""
    device = module_device(vae)
    dtype = next(vae.parameters()).dtype
    batch_size = batch_size or decode_batch_size(vae, latents)
    frames = []
    for chunk in latents.split(batch_size):
        image = vae.decode(to_vae_space(vae, chunk.to(device=device, dtype=dtype)), return_dict=False)[0]
        if fallback is not None and fallback is not vae and not torch.isfinite(image).all():
            image = torch.from_numpy(vae_decode(fallback, chunk)).permute(0, 3, 1, 2).float() / 127.5 - 1
        frames.append(to_uint8(image))
    return np.concatenate(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def latent_rgb_factors(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own latent -> RGB fit if its folder has one, else its family's factors."""
    model_folder = pipe.config.get("_name_or_path")
    if model_folder:
        path = Path(model_folder) / LATENT_RGB_FILE
        if path.exists():
            fit = json.loads(path.read_text())
            return torch.tensor(fit["factors"]), torch.tensor(fit["bias"])
    family = family_of(pipe)
    return torch.tensor(family.latent_rgb_factors), torch.tensor(family.latent_rgb_bias)


def latent_preview(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor, size: int | None = None) -> np.ndarray:
    """Cheap preview: scaled latents [N, C, h, w] -> uint8 [N, h, w, 3] (nearest-upscaled to `size`)."""
    rgb = torch.einsum("nchw,cr->nrhw", latents.float().cpu(), factors) + bias[None, :, None, None]
    if size:
        rgb = torch.nn.functional.interpolate(rgb, size=(size, size), mode="nearest")
    return to_uint8(rgb)


def fit_latent_rgb(latents: torch.Tensor, images: torch.Tensor) -> dict:
    """Least-squares latent -> RGB factors from scaled latents [N, C, h, w] and images [N, 3, h, w] in [-1, 1]."""
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = images.permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(x1, y).solution
    return {"factors": solution[:-1].tolist(), "bias": solution[-1].tolist()}


def load_taesd(device: torch.device, family: str = "sd"):
    """AutoencoderTiny for the latents of `family` (a families.BY_KEY key) from the folder or hub id its TAESD
    variable names, else its taesd_repo: from the local Hub cache, or downloaded once when the Hub is reachable and
    HF_HUB_OFFLINE is not set; None if absent."""
    from diffusers import AutoencoderTiny

    adapter = BY_KEY[family]
    source = os.environ.get(adapter.taesd_variable, adapter.taesd_repo)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return AutoencoderTiny.from_pretrained(source, local_files_only=offline).to(device).eval()
    except Exception:  # absent weights are the normal case offline
        return None


@torch.inference_mode()
def taesd_decode(taesd, latents: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> np.ndarray:
    """Scaled latents -> uint8 preview frames through TAESD (unscaled as the model's VAE unscales them)."""
    device = next(taesd.parameters()).device
    images = taesd.decode(latents.to(device, torch.float32) / scaling_factor + shift_factor).sample
    return to_uint8(images)


class StreamingDecoder:
    """A step callback that VAE-decodes the x_t and x0-hat frames of finished steps, exactly, in an order a
    person watching the run wants them, and the same way every time.

    The start (step 1's model input: the initial noise) is decoded alone when step 1 ends, kind START. Frames are
    decoded in fixed blocks of consecutive steps (step 1 alone, so that the first frame shows at
    once, then `decode_batch_size` frames at a time: batching amortises
    the decoder's per-call cost, and a frame's rounding depends on its batch, so fixed blocks make every
    frame bit-identical from run to run, whatever the timing). During the run a block is decoded as soon as
    it is complete if decoding it too (at the last decode's cost per frame) keeps decoding within `budget` of
    the run's time so far; the others wait, so step 1's frames aside, the denoising is slowed by at most that
    share (the estimate is conservative: step 1's small batch costs more per frame than a full block). After
    the loop, `drain` decodes each finished run's final image first (alone), then the waiting blocks.
    `budget=None` decodes every block as it completes. `clock` (seconds) is the one the budget is kept by.
    """

    def __init__(self, vae, kinds: tuple[str, ...] = ("xt", "x0"), budget: float | None = LIVE_DECODE_BUDGET,
                 clock: Callable[[], float] = time.perf_counter, workers: int | None = None, frames_vae=None):
        self.vae, self.kinds, self.budget, self.clock = vae, kinds, budget, clock
        self.frames_vae = vae if frames_vae is None else frames_vae  # the other frames' VAE (frame_vae); the final
        # image is always `vae`'s, decoded alone
        self._totals: dict[int, int] = {}  # sampler -> the steps its run will have
        self.workers = workers  # threads decoding the blocks left after the loop (None: decode_workers)
        self.frames: dict[int, dict[str, dict[int, np.ndarray]]] = {}  # sampler -> kind -> step (0-based) -> frame
        self._filling: dict[int, list] = {}  # sampler -> the block being filled: [(sampler, kind, step, latents)]
        self._waiting: list[list] = []  # complete blocks not decoded yet
        self._block_steps: int | None = None
        self._started: float | None = None
        self._decoding = 0.0  # seconds spent decoding so far
        self._frame_cost = 0.0  # seconds per frame of the last decode

    def __call__(self, event) -> None:
        if self._started is None:
            self._started = self.clock()
        self._totals[event.sampler_index] = event.total_steps
        if self._block_steps is None:
            self._block_steps = max(1, decode_batch_size(self.vae, event.latents) // len(self.kinds))
        if event.step.index == 1 and "xt" in self.kinds:  # the start, alone: the film's first frame (decode_run's)
            self._decode([(event.sampler_index, START, 0, event.x_in)])
        block = self._filling.setdefault(event.sampler_index, [])
        block += [(event.sampler_index, kind, event.step.index - 1, getattr(event, kind)) for kind in self.kinds]
        first = block[0][2] == 0
        steps = 1 if first else self._block_steps  # step 1 alone, always decoded: the first frame comes at once
        if len(block) < steps * len(self.kinds):
            return
        del self._filling[event.sampler_index]
        cost = self._decoding + self._frame_cost * len(block)
        if self.budget is None or first or cost <= self.budget * (self.clock() - self._started):
            self._decode(block)
        else:
            self._waiting.append(block)

    def _decode(self, entries: list) -> None:
        started = self.clock()
        self._store(entries, self._frames_of(entries))
        seconds = self.clock() - started
        self._decoding += seconds
        self._frame_cost = seconds / len(entries)

    def _frames_of(self, entries: list) -> np.ndarray:
        if self.frames_vae is self.vae:
            return vae_decode(self.vae, torch.cat([t for *_, t in entries]), batch_size=len(entries))
        final = [kind == "xt" and step == self._totals.get(index, 0) - 1 for index, kind, step, _ in entries]
        others = [e for e, last in zip(entries, final) if not last]
        decoded = iter(vae_decode(self.frames_vae, torch.cat([t for *_, t in others]), batch_size=len(others),
                                  fallback=self.vae) if others else [])
        return np.stack([vae_decode(self.vae, t)[0] if last else next(decoded)
                         for (*_, t), last in zip(entries, final)])

    def _store(self, entries: list, decoded: np.ndarray) -> None:
        for (index, kind, step, _), frame in zip(entries, decoded):
            self.frames.setdefault(index, {}).setdefault(kind, {})[step] = frame

    def drain(self, runs) -> Iterator[int]:
        """After the loop: decode each finished run's final image (alone), then the waiting blocks and each run's
        last, partial block; yield the number of frames still to decode after each batch, and 0 at the end (also
        when every frame was decoded during the loop)."""
        blocks = self._waiting + [block for _, block in sorted(self._filling.items())]
        self._waiting, self._filling = [], {}
        last = {index: len(run) - 1 for index, run in enumerate(runs) if len(run) and not run.info.stopped}
        finals = [e for block in blocks for e in block if e[1] == "xt" and last.get(e[0]) == e[2]]
        blocks = [[e for e in block if not any(e is f for f in finals)] for block in blocks]
        rest = [block for block in blocks if block]
        remaining = len(finals) + sum(len(block) for block in rest)
        if not remaining:
            yield 0
        for final in finals:
            self._decode([final])
            remaining -= 1
            yield remaining
        workers = self.workers if self.workers is not None else decode_workers(self.vae)
        parallel = workers > 1 and len(rest) > 1
        pool = ThreadPoolExecutor(workers, thread_name_prefix="visualizer-decode") if parallel else None
        if pool is None:
            decoded = (self._frames_of(block) for block in rest)  # here, one block at a time
        else:  # each block on one thread, as it would be here: the same frames, bit for bit
            decoded = (future.result() for future in [pool.submit(self._frames_of, block) for block in rest])
        try:
            for block, frames in zip(rest, decoded):
                self._store(block, frames)
                remaining -= len(block)
                yield remaining
        finally:  # closed early: nothing keeps decoding behind the caller's back
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def finish(self, runs) -> None:
        """Decode what is left and attach frames (and final images) to `runs`, in sampler order."""
        for _ in self.drain(runs):
            pass
        for index, run in enumerate(runs):
            for kind, frames in self.frames.get(index, {}).items():
                if kind == START:
                    run.start_frame = frames[0]
                else:
                    run.frames[kind] = [frames[step] for step in sorted(frames)]
            decode_run(run, self.vae, self.kinds, frames_vae=self.frames_vae)


def decode_run(run, vae, kinds: tuple[str, ...] = ("xt", "x0"), batch_size: int | None = None,
               frames_vae=None) -> None:
    """Decode every step of `run` for each kind in place (run.frames), its start (with "xt") and final image. The last x_t (the
    final image) is decoded alone by `vae`, as the run's own decoder and diffusers' pipeline decode it (a batch can
    round differently on some CPUs); the other frames by `frames_vae` (default `vae`; see frame_vae)."""
    frames_vae = vae if frames_vae is None else frames_vae
    for kind in kinds:
        if kind not in run.frames or len(run.frames[kind]) != len(run):
            latents = run.tensors[kind]
            alone = 1 if kind == "xt" and len(run) else 0
            run.frames[kind] = (list(vae_decode(frames_vae, latents[:len(latents) - alone], batch_size, fallback=vae))
                                if len(latents) > alone else []) + (list(vae_decode(vae, latents[-1:])) if alone else [])
    if run.start_frame is None and "xt" in kinds and "x_in" in run.tensors and len(run):
        run.start_frame = vae_decode(frames_vae, run.tensors["x_in"][:1], fallback=vae)[0]
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


def _taesd(device, family: str):
    """`family`'s TAESD on `device`, loaded once per process (None where its weights are absent)."""
    if (device, family) not in _TAESD:
        _TAESD[device, family] = load_taesd(device, family)
    return _TAESD[device, family]


class CheapPreview:
    """A labelled preview of latents that costs little: the family's TAESD (load_taesd) where its weights are on
    this machine, else the linear latent -> RGB fit. Not an exact frame: callers show its label."""

    def __init__(self, pipe, use_taesd: bool = True):
        self.pipe, self.use_taesd = pipe, use_taesd
        self._decode = None  # chosen on first use: looking for TAESD's weights may take a while offline

    def __call__(self, latents: torch.Tensor, step: int) -> Preview:
        if self._decode is None:
            family = family_of(self.pipe)
            taesd = _taesd(family.denoiser(self.pipe).device, family.key) if self.use_taesd else None
            if taesd is not None:
                vae = self.pipe.vae
                self._decode = lambda x: (taesd_decode(taesd, x, vae.config.scaling_factor, shift_factor(vae))[0],
                                          "TAESD preview")
            else:
                factors = latent_rgb_factors(self.pipe)
                self._decode = lambda x: (latent_preview(x, *factors)[0], "approximate preview (latent colours)")
        image, label = self._decode(latents)
        return Preview(image, step, label)
