"""The Python API: one call per job, used by the CLI, the app and notebooks alike."""
from __future__ import annotations

from typing import Callable, Sequence

from .decode import StreamingDecoder
from .insight import attach_metrics
from .denoise import StepCallback, generate_many
from .models import load_pipeline
from .run import DEFAULT_GUIDANCE, Run, Settings


def run(prompt: str, *, sampler: str = "Euler", model: str = "embedded", num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, width: int | None = None, height: int | None = None,
        negative_prompt: str = "", init_image=None, strength: float = 1.0, decode: bool = True,
        callback: StepCallback | None = None, should_stop: Callable[[], bool] | None = None,
        decoder: StreamingDecoder | None = None) -> Run:
    """Generate, capture every step and (by default) decode its x_t and x0-hat frames through the VAE.

    With `init_image` (PIL image or uint8 array) it is img2img: only the last `strength` of the schedule
    runs, starting from the image's latents noised to that point.
    """
    return compare(prompt, [sampler], model=model, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, seed=seed, width=width, height=height,
                   negative_prompt=negative_prompt, init_image=init_image, strength=strength, decode=decode,
                   callback=callback, should_stop=should_stop, decoder=decoder)[0]


def compare(prompt: str, samplers: Sequence[str], *, model: str = "embedded", num_inference_steps: int = 25,
            guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, width: int | None = None, height: int | None = None,
            negative_prompt: str = "", init_image=None, strength: float = 1.0, decode: bool = True,
            callback: StepCallback | None = None, should_stop: Callable[[], bool] | None = None,
            decoder: StreamingDecoder | None = None) -> list[Run]:
    """Several samplers on the same prompt, seed and initial noise, run in lockstep (one UNet batch per round).

    With `decode`, every step's x_t and x0-hat are VAE-decoded in batches as the steps finish (pass your
    own `decoder` to read its newest frames during the run).
    """
    if not samplers:
        raise ValueError("Pick at least one sampler.")
    settings = [Settings(prompt=prompt, negative_prompt=negative_prompt, model=model, sampler=name,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                         width=width, height=height, strength=strength).validate() for name in samplers]
    pipe = load_pipeline(model)
    if not decode:
        return generate_many(settings, pipe, callback=callback, should_stop=should_stop, init_image=init_image)
    decoder = decoder or StreamingDecoder(pipe.vae)

    def on_step(event):
        decoder(event)
        if callback is not None:
            callback(event)

    runs = generate_many(settings, pipe, callback=on_step, should_stop=should_stop, init_image=init_image)
    decoder.finish(runs)
    for r in runs:
        attach_metrics(r)
    return runs
