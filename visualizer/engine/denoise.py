"""The denoising loop, owned end to end, capturing every step of one or several samplers.

diffusers' step callback never sees x0-hat or the noise predictions, so this module runs the loop
itself (encode prompt, draw noise, scale_model_input, denoiser, CFG, scheduler.step), exactly as
`StableDiffusionPipeline.__call__` (or the family's own pipeline: families.py adapts the prompt encoding and
the denoiser call: a UNet, or the SD 3 and Flux transformers) does, and records per step: the latents after the step,
x0-hat, the guided noise prediction and its conditional / unconditional parts.

Flow-matching models (SD 3, Flux) output a velocity v on x_t = (1 - sigma) x0 + sigma * noise with sigma in [0, 1]:
their latents are x_t as they are, x0-hat = x_t - sigma * v and the noise = x_t + (1 - sigma) * v.

Several samplers run in lockstep: each round stacks every active sampler's next model input into
ONE batched denoiser call with per-sample timesteps, then steps each sampler's own scheduler.

A "step" is one update of the sampler from one noise level to the next. Heun and DPM2 spend two
model evaluations on it; the step's timestep, sigma, x0-hat and noise prediction come from its
first evaluation (at the step's start), its latents from after the update.

img2img (`Settings.init_image`) works as in `StableDiffusionImg2ImgPipeline` (and the SD 3 / Flux img2img
pipelines): the image is VAE-encoded, noised to the schedule's timestep at `1 - strength` of the way through
(flow models: x = (1 - sigma) x0 + sigma * noise, `scale_noise`), and only the remaining steps run; they are
captured like any other run's.

`denoise_steps` is the loop as a generator: it yields a `StepEvent` after every completed step and
returns the runs, so a caller (api.stream) can show each step and stop the loop by closing it.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .attention import AttentionRecorder, combine
from .decode import from_vae_space, shift_factor
from ..errors import NonFiniteError, SettingsError
from .families import family_of
from .models import embedded_name, load_pipeline, resolve
from .run import Img2ImgInfo, Run, RunInfo, Settings, Step
from .samplers import make_scheduler, prediction_type, x0_clip_range


@dataclass
class StepEvent:
    """What the loop hands out after each completed step of one sampler."""
    sampler_index: int  # which of the runs in a lockstep batch
    step: Step
    latents: torch.Tensor  # [1, C, h, w] on the model's device, raw scheduler latents after the step
    xt: torch.Tensor  # the same latents in the model-input scale (variance-preserving; flow models: as they are)
    x0: torch.Tensor  # predicted clean latents at the step's start
    eps: torch.Tensor  # the guided noise prediction at the step's start
    x_in: torch.Tensor  # the model input at the step's start, in x_t's scale (step 1: the initial noise x_T, or
    # img2img's noised init image)
    total_steps: int  # steps this sampler will run in all (fewer than the schedule's for img2img)


StepCallback = Callable[[StepEvent], None]


@dataclass
class _Pending:
    """One step being assembled across its model evaluations."""
    timestep: float
    sigma: float
    x_in: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    eps_cond: torch.Tensor | None = None
    eps_uncond: torch.Tensor | None = None
    x0_cond: torch.Tensor | None = None  # flow runs with CFG: each branch's x0-hat (not recoverable from its noise
    x0_uncond: torch.Tensor | None = None  # estimate where sigma = 1)
    attention: dict[int, torch.Tensor] | None = None  # resolution -> [tokens, h_r, w_r], first evaluation's
    evaluations: int = 0


@dataclass
class SamplerLoop:
    """One sampler's state: its own scheduler, latents, generator and captured steps.

    Model-agnostic: a caller feeds it the (guided) output of any denoiser for `model_input()` (the image
    models here, the 2D points of toy.py); `settings` needs num_inference_steps and sampler."""
    settings: Settings
    scheduler: object
    latents: torch.Tensor
    generator: torch.Generator
    cfg_scale: float | None  # classifier-free guidance's scale (the caller's guide() applies it); None: no CFG
    skipped_steps: int = 0  # img2img: schedule steps before the start (their noise comes from the image)
    timesteps: list[float] = field(default_factory=list)
    position: int = 0  # index of the next model evaluation
    pending: _Pending | None = None
    captured: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    x_in: torch.Tensor | None = None
    sigma_space: bool = False  # latents scaled like x0 + sigma * eps (Euler family)
    flow: bool = False  # a flow-matching sampler: latents are (1 - sigma) x0 + sigma * eps
    step_kwargs: dict = field(default_factory=dict)
    evaluations: int = 0

    def __post_init__(self):
        self.timesteps = [float(t) for t in self.scheduler.timesteps.cpu()]
        self.position = self.start
        self.sigma_space = abs(self.init_noise_sigma - 1.0) > 1e-6
        self.prediction_type = prediction_type(self.scheduler)
        self.flow = self.prediction_type == "flow_prediction"
        self.clip_range = x0_clip_range(self.scheduler)
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in accepted:
            self.step_kwargs["eta"] = 0.0
        if "generator" in accepted:
            self.step_kwargs["generator"] = self.generator

    @property
    def do_cfg(self) -> bool:
        return self.cfg_scale is not None

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial noise (the flow-matching schedulers have none: 1)."""
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    @property
    def done(self) -> bool:
        return self.position >= len(self.timesteps)

    @property
    def start(self) -> int:
        """Index in the scheduler's timesteps of this sampler's first model evaluation."""
        return self.skipped_steps * self.scheduler.order

    @property
    def total_steps(self) -> int:
        return self.settings.num_inference_steps - self.skipped_steps

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This sampler's next denoiser input (scaled latents) and its timestep."""
        t = self.scheduler.timesteps[self.position]
        scale = getattr(self.scheduler, "scale_model_input", None)  # the flow-matching schedulers have none
        self.x_in = self.latents if scale is None else scale(self.latents, t)
        return self.x_in, t

    def _input_scale(self, t: torch.Tensor) -> float:
        """The factor scale_model_input applies at timestep `t` (computed on the CPU: no device sync)."""
        return float(self.scheduler.scale_model_input(torch.ones(1), t)[0])

    def _sigma(self, t: torch.Tensor) -> float:
        """Noise level of the current model input: x = x0 + sigma * eps, or for flow samplers the sigma in
        [0, 1] of x = (1 - sigma) x0 + sigma * eps (the scheduler's own sigmas)."""
        if self.sigma_space:
            return math.sqrt(max(1.0 / self._input_scale(t) ** 2 - 1.0, 0.0))
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is not None and len(sigmas) == len(self.timesteps) + 1:
            return float(sigmas[self.position])
        abar = float(self.scheduler.alphas_cumprod[int(self.timesteps[self.position])])
        return math.sqrt((1 - abar) / abar)

    def advance(self, model_output: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor | None,
                attention: dict[int, torch.Tensor] | None = None):
        """Feed one evaluation's guided output (and its attention maps); return the Step if it completed one."""
        t = self.scheduler.timesteps[self.position]
        if self.pending is None:
            sigma = self._sigma(t)
            x0, eps = predictions(self.x_in, model_output, sigma, self.prediction_type)
            if self.clip_range is not None:  # what the sampler itself uses (clip_sample)
                x0 = x0.clamp(-self.clip_range, self.clip_range)
            branches = {}
            if cond is not None:  # noise predictions whatever the model outputs (v models output v)
                (x0_cond, cond), (x0_uncond, uncond) = (predictions(self.x_in, branch, sigma, self.prediction_type)
                                                        for branch in (cond, uncond))
                if self.flow:
                    branches = dict(x0_cond=x0_cond, x0_uncond=x0_uncond)
            self.pending = _Pending(self.timesteps[self.position], sigma, self.x_in, x0, eps, cond, uncond, **branches,
                                    attention=attention)
        self.pending.evaluations += 1
        self.evaluations += 1
        self.latents = self.scheduler.step(model_output, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        self.position += 1
        if not self._completed_step():
            return None
        return self._finish_step()

    def _completed_step(self) -> bool:
        if self.done:
            return True
        if hasattr(self.scheduler, "state_in_first_order"):
            return bool(self.scheduler.state_in_first_order)
        # PNDM (PLMS) corrects its first step with a second evaluation, counted by `counter`
        return getattr(self.scheduler, "counter", None) != 1

    def _finish_step(self) -> Step:
        pending, self.pending = self.pending, None
        scale = 1.0  # alpha-space and flow latents, and sigma 0 at the end
        if self.sigma_space and not self.done:
            scale = self._input_scale(self.scheduler.timesteps[self.position])
        record = {"latents": self.latents, "xt": self.latents * scale, "x0": pending.x0, "eps": pending.eps,
                  "x_in": pending.x_in}
        if pending.eps_cond is not None:
            record.update(eps_cond=pending.eps_cond, eps_uncond=pending.eps_uncond)
        if pending.x0_cond is not None:
            record.update(x0_cond=pending.x0_cond, x0_uncond=pending.x0_uncond)
        if pending.attention is not None:
            hw = tuple(self.latents.shape[-2:])
            record["attention"] = combine(pending.attention, hw)[None]
            record.update({f"attention_{r}": maps[None] for r, maps in pending.attention.items()})
        for key, value in record.items():
            self.captured.setdefault(key, []).append(value)
        index = len(self.steps) + 1
        step = Step(index=index, timestep=pending.timestep, sigma=pending.sigma,
                    progress=(self.skipped_steps + index) / self.settings.num_inference_steps,
                    evaluations=pending.evaluations, flow=self.flow)
        self.steps.append(step)
        return step


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def predictions(x_in: torch.Tensor, output: torch.Tensor, sigma, prediction_type: str):
    """(x0-hat, eps) from a model output, for a model input x_in = (x0 + sigma * eps) / sqrt(1 + sigma^2), or
    with flow_prediction (a velocity v = eps - x0; Lipman et al. 2023) x_in = (1 - sigma) x0 + sigma * eps."""
    if prediction_type == "flow_prediction":
        return x_in - float(sigma) * output, x_in + (1.0 - float(sigma)) * output
    alpha = 1.0 / math.sqrt(1.0 + float(sigma) ** 2)
    if prediction_type == "epsilon":
        return x_in / alpha - float(sigma) * output, output
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma_vp * x0, sigma_vp = alpha * sigma
        sigma_vp = alpha * float(sigma)
        return alpha * x_in - sigma_vp * output, sigma_vp * x_in + alpha * output
    raise SettingsError(f"Unsupported prediction type {prediction_type!r} (epsilon, v_prediction and "
                        "flow_prediction are).")


def _prompt_info(family, pipe, prompt: str) -> dict:
    tokenizer, limit = family.prompt_tokenizer(pipe)
    ids = tokenizer(prompt, truncation=False).input_ids
    kept = ids[: limit - 1] + ([ids[-1]] if len(ids) > limit else [])
    dropped = tokenizer.decode(ids[limit - 1:-1]).strip() if len(ids) > limit else ""
    return {"tokens": len(ids), "token_limit": limit, "dropped_text": dropped,
            "token_strings": tokenizer.convert_ids_to_tokens(kept)}


SHARED_SETTINGS = ("prompt", "negative_prompt", "seed", "width", "height", "model")


def _check_lockstep(settings_list: list[Settings]) -> None:
    if not settings_list:
        raise SettingsError("Pick at least one sampler.")
    first = settings_list[0]
    for s in settings_list:
        s.validate()
        for name in SHARED_SETTINGS:
            if getattr(s, name) != getattr(first, name):
                raise SettingsError(f"Runs in one lockstep batch must share {name}.")
        if (s.init_image is None) != (first.init_image is None) or (
                s.init_image is not None and not np.array_equal(s.init_image, first.init_image)):
            raise SettingsError("Runs in one lockstep batch must share the init image.")


def denoise_steps(settings_list: list[Settings], pipe=None,
                  should_stop: Callable[[], bool] | None = None) -> Generator[StepEvent, None, list[Run]]:
    """Run several samplers in lockstep on one prompt, seed and size; yield a StepEvent per finished step and
    return one Run each (same initial noise).

    Every Settings must share prompt, negative prompt, seed, size, model and init image (only the sampler,
    steps, guidance and strength may differ). `should_stop` is polled between rounds: when it returns True
    the runs end early and keep the steps computed so far (`info.stopped`). Closing the generator halts the
    loop at once.
    """
    _check_lockstep(settings_list)
    first = settings_list[0]
    # an embedded model by its own name ("emoji", "shapes"): a run bundle holds no path of this machine
    model_source = embedded_name(first.model) or (first.model if pipe is not None else resolve(first.model).source)
    pipe = pipe or load_pipeline(first.model)
    family = family_of(pipe)
    family.check_settings(first)
    denoiser = family.denoiser(pipe)
    device = pipe._execution_device  # with --offload the weights wait on the CPU; this is where they run
    scale_factor = pipe.vae_scale_factor
    height = first.height or family.default_size(pipe)
    width = first.width or family.default_size(pipe)
    multiple = family.size_multiple(pipe)
    if height % multiple or width % multiple:
        w, h = (max(multiple, side // multiple * multiple) for side in (width, height))
        raise SettingsError(f"Width and height must be multiples of {multiple} for this model, got "
                            f"{width}x{height}. Try {w}x{h}.")
    started = time.perf_counter()
    with torch.inference_mode():
        guidance = family.guidance_kind(pipe)  # cfg, or an input of the model (LCM, Flux.1-dev), or unused
        cfg_scales = [family.cfg_scale(pipe, s) for s in settings_list]
        any_cfg = any(scale is not None for scale in cfg_scales)
        conditioning = family.encode_prompt(pipe, first.prompt, first.negative_prompt, any_cfg, (height, width))
        dtype = conditioning.prompt_embeds.dtype
        posterior = None if first.init_image is None else _encode_image(pipe, first.init_image, height, width)
        shape = (1, *family.latent_shape(pipe, height, width))
        loops = []
        for s, cfg_scale in zip(settings_list, cfg_scales):
            scheduler = make_scheduler(s.sampler, pipe.scheduler.config, family.sampler_kind)
            family.set_timesteps(pipe, scheduler, s.num_inference_steps, device, shape[1:])
            generator = torch.Generator("cpu").manual_seed(s.seed)
            skipped = 0
            if posterior is None:
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching: none (1)
            else:  # the order of draws (posterior sample, then noise) is diffusers' img2img order
                init_latents = from_vae_space(pipe.vae, posterior.sample(generator)).to(dtype)
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                skipped = family.skipped_steps(s.num_inference_steps, s.strength)
                start = skipped * scheduler.order
                if hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(start)
                noised = getattr(scheduler, "scale_noise", None)  # the flow-matching schedulers' add_noise
                t_start = scheduler.timesteps[start:start + 1]
                latents = (noised(init_latents, t_start, noise) if noised else
                           scheduler.add_noise(init_latents, noise, t_start))
            loops.append(SamplerLoop(settings=s, scheduler=scheduler, latents=latents, generator=generator,
                                      cfg_scale=cfg_scale, skipped_steps=skipped))
        initial_noise = noise
    recorder = AttentionRecorder(denoiser, family.joint_attention) if first.attention else None
    try:
        if recorder is not None:
            recorder.__enter__()
        while not all(loop.done for loop in loops):  # the model runs in inference mode, never across a yield:
            if should_stop is not None and should_stop():  # grad mode is per thread, and a generator may be
                break  # resumed on another thread
            yield from _round(pipe, family, loops, conditioning, recorder)
    finally:
        if recorder is not None:
            recorder.__exit__()
    common = dict(
        model_source=model_source, device=str(device), dtype=str(dtype).replace("torch.", ""),
        text_embedding_shape=list(conditioning.prompt_embeds.shape), latent_shape=list(initial_noise.shape),
        vae_scale_factor=scale_factor, image_size=[height, width],
        vae_scaling_factor=float(pipe.vae.config.scaling_factor), vae_shift_factor=shift_factor(pipe.vae),
        seconds=round(time.perf_counter() - started, 3), lockstep_batch=len(loops), guidance=guidance,
        **_prompt_info(family, pipe, first.prompt),
        **conditioning.facts)
    runs = [_to_run(loop, initial_noise, common, family.word_span(common["token_strings"])) for loop in loops]
    if posterior is not None:
        init_latents = from_vae_space(pipe.vae, posterior.mean.float()).cpu()
        for run in runs:
            run.tensors["init_latents"] = init_latents
    return runs


def _encode_image(pipe, image: np.ndarray, height: int, width: int):
    """The VAE posterior of `image`, resized and centre-cropped to height x width."""
    pixels = pipe.image_processor.preprocess(Image.fromarray(image), height=height, width=width, resize_mode="crop")
    return pipe.vae.encode(pixels.to(pipe._execution_device, pipe.vae.dtype)).latent_dist


@torch.inference_mode()
def _round(pipe, family, loops, conditioning, recorder: AttentionRecorder | None = None) -> list[StepEvent]:
    """One batched denoiser call for every active sampler, then each sampler's own step; the steps completed.
    With a recorder, the conditional rows of each sampler's first evaluation of a step are recorded."""
    active = [i for i, loop in enumerate(loops) if not loop.done]
    inputs, times, rows, scales = [], [], [], []
    for i in active:
        loop = loops[i]
        x_in, t = loop.model_input()
        copies = 2 if loop.do_cfg else 1
        if recorder is not None and loop.pending is None:
            recorder.rows.append((i, len(inputs) + copies - 1))  # the conditional row: after the negative one
        inputs += [x_in] * copies
        times += [t.float().reshape(1)] * copies
        rows += [False, True] if loop.do_cfg else [True]  # the negative branch first, as diffusers batches CFG
        scales += [loop.settings.guidance_scale] * copies
    extra = family.guidance_inputs(pipe, scales, inputs[0])
    output = family.predict(pipe, torch.cat(inputs), torch.cat(times), conditioning, rows, **extra)
    maps = recorder.collect(tuple(inputs[0].shape[-2:])) if recorder is not None else {}
    events, offset = [], 0
    for i in active:
        loop = loops[i]
        if loop.do_cfg:
            uncond, cond = output[offset:offset + 1], output[offset + 1:offset + 2]
            guided = guide(uncond, cond, loop.cfg_scale)
            offset += 2
        else:
            guided, cond, uncond = output[offset:offset + 1], None, None
            offset += 1
        step = loop.advance(guided, cond, uncond, maps.get(i))
        if step is not None:
            c = loop.captured
            events.append(StepEvent(i, step, c["latents"][-1], c["xt"][-1], c["x0"][-1], c["eps"][-1],
                                    c["x_in"][-1], loop.total_steps))
    return events


def _to_run(loop: SamplerLoop, initial_noise: torch.Tensor, common: dict, words: slice) -> Run:
    tensors = {k: torch.cat(v).float().cpu() for k, v in loop.captured.items()}
    tensors["initial_noise"] = initial_noise.float().cpu()
    attention = None
    if "attention" in tensors:  # keep the prompt's own tokens (`words`): one map each
        for name in [k for k in tensors if k.startswith("attention")]:
            tensors[name] = tensors[name][:, words].contiguous()
        attention = {"tokens": [t.replace("</w>", "").lstrip("\u2581") for t in common["token_strings"][words]],
                     "resolutions": sorted(int(k.split("_")[1]) for k in tensors if k.startswith("attention_"))}
    for name in ("latents", "x0"):
        if name in tensors and not torch.isfinite(tensors[name]).all():
            bad = int((~torch.isfinite(tensors[name])).flatten(1).any(1).nonzero()[0]) + 1
            raise NonFiniteError(f"The model produced NaN or infinite values at step {bad} of "
                                 f"{loop.settings.sampler}. Try fewer steps, another sampler, or fp32.")
    scheduler = loop.scheduler
    img2img = None
    if loop.settings.init_image is not None:
        img2img = Img2ImgInfo(strength=loop.settings.strength, skipped_steps=loop.skipped_steps,
                              start_timestep=loop.timesteps[loop.start])
    info = RunInfo(scheduler=type(scheduler).__name__, scheduler_config=_jsonable(dict(scheduler.config)),
                   init_noise_sigma=loop.init_noise_sigma, prediction_type=loop.prediction_type,
                   denoiser_evaluations=loop.evaluations, stopped=len(loop.steps) < loop.total_steps, img2img=img2img,
                   attention=attention, **common)
    return Run(settings=loop.settings, steps=loop.steps, tensors=tensors, info=info)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def generate_many(settings_list: list[Settings], pipe=None, callback: StepCallback | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[Run]:
    """`denoise_steps` run to the end, calling `callback` with each StepEvent."""
    steps = denoise_steps(settings_list, pipe, should_stop)
    while True:
        try:
            event = next(steps)
        except StopIteration as finished:
            return finished.value
        if callback is not None:
            callback(event)


def generate(settings: Settings, pipe=None, callback: StepCallback | None = None,
             should_stop: Callable[[], bool] | None = None) -> Run:
    """One sampler's run with every step captured (see `denoise_steps`)."""
    return generate_many([settings], pipe, callback, should_stop)[0]
