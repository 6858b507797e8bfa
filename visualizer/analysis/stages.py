"""The pipeline's real path for one run, stage by stage, in words and numbers."""
from __future__ import annotations

from ..engine.samplers import config_notes


def step_numbers(run, index: int) -> str:
    """Markdown with the numbers of step `index` (0-based)."""
    s = run.steps[index]
    snr = s.snr
    return (f"| step | t | sigma | SNR | noise share | guidance | evaluations |\n|---|---|---|---|---|---|---|\n"
            f"| {s.index} / {len(run)} | {s.timestep:.1f} | {s.sigma:.4f} | {snr:.4g} | {s.noise_share:.1%} | "
            f"{run.settings.guidance_scale:g} | {s.evaluations} |")


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
