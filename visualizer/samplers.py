"""The sampler registry: the names people know -> a diffusers scheduler class and its overrides.

`make_scheduler` builds a fresh scheduler for every run (schedulers are stateful: never share one) from
the model's own scheduler config, exactly as `Scheduler.from_config(pipe.scheduler.config)` does in
diffusers: a key the config omits takes the scheduler class's default (DDIM then clips x0-hat to [-1, 1]).
"""
from __future__ import annotations

from diffusers import (
    DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
    PNDMScheduler, UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import UnknownSamplerError

SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "DDIM": (DDIMScheduler, {}),  # Song et al. 2020, deterministic (eta = 0)
    "DDPM": (DDPMScheduler, {}),  # Ho et al. 2020, ancestral
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),  # Liu et al. 2022, PLMS
    "LMS": (LMSDiscreteScheduler, {}),  # linear multistep (k-diffusion)
    "Euler": (EulerDiscreteScheduler, {}),  # Karras et al. 2022, Algorithm 2 without churn
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),  # 2 model evaluations per step
    "DPM2": (KDPM2DiscreteScheduler, {}),  # 2 model evaluations per step
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, {}),  # 2 model evaluations per step
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),  # Lu et al. 2022
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "UniPC": (UniPCMultistepScheduler, {}),  # Zhao et al. 2023
    "DEIS": (DEISMultistepScheduler, {}),  # Zhang & Chen 2022
    "LCM": (LCMScheduler, {}),  # Luo et al. 2023; for LCM / turbo checkpoints
}
TWO_EVALUATION_SAMPLERS = ("Heun", "DPM2", "DPM2 a")
DEFAULT_SAMPLER = "Euler"


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def check_sampler(name: str) -> str:
    """Return `name` if it is registered, else raise with the list of valid names."""
    if name not in SAMPLERS:
        raise UnknownSamplerError(f"Unknown sampler {name!r}. Valid samplers: {', '.join(SAMPLERS)}.")
    return name


def make_scheduler(name: str, base_config) -> SchedulerMixin:
    """A fresh scheduler of sampler `name`, built from a model's scheduler config."""
    cls, overrides = SAMPLERS[check_sampler(name)]
    return cls.from_config(base_config, **overrides)


def x0_clip_range(scheduler) -> float | None:
    """The range the sampler clips x0-hat to at every step (clip_sample in its config), or None."""
    config = scheduler.config
    return float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else None


def config_notes(config: dict) -> list[str]:
    """Plain-words notes on scheduler settings that change what a sampler does in surprising ways."""
    notes = []
    if config.get("clip_sample"):
        notes.append(f"x0-hat is clipped to [-{config.get('clip_sample_range', 1.0):g}, "
                     f"{config.get('clip_sample_range', 1.0):g}] at every step (clip_sample is on: the model's "
                     "config does not turn it off, and this sampler clips by default)")
    if config.get("thresholding"):
        notes.append("x0-hat is dynamically thresholded at every step (thresholding is on)")
    spacing = config.get("timestep_spacing")
    if spacing == "trailing":
        notes.append("timesteps are spaced 'trailing': the first step starts at the very last timestep (pure noise)")
    elif spacing == "leading":
        notes.append(f"timesteps are spaced 'leading' (offset {config.get('steps_offset', 0)}): the first step "
                     "starts a little below the noisiest timestep")
    if "set_alpha_to_one" in config and not config["set_alpha_to_one"] and config.get("_class_name") == "DDIMScheduler":
        notes.append("the last step ends one timestep short of clean (set_alpha_to_one is off)")
    return notes
