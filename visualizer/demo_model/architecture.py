"""Configs and builders for small Stable-Diffusion-shaped models (the embedded model and test models).

The parts are diffusers' and transformers' own classes, so a folder saved from them loads with
`StableDiffusionPipeline.from_pretrained` (`StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` for the SDXL- and
SD 3-shaped test models) like any real checkpoint.
"""
from __future__ import annotations

import string
from pathlib import Path

from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def write_tokenizer(folder: Path, words: list[str], max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every character and every word of `words` whole."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            if rule not in merges:
                merges.append(rule)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=[tuple(rule.split(" ")) for rule in merges], model_max_length=max_length,
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_encoder(vocab_size: int, max_length: int, hidden: int, layers: int,
                 projection_dim: int | None = None) -> CLIPTextModel:
    """A CLIP text encoder; with `projection_dim`, one that also outputs a projected pooled embedding (SDXL's
    second encoder)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        projection_dim=projection_dim or hidden,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def vae(channels: tuple[int, ...], sample_size: int, latent_channels: int = 4, **config) -> AutoencoderKL:
    """A KL autoencoder with a downsampling factor of 2**(len(channels)-1); `config`: more AutoencoderKL keywords."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=16, sample_size=sample_size, **config,
    )


def unet(channels: tuple[int, ...], sample_size: int, cross_attention_dim: int, heads: int = 4, layers: int = 1,
         text_embedding: bool = False) -> UNet2DConditionModel:
    """A cross-attention UNet: attention in every block but the deepest. With `text_embedding`, an attention-pooled
    caption embedding is also added to the time embedding (diffusers' addition_embed_type="text"), so every
    ResNet block sees the caption; it is computed from the text encoder's states alone, so pipelines run it as is."""
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=layers, cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
        norm_num_groups=16, addition_embed_type="text" if text_embedding else None,
        addition_embed_type_num_heads=heads,
    )


def assemble(unet_model, vae_model, encoder, tokenizer, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline from parts, with SD's noise schedule and no safety checker.

    `prediction_type` is what the UNet outputs: "epsilon" (SD 1.x, SD 2.x-base) or "v_prediction" (SD 2.x-768).
    """
    scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=prediction_type)
    scheduler.register_to_config(clip_sample=False)  # as SD 1.x's config says: samplers never clip x0-hat
    return StableDiffusionPipeline(
        vae=vae_model, text_encoder=encoder, tokenizer=tokenizer, unet=unet_model, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_pipeline(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny random-weight SD pipeline (32x32 images, 8x8 latents) to `folder`; for tests."""
    import torch

    torch.manual_seed(seed)
    words = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "background"]
    tokenizer = write_tokenizer(folder / "tokenizer", words, max_length=16)
    encoder = text_encoder(len(tokenizer.get_vocab()), 16, hidden=32, layers=1)
    pipe = assemble(unet((32, 64), 8, cross_attention_dim=32), vae((16, 32, 32), 32), encoder, tokenizer,
                    prediction_type)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random-weight SDXL pipeline (32x32 images, 8x8 latents) to `folder`; for tests.

    SDXL's layout at toy scale: two CLIP text encoders (the second with a projected pooled embedding) whose
    hidden states are concatenated for cross-attention, a UNet with the "text_time" added conditioning, and
    SDXL's Euler scheduler config."""
    import torch

    torch.manual_seed(seed)
    words = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "background"]
    tokenizers = [write_tokenizer(folder / name, words, max_length=16) for name in ("tokenizer", "tokenizer_2")]
    vocab = len(tokenizers[0].get_vocab())
    encoder, encoder_2 = text_encoder(vocab, 16, hidden=32, layers=2), text_encoder(vocab, 16, 32, 2, projection_dim=24)
    time_embed_dim = 8  # per time id: 6 ids (original size, crop top-left, target size)
    unet_model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=32 + 32, norm_num_groups=16, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, projection_class_embeddings_input_dim=6 * time_embed_dim + 24,
    )
    scheduler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)  # as SDXL's config
    pipe = StableDiffusionXLPipeline(
        vae=vae((16, 32, 32), 32), text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet_model, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def write_t5_tokenizer(folder: Path, words: list[str]):
    """A T5 (Unigram, SentencePiece-style) fast tokenizer holding every word of `words` whole and every
    character, built with the `tokenizers` library (no sentencepiece model file needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_sd3_pipeline(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random-weight SD 3 pipeline (32x32 images, 16x8x8 latents) to `folder`; for tests.

    SD 3's layout at toy scale: two CLIP text encoders with projected pooled embeddings, a T5 encoder, an MMDiT
    transformer (2x2 patches, joint attention over image and text tokens), a 16-channel VAE with a shift factor,
    and SD 3's flow-matching Euler scheduler (shift 3)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    words = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "background"]
    tokenizers = [write_tokenizer(folder / name, words, max_length=16) for name in ("tokenizer", "tokenizer_2")]
    vocab = len(tokenizers[0].get_vocab())
    clip, clip_2 = (text_encoder(vocab, 16, hidden=32, layers=2, projection_dim=32) for _ in range(2))
    t5_tokenizer = write_t5_tokenizer(folder / "tokenizer_3", words)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_ff=64, d_kv=16, num_layers=1,
                                 num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )  # joint_attention_dim: T5's width (the CLIP states, 2 x 32, are padded to it); pooled: 2 x 32
    autoencoder = vae((16, 32, 32), 32, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                      use_quant_conv=False, use_post_quant_conv=False)  # SD 3's VAE factors and layout
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=autoencoder,
        text_encoder=clip, tokenizer=tokenizers[0], text_encoder_2=clip_2, tokenizer_2=tokenizers[1],
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_flux_pipeline(folder: Path, seed: int = 0, guidance_embeds: bool = True, full_width: bool = False) -> Path:
    """Save a tiny random-weight Flux.1 pipeline (32x32 images, 16x8x8 latents packed into 16 tokens) to `folder`;
    for tests. With `guidance_embeds` it is dev-like (guidance-distilled), without it schnell-like. With
    `full_width` its transformer has FLUX.1's own width (24 heads of 128: about 530M parameters, 2 GB), which
    diffusers' single-file conversion assumes; else 2 heads of 16.

    Flux's layout at toy scale: a CLIP text encoder (its pooled output), a T5 encoder (the text tokens), a
    transformer with one double-stream and one single-stream block and 3-axis rotary positions, a 16-channel
    VAE with Flux's scaling and shift factors, and Flux.1-dev's dynamically shifted flow-matching Euler scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    words = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "background"]
    tokenizer = write_tokenizer(folder / "tokenizer", words, max_length=16)
    clip = text_encoder(len(tokenizer.get_vocab()), 16, hidden=32, layers=2)
    t5_tokenizer = write_t5_tokenizer(folder / "tokenizer_2", words)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_ff=64, d_kv=16, num_layers=1,
                                 num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    heads, head_dim, rope_axes = (24, 128, (16, 56, 56)) if full_width else (2, 16, (4, 4, 8))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=rope_axes,
    )  # in_channels: 16 latent channels x a 2x2 patch; joint_attention_dim: T5's width; pooled: CLIP's width
    autoencoder = vae((16, 32, 32), 32, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                      use_quant_conv=False, use_post_quant_conv=False)  # Flux's VAE factors and layout
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=autoencoder, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
