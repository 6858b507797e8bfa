"""Model families as small adapters under the one shared denoising loop (denoise.py).

A family says how a pipeline of its kind is loaded, how the prompt becomes the denoiser's conditioning,
which network denoises and how one batched call to it is made, and which samplers fit it; the loop,
capture, lockstep batching, img2img and decoding stay shared (the VAE's own config carries the latent
scaling: `latents / scaling_factor + shift_factor`, decode.py). A family also holds what the rest of the
package knows of it, so nothing else branches on family names: its aliases and single-file checkpoint kinds
(models.py), its latent colours and TAESD preview decoder (decode.py), and its pipeline stages in words
(analysis/stages.py).

- `StableDiffusion` (1.x / 2.x): one CLIP text encoder; its last hidden states condition the UNet.
- `StableDiffusionXL`: two text encoders whose penultimate hidden states are concatenated per token, plus
  the second encoder's pooled embedding and the size micro-conditioning `time_ids` (original size, crop
  top-left, target size; Podell et al. 2023, section 2.2), given to the UNet as `added_cond_kwargs`.
- `StableDiffusion3`: a flow-matching MMDiT transformer (Esser et al. 2024). Two CLIP encoders (penultimate
  hidden states, concatenated per token, zero-padded to T5's width) and T5's hidden states, concatenated
  along the tokens, enter the transformer's joint attention; the two CLIP pooled embeddings, concatenated, are
  its `pooled_projections`. 16 latent channels; the transformer outputs a velocity.
- `Flux`: Flux.1 (Black Forest Labs 2024), a flow-matching MMDiT with double- and single-stream blocks. T5's hidden
  states are the text tokens and CLIP's pooled embedding its `pooled_projections`; the latents enter as 2x2
  patches packed into tokens (`_pack_latents`) with 3-axis position ids (`img_ids`, `txt_ids`), and the schedule
  is shifted by the image's token count (`mu`, dynamic shifting). Flux.1-dev is guidance-distilled: the guidance
  scale is an input of the transformer (`guidance`), with no unconditional branch; Flux.1-schnell ignores it.
  The loop keeps the latents unpacked, [1, 16, h, w]: the scheduler's update is elementwise, so packing only
  around the transformer call gives diffusers' numbers, and every view (x_t, x0-hat, latents) stays an image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError, SettingsError


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
    guidance_label = "Guidance scale (CFG; 1 = off)"  # what the guidance slider means for its models
    cfg_setting = "guidance_scale"  # the Settings field cfg_scale reads (a finished run's breakdown reads it too)
    gpu_dtype = torch.float16  # what --dtype auto runs its models in on a GPU (as diffusers' documentation does)
    joint_attention = None  # word maps (attention.py): None, UNet cross-attention; else the MMDiT's token order
    # short names a person may give instead of a hub id (models.resolve): name -> hub id
    aliases = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1-base",
               "sd-turbo": "stabilityai/sd-turbo"}
    checkpoint_kinds = ("v1", "v2")  # single-file checkpoints of it, by diffusers' name for their kind
    # (single_file_utils.infer_diffusers_model_type; models.checkpoint_family)
    # the cheap latent -> RGB preview (decode.latent_preview): rows = the latent channels, columns = R, G, B;
    # output in [-1, 1] (ComfyUI latent_formats.py)
    latent_rgb_factors = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                          [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
    latent_rgb_bias = [0.0, 0.0, 0.0]
    taesd_variable = "VISUALIZER_TAESD"  # the environment variable naming its TAESD preview decoder (a folder
    taesd_repo = "madebyollin/taesd"  # or hub id; decode.load_taesd), and the decoder's hub id without it
    # the pipeline-stages view (analysis/stages.py), in words
    tokenizer_heading = "Tokenizer"
    tokenizer_note = ""  # after the token count and limit: which tokenizer the limit is, what the others read
    denoiser_heading = "UNet**"  # the denoiser stage's heading (closing the bold) and what the network does

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def check(self, pipe) -> None:
        """Raise ModelLoadError if a loaded pipeline of this family cannot run here."""

    def check_settings(self, settings) -> None:
        """Raise SettingsError if `settings` asks for what this family cannot do here."""
        if settings.true_cfg_scale > 1:
            raise SettingsError(f"True CFG is for Flux models; {self.name} models run classifier-free guidance with "
                                "the guidance scale. Set the true CFG scale to 1.")

    def cfg_scale(self, pipe, settings) -> float | None:
        """The classifier-free guidance scale of a run with `settings`: guided = uncond + scale * (cond - uncond);
        None for a run without CFG (scale <= 1, or guidance that is not CFG: guidance_kind)."""
        if self.guidance_kind(pipe) != "cfg" or settings.guidance_scale <= 1:
            return None
        return settings.guidance_scale

    def denoiser(self, pipe):
        """The network that denoises: the UNet."""
        return pipe.unet

    def frame_dtype(self, pipe):
        """The dtype this family's own diffusers pipeline decodes in, for the intermediate frames: the pipeline's
        dtype (its denoiser's here: fp16 on a GPU for SD 1.x / 2.x, bf16 for SD 3 and Flux), and fp32 on the CPU,
        where the models run in fp32. The final image stays the fp32 VAE's (decode.frame_vae)."""
        return self.denoiser(pipe).dtype

    def size_multiple(self, pipe) -> int:
        """Image width and height must be multiples of this: the VAE's downsampling factor."""
        return pipe.vae_scale_factor

    def default_size(self, pipe) -> int:
        """The image side the model was trained at (its pipeline's default height and width)."""
        return self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of a height x width image, as the loop keeps them."""
        return (self.denoiser(pipe).config.in_channels, height // pipe.vae_scale_factor,
                width // pipe.vae_scale_factor)

    def set_timesteps(self, pipe, scheduler, steps: int, device, latent_shape: tuple[int, int, int]) -> None:
        """Set `scheduler`'s schedule of `steps` steps as the family's pipeline does."""
        scheduler.set_timesteps(steps, device=device)

    def skipped_steps(self, steps: int, strength: float) -> int:
        """img2img: the schedule's steps skipped at `strength` (their noise comes from the image), as the family's
        img2img pipeline counts them (SD: int(steps * strength) steps run)."""
        return steps - min(int(steps * strength), steps)

    def guidance_kind(self, pipe) -> str:
        """What a guidance scale means for this model (RunInfo.guidance): "cfg", classifier-free guidance (a
        negative branch every step); "distilled", an input of the model (LCM checkpoints' time_cond_proj_dim);
        "none", unused."""
        return "cfg" if self.denoiser(pipe).config.get("time_cond_proj_dim") is None else "distilled"

    def guidance_inputs(self, pipe, scales: list[float], like: torch.Tensor) -> dict:
        """Denoiser keywords carrying each batch row's guidance scale, for models that take it as an input:
        LCM's guidance embedding of w = scale - 1 (timestep_cond); {} for the others. `like`: the device and dtype."""
        dim = self.denoiser(pipe).config.get("time_cond_proj_dim")
        if dim is None:
            return {}
        embedding = pipe.get_guidance_scale_embedding(torch.tensor(scales) - 1.0, embedding_dim=dim)
        return {"timestep_cond": embedding.to(device=like.device, dtype=like.dtype)}

    def prompt_tokenizer(self, pipe) -> tuple:
        """(tokenizer, token limit) of the encoder whose per-token states condition the denoiser (and whose
        tokens the word maps name)."""
        return pipe.tokenizer, pipe.tokenizer.model_max_length

    def word_span(self, token_strings: list[str]) -> slice:
        """The prompt's own words among the tokens (CLIP: without its start and end tokens), as the text keys
        the word maps read are ordered (the prompt tokenizer's first)."""
        return slice(1, max(1, len(token_strings) - 1))

    def text_encoder_stage(self, info, cfg: bool, negative_prompt: bool) -> str:
        """The pipeline-stages view's text-encoder stage in words, for a run with `info` (run.RunInfo), with or
        without CFG, with or without a negative prompt."""
        return (f"**Text encoder**: embedding of shape {info.text_embedding_shape} "
                f"({'with an unconditional twin for CFG' if cfg else 'no CFG'})")

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, do_cfg: bool,
                      size: tuple[int, int]) -> Conditioning:
        """Conditioning of `prompt` (and, with CFG, of `negative_prompt`; "" = the empty prompt) for a
        `size` = (height, width) image, exactly as the family's diffusers pipeline computes it."""
        positive, negative = pipe.encode_prompt(prompt, pipe._execution_device, 1, do_cfg, negative_prompt or None)
        return Conditioning({"prompt_embeds": positive}, {"prompt_embeds": negative} if do_cfg else None,
                            {"family": self.key})

    def unet_kwargs(self, conditioning: Conditioning, rows: list[bool]) -> dict:
        """The UNet's conditioning keywords for a batch of prompt (True) / negative (False) rows."""
        return {"encoder_hidden_states": conditioning.stack("prompt_embeds", rows)}

    def predict(self, pipe, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                rows: list[bool], **extra) -> torch.Tensor:
        """One batched denoiser call: model inputs [B, C, h, w], per-row timesteps [B], rows as in unet_kwargs;
        `extra` keywords (guidance_inputs) go to the network as they are."""
        return pipe.unet(latents, timesteps, return_dict=False, **extra, **self.unet_kwargs(conditioning, rows))[0]


class StableDiffusionXL(StableDiffusion):
    """Stable Diffusion XL base and its distillations (`StableDiffusionXLPipeline`: SDXL 1.0, SDXL-Turbo)."""
    key = "sdxl"
    name = "Stable Diffusion XL"
    pipelines = ("StableDiffusionXLPipeline",)
    load_kwargs = dict(add_watermarker=False)  # the watermark would alter the frames this tool shows
    aliases = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl-turbo": "stabilityai/sdxl-turbo"}
    checkpoint_kinds = ("xl_base",)
    latent_rgb_factors = [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                          [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]
    latent_rgb_bias = [0.1084, -0.0175, -0.0011]
    taesd_variable = "VISUALIZER_TAESDXL"
    taesd_repo = "madebyollin/taesdxl"

    def frame_dtype(self, pipe):
        """SDXL's pipeline upcasts an fp16 VAE to fp32 unless the VAE's config says it need not (force_upcast
        False: the fp16-fixed VAE, e.g. madebyollin/sdxl-vae-fp16-fix); frames decode as that pipeline does."""
        if getattr(pipe.vae.config, "force_upcast", True):
            return torch.float32
        return super().frame_dtype(pipe)

    tokenizer_heading = "Tokenizers"

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

    def text_encoder_stage(self, info, cfg: bool, negative_prompt: bool) -> str:
        twin = "no CFG"
        if cfg and info.zero_negative:
            twin = ("with an all-zero unconditional twin for CFG: no negative prompt, and the model's "
                    "force_zeros_for_empty_prompt is on")
        elif cfg:
            twin = f"with an unconditional twin for CFG, from the {'negative' if negative_prompt else 'empty'} prompt"
        size = ", ".join(f"{v:g}" for v in info.time_ids or [])
        return (f"**Text encoders** (SDXL): text_encoder and text_encoder_2 each encode the prompt; their "
                f"penultimate hidden states are concatenated per token into an embedding of shape "
                f"{info.text_embedding_shape} ({twin}). text_encoder_2's **pooled embedding**, shape "
                f"{info.pooled_embedding_shape}, and the size conditioning time_ids = ({size}) (original height, "
                "width; crop top, left; target height, width) enter the UNet beside the timestep (added_cond_kwargs)")

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, do_cfg: bool,
                      size: tuple[int, int]) -> Conditioning:
        device = pipe._execution_device
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
    joint_attention = "image_first"  # the joint attention's tokens: image patches, then CLIP's and T5's text
    gpu_dtype = torch.bfloat16  # SD 3.5 and Flux are run in bf16 (fp16 changes their images)
    aliases = {"sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium"}
    checkpoint_kinds = ("sd3", "sd35_medium", "sd35_large")
    latent_rgb_factors = [  # 16 latent channels
        [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
        [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
        [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
        [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189]]
    latent_rgb_bias = [0.2394, 0.2135, 0.1925]
    taesd_variable = "VISUALIZER_TAESD3"
    taesd_repo = "madebyollin/taesd3"
    tokenizer_heading = "Tokenizers"
    tokenizer_note = " (CLIP; T5 reads up to 256)"
    image_tokens = "image patches"  # what the image is to the transformer (denoiser_heading)

    @property
    def denoiser_heading(self) -> str:
        return (f"Transformer** (MMDiT: {self.image_tokens} and text tokens in joint attention; outputs a velocity "
                "v, x0-hat = x_t - sigma * v)")

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def check(self, pipe) -> None:
        if pipe.scheduler.config.get("use_dynamic_shifting"):
            raise ModelLoadError("This SD 3 model's scheduler shifts its schedule by the image size "
                                 "(use_dynamic_shifting); that is not supported yet.")

    def skipped_steps(self, steps: int, strength: float) -> int:
        """As StableDiffusion3Img2ImgPipeline (and FluxImg2ImgPipeline) count them: int(steps - steps * strength)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def denoiser(self, pipe):
        """The network that denoises: the MMDiT transformer."""
        return pipe.transformer

    def size_multiple(self, pipe) -> int:
        """The VAE's factor times the transformer's patch size (a patch of latents is one image token)."""
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def text_encoder_stage(self, info, cfg: bool, negative_prompt: bool) -> str:
        source = "negative" if negative_prompt else "empty"
        return (f"**Text encoders** (SD 3): text_encoder and text_encoder_2 (CLIP) each encode the prompt; their "
                "penultimate hidden states, concatenated per token and zero-padded to T5's width, are followed by "
                f"text_encoder_3's (T5) hidden states: an embedding of shape {info.text_embedding_shape} "
                f"({f'with an unconditional twin for CFG, from the {source} prompt' if cfg else 'no CFG'}). Both CLIP "
                f"encoders' **pooled embeddings**, concatenated, shape {info.pooled_embedding_shape}, enter the "
                "transformer beside the timestep (pooled_projections)")

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, do_cfg: bool,
                      size: tuple[int, int]) -> Conditioning:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, None, None, device=pipe._execution_device, num_images_per_prompt=1,
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


class Flux(StableDiffusion3):
    """Flux.1 dev and schnell (`FluxPipeline`)."""
    key = "flux"
    name = "Flux.1"
    pipelines = ("FluxPipeline",)
    sampler_kind = "flux"
    cfg_setting = "true_cfg_scale"
    joint_attention = "text_first"  # T5's tokens, then the image's
    guidance_label = "Guidance scale (Flux: an input of the model, no CFG branch; schnell ignores it)"
    max_sequence_length = 512  # FluxPipeline's default T5 token count
    aliases = {"flux-schnell": "black-forest-labs/FLUX.1-schnell"}
    checkpoint_kinds = ("flux-dev", "flux-schnell")
    latent_rgb_factors = [  # 16 latent channels
        [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778]]
    latent_rgb_bias = [-0.0329, -0.0718, -0.0851]
    taesd_variable = "VISUALIZER_TAEF1"
    taesd_repo = "madebyollin/taef1"
    tokenizer_note = " (T5; CLIP reads up to 77 for the pooled embedding)"
    image_tokens = "2x2 latent patches packed into tokens, with position ids,"

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def check(self, pipe) -> None:
        """Every Flux.1 model runs (its dynamic shifting is the family's own schedule)."""

    def check_settings(self, settings) -> None:
        if settings.negative_prompt and settings.true_cfg_scale <= 1:
            raise SettingsError("Flux.1 has no unconditional branch, so a negative prompt has no effect unless true "
                                "CFG runs one: set the true CFG scale above 1, or clear the negative prompt.")

    def cfg_scale(self, pipe, settings) -> float | None:
        """True CFG (FluxPipeline's true_cfg_scale > 1): a second, negative branch (the negative prompt, else the
        empty prompt) every step, beside the distilled guidance the transformer takes in both branches."""
        return settings.true_cfg_scale if settings.true_cfg_scale > 1 else None

    def size_multiple(self, pipe) -> int:
        """The VAE's factor times 2: a 2x2 patch of latents is one image token."""
        return pipe.vae_scale_factor * 2

    def default_size(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, int, int]:
        """Unpacked: the transformer's in_channels are 4 latent channels per 2x2 patch."""
        return (self.denoiser(pipe).config.in_channels // 4, height // pipe.vae_scale_factor,
                width // pipe.vae_scale_factor)

    def set_timesteps(self, pipe, scheduler, steps: int, device, latent_shape: tuple[int, int, int]) -> None:
        """FluxPipeline's schedule: sigmas 1 .. 1/steps, shifted by mu of the image's token count (a solver on
        flow sigmas makes its own and takes only mu)."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        tokens = (latent_shape[1] // 2) * (latent_shape[2] // 2)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)

    def guidance_kind(self, pipe) -> str:
        """Never CFG: dev's guidance is distilled into the transformer (an input); schnell has none."""
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def guidance_inputs(self, pipe, scales: list[float], like: torch.Tensor) -> dict:
        """Flux.1-dev's distilled guidance: the scale itself, per row (float32, as FluxPipeline passes it)."""
        if not pipe.transformer.config.guidance_embeds:
            return {}
        return {"guidance": torch.tensor(scales, dtype=torch.float32, device=like.device)}

    def prompt_tokenizer(self, pipe) -> tuple:
        return pipe.tokenizer_2, self.max_sequence_length

    def word_span(self, token_strings: list[str]) -> slice:
        """T5's tokens have no start token: every token but the end one."""
        return slice(0, max(0, len(token_strings) - 1))

    def text_encoder_stage(self, info, cfg: bool, negative_prompt: bool) -> str:
        return (f"**Text encoders** (Flux): text_encoder_2 (T5) encodes the prompt into {info.text_embedding_shape[1]} "
                f"token states, shape {info.text_embedding_shape}, the transformer's text tokens (txt_ids all zero); "
                f"text_encoder (CLIP)'s **pooled embedding**, shape {info.pooled_embedding_shape}, enters beside the "
                "timestep (pooled_projections). No negative prompt: Flux has no unconditional branch")

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, do_cfg: bool,
                      size: tuple[int, int]) -> Conditioning:
        branches = []
        for text in [prompt, negative_prompt] if do_cfg else [prompt]:
            embeds, pooled, _ = pipe.encode_prompt(text, None, device=pipe._execution_device, num_images_per_prompt=1,
                                                   max_sequence_length=self.max_sequence_length)
            branches.append({"prompt_embeds": embeds, "pooled_projections": pooled})
        facts = {"family": self.key, "pooled_embedding_shape": list(branches[0]["pooled_projections"].shape)}
        return Conditioning(branches[0], branches[1] if do_cfg else None, facts)

    def predict(self, pipe, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                rows: list[bool], **extra) -> torch.Tensor:
        """Pack [B, C, h, w] into [B, h/2 * w/2, 4C] tokens, call the transformer (timesteps / 1000), unpack."""
        batch, channels, h, w = latents.shape
        embeds = conditioning.stack("prompt_embeds", rows)
        output = pipe.transformer(
            hidden_states=pipe._pack_latents(latents, batch, channels, h, w),
            timestep=timesteps.to(latents.dtype) / 1000, guidance=extra.get("guidance"),
            pooled_projections=conditioning.stack("pooled_projections", rows), encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype),
            img_ids=pipe._prepare_latent_image_ids(batch, h // 2, w // 2, latents.device, latents.dtype),
            return_dict=False)[0]
        return pipe._unpack_latents(output, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                    pipe.vae_scale_factor)


BY_KEY = {family.key: family for family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}
BY_PIPELINE = {pipeline: family for family in BY_KEY.values() for pipeline in family.pipelines}


def family_of(pipe) -> StableDiffusion:
    """The family adapter of a loaded pipeline, by its class."""
    name = type(pipe).__name__
    if name not in BY_PIPELINE:
        raise ModelLoadError(f"{name} is not a pipeline this version runs "
                             f"({', '.join(f.name for f in BY_KEY.values())}).")
    return BY_PIPELINE[name]
