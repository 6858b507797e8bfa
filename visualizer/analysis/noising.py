"""What the model predicts with and without the prompt, and the forward process q(x_t | x_0) at a run's noise levels."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..engine.decode import from_vae_space, module_device, vae_decode
from ..engine.denoise import predictions
from ..engine.families import BY_KEY
from .metrics import heat


def guidance_note(run) -> str:
    """One line in plain words on what the guidance panel shows for `run`: its formula with the run's own scale,
    what stands for "without the prompt" (the negative prompt, when one is set), or why the panel is empty."""
    family = BY_KEY[run.info.family]
    scale = getattr(run.settings, family.cfg_setting)
    if "eps_cond" not in run.tensors:
        if family.cfg_setting != "guidance_scale":
            return (f"{family.name}: its guidance scale ({run.settings.guidance_scale:g}) is an input of the model, so "
                    "there is no second branch to show; set the true CFG scale above 1 for one.")
        return (f"Guidance was off in this run (scale {scale:g}: at 1 and below only the prompt's branch runs, as in "
                "diffusers), so the image is the prompt's prediction alone and there is nothing to break down.")
    negative = run.settings.negative_prompt.strip()
    without = f"the negative prompt “{negative}”" if negative else "the empty prompt"
    return (f"Scale {scale:g}: guided = without + {scale:g} × (with − without). “Without the prompt” is the "
            f"prediction for {without}.")


def guidance_breakdown(run, index: int, vae) -> dict[str, np.ndarray] | None:
    """What the model predicts at step `index` without the prompt, with it, and what guidance adds.

    Returns uint8 images: 'uncond' and 'cond' are the decoded x0-hat each branch implies, 'guided' the
    decoded x0-hat of guided = uncond + scale * (cond - uncond), 'added' a heatmap of |scale * (cond - uncond)|
    in latent space (flow-matching runs: of scale * (v_cond - v_uncond), the velocities, v = noise - x0-hat). None
    when the run used no classifier-free guidance (Flux: none; its guidance is an input of the model).
    """
    t = run.tensors
    if "eps_cond" not in t:
        return None
    step = slice(index, index + 1)
    if run.steps[index].flow:  # each branch's x0-hat is captured (denoise.py)
        x0_uncond, x0_cond = t["x0_uncond"][step], t["x0_cond"][step]
        difference = (t["eps_cond"][index] - x0_cond[0]) - (t["eps_uncond"][index] - x0_uncond[0])
    else:
        sigma = run.steps[index].sigma
        x0_uncond, _ = predictions(t["x_in"][step], t["eps_uncond"][step], sigma, "epsilon")
        x0_cond, _ = predictions(t["x_in"][step], t["eps_cond"][step], sigma, "epsilon")
        difference = t["eps_cond"][index] - t["eps_uncond"][index]
    decoded = vae_decode(vae, torch.cat([x0_uncond, x0_cond, t["x0"][step]]))
    scale = getattr(run.settings, BY_KEY[run.info.family].cfg_setting)
    added = (scale * difference).norm(dim=0).numpy()
    size = decoded.shape[1]
    added_image = np.asarray(Image.fromarray(heat(added)).resize((size, size), Image.Resampling.NEAREST))
    return {"uncond": decoded[0], "cond": decoded[1], "guided": decoded[2], "added": added_image}


@torch.inference_mode()
def forward_noising(run, image: np.ndarray, vae, seed: int = 0) -> list[np.ndarray]:
    """q(x_t | x_0) at the run's own noise levels: `image` (uint8 RGB) is VAE-encoded, noised to every step's
    sigma with one fixed noise draw, and decoded; returns one uint8 frame per step, at the run's size."""
    h, w = run.info.image_size or image.shape[:2]
    pixels = np.asarray(Image.fromarray(image).convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
    device = module_device(vae)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    latents = from_vae_space(vae, vae.encode(x).latent_dist.mean)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    noised = [(1 - s.sigma) * latents + s.sigma * noise if s.flow
              else (latents + s.sigma * noise) / math.sqrt(1 + s.sigma ** 2) for s in run.steps]
    return list(vae_decode(vae, torch.cat(noised)))
