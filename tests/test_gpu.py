"""On a CUDA GPU only (skipped elsewhere, CI included; where one is: `python -m pytest tests/test_gpu.py`): every
family runs on the GPU in its `--dtype auto` dtype, with and without `--offload`, and gives the image of diffusers'
own pipeline run the same way; with `--offload` its parts wait in CPU memory."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline

from visualizer import api
from visualizer.engine.decode import module_device, vae_decode
from visualizer.engine.families import family_of
from visualizer.engine.models import LoadOptions, load_pipeline
from visualizer.engine.run import Settings

from conftest import tiny_family_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT, SEED, STEPS, GUIDANCE = "a red circle on the left", 3, 4, 3.5
BUILDERS = {"sd": ("tiny_pipeline", {}), "sdxl": ("tiny_sdxl_pipeline", {}), "sd3": ("tiny_sd3_pipeline", {}),
            "flux-dev": ("tiny_flux_pipeline", {}), "flux-schnell": ("tiny_flux_pipeline", {"guidance_embeds": False})}


@pytest.fixture(scope="module", params=list(BUILDERS))
def folder(request, tmp_path_factory) -> str:
    builder, kw = BUILDERS[request.param]
    return tiny_family_model(tmp_path_factory, builder, **kw)[0]


def diffusers_latents(pipeline_class, folder: str, dtype: torch.dtype, offload: bool) -> torch.Tensor:
    """The final latents of diffusers' own `pipeline_class` with the Euler sampler the run used, loaded in `dtype`
    and put on the GPU as `offload` says, image-shaped ([1, C, h, w])."""
    pipe = pipeline_class.from_pretrained(folder, torch_dtype=dtype)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):  # a flow model's Euler is its own scheduler
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.enable_model_cpu_offload() if offload else pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                   output_type="latent", generator=torch.Generator("cpu").manual_seed(SEED)).images
    if isinstance(pipe, FluxPipeline):
        latents = FluxPipeline._unpack_latents(latents, 32, 32, pipe.vae_scale_factor)
    return latents


@pytest.mark.parametrize("offload", [False, True], ids=["on-gpu", "offload"])
def test_runs_on_the_gpu_in_its_dtype_as_diffusers_pipeline_does(folder, offload, load_options):
    load_options(LoadOptions(offload=offload))
    pipe = load_pipeline(folder)
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    assert denoiser.dtype == family.gpu_dtype and pipe.vae.dtype == torch.float32
    weights = lambda: next(denoiser.parameters()).device.type  # noqa: E731
    assert module_device(denoiser).type == "cuda" and weights() == ("cpu" if offload else "cuda")  # offload: they
    # wait in CPU memory
    run = api.run(Settings(prompt=PROMPT, model=folder, num_inference_steps=STEPS, seed=SEED, width=32, height=32,
                           guidance_scale=GUIDANCE), frames=("xt", "x0"))
    assert run.info.device.startswith("cuda") and run.info.dtype == str(family.gpu_dtype).removeprefix("torch.")
    assert weights() == ("cpu" if offload else "cuda")  # back in CPU memory after the run
    ours = vae_decode(pipe.vae, run.tensors["latents"][-1:]).astype(np.float32)
    theirs = vae_decode(pipe.vae, diffusers_latents(type(pipe), folder, family.gpu_dtype, offload)).astype(np.float32)
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()
    assert ours.std() > 1  # not a blank (NaN-decoded) frame


def test_the_cli_runs_with_offload_on_the_gpu(folder, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "visualizer", "run", "--model", folder, "--prompt", PROMPT,
                           "--offload", "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Offload has no effect" not in done.stderr  # what models._load logs where it cannot offload
    assert json.loads((out / "run.json").read_text())["info"]["device"].startswith("cuda")
