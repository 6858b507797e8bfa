"""The pipeline's real path for one run, stage by stage, in words and numbers (what is particular to a model
family, its tokenizers, text encoders and denoiser, its adapter in engine/families.py says)."""
from __future__ import annotations

from ..engine.families import BY_KEY
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
    family = BY_KEY[i.family]
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
    lockstep = ", in lockstep with other samplers" if i.lockstep_batch > 1 else ""
    shift = f" + {i.vae_shift_factor:.4f}" if i.vae_shift_factor else ""
    return "\n".join([
        f"1. **{family.tokenizer_heading}**: {i.tokens} tokens of at most {i.token_limit}{family.tokenizer_note}"
        f"{truncated}: `{shown}`",
        f"2. {family.text_encoder_stage(i, cfg, bool(run.settings.negative_prompt))}",
        start,
        f"4. **{family.denoiser_heading}: {i.denoiser_evaluations} evaluations for {len(run)} steps, batch of "
        f"{2 if cfg else 1} per evaluation{lockstep}{_guidance_note(run, cfg)}",
        f"5. **Scheduler**: {i.scheduler} ({settings}){notes}",
        f"6. **VAE**: latents / {i.vae_scaling_factor:.4f}{shift}, upsampled x{i.vae_scale_factor} to a {w}x{h} image",
    ])


def _guidance_note(run, cfg: bool) -> str:
    """What the guidance scale meant (RunInfo.guidance), and Flux's true CFG."""
    note = {"cfg": "", "distilled": "; the guidance scale is an **input** of the model (guidance-distilled)",
            "none": "; this model takes **no guidance** (the scale is ignored, as its pipeline ignores it)"}[run.info.guidance]
    if run.info.guidance != "cfg":
        note += (f", and **true CFG** (scale {run.settings.true_cfg_scale:g}) adds a negative branch: the batch of 2"
                 if cfg else ": there is no unconditional branch, so no CFG breakdown")
    return note

