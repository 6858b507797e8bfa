"""The guided tour's content: eight chapters through real runs of one model, each a paragraph in plain words
whose numbers are those runs' own, and what the player beside it shows (which runs, view, tab and position).

`TourRuns` holds what a tour shows: the run (with word maps), the same seed at three guidance scales, four samplers
from the same noise, and a 2D run. `chapters(runs)` writes the text from their numbers; nothing is hard-coded but
Stable Diffusion 1.5's sizes, stated as the comparison. No gradio here: learn.py is the tab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..analysis import image_map, word_maps
from ..engine.labels import model_name
from ..engine.run import Run
from ..toy import model as toy

TOUR_STEPS = 25
GUIDANCE_SCALES = (1.0, 5.0, 12.0)  # chapter "text": off, moderate, strong
TOUR_SAMPLERS = ("Euler", "DDIM", "DPM++ 2M", "Euler a")
SD15_SIDE, SD15_FACTOR, SD15_CHANNELS = 512, 8, 4  # SD 1.5: 512x512 RGB images, latents 8x smaller, 4 channels
TITLES = {  # each chapter's deep-link key (?chapter=<key>) and title, in the tour's order
    "noise": "1 · An image is numbers, and noise is added step by step",
    "way-back": "2 · The model learns which way is back",
    "denoising": "3 · Denoising from pure noise",
    "click": "4 · When does it click?",
    "text": "5 · Text steers it",
    "latents": "6 · Why latents",
    "samplers": "7 · Samplers",
    "image-space": "8 · Where the image lands",
}
PREDICTS = {"epsilon": "the noise in its input", "v_prediction": "v, a blend of the noise and the image",
            "flow_prediction": "a velocity, the direction from the image to the noise"}


@dataclass
class TourRuns:
    """Everything a tour shows, computed from one prompt, seed and model."""
    run: Run  # Euler, TOUR_STEPS steps, with word maps and forward noising (its "forward" frames)
    guided: list[Run]  # the same seed at GUIDANCE_SCALES
    samplers: list[Run]  # TOUR_SAMPLERS from the same noise
    toy: toy.ToyRun  # the 2D playground's default run


@dataclass
class Chapter:
    key: str  # its deep link: ?chapter=<key>
    title: str
    text: str  # markdown, with the runs' numbers
    visual: str  # the runs the player shows: "run", "toy", "guided" or "samplers"
    view: str  # the player's view
    tab: str = "convergence"  # the insight tab to open
    at: int | None = None  # the player position to open on (1 = the start); None: the last


def _pct(share: float) -> str:
    return f"{share:.1%}" if share < 0.1 or share > 0.9 else f"{share:.0%}"


def _distance(run: Run, step: int) -> float:
    """1 - SSIM of x0-hat at `step` (1-based) to the final image."""
    return 1 - run.info.metrics[step - 1]["ssim_x0_to_final"]


def _mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference, as a share of the 0-255 range."""
    return float(np.abs(a.astype(float) - b.astype(float)).mean() / 255)


def _word_shares(run: Run, step: int) -> list[tuple[str, float]]:
    """Each word of the prompt (its tokenizer's pieces joined) and its share of the words' attention at `step`."""
    pieces = run.info.token_strings[1:1 + len(run.info.attention["tokens"])] if run.info.attention else []
    shares = word_maps.shares(run)[step - 1] if pieces else []
    words: list[tuple[str, float]] = []
    open_word = False
    for piece, share in zip(pieces, shares):
        text = piece.replace("</w>", "").lstrip("\u2581")
        if open_word:
            words[-1] = (words[-1][0] + text, words[-1][1] + share)
        else:
            words.append((text, share))
        open_word = not piece.endswith("</w>") and not piece.startswith("\u2581")
    return words


