"""Single-file checkpoints (.safetensors / .ckpt, as A1111 and ComfyUI keep them) and the load options (dtype,
offload), offline, on tiny models written in the original Stable Diffusion (LDM) layout by the inverse of diffusers'
own conversion, so that the real `from_single_file` path converts them back."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import load_file, save_file

from visualizer import api
from visualizer.engine.families import BY_KEY
from visualizer.engine.denoise import generate
from visualizer.engine.models import LoadOptions, ModelLoadError, checkpoint_family, configure, family_of_reference, load_pipeline, resolve
from visualizer.engine.run import Settings

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # diffusers -> LDM, in a UNet's resnets
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    first, _, tail = rest.partition(".")
    return f"{RESNET.get(first, first)}.{tail}"


def ldm_unet(unet) -> dict:
    """A diffusers UNet's weights under LDM's names (the inverse of convert_ldm_unet_checkpoint)."""
    n = unet.config.layers_per_block + 1  # LDM blocks per level: the layers, then the down- or upsampler
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    out = {}
    for key, value in unet.state_dict().items():
        part = key.split(".")
        rest = ".".join(part[4:])
        if key in fixed:
            name = fixed[key]
        elif part[0] == "mid_block":  # resnet, attention, resnet
            tail = ".".join(part[3:])
            name = (f"middle_block.{2 * int(part[2])}.{_resnet(tail)}" if part[1] == "resnets"
                    else f"middle_block.1.{tail}")
        elif part[0] == "down_blocks":
            k = int(part[1]) * n + int(part[3]) + 1
            name = {"resnets": f"input_blocks.{k}.0.{_resnet(rest)}", "attentions": f"input_blocks.{k}.1.{rest}",
                    "downsamplers": f"input_blocks.{int(part[1]) * n + n}.0.op.{rest.removeprefix('conv.')}"}[part[2]]
        else:  # up_blocks: the upsampler follows the block's last layer, after its attention if it has one
            k = int(part[1]) * n + int(part[3])
            slot = 2 if hasattr(unet.up_blocks[int(part[1])], "attentions") else 1
            name = {"resnets": f"output_blocks.{k}.0.{_resnet(rest)}", "attentions": f"output_blocks.{k}.1.{rest}",
                    "upsamplers": f"output_blocks.{int(part[1]) * n + n - 1}.{slot}.{rest}"}[part[2]]
        out["model.diffusion_model." + name] = value
    return out


def ldm_vae(vae) -> dict:
    """A diffusers AutoencoderKL's weights under LDM's names (the inverse of convert_ldm_vae_checkpoint)."""
    top = len(vae.config.block_out_channels) - 1  # LDM numbers the decoder's levels from the bottom
    rules = [(r"down_blocks\.(\d+)\.resnets", lambda m: f"down.{m[1]}.block"),
             (r"down_blocks\.(\d+)\.downsamplers\.0", lambda m: f"down.{m[1]}.downsample"),
             (r"up_blocks\.(\d+)\.resnets", lambda m: f"up.{top - int(m[1])}.block"),
             (r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{top - int(m[1])}.upsample"),
             (r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}"),
             (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)",
              lambda m: f"mid.attn_1.{VAE_ATTENTION[m[1]]}"),
             (r"conv_shortcut", lambda m: "nin_shortcut"), (r"conv_norm_out", lambda m: "norm_out")]
    out = {}
    for key, value in vae.state_dict().items():
        for pattern, name in rules:
            key = re.sub(pattern, name, key)
        if ".attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projects with 1x1 convolutions
        out["first_stage_model." + key] = value
    return out


def ldm_clip(encoder, prefix: str) -> dict:
    """A CLIP text encoder's weights under `prefix` + its transformers names (SD's cond_stage_model). The files keep
    the `text_model.` level that transformers 5.6 dropped from CLIPTextModel (CLIPTextModelWithProjection has it)."""
    return {prefix + (key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key): value
            for key, value in encoder.state_dict().items()}


def ldm_open_clip(encoder, prefix: str) -> dict:
    """SDXL's second text encoder under OpenCLIP's names (the inverse of convert_open_clip_checkpoint)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    weights = encoder.state_dict()
    out = {}
    for key, value in weights.items():
        if key in fixed:
            out[fixed[key]] = value.T if key == "text_projection.weight" else value
        elif not re.search(r"self_attn\.[qkv]_proj\.", key):
            for diffusers_part, open_clip_part in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items():
                key = key.replace(diffusers_part, open_clip_part)
            out["transformer." + key] = value
    for i in range(encoder.config.num_hidden_layers):  # OpenCLIP keeps q, k, v in one projection
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [weights[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
    return {prefix + key: value for key, value in out.items()}


def fused(weights: dict, parts: tuple[str, ...], into: str, within: str = "") -> dict:
    """`weights` with each block's `parts` (e.g. attn.to_q, attn.to_k, attn.to_v), in that order, concatenated into
    one tensor named `into`, as the original transformers keep them; only in blocks whose names start with `within`."""
    out = dict(weights)
    for key in [k for k in weights if k.startswith(within) and f".{parts[0]}." in k]:
        out[key.replace(parts[0], into)] = torch.cat([out.pop(key.replace(parts[0], part)) for part in parts])
    return out


def renamed(weights: dict, names: dict) -> dict:
    """`weights` under the original names. `names` maps a diffusers name (a key's start: its longest match wins) to the
    original's; a block list (transformer_blocks.N.) to (the original list's name, the same kind of map within it)."""
    out = {}
    for key, value in weights.items():
        block = re.match(r"(\w+_blocks)\.(\d+)\.", key)
        table, start = (names, "") if not block else (names[block[1]][1], f"{names[block[1]][0]}.{block[2]}.")
        rest = key[block.end():] if block else key
        name = max((n for n in table if rest == n or rest.startswith(n + ".")), key=len)
        out[start + table[name] + rest[len(name):]] = value
    return out


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """An adaLN projection's (shift, scale) as diffusers' (scale, shift), and back (swap_scale_shift's inverse is
    itself)."""
    return torch.cat(weight.chunk(2)[::-1])


SD3_NAMES = {  # diffusers -> SD 3's MMDiT (the inverse of convert_sd3_transformer_checkpoint_to_diffusers)
    "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear",
    "transformer_blocks": ("joint_blocks", {
        "attn.qkv": "x_block.attn.qkv", "attn.to_out.0": "x_block.attn.proj",
        "norm1.linear": "x_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
        "attn.add_qkv": "context_block.attn.qkv", "attn.to_add_out": "context_block.attn.proj",
        "norm1_context.linear": "context_block.adaLN_modulation.1", "ff_context.net.0.proj": "context_block.mlp.fc1",
        "ff_context.net.2": "context_block.mlp.fc2"})}
FLUX_NAMES = {  # diffusers -> Black Forest Labs' Flux.1 (inverse of convert_flux_transformer_checkpoint_to_diffusers)
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
    "transformer_blocks": ("double_blocks", {
        "norm1.linear": "img_mod.lin", "attn.qkv": "img_attn.qkv",
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.to_out.0": "img_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "norm1_context.linear": "txt_mod.lin", "attn.add_qkv": "txt_attn.qkv",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_add_out": "txt_attn.proj",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}),
    "single_transformer_blocks": ("single_blocks", {
        "norm.linear": "modulation.lin", "linear1": "linear1", "attn.norm_q.weight": "norm.query_norm.scale",
        "attn.norm_k.weight": "norm.key_norm.scale", "proj_out": "linear2"})}
QKV, ADDED_QKV = ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def sd3_transformer(transformer) -> dict:
    """An SD3Transformer2DModel's weights under the MMDiT names of SD 3's own checkpoints."""
    weights = fused(fused(transformer.state_dict(), QKV, "attn.qkv"), ADDED_QKV, "attn.add_qkv")
    out = renamed(weights, SD3_NAMES)
    last = transformer.config.num_layers - 1  # its text stream ends with a final-layer-like (shift, scale) norm
    for layer in ("final_layer", f"joint_blocks.{last}.context_block"):
        for kind in ("weight", "bias"):
            out[f"{layer}.adaLN_modulation.1.{kind}"] = swap_halves(out[f"{layer}.adaLN_modulation.1.{kind}"])
    return {"model.diffusion_model." + key: value for key, value in out.items()}


def flux_transformer(transformer) -> dict:
    """A FluxTransformer2DModel's weights under BFL's names (flux1-dev.safetensors' layout, ComfyUI's prefix)."""
    weights = fused(transformer.state_dict(), (*QKV, "proj_mlp"), "linear1", within="single_transformer_blocks")
    out = renamed(fused(fused(weights, QKV, "attn.qkv"), ADDED_QKV, "attn.add_qkv"), FLUX_NAMES)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(out[f"final_layer.adaLN_modulation.1.{kind}"])
    return {"model.diffusion_model." + key: value for key, value in out.items()}


def write_checkpoint(weights: dict, path) -> str:
    """`weights` as one file: safetensors, or a Lightning-style {"state_dict": ...} pickle for .ckpt."""
    weights = {key: value.contiguous().clone() for key, value in weights.items()}  # tied ones (T5's) apart
    if path.suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save({"state_dict": weights}, path)
    return str(path)


def sd_checkpoint(folder: str, path) -> str:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    return write_checkpoint({**ldm_unet(pipe.unet), **ldm_vae(pipe.vae),
                             **ldm_clip(pipe.text_encoder, "cond_stage_model.transformer.")}, path)


@pytest.fixture(scope="module")
def sd_file(tiny_model, tmp_path_factory) -> str:
    return sd_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny-sd.safetensors")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> tuple[str, str]:
    """(folder, checkpoint) of a tiny SDXL. Its second text encoder has the shape diffusers tells SDXL by: 10 layers
    (conditioner.embedders.1.model.transformer.resblocks.9) and a width unlike the first encoder's."""
    from visualizer.demo_model.architecture import text_encoder, tiny_sdxl_pipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl-base")))
    torch.manual_seed(0)
    encoder_2 = text_encoder(base.text_encoder.config.vocab_size, 16, hidden=48, layers=10, projection_dim=24)
    unet = UNet2DConditionModel.from_config(base.unet.config, cross_attention_dim=32 + 48,
                                            projection_class_embeddings_input_dim=6 * 8 + 24)
    pipe = StableDiffusionXLPipeline(**{**base.components, "text_encoder_2": encoder_2, "unet": unet})
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipe.save_pretrained(folder)
    weights = {**ldm_unet(pipe.unet), **ldm_vae(pipe.vae),
               **ldm_clip(pipe.text_encoder, "conditioner.embedders.0.transformer."),
               **ldm_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model.")}
    return str(folder), write_checkpoint(weights, folder.parent / "tiny-sdxl.safetensors")


def same_run(folder: str, checkpoint: str) -> None:
    """The checkpoint, loaded by path, holds exactly the folder's weights, and gives the folder's run: every step's
    latents and the final image. Bit for bit for SD; for SDXL, SD 3 and Flux (measured with today's diffusers and
    transformers) the same weights give latents up to about 1e-5 apart, float rounding of the loaded modules, so
    latents are compared within 1e-4 and images within one level of 255."""
    assert_same_weights(folder, checkpoint)
    runs = [api.run(Settings(prompt="a red circle on the left", model=model, num_inference_steps=3), frames=("x0",))
            for model in (folder, checkpoint)]
    assert runs[1].info.model_source == checkpoint
    assert torch.allclose(runs[0].tensors["latents"], runs[1].tensors["latents"], rtol=0, atol=1e-4)
    assert np.abs(runs[0].final_image.astype(int) - runs[1].final_image).max() <= 1
    assert np.abs(runs[0].frames["x0"][-1].astype(int) - runs[1].frames["x0"][-1]).max() <= 1


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd_checkpoint_loads_by_path_and_runs_as_its_folder(tiny_model, tmp_path, load_options, suffix):
    checkpoint = sd_checkpoint(tiny_model, tmp_path / f"tiny-sd{suffix}")
    load_options(LoadOptions(configs=(tiny_model,)))
    assert resolve(checkpoint).single_file and family_of_reference(checkpoint) is BY_KEY["sd"]
    pipe = load_pipeline(checkpoint)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and load_pipeline(checkpoint) is pipe  # cached
    same_run(tiny_model, checkpoint)


def test_sdxl_checkpoint_loads_by_path_and_runs_as_its_folder(sdxl, load_options):
    folder, checkpoint = sdxl
    load_options(LoadOptions(configs=(folder,)))
    assert family_of_reference(checkpoint) is BY_KEY["sdxl"]
    assert type(load_pipeline(checkpoint)).__name__ == "StableDiffusionXLPipeline"
    same_run(folder, checkpoint)


def test_config_folder_of_another_family_is_not_used(sdxl, sd_file, load_options, tmp_path, monkeypatch):
    """An SDXL config folder does not serve an SD 1.x checkpoint: that falls back to the (empty, offline) cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # where snapshot_download looks, read per call
    load_options(LoadOptions(configs=(sdxl[0],)))
    with pytest.raises(ModelLoadError, match="stable-diffusion-v1-5/stable-diffusion-v1-5") as error:
        load_pipeline(sd_file)
    assert f"not in the Hugging Face cache ({tmp_path})" in str(error.value)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "visualizer", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_missing_config_says_what_is_missing_and_how_to_get_it(sd_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty Hugging Face cache
    env.pop("HF_HUB_CACHE", None)
    result = cli("run", "--prompt", "a red circle", "--model", sd_file, "--steps", "2", "--out", str(tmp_path / "out"),
                 env=env)
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    message = result.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("error: ") and "Traceback" not in message
    for words in ("Stable Diffusion 1.x / 2.x checkpoint", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  str(tmp_path / "hf" / "hub"), "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 "
                  "--include '*.json' --include '*.txt' --include '*.model'", "--model-config FOLDER"):
        assert words in message, words


def test_cli_loads_a_checkpoint_with_a_config_folder_in_bf16(sd_file, tiny_model, tmp_path):
    out = tmp_path / "out"
    result = cli("run", "--prompt", "a red circle", "--model", sd_file, "--model-config", tiny_model,
                 "--dtype", "bf16", "--offload", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "run.json").read_text())["info"]
    assert info["dtype"] == "bfloat16" and info["model_source"] == sd_file
    assert "Offload has no effect on cpu" in result.stderr


def test_bad_load_options_are_refused_at_startup(tiny_model, tmp_path):
    result = cli("run", "--prompt", "a", "--model", tiny_model, "--model-config", str(tmp_path), "--out",
                 str(tmp_path / "out"))
    assert result.returncode == 1 and "has no model_index.json" in result.stderr
    with pytest.raises(ModelLoadError, match="one config folder per family"):
        LoadOptions(configs=(tiny_model, tiny_model))
    with pytest.raises(ModelLoadError, match="dtype must be one of auto, fp32, fp16, bf16"):
        LoadOptions(dtype="fp8")


def write_safetensors(path, shapes: dict) -> str:
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, path)
    return str(path)


@pytest.mark.parametrize("make, words", [
    (lambda d: (d / "notes.safetensors").write_text("not tensors") and str(d / "notes.safetensors"),
     "is not a readable checkpoint"),
    (lambda d: (d / "model.ckpt").write_bytes(b"\x00" * 64) and str(d / "model.ckpt"), "is not a readable checkpoint"),
    (lambda d: write_safetensors(d / "lora.safetensors", {"lora_unet_down_blocks_0.lora_up.weight": (4, 2)}),
     "holds no Stable Diffusion UNet"),
    (lambda d: write_safetensors(d / "refiner.safetensors", {
        "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (4,)}),
     "is an SDXL refiner checkpoint"),
    (lambda d: write_safetensors(d / "inpaint.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)}), "is an SD 1.x inpainting checkpoint"),
])
def test_files_that_are_not_checkpoints_of_a_family_here_say_what_they_are(tmp_path, make, words):
    with pytest.raises(ModelLoadError, match=words):
        family_of_reference(make(tmp_path))


@pytest.mark.parametrize("name, words", [("missing.safetensors", "No checkpoint file at"),
                                         ("readme.txt", "is a file but not a checkpoint")])
def test_paths_that_are_not_checkpoint_files(tmp_path, name, words):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=words):
        resolve(str(tmp_path / name))


def test_bf16_on_cpu_runs_the_loop_and_offload_says_it_does_nothing(tiny_model, load_options, caplog):
    fp32 = api.run(Settings(prompt="a red circle", model=tiny_model, num_inference_steps=4), frames=("x0",))
    load_options(LoadOptions(dtype="bf16", offload=True))
    with caplog.at_level(logging.WARNING, logger="visualizer.engine.models"):
        pipe = load_pipeline(tiny_model, torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records] == [
        f"Offload has no effect on cpu (it moves parts between CPU and GPU memory): {tiny_model} loads as usual."]
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert load_pipeline(tiny_model, torch.device("cpu")) is pipe and not hasattr(pipe.unet, "_hf_hook")
    bf16 = api.run(Settings(prompt="a red circle", model=tiny_model, num_inference_steps=4), frames=("x0",))
    assert bf16.info.dtype == "bfloat16" and fp32.info.dtype == "float32"
    assert np.isfinite(bf16.final_image).all()
    difference = np.abs(bf16.final_image.astype(int) - fp32.final_image.astype(int)).mean()
    assert 0 < difference < 8, difference  # bf16 keeps ~3 significant digits: close to fp32, not equal
    configure(LoadOptions())
    assert load_pipeline(tiny_model, torch.device("cpu")) is not pipe  # the options are part of the cache key


def assert_same_weights(folder: str, checkpoint: str) -> None:
    """Every module of the checkpoint's pipeline holds the folder's weights, bit for bit."""
    pipes = [load_pipeline(model) for model in (folder, checkpoint)]
    for name, module in pipes[0].components.items():
        if isinstance(module, torch.nn.Module):
            theirs = getattr(pipes[1], name).state_dict()
            assert module.state_dict().keys() == theirs.keys(), name
            assert all(torch.equal(value, theirs[key]) for key, value in module.state_dict().items()), name


def same_latents(folder: str, checkpoint: str) -> None:
    """The checkpoint's pipeline holds the folder's weights and gives the folder's run: every step's latents
    within 1e-4 (float rounding of the loaded modules: see same_run)."""
    assert_same_weights(folder, checkpoint)
    runs = [generate(Settings(prompt="a red circle on the left", model=model, num_inference_steps=4, seed=7, width=32,
                              height=32).validate(), load_pipeline(model)) for model in (folder, checkpoint)]
    assert torch.allclose(runs[0].tensors["latents"], runs[1].tensors["latents"], rtol=0, atol=1e-4)


def sd3_text_encoders(pipe) -> dict:
    """The text encoders under the names of SD 3's and ComfyUI's whole checkpoints (as from_single_file reads them)."""
    names = {"clip_l": pipe.text_encoder, "clip_g": getattr(pipe, "text_encoder_2", None),
             "t5xxl": getattr(pipe, "text_encoder_3", pipe.text_encoder_2)}  # Flux: CLIP-L and T5 only
    if names["clip_g"] is names["t5xxl"]:
        del names["clip_g"]
    weights = {}
    for name, encoder in names.items():
        prefix = f"text_encoders.{name}.transformer."
        weights |= ldm_clip(encoder, prefix) if name.startswith("clip") else {
            prefix + key: value for key, value in encoder.state_dict().items()}
    return weights


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> tuple[str, str]:
    """(folder, checkpoint) of a tiny SD 3 with every part in SD 3's own layout (from_single_file takes no weights
    from the config folder: it looks for diffusers' weight names, not transformers'). diffusers tells the CLIP-G from
    the CLIP-L by width and gives the CLIP-L an identity projection, as SD 3's has: so here too."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from visualizer.demo_model.architecture import text_encoder, tiny_sd3_pipeline

    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3-base")))
    torch.manual_seed(0)
    clip_g = text_encoder(base.text_encoder.config.vocab_size, 16, hidden=24, layers=2, projection_dim=24)
    transformer = SD3Transformer2DModel.from_config(base.transformer.config, pooled_projection_dim=32 + 24)
    with torch.no_grad():
        base.text_encoder.text_projection.weight.copy_(torch.eye(32))
    pipe = StableDiffusion3Pipeline(**{**base.components, "text_encoder_2": clip_g, "transformer": transformer})
    folder = tmp_path_factory.mktemp("tiny-sd3")
    pipe.save_pretrained(folder)
    weights = {**sd3_transformer(pipe.transformer), **ldm_vae(pipe.vae), **sd3_text_encoders(pipe)}
    return str(folder), write_checkpoint(weights, folder.parent / "tiny-sd3.safetensors")


def test_sd3_checkpoint_loads_by_path_and_runs_as_its_folder(sd3, load_options, monkeypatch):
    """diffusers tells SD 3 by its width (adaLN 6 x 1536 = 9216) and positions (192 x 192): the tiny MMDiT has
    neither, so diffusers calls it "v1" and the test tells it; test_sd3_checkpoint_is_told_by_its_mmdit_shapes
    covers the telling."""
    folder, checkpoint = sd3
    assert single_file_utils.infer_diffusers_model_type(load_file(checkpoint)) == "v1"
    monkeypatch.setattr(single_file_utils, "infer_diffusers_model_type", lambda checkpoint: "sd3")
    load_options(LoadOptions(configs=(folder,)))
    assert checkpoint_family(resolve(checkpoint)) == (BY_KEY["sd3"], "sd3")
    pipe = load_pipeline(checkpoint)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    # diffusers 0.42.1 leaves a T5 read from a single file in training mode (create_diffusers_t5_model_from_checkpoint
    # never calls eval()): its dropout then changes every run
    assert [name for name, part in pipe.components.items() if getattr(part, "training", False)] == []
    same_latents(folder, checkpoint)


@pytest.mark.parametrize("positions, kind", [(192 * 192, "sd3"), (384 * 384, "sd35_medium")])
def test_sd3_checkpoint_is_told_by_its_mmdit_shapes(tmp_path, positions, kind):
    path = write_safetensors(tmp_path / "sd3.safetensors", {  # SD 3's marker tensors (pos_embed's width cut to 1)
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
        "model.diffusion_model.pos_embed": (1, positions, 1)})
    assert checkpoint_family(resolve(path)) == (BY_KEY["sd3"], kind)


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def flux(request, tmp_path_factory) -> tuple[str, str]:
    """(folder, checkpoint) of a tiny Flux.1, dev-like (guidance-distilled) or schnell-like, as ComfyUI keeps a whole
    one: the transformer in BFL's layout, the VAE, CLIP-L and T5."""
    from diffusers import FluxPipeline

    from visualizer.demo_model.architecture import tiny_flux_pipeline

    folder = tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"), guidance_embeds=request.param)
    pipe = FluxPipeline.from_pretrained(folder)
    weights = {**flux_transformer(pipe.transformer), **ldm_vae(pipe.vae), **sd3_text_encoders(pipe)}
    return str(folder), write_checkpoint(weights, folder.parent / f"tiny-flux-{request.param_index}.safetensors")


def test_flux_checkpoint_is_told_dev_or_schnell(flux):
    folder, checkpoint = flux
    kind = "flux-dev" if json.loads(Path(folder, "transformer", "config.json").read_text())["guidance_embeds"] \
        else "flux-schnell"
    assert checkpoint_family(resolve(checkpoint)) == (BY_KEY["flux"], kind)
    assert family_of_reference(checkpoint) is BY_KEY["flux"]


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def full_width_flux(request, tmp_path_factory):
    """(folder, checkpoint) of a Flux.1 whose transformer has FLUX.1's own width, in one double and one single block
    (2 GB): diffusers' conversion (convert_flux_transformer_checkpoint_to_diffusers) hard-codes that width, so the
    tiny one above cannot load from a file. The text encoders and the VAE stay tiny. Both are deleted after the
    test (4 GB: pytest would keep them for its last three sessions)."""
    from diffusers import FluxPipeline

    from visualizer.demo_model.architecture import tiny_flux_pipeline

    base = tmp_path_factory.mktemp("flux-full-width")
    folder = tiny_flux_pipeline(base / "model", guidance_embeds=request.param, full_width=True)
    pipe = FluxPipeline.from_pretrained(folder)
    checkpoint = write_checkpoint({**flux_transformer(pipe.transformer), **ldm_vae(pipe.vae),
                                   **sd3_text_encoders(pipe)}, base / "flux.safetensors")
    del pipe  # 2 GB, not to be held while the test runs
    yield str(folder), checkpoint
    shutil.rmtree(base)


def test_flux_checkpoint_loads_by_path_and_runs_as_its_folder(full_width_flux, load_options):
    folder, checkpoint = full_width_flux
    load_options(LoadOptions(configs=(folder,)))
    guided = json.loads(Path(folder, "transformer", "config.json").read_text())["guidance_embeds"]
    assert checkpoint_family(resolve(checkpoint)) == (BY_KEY["flux"], "flux-dev" if guided else "flux-schnell")
    assert type(load_pipeline(checkpoint)).__name__ == "FluxPipeline"
    same_latents(folder, checkpoint)
