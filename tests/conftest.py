"""Shared fixtures: a tiny random Stable Diffusion pipeline saved to disk and loaded like a real model."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from visualizer.demo_model.architecture import tiny_pipeline


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny SD pipeline folder (32x32 images) built from configs with save_pretrained."""
    return str(tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from visualizer.engine.models import load_pipeline

    return load_pipeline(tiny_model)


@pytest.fixture
def load_options():
    """Set this process's LoadOptions (models.configure) for one test; the previous ones come back after it."""
    from visualizer.engine.models import LoadOptions, configure

    previous = configure(LoadOptions())
    yield configure
    configure(previous)


def tiny_family_model(tmp_path_factory, builder: str, **kw) -> tuple[str, object]:
    """(folder, pipeline) of a tiny random model made by `demo_model.architecture.<builder>` (e.g.
    "tiny_sd3_pipeline"), saved with save_pretrained and loaded like a real one."""
    from visualizer.demo_model import architecture
    from visualizer.engine.models import load_pipeline

    folder = str(getattr(architecture, builder)(tmp_path_factory.mktemp(builder), **kw))
    return folder, load_pipeline(folder)


def check_latent_colour_preview(pipe, factors, bias) -> None:
    """`pipe`'s cheap preview uses its family's latent -> RGB `factors` and `bias`, says it is a preview, and shows
    all-zero latents as the bias colour."""
    import numpy as np
    import torch

    from visualizer.engine.decode import CheapPreview, latent_rgb_factors

    got_factors, got_bias = latent_rgb_factors(pipe)
    assert torch.equal(got_factors, torch.tensor(factors)) and torch.equal(got_bias, torch.tensor(bias))
    preview = CheapPreview(pipe, use_taesd=False)(torch.zeros(1, len(factors), 8, 8), step=1)
    assert not preview.exact and "preview" in preview.label
    assert (preview.image[0, 0] == np.round((np.array(bias) / 2 + 0.5) * 255)).all()


def check_taesd_lookup(family: str, variable: str, folder, monkeypatch, latent_channels: int = 16) -> None:
    """`family`'s TAESD is loaded from the folder its environment `variable` names."""
    import torch
    from diffusers import AutoencoderTiny

    from visualizer.engine.decode import load_taesd

    AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8, 8, 8, 8),
                    decoder_block_out_channels=(8, 8, 8, 8)).save_pretrained(folder)
    monkeypatch.setenv(variable, str(folder))
    assert load_taesd(torch.device("cpu"), family) is not None


# The largest difference allowed on any pixel channel between this project's final image (uint8, as the app shows
# it) and diffusers' own pipeline output (float in [0, 1]) for the same settings: the rounding to uint8 (0.5/255) and
# 1e-6 for float arithmetic. Measured on the tiny models here: at most 0.500004/255; before the rounding the two
# decoded images were bit for bit the same for SD, SDXL and SD 3, and within 0.0003/255 for Flux with true CFG.
IMAGE_TOLERANCE = 0.5 / 255 + 1e-6


def image_difference(ours, theirs) -> float:
    """The largest absolute difference on any pixel channel, ours (uint8, or floats in [0, 1]) against theirs."""
    import numpy as np

    ours = np.asarray(ours)
    ours = ours.astype(np.float64) / 255 if ours.dtype == np.uint8 else ours.astype(np.float64)
    return float(np.abs(ours - np.asarray(theirs, np.float64)).max())


def assert_same_image(ours, theirs, tolerance: float = IMAGE_TOLERANCE) -> None:
    """ours matches diffusers' image within `tolerance` on every pixel channel."""
    difference = image_difference(ours, theirs)
    assert difference <= tolerance, f"largest difference {difference * 255:.4f}/255 > {tolerance * 255:.4f}/255"


def trace_diffusers(reference, denoiser, **call) -> dict:
    """Run diffusers' own pipeline `reference(**call)` once and record, per step as this project counts steps:

    - "latents": [steps, ...] what diffusers hands `callback_on_step_end` (`callback_kwargs["latents"]`) at the
      end of each step;
    - "model_input" / "model_output": [steps, ...] what its `denoiser` module (reference.unet or .transformer)
      was given as `hidden_states` / `sample` and returned, at the first evaluation of each step, CFG batch as
      diffusers stacks it ([negative, positive]); "sigmas": [steps] the scheduler's sigma at that evaluation.

    diffusers calls the callback once per entry of `scheduler.timesteps`, after `scheduler.step`. Heun-type
    schedulers (those with `state_in_first_order`: Heun, DPM2, FlowMatchHeun) have 2N - 1 entries for N steps:
    the first timestep once, every later one twice. Their first evaluation of a step moves the latents to an Euler
    estimate at the next sigma (the scheduler is then in its second-order state), the second corrects it (back in
    the first-order state). So a step ends at each callback after which the scheduler is in its first-order state
    (entries 1, 3, ..., 2N - 3) and at the last entry (2N - 2), a single Euler step to sigma 0; a step starts at
    each evaluation made in the first-order state (entries 0, 2, ..., 2N - 2). Every other scheduler used here
    evaluates once per entry: each callback ends a step, each evaluation starts one."""
    import torch

    ends, starts, evaluations = [], [], []

    def first_order() -> bool:
        return bool(getattr(reference.scheduler, "state_in_first_order", True))

    def on_step_end(pipe, i, t, kwargs):
        if first_order() or i == len(pipe.scheduler.timesteps) - 1:
            ends.append(kwargs["latents"].clone())
        return kwargs

    def on_forward(module, args, kwargs, output):  # the UNet takes its sample first, the transformers hidden_states=
        if first_order():
            sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            result = output[0] if isinstance(output, tuple) else output.sample
            starts.append((len(evaluations), sample.clone(), result.clone()))
        evaluations.append(1)

    handle = denoiser.register_forward_hook(on_forward, with_kwargs=True)
    try:
        image = reference(**call, callback_on_step_end=on_step_end).images[0]
    finally:
        handle.remove()
    scheduler = reference.scheduler
    return {"latents": torch.cat(ends), "model_input": torch.stack([s for _, s, _ in starts]),
            "model_output": torch.stack([o for _, _, o in starts]),
            "sigmas": torch.tensor([float(scheduler.sigmas[j]) for j, _, _ in starts]), "evaluations": len(evaluations),
            "image": image}
