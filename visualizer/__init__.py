"""Denoising visualizer: capture, decode and export every step of a Stable Diffusion run.

    from visualizer import run, export_run
    r = run("red apple", sampler="Euler", num_inference_steps=25)
    export_run(r, "out", formats=["gif", "mp4"])

The names below load on first use, so `import visualizer.engine.run` (plain data) stays light.
"""
import importlib

_EXPORTS = {  # name -> the module that defines it
    "compare": "api", "run": "api", "decode_run": "engine.decode", "vae_decode": "engine.decode",
    "generate": "engine.denoise", "generate_many": "engine.denoise", "export_grid": "media.export",
    "export_run": "media.export", "ModelLoadError": "engine.models", "load_pipeline": "engine.models",
    "Run": "engine.run", "Settings": "engine.run", "Step": "engine.run", "SAMPLERS": "engine.samplers",
    "sampler_names": "engine.samplers",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
