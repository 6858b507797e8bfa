"""`python -m visualizer bench --families`: the capture's cost per model family, on tiny random models.

For each family (SD 1.x / 2.x, SDXL, SD 3, Flux) a tiny random pipeline is built offline (demo_model.architecture)
and timed, in one process, one job at a time, median of `repeats`:
- plain: the family's own diffusers pipeline `__call__` with the same Euler sampler (output_type="np");
- capture: the visualizer's loop capturing every step (x_t, x0-hat, noise predictions) plus the final image's
  VAE decode: the same work as plain, and what owning the loop adds;
- frames: `api.run`, which also decodes every x_t and x0-hat frame and computes the convergence metrics.
Tiny models make the denoiser cheap, so these ratios are an upper bound on what capture adds to a real model.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import api
from ..engine.decode import vae_decode
from ..engine.denoise import generate
from ..engine.families import family_of
from ..engine.models import load_pipeline
from ..engine.run import Settings
from ..engine.samplers import make_scheduler

PROMPT = "a red circle on the left"
SIZE = 32  # pixels: every tiny model's native size but Flux's, which would default to 512
GUIDANCE = {"sd": 5.0, "sdxl": 5.0, "sd3": 5.0, "flux": 3.5}


def _builders():
    from ..demo_model import architecture

    return {"sd": architecture.tiny_pipeline, "sdxl": architecture.tiny_sdxl_pipeline,
            "sd3": architecture.tiny_sd3_pipeline, "flux": architecture.tiny_flux_pipeline}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_family(folder: str, family: str, steps: int, repeats: int) -> dict:
    pipe = load_pipeline(folder)
    reference = type(pipe)(**pipe.components)  # plain diffusers, sharing the modules, with the same sampler
    reference.scheduler = make_scheduler("Euler", pipe.scheduler.config, family_of(pipe).sampler_kind)
    reference.set_progress_bar_config(disable=True)
    guidance = GUIDANCE[family]
    settings = Settings(prompt=PROMPT, model=folder, sampler="Euler", num_inference_steps=steps,
                        guidance_scale=guidance, width=SIZE, height=SIZE)

    def plain():
        reference(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
             generator=torch.Generator().manual_seed(0), output_type="np")

    def capture():
        run = generate(settings, pipe)
        vae_decode(pipe.vae, run.tensors["latents"][-1:])

    def frames():
        api.run(settings)

    row = {"plain": _median_seconds(plain, repeats), "capture": _median_seconds(capture, repeats),
           "frames": _median_seconds(frames, repeats)}
    row.update(capture_over_plain=row["capture"] / row["plain"], frames_over_plain=row["frames"] / row["plain"])
    return row


def main(steps: int = 20, repeats: int = 5) -> dict:
    """Time every family's row (see the module docstring) on the engine thread, as the app runs its models."""
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, build in _builders().items():
            folder = str(build(Path(tmp) / family))
            report[family] = api.on_engine(measure_family, folder, family, steps, repeats)
    return report


def format_rows(report: dict, steps: int = 20) -> str:
    lines = [f"| family (tiny random, {SIZE}x{SIZE}, {steps} Euler steps) | plain s | capture s | every frame s | "
             "capture / plain | every frame / plain |", "|---|---|---|---|---|---|"]
    for family, r in report.items():
        lines.append(f"| {family} | {r['plain']:.3f} | {r['capture']:.3f} | {r['frames']:.3f} | "
                     f"{r['capture_over_plain']:.2f}x | {r['frames_over_plain']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_rows(main()))
