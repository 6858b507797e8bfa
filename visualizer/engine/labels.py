"""How runs and steps are named for people (comparison cells, step labels)."""
from __future__ import annotations

def model_name(model: str) -> str:
    """A model reference, short: an alias or "embedded" as it is, a folder's or hub id's last part."""
    return model.rstrip("/").rsplit("/", 1)[-1]


def comparison_labels(settings_list) -> list[str]:
    """Each run's name in a comparison, from its Settings: the sampler, after the model's short name where the
    runs' models differ."""
    if len({s.model for s in settings_list}) == 1:
        return [s.sampler for s in settings_list]
    return [f"{model_name(s.model)} · {s.sampler}" for s in settings_list]


def step_label(step, total: int) -> str:
    """'step 5/25 · t=801 · σ=3.21' for a run.Step."""
    return f"step {step.index}/{total} · t={step.timestep:.0f} · sigma={step.sigma:.2f}"


def start_label(run) -> str:
    """The start frame's label (Run.start_frame): the initial noise x_T, or img2img's noised init image."""
    first = run.steps[0]
    return f"start · {start_what(run)} · t={first.timestep:.0f} · sigma={first.sigma:.2f}"


def start_what(run) -> str:
    """What a run's start frame is, in words."""
    return "the init image noised" if run.info.img2img else "the initial noise x_T"
