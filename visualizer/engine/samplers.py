"""The sampler registry: the names people know -> a diffusers scheduler class and its overrides, per kind of model.

Diffusion models (SD 1.x / 2.x, SDXL: noise or v prediction on a beta schedule) and flow-matching models
(SD 3, Flux: a velocity on the straight path x_t = (1 - sigma) x0 + sigma * noise) need different schedulers, so
each kind has its own registry (`SAMPLERS`, `FLOW_SAMPLERS`, `FLUX_SAMPLERS`); a name means the same algorithm
in each. Flux shifts its schedule by the image size (`mu`), which FlowMatchHeun cannot take: Flux has no Heun.

`make_scheduler` builds a fresh scheduler for every run (schedulers are stateful: never share one) from
the model's own scheduler config, exactly as `Scheduler.from_config(pipe.scheduler.config)` does in
diffusers: a key the config omits takes the scheduler class's default (DDIM then clips x0-hat to [-1, 1]).
"""
from __future__ import annotations

import importlib
from typing import Callable

from ..errors import UnknownSamplerError

# (diffusers scheduler class name, overrides): the name is resolved only when a scheduler is made, so the registry
# (and Settings, which checks names against it) is plain data that does not import diffusers; the overrides are
# keywords for from_config, or a function of the model's scheduler config that returns them
Overrides = dict | Callable[[dict], dict]
SAMPLERS: dict[str, tuple[str, Overrides]] = {  # for diffusion models
    "DDIM": ("DDIMScheduler", {}),  # Song et al. 2020, deterministic (eta = 0)
    "DDPM": ("DDPMScheduler", {}),  # Ho et al. 2020, ancestral
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),  # Liu et al. 2022, PLMS
    "LMS": ("LMSDiscreteScheduler", {}),  # linear multistep (k-diffusion)
    "Euler": ("EulerDiscreteScheduler", {}),  # Karras et al. 2022, Algorithm 2 without churn
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),  # 2 model evaluations per step
    "DPM2": ("KDPM2DiscreteScheduler", {}),  # 2 model evaluations per step
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),  # 2 model evaluations per step
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),  # Lu et al. 2022
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "UniPC": ("UniPCMultistepScheduler", {}),  # Zhao et al. 2023
    "DEIS": ("DEISMultistepScheduler", {}),  # Zhang & Chen 2022
    "LCM": ("LCMScheduler", {}),  # Luo et al. 2023; for LCM / turbo checkpoints
}


def _flow_solver(config: dict) -> dict:
    """A multistep solver on flow sigmas, shifted by the model's own `shift`, reading the output as a velocity."""
    return {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": config.get("shift", 1.0)}


FLOW_SAMPLERS: dict[str, tuple[str, Overrides]] = {  # for flow-matching models
    "Euler": ("FlowMatchEulerDiscreteScheduler", {}),  # the SD 3 pipeline's own sampler
    "Heun": ("FlowMatchHeunDiscreteScheduler", {}),  # 2 model evaluations per step
    "DPM++ 2M": ("DPMSolverMultistepScheduler", _flow_solver),  # Lu et al. 2022
    "UniPC": ("UniPCMultistepScheduler", _flow_solver),  # Zhao et al. 2023
    "DEIS": ("DEISMultistepScheduler", _flow_solver),  # Zhang & Chen 2022
}
FLUX_SAMPLERS = {name: entry for name, entry in FLOW_SAMPLERS.items() if name != "Heun"}  # the Euler: FluxPipeline's
REGISTRIES = {"diffusion": SAMPLERS, "flow": FLOW_SAMPLERS, "flux": FLUX_SAMPLERS}  # by families.py's sampler_kind
KINDS = {"diffusion": "diffusion models (SD 1.x / 2.x, SDXL)", "flow": "flow-matching models (SD 3)",
         "flux": "Flux models (flow matching with a size-dependent shift)"}  # in words
TWO_EVALUATION_SAMPLERS = ("Heun", "DPM2", "DPM2 a")
DEFAULT_SAMPLER = "Euler"


def sampler_names() -> list[str]:
    """The diffusion models' samplers (valid_for gives another kind's)."""
    return list(SAMPLERS)


def valid_for(kind: str) -> list[str]:
    """The samplers that fit models of `kind` (a key of REGISTRIES)."""
    return list(REGISTRIES[kind])


def fitting(name: str, kind: str) -> str:
    """`name` where it fits models of `kind`, else DEFAULT_SAMPLER (which every kind has)."""
    return name if name in REGISTRIES[kind] else DEFAULT_SAMPLER


def check_sampler(name: str) -> str:
    """Return `name` if some kind of model has it, else raise with the list of valid names."""
    if not any(name in registry for registry in REGISTRIES.values()):
        raise UnknownSamplerError(f"Unknown sampler {name!r}. Valid samplers: {', '.join(SAMPLERS)}; for "
                                  f"{KINDS['flow']}: {', '.join(FLOW_SAMPLERS)}; for Flux: {', '.join(FLUX_SAMPLERS)}.")
    return name


def make_scheduler(name: str, base_config, kind: str = "diffusion") :
    """A fresh scheduler of sampler `name` for a model of `kind`, built from the model's scheduler config;
    UnknownSamplerError naming the valid ones if the sampler does not fit that kind."""
    registry = REGISTRIES[kind]
    if check_sampler(name) not in registry:
        raise UnknownSamplerError(f"The {name} sampler does not fit {KINDS[kind]}. Valid samplers for them: "
                                  f"{', '.join(registry)}.")
    _, overrides = registry[name]
    return scheduler_class(name, kind).from_config(base_config, **(overrides(base_config) if callable(overrides)
                                                                  else overrides))


def scheduler_class(name: str, kind: str = "diffusion"):
    """The diffusers scheduler class of sampler `name` for models of `kind` (imports diffusers)."""
    return getattr(importlib.import_module("diffusers"), REGISTRIES[kind][name][0])


def prediction_type(scheduler) -> str:
    """What the model output means to `scheduler`: its config's prediction_type; the flow-matching schedulers
    have none (they read a velocity): "flow_prediction"."""
    return scheduler.config.get("prediction_type", "flow_prediction")


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
        notes.append("timesteps are spaced 'trailing': the first step starts at the very last timestep (the noisiest; "
                     "pure noise only on a zero-terminal-SNR schedule: on SD's, alpha_bar there is about 0.005)")
    elif spacing == "leading":
        notes.append(f"timesteps are spaced 'leading' (offset {config.get('steps_offset', 0)}): the first step "
                     "starts a little below the noisiest timestep")
    if "set_alpha_to_one" in config and not config["set_alpha_to_one"] and config.get("_class_name") == "DDIMScheduler":
        notes.append("the last step ends one timestep short of clean (set_alpha_to_one is off)")
    return notes