def chapters(runs: TourRuns) -> list[Chapter]:
    run, first, last = runs.run, runs.run.steps[0], runs.run.steps[-1]
    h, w = run.info.image_size
    pixels = h * w * 3
    latent = math.prod(run.info.latent_shape[1:])
    c, lh, lw = run.info.latent_shape[1:]
    sd_pixels, sd_latent = SD15_SIDE ** 2 * 3, (SD15_SIDE // SD15_FACTOR) ** 2 * SD15_CHANNELS
    structure = run.info.structure_step
    changes = np.cumsum([m["change_from_previous"] or 0 for m in run.info.metrics])
    half = int(np.searchsorted(changes, changes[-1] / 2)) + 1  # the step by which half the guess's change is done
    model = model_name(run.info.model_source)
    out = [Chapter("noise", TITLES["noise"], (
        f"To the computer this run's final image is {h}×{w} pixels × 3 colours: {pixels:,} numbers from 0 to 255. "
        "A diffusion model is trained on images with noise added on purpose, a little or a lot. The player shows "
        f"this image noised at each of the run's {len(run)} noise levels (encoded, mixed with Gaussian noise, "
        f"decoded). At step {last.index} the noise share is {_pct(last.noise_share)}; at step 1 it is "
        f"{_pct(first.noise_share)}, and only {_pct(1 - first.noise_share)} of the input's variance is still the "
        "image. Drag the slider left to add noise."), "run", "forward", "schedule")]
    ratio = toy.distance_ratio(runs.toy)
    s = runs.toy.settings
    out.append(Chapter("way-back", TITLES["way-back"], (
        f"Here {s.points:,} points in a plane (two numbers each, not {pixels:,}) start as random noise and flow onto "
        f"a {s.pattern} in {len(runs.toy)} steps. Each arrow points from where a point is toward where the model "
        "guesses it started (its x0-hat). That guess, at every noise level, is all a diffusion model learns: which "
        f"way is back to the data. The points' median distance to the {s.pattern} falls to {ratio:.0%} of the "
        "noise's. Press Play, or click a point to trace its path."), "toy", "points", "schedule", at=1))
    predicts = PREDICTS.get(run.info.prediction_type, run.info.prediction_type)
    out.append(Chapter("denoising", TITLES["denoising"], (
        f"A run starts from random noise: position 0 of the slider is the seed's {c}×{lh}×{lw} noise, decoded. It "
        f"reads as noise share {_pct(first.noise_share)} at timestep t = {first.timestep:.0f}, the noisiest level of "
        f"this schedule. At each of {len(run)} steps the model ({model}) predicts {predicts}, and the sampler "
        f"({run.settings.sampler}) moves a little toward what that implies. Left, x_t: where the run is. Right, x0-hat: "
        f"the model's guess of the final image from there ({run.info.denoiser_evaluations} model evaluations in "
        "all). Press Play."), "run", "both", "numbers", at=1))
    if structure:
        click = (f"The curve is how far the guess is from the final image (1 − SSIM): {_distance(run, 1):.2f} at step 1, "
                 f"{_distance(run, structure):.2f} at step {structure}, where it has halved. That is where structure "
                 f"appears, outlined on the frame; the noise share there is still {_pct(run.steps[structure - 1].noise_share)}. ")
    else:
        click = (f"The guess never got half-way closer to the final image before the end (1 − SSIM "
                 f"{_distance(run, 1):.2f} at step 1, {_distance(run, len(run)):.2f} at the end). ")
    out.append(Chapter("click", TITLES["click"], click + (
        f"Half of all the change in the guess, step to step, has happened by step {half} of {len(run)} (the Change "
        "tab shows where in the image it changes)."), "run", "x0", "convergence",
        at=(structure + 1) if structure else None))
    finals = [r.final_image for r in runs.guided]
    scales = " · ".join(f"{g:g}" for g in GUIDANCE_SCALES)
    top = ""
    words = _word_shares(runs.guided[-1], structure) if structure else []
    if words:
        word, share = max(words, key=lambda pair: pair[1])
        top = (f" Pick a word (or a piece of one) under the frames to see where it acts: at step {structure}, "
               f"“{word}” gets {share:.0%} of the prompt's attention.")
    out.append(Chapter("text", TITLES["text"], (
        f"The same seed and noise at guidance {scales}. Guidance runs the model twice per step, without and with the "
        "prompt, and pushes further in the direction the prompt adds: uncond + scale × (cond − uncond); at 1 it is "
        f"off. The final images at {GUIDANCE_SCALES[0]:g} and {GUIDANCE_SCALES[-1]:g} differ by "
        f"{_mean_difference(finals[0], finals[-1]):.0%} of the pixel range on average; {GUIDANCE_SCALES[1]:g} and "
        f"{GUIDANCE_SCALES[-1]:g} by {_mean_difference(finals[1], finals[-1]):.0%}.{top}"), "guided", "xt", "convergence"))
    out.append(Chapter("latents", TITLES["latents"], (
        f"The model does not denoise pixels. Its VAE compresses each {h}×{w}×3 image ({pixels:,} numbers) into a "
        f"{c}×{lh}×{lw} latent ({latent:,} numbers, {pixels / latent:g}× fewer); Stable Diffusion 1.5 turns "
        f"{SD15_SIDE}×{SD15_SIDE}×3 ({sd_pixels:,}) into {SD15_CHANNELS}×{SD15_SIDE // SD15_FACTOR}×"
        f"{SD15_SIDE // SD15_FACTOR} ({sd_latent:,}), {sd_pixels / sd_latent:g}× fewer. The whole run happens there; "
        "every frame you saw is a latent decoded. The player shows this run's latent channels, each scaled to its own "
        "range."), "run", "latents", "numbers"))
    lines = []
    for r in runs.samplers:
        at = f"structure at step {r.info.structure_step}" if r.info.structure_step else "no halving"
        lines.append(f"{r.settings.sampler}: {at}, {r.info.denoiser_evaluations} evaluations")
    base = runs.samplers[0]
    apart = {r.settings.sampler: _mean_difference(base.final_image, r.final_image) for r in runs.samplers[1:]}
    farthest = max(apart, key=apart.get)
    out.append(Chapter("samplers", TITLES["samplers"], (
        f"{len(runs.samplers)} samplers from the same noise, on one slider (each at the same share of its schedule): "
        f"{'; '.join(lines)}. They follow the same model's predictions with different rules for the next step. "
        f"{farthest}'s final image is the farthest from {base.settings.sampler}'s: {apart[farthest]:.1%} of the pixel "
        "range on average."), "samplers", "xt", "convergence"))
    space = image_map.for_runs([run])
    if len(space.points):
        where = (f"The map is fixed: the two directions along which {model}'s training images vary most (PCA of "
                 f"their latents). The path starts at the noise and ends nearest the "
                 f"{space.cluster(image_map.path(run, space).end)} group.")
    else:
        where = "The map is fitted to this run's own latents (no map ships with this model)."
    out.append(Chapter("image-space", TITLES["image-space"], (
        f"Each latent is one point in a space of {latent:,} dimensions. The map flattens that space to two: the "
        f"run's x0-hat at each step is a dot, and the dots make its path. {where} Move the slider to follow it."),
        "run", "map", "convergence"))
    return out

