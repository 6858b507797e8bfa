"""The sampler registry: the names people know -> a diffusers scheduler class and its overrides.

`make_scheduler` builds a fresh scheduler for every run (schedulers are stateful: never share one).
"""
from __future__ import annotations

from diffusers import (
    DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
    PNDMScheduler, UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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


class UnknownSamplerError(ValueError):
    pass


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
    scheduler = cls.from_config(base_config, **overrides)
    if scheduler.config.get("clip_sample"):  # latents are never clipped (StableDiffusionPipeline agrees)
        scheduler = cls.from_config(base_config, **overrides, clip_sample=False)
    return scheduler
