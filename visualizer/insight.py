"""Insight into a run: convergence metrics, the noise schedule, the guidance breakdown, the change heatmap
and the pipeline's stages. Plain numpy / torch / matplotlib (no gradio): the app and the CLI share it.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from .decode import from_vae_space, module_device, vae_decode
from .denoise import predictions
from .export import comparison_labels
from .families import BY_KEY
from .samplers import config_notes


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two uint8 RGB images (grey, box window), in [-1, 1]."""
    x, y = (np.asarray(i, np.float64).mean(axis=2) / 255 for i in (a, b))

    def box(z):
        c = np.pad(z, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        w = window
        return (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]) / (w * w)

    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx ** 2, box(y * y) - my ** 2, box(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean square difference of two uint8 images, in [0, 1]."""
    return float(np.sqrt((((a.astype(np.float64) - b.astype(np.float64)) / 255) ** 2).mean()))


def step_metrics(run) -> list[dict]:
    """Per step: how far x0-hat and x_t are from the final image (SSIM, RMSE in [0, 1]; latent distance
    relative to the final latents) and how much x0-hat changed since the previous step."""
    final = run.frames["xt"][-1]
    final_latents = run.tensors["latents"][-1]
    norm = float(final_latents.norm()) or 1.0
    out = []
    for i in range(len(run)):
        x0 = run.frames["x0"][i]
        out.append({
            "step": i + 1,
            "ssim_x0_to_final": round(ssim(x0, final), 4),
            "rmse_x0_to_final": round(rmse(x0, final), 4),
            "rmse_xt_to_final": round(rmse(run.frames["xt"][i], final), 4),
            "latent_distance_x0_to_final": round(float((run.tensors["x0"][i] - final_latents).norm()) / norm, 4),
            "change_from_previous": round(rmse(x0, run.frames["x0"][i - 1]), 4) if i else None,
        })
    return out


def structure_step(metrics: list[dict]) -> int | None:
    """The step (1-based) where structure appears: the first whose x0-hat distance to the final image
    (1 - SSIM) has fallen to half its value at step 1; None if it never does."""
    if not metrics:
        return None
    start = 1 - metrics[0]["ssim_x0_to_final"]
    return next((m["step"] for m in metrics if 1 - m["ssim_x0_to_final"] <= start / 2), None)


def figure_png(fig) -> np.ndarray:
    """A matplotlib figure as a uint8 RGB array (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def convergence_plot(runs, current: int | None = None):
    """A matplotlib figure: 1 - SSIM(x0-hat, final) and latent distance per step, progress on x, one line
    per run (named as in a comparison: by sampler, or model and sampler); the structure step is marked, and the
    `current` step (1-based, first run) highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for k, (run, label) in enumerate(zip(runs, comparison_labels([r.settings for r in runs]))):
        metrics = run.info.metrics or step_metrics(run)
        n = len(metrics)
        x = [m["step"] / n * 100 for m in metrics]
        line, = ax.plot(x, [1 - m["ssim_x0_to_final"] for m in metrics], marker=".", label=f"{label}: 1 - SSIM")
        if len(runs) == 1:
            ax.plot(x, [m["latent_distance_x0_to_final"] for m in metrics], ls="--", color="gray",
                    label="latent distance")
        found = structure_step(metrics)
        if found:
            ax.axvline(found / n * 100, color=line.get_color(), ls=":", lw=1)
            ax.annotate(f"structure at step {found}", (found / n * 100, 0.9 - 0.1 * k), fontsize=8,
                        color=line.get_color(), xytext=(3, 0), textcoords="offset points")
        if current and k == 0:
            m = metrics[current - 1]
            ax.plot([current / n * 100], [1 - m["ssim_x0_to_final"]], "o", ms=10, mfc="none", color="crimson")
    ax.set_xlabel("progress through the schedule (%)")
    ax.set_ylabel("distance to the final image")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.set_title("x0-hat vs the final image (dotted: where structure appears)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def schedule_plot(run, current: int | None = None):
    """sigma (log scale) and noise share per step, the current step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s.index for s in run.steps]
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    ax.semilogy(steps, [max(s.sigma, 1e-4) for s in run.steps], marker=".", label="sigma")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma (log)")
    twin = ax.twinx()
    twin.plot(steps, [s.noise_share for s in run.steps], color="orange", label="noise share")
    twin.set_ylabel("noise share")
    twin.set_ylim(0, 1.05)
    if current:
        ax.axvline(current, color="crimson", lw=1.5)
    ax.set_title(f"{run.settings.sampler}: noise level per step", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def step_numbers(run, index: int) -> str:
    """Markdown with the numbers of step `index` (0-based)."""
    s = run.steps[index]
    snr = s.snr
    return (f"| step | t | sigma | SNR | noise share | guidance | evaluations |\n|---|---|---|---|---|---|---|\n"
            f"| {s.index} / {len(run)} | {s.timestep:.1f} | {s.sigma:.4f} | {snr:.4g} | {s.noise_share:.1%} | "
            f"{run.settings.guidance_scale:g} | {s.evaluations} |")


def heat(values: np.ndarray, scale: float | None = None) -> np.ndarray:
    """A 2-D array -> uint8 RGB heatmap (black -> red -> yellow -> white)."""
    v = values / (scale or values.max() or 1.0)
    v = np.clip(v, 0, 1)
    return (np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1) * 255).astype(np.uint8)


def change_image(previous: np.ndarray | None, current: np.ndarray) -> np.ndarray:
    """|current - previous| per pixel (uint8 frames) as a heatmap; black when there is no previous frame."""
    if previous is None:
        previous = current
    return heat(np.abs(current.astype(np.float32) - previous.astype(np.float32)).mean(axis=2), scale=255 * 0.25)


def change_heatmap(run, index: int) -> np.ndarray:
    """|x0-hat(step) - x0-hat(previous step)| of step `index` (0-based) as a heatmap (black at the first step)."""
    return change_image(run.frames["x0"][index - 1] if index else None, run.frames["x0"][index])


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


def pipeline_stages(run) -> str:
    """Markdown: the run's real path, stage by stage, with shapes and counts."""
    i = run.info
    shown = " ".join(t.replace("</w>", "") for t in i.token_strings[:40])
    truncated = f" — **truncated**, ignored: “{i.dropped_text}”" if i.truncated else ""
    config = i.scheduler_config
    keys = ("timestep_spacing", "prediction_type", "use_karras_sigmas", "algorithm_type", "beta_schedule")
    flow = i.prediction_type == "flow_prediction"
    if flow:  # flow matching: the schedule's shift toward high noise
        keys += ("shift", "use_dynamic_shifting", "use_flow_sigmas", "flow_shift")
    settings = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
    notes = "".join(f"\n   - {note}" for note in config_notes(config))
    h, w = i.image_size or ["?", "?"]
    cfg = "eps_cond" in run.tensors
    start = (f"3. **Initial noise**: shape {i.latent_shape}, seed {run.settings.seed}, "
             + (f"{i.latent_shape[1]} latent channels; x_t = (1 - sigma) x0 + sigma * noise, so the noise "
                "is x_t at sigma = 1 (flow matching)" if flow else
                f"scaled by init_noise_sigma = {i.init_noise_sigma:.3f}"))
    if i.img2img is not None:
        m = i.img2img
        start = (f"3. **Init image (img2img)**: VAE-encoded to shape {i.latent_shape}, noised with seed "
                 f"{run.settings.seed} to t = {m.start_timestep:.0f}, where step {m.skipped_steps + 1} of "
                 f"{run.settings.num_inference_steps} begins (strength {m.strength}); the first "
                 f"{m.skipped_steps} steps are skipped")
    denoiser = ("Transformer** (MMDiT: image patches and text tokens in joint attention; outputs a velocity "
                "v, x0-hat = x_t - sigma * v)" if flow else "UNet**")
    if i.family == "flux":
        denoiser = denoiser.replace("image patches", "2x2 latent patches packed into tokens, with position ids,")
    shift = f" + {i.vae_shift_factor:.4f}" if i.vae_shift_factor else ""
    return "\n".join([
        f"1. **{'Tokenizers' if i.family != 'sd' else 'Tokenizer'}**: {i.tokens} tokens of at most "
        f"{i.token_limit}{_TOKENIZER_NOTES.get(i.family, '')}{truncated}: `{shown}`",
        _text_encoders(run, cfg),
        start,
        f"4. **{denoiser}: {i.unet_evaluations} evaluations for {len(run)} steps, batch of {2 if cfg else 1} per "
        f"evaluation{', in lockstep with other samplers' if i.lockstep_batch > 1 else ''}{_guidance_note(run, cfg)}",
        f"5. **Scheduler**: {i.scheduler} ({settings}){notes}",
        f"6. **VAE**: latents / {i.vae_scaling_factor:.4f}{shift}, upsampled x{i.vae_scale_factor} to a {w}x{h} image",
    ])


_TOKENIZER_NOTES = {"sd3": " (CLIP; T5 reads up to 256)", "flux": " (T5; CLIP reads up to 77 for the pooled embedding)"}
def _guidance_note(run, cfg: bool) -> str:
    """What the guidance scale meant (RunInfo.guidance), and Flux's true CFG."""
    note = {"cfg": "", "distilled": "; the guidance scale is an **input** of the model (guidance-distilled)",
            "none": "; this model takes **no guidance** (the scale is ignored, as its pipeline ignores it)"}[run.info.guidance]
    if run.info.guidance != "cfg":
        note += (f", and **true CFG** (scale {run.settings.true_cfg_scale:g}) adds a negative branch: the batch of 2"
                 if cfg else ": there is no unconditional branch, so no CFG breakdown")
    return note


def _text_encoders(run, cfg: bool) -> str:
    """The text-encoder stage of pipeline_stages, for the run's model family."""
    i = run.info
    source = "negative" if run.settings.negative_prompt else "empty"
    if i.family == "flux":
        return (f"2. **Text encoders** (Flux): text_encoder_2 (T5) encodes the prompt into {i.text_embedding_shape[1]} "
                f"token states, shape {i.text_embedding_shape}, the transformer's text tokens (txt_ids all zero); "
                f"text_encoder (CLIP)'s **pooled embedding**, shape {i.pooled_embedding_shape}, enters beside the "
                "timestep (pooled_projections). No negative prompt: Flux has no unconditional branch")
    if i.family == "sd3":
        return (f"2. **Text encoders** (SD 3): text_encoder and text_encoder_2 (CLIP) each encode the prompt; their "
                "penultimate hidden states, concatenated per token and zero-padded to T5's width, are followed by "
                f"text_encoder_3's (T5) hidden states: an embedding of shape {i.text_embedding_shape} "
                f"({f'with an unconditional twin for CFG, from the {source} prompt' if cfg else 'no CFG'}). Both CLIP "
                f"encoders' **pooled embeddings**, concatenated, shape {i.pooled_embedding_shape}, enter the "
                "transformer beside the timestep (pooled_projections)")
    if i.family != "sdxl":
        return (f"2. **Text encoder**: embedding of shape {i.text_embedding_shape} "
                f"({'with an unconditional twin for CFG' if cfg else 'no CFG'})")
    twin = "no CFG"
    if cfg and i.zero_negative:
        twin = ("with an all-zero unconditional twin for CFG: no negative prompt, and the model's "
                "force_zeros_for_empty_prompt is on")
    elif cfg:
        twin = f"with an unconditional twin for CFG, from the {source} prompt"
    size = ", ".join(f"{v:g}" for v in i.time_ids or [])
    return (f"2. **Text encoders** (SDXL): text_encoder and text_encoder_2 each encode the prompt; their "
            f"penultimate hidden states are concatenated per token into an embedding of shape "
            f"{i.text_embedding_shape} ({twin}). text_encoder_2's **pooled embedding**, shape "
            f"{i.pooled_embedding_shape}, and the size conditioning time_ids = ({size}) (original height, width; "
            "crop top, left; target height, width) enter the UNet beside the timestep (added_cond_kwargs)")


def attach_metrics(run) -> None:
    """Store per-step metrics and the structure step in `run.info` (so they land in run.json); a stopped run
    has no final image to measure against, so it gets none."""
    if len(run) and not run.info.stopped and {"xt", "x0"} <= set(run.frames):
        run.info.metrics = step_metrics(run)
        run.info.structure_step = structure_step(run.info.metrics)


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
