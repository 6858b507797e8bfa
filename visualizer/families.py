"""Model families as small adapters under the one shared denoising loop (denoise.py).

A family says how a pipeline of its kind is loaded, how the prompt becomes the denoiser's conditioning,
which network denoises and how one batched call to it is made, and which samplers fit it; the loop,
capture, lockstep batching, img2img and decoding stay shared (the VAE's own config carries the latent
scaling: `latents / scaling_factor + shift_factor`, decode.py).

- `StableDiffusion` (1.x / 2.x): one CLIP text encoder; its last hidden states condition the UNet.
- `StableDiffusionXL`: two text encoders whose penultimate hidden states are concatenated per token, plus
  the second encoder's pooled embedding and the size micro-conditioning `time_ids` (original size, crop
  top-left, target size; Podell et al. 2023, section 2.2), given to the UNet as `added_cond_kwargs`.
- `StableDiffusion3`: a flow-matching MMDiT transformer (Esser et al. 2024). Two CLIP encoders (penultimate
  hidden states, concatenated per token, zero-padded to T5's width) and T5's hidden states, concatenated
  along the tokens, enter the transformer's joint attention; the two CLIP pooled embeddings, concatenated, are
  its `pooled_projections`. 16 latent channels; the transformer outputs a velocity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ModelLoadError, SettingsError


@dataclass
class Conditioning:
    """The prompt's denoiser inputs for one image, per branch, by name (each with batch size 1)."""
    positive: dict[str, torch.Tensor]  # the prompt branch: "prompt_embeds" [1, tokens, dim] and any extras
    negative: dict[str, torch.Tensor] | None  # the negative / unconditional branch of CFG; None without CFG
    facts: dict = field(default_factory=dict)  # RunInfo fields this family reports (see run.RunInfo)

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.positive["prompt_embeds"]

    def stack(self, name: str, rows: list[bool]) -> torch.Tensor:
        """Input `name` for a batch whose rows are prompt (True) or negative (False) branches."""
        return torch.cat([self.positive[name] if row else self.negative[name] for row in rows])


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`)."""
    key = "sd"  # RunInfo.family
    name = "Stable Diffusion 1.x / 2.x"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")  # model_index.json classes it loads
    load_kwargs = dict(safety_checker=None, requires_safety_checker=False)  # this tool shows raw frames
    sampler_kind = "diffusion"  # which registry of samplers.REGISTRIES fits its models
    img2img = True  # Settings.init_image runs (denoise.py)
    word_maps = True  # Settings.attention runs (attention.py records UNet cross-attention)

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def check(self, pipe) -> None:
        """Raise ModelLoadError if a loaded pipeline of this family cannot run here."""

    def check_settings(self, settings) -> None:
        """Raise SettingsError if `settings` asks for what this family cannot do here."""
        if settings.init_image is not None and not self.img2img:
            raise SettingsError(f"img2img (an init image) is not supported for {self.name} models yet: "
                                "remove the init image to generate from noise.")
        if settings.attention and not self.word_maps:
            raise SettingsError(f"Word maps are not available for {self.name} models: they read a UNet's "
                                "cross-attention, and this model's transformer attends to text and image jointly. "
                                "Turn word maps off.")

    def denoiser(self, pipe):
        """The network that denoises: the UNet."""
        return pipe.unet

    def size_multiple(self, pipe) -> int:
        """Image width and height must be multiples of this: the VAE's downsampling factor."""
        return pipe.vae_scale_factor

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, do_cfg: bool,
                      size: tuple[int, int]) -> Conditioning:
        """Conditioning of `prompt` (and, with CFG, of `negative_prompt`; "" = the empty prompt) for a
        `size` = (height, width) image, exactly as the family's diffusers pipeline computes it."""
        positive, negative = pipe.encode_prompt(prompt, pipe.unet.device, 1, do_cfg, negative_prompt or None)
        return Conditioning({"prompt_embeds": positive}, {"prompt_embeds": negative} if do_cfg else None,
                            {"family": self.key})

    def unet_kwargs(self, conditioning: Conditioning, rows: list[bool]) -> dict:
        """The UNet's conditioning keywords for a batch of prompt (True) / negative (False) rows."""
        return {"encoder_hidden_states": conditioning.stack("prompt_embeds", rows)}

    def predict(self, pipe, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                rows: list[bool], **extra) -> torch.Tensor:
        """One batched denoiser call: model inputs [B, C, h, w], per-row timesteps [B], rows as in unet_kwargs;
        `extra` keywords (LCM's timestep_cond) go to the network as they are."""
        return pipe.unet(latents, timesteps, return_dict=False, **extra, **self.unet_kwargs(conditioning, rows))[0]


class StableDiffusionXL(StableDiffusion):
    """Stable Diffusion XL base and its distillations (`StableDiffusionXLPipeline`: SDXL 1.0, SDXL-Turbo)."""
    key = "sdxl"
    name = "Stable Diffusion XL"
    pipelines = ("StableDiffusionXLPipeline",)
    load_kwargs = dict(add_watermarker=False)  # the watermark would alter the frames this tool shows

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def check(self, pipe) -> None:
        if pipe.text_encoder is None or pipe.tokenizer is None:
            raise ModelLoadError("This SDXL model has no first text encoder (the SDXL refiner's layout); "
                                 "only SDXL base-style models with both text encoders run here.")
        if getattr(pipe.vae.config, "latents_mean", None) is not None:
            raise ModelLoadError("This SDXL model's VAE normalises latents by a per-channel mean and std "
                                 "(latents_mean / latents_std, as Playground v2.5 does); that is not supported yet.")

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, do_cfg: bool,
                      size: tuple[int, int]) -> Conditioning:
        device = pipe.unet.device
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt or None)
        # micro-conditioning as StableDiffusionXLPipeline's defaults: original = target = the image size, no crop
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=embeds.dtype, device=device)
        zero_negative = do_cfg and not negative_prompt and bool(pipe.config.force_zeros_for_empty_prompt)
        facts = {"family": self.key, "pooled_embedding_shape": list(pooled.shape),
                 "time_ids": [float(v) for v in time_ids[0]], "zero_negative": zero_negative}
        positive = {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": time_ids}
        negative = {"prompt_embeds": negative, "text_embeds": negative_pooled, "time_ids": time_ids} if do_cfg else None
        return Conditioning(positive, negative, facts)

    def unet_kwargs(self, conditioning: Conditioning, rows: list[bool]) -> dict:
        added = {name: conditioning.stack(name, rows) for name in ("text_embeds", "time_ids")}
        return {**super().unet_kwargs(conditioning, rows), "added_cond_kwargs": added}


class StableDiffusion3(StableDiffusion):
    """Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`)."""
    key = "sd3"
    name = "Stable Diffusion 3.x"
    pipelines = ("StableDiffusion3Pipeline",)
    load_kwargs = {}
    sampler_kind = "flow"
    img2img = False  # StableDiffusion3Img2ImgPipeline noises with scale_noise: not wired yet
    word_maps = False  # MMDiT joint attention: no UNet cross-attention to read

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def check(self, pipe) -> None:
        if pipe.scheduler.config.get("use_dynamic_shifting"):
            raise ModelLoadError("This SD 3 model's scheduler shifts its schedule by the image size "
                                 "(use_dynamic_shifting); that is not supported yet.")

    def denoiser(self, pipe):
        """The network that denoises: the MMDiT transformer."""
        return pipe.transformer

    def size_multiple(self, pipe) -> int:
        """The VAE's factor times the transformer's patch size (a patch of latents is one image token)."""
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, do_cfg: bool,
                      size: tuple[int, int]) -> Conditioning:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, None, None, device=pipe.transformer.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt or None)
        facts = {"family": self.key, "pooled_embedding_shape": list(pooled.shape)}
        positive = {"prompt_embeds": embeds, "pooled_projections": pooled}
        negative = {"prompt_embeds": negative, "pooled_projections": negative_pooled} if do_cfg else None
        return Conditioning(positive, negative, facts)

    def predict(self, pipe, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                rows: list[bool], **extra) -> torch.Tensor:
        return pipe.transformer(hidden_states=latents, timestep=timesteps,
                                encoder_hidden_states=conditioning.stack("prompt_embeds", rows),
                                pooled_projections=conditioning.stack("pooled_projections", rows),
                                return_dict=False, **extra)[0]


BY_KEY = {family.key: family for family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3())}
BY_PIPELINE = {pipeline: family for family in BY_KEY.values() for pipeline in family.pipelines}


def family_of(pipe) -> StableDiffusion:
    """The family adapter of a loaded pipeline, by its class."""
    name = type(pipe).__name__
    if name not in BY_PIPELINE:
        raise ModelLoadError(f"{name} is not a pipeline this version runs "
                             f"({', '.join(f.name for f in BY_KEY.values())}).")
    return BY_PIPELINE[name]
