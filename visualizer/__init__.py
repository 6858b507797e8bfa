"""Denoising visualizer: capture, decode and export every step of a Stable Diffusion run.

    from visualizer import run, export_run
    r = run("a large red circle in the centre", sampler="Euler", num_inference_steps=25)
    export_run(r, "out", formats=["gif", "mp4"])
"""
from .api import compare, run
from .decode import decode_run, vae_decode
from .denoise import generate, generate_many
from .export import export_grid, export_run
from .models import ModelLoadError, load_pipeline
from .run import Run, Settings, Step
from .samplers import SAMPLERS, sampler_names

__all__ = ["compare", "run", "decode_run", "vae_decode", "generate", "generate_many", "export_grid",
           "export_run", "ModelLoadError", "load_pipeline", "Run", "Settings", "Step", "SAMPLERS", "sampler_names"]
