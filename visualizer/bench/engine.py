"""`python -m visualizer bench [--quick]`: capture-and-decode cost against plain diffusers, in one process.

Rows, each the median of `repeats` runs on the same model, prompt, seed and settings:
- plain: `StableDiffusionPipeline.__call__` with no capture up to its final latents, then their one decode by the
  fp32 VAE this tool keeps (the pipeline's own decode would fail: it feeds fp16 latents to that VAE on a GPU);
- naive: the same with a `callback_on_step_end` that VAE-decodes the latents every step;
- ours, final image: the visualizer's run until its final image is decoded (live exact frames within the
  decode budget of decode.StreamingDecoder); ours, frames: until every x_t (and x0-hat) frame is decoded;
- grid: 4 samplers in lockstep vs 4 sequential plain runs;
- scrub: serving an already-decoded frame for the slider (median over all steps);
- export: GIF and MP4 of 50 frames of 512x512.
On a GPU also the peak GPU memory of a run with every frame. The process's load options (`--dtype`, `--offload`)
apply to every row.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import api
from ..media import views
from ..engine.decode import vae_decode
from ..media.export import prepare, save_gif, save_mp4
from ..engine.models import EMBEDDED_MODELS, current_options, load_pipeline
from ..engine.run import DEFAULTS, Settings
from ..engine.samplers import make_scheduler

PROMPT = "red apple"
GRID_SAMPLERS = ["Euler", "DDIM", "DPM++ 2M", "Euler a"]


def sd15_random(folder: Path) -> Path:
    """A random-weight model with the Stable Diffusion 1.5 architecture, saved once (about 4 GB fp32)."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..demo_model.architecture import assemble, write_tokenizer

    torch.manual_seed(0)
    tokenizer = write_tokenizer(folder / "tokenizer", PROMPT.split(), max_length=77)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=768,
                                           intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                           max_position_embeddings=77))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD 1.x defaults
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215)
    assemble(unet, vae, encoder, tokenizer).save_pretrained(folder)
    return folder


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_model(model: str, size: int | None, steps: int, repeats: int) -> dict:
    pipe = load_pipeline(model)
    scheduler = make_scheduler("Euler", pipe.scheduler.config)
    pipe.scheduler = scheduler
    kwargs = dict(num_inference_steps=steps, guidance_scale=DEFAULTS["guidance_scale"], height=size, width=size)
    generator = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731

    def plain(**callback):
        latents = pipe(PROMPT, generator=generator(), output_type="latent", **callback, **kwargs).images
        vae_decode(pipe.vae, latents)

    def naive():
        def decode_each(p, i, t, tensors):
            vae_decode(p.vae, tensors["latents"], batch_size=1)
            return tensors
        plain(callback_on_step_end=decode_each)

    marks: dict = {}
    settings = Settings(prompt=PROMPT, model=model, sampler="Euler", num_inference_steps=steps, width=size, height=size)

    def ours_final():
        """The visualizer's run (capturing everything, exact live frames within the decode budget) until its final
        image is decoded."""
        items = api.stream(settings)
        next(item for item in items if not isinstance(item, api.StepUpdate))  # the final image's decode, or the
        # Run where every frame was decoded live (a GPU can)
        items.close()

    def ours_frames(kinds):
        """Until every step's frame of `kinds` exists (and, with both kinds, the convergence metrics)."""
        marks["run"] = api.run(settings, frames=kinds)


    plain(), naive(), ours_final(), ours_frames(("xt",))  # warm up
    rows = {"plain": [], "naive": [], "ours_final_image": [], "ours_xt_frames": [], "ours_xt_and_x0_frames": []}
    for _ in range(repeats):
        rows["plain"].append(_timed(plain))
        rows["naive"].append(_timed(naive))
        rows["ours_final_image"].append(_timed(ours_final))
        rows["ours_xt_frames"].append(_timed(lambda: ours_frames(("xt",))))
        rows["ours_xt_and_x0_frames"].append(_timed(lambda: ours_frames(("xt", "x0"))))
    result = {k: statistics.median(v) for k, v in rows.items()}
    result["ours_final_over_plain"] = result["ours_final_image"] / result["plain"]
    result["ours_xt_over_naive"] = result["ours_xt_frames"] / result["naive"]
    result["ours_xt_x0_over_plain"] = result["ours_xt_and_x0_frames"] / result["plain"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        ours_frames(("xt", "x0"))
        result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    with_maps = dataclasses.replace(settings, attention=True)
    no_maps = statistics.median(_timed(lambda: api.run(settings, frames=())) for _ in range(repeats))
    maps = statistics.median(_timed(lambda: api.run(with_maps, frames=())) for _ in range(repeats))
    result["attention_capture_ratio"] = maps / no_maps  # the loop with word maps / without (no decoding)
    grid = statistics.median(_timed(lambda: api.compare(PROMPT, GRID_SAMPLERS, model=model, num_inference_steps=steps,
                                                         width=size, height=size, frames=())) for _ in range(repeats))
    def sequential_plain() -> float:
        total = 0.0
        for name in GRID_SAMPLERS:
            pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
            total += _timed(plain)  # noqa: B023
        return total

    sequential = statistics.median(sequential_plain() for _ in range(repeats))
    result.update(grid_lockstep=grid, grid_sequential_plain=sequential, grid_ratio=grid / sequential)
    run = marks["run"]
    scrub = [_timed(lambda i=i: views.frame(run, i, "xt")) for i in range(len(run))]
    result["scrub_median_ms"] = statistics.median(scrub) * 1000
    return result


def measure_export(frames: int = 50, size: int = 512) -> dict:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    images = prepare([np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8)) for i in range(frames)],
                     min_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        gif = _timed(lambda: save_gif(images, Path(tmp) / "a.gif"))
        mp4 = _timed(lambda: save_mp4(images, Path(tmp) / "a.mp4"))
    return {"gif_50x512_s": gif, "mp4_50x512_s": mp4}


def main(quick: bool = False, repeats: int = 3, out: Path = Path("bench.json"), sd15_size: int = 256,
         sd15_steps: int = 10, app: bool = False) -> dict:
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
              "torch": torch.__version__, "load_options": dataclasses.asdict(current_options()), "models": {}}
    # all model work on the engine thread, as in the app (torch's thread pool is per calling thread; see api)
    for name in EMBEDDED_MODELS:  # the default first
        report["models"][f"{name} (embedded, 64x64, 25 steps)"] = api.on_engine(measure_model, name, None, 25, repeats)
    if not quick:
        folder = api.on_engine(sd15_random, Path(tempfile.gettempdir()) / "visualizer-sd15-random")
        name = f"SD 1.5 architecture, random weights ({sd15_size}x{sd15_size}, {sd15_steps} steps)"
        report["models"][name] = api.on_engine(measure_model, str(folder), sd15_size, sd15_steps, max(1, repeats - 2))
    report["export"] = measure_export()
    if app:
        from . import app as bench_app

        report["app"] = bench_app.main(repeats)
    out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return report


def format_table(report: dict) -> str:
    lines = [f"machine: {report['machine']}, torch {report['torch']}, load options {report['load_options']}", "",
             "| model | plain s | naive s | ours: final image s | ours: every x_t frame s | "
             "ours: every x_t and x0-hat frame s | final / plain | x_t frames / naive | x_t + x0-hat frames / plain | "
             "grid of 4 / 4 sequential | word maps / none | scrub ms | GPU peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        lines.append(f"| {name} | {r['plain']:.3f} | {r['naive']:.3f} | {r['ours_final_image']:.3f} | "
                     f"{r['ours_xt_frames']:.3f} | {r['ours_xt_and_x0_frames']:.3f} | "
                     f"{r['ours_final_over_plain']:.2f}x | {r['ours_xt_over_naive']:.2f}x | "
                     f"{r['ours_xt_x0_over_plain']:.2f}x | {r['grid_ratio']:.2f}x | {r['attention_capture_ratio']:.2f}x | "
                     f"{r['scrub_median_ms']:.1f} | {r.get('gpu_peak_gib', float('nan')):.2f} |")
    emoji, shapes = (report["models"].get(f"{n} (embedded, 64x64, 25 steps)") for n in EMBEDDED_MODELS)
    if emoji and shapes:
        lines += ["", f"emoji model / shapes model, a plain 25-step image: {emoji['plain'] / shapes['plain']:.2f}x; "
                      f"every x_t and x0-hat frame: {emoji['ours_xt_and_x0_frames'] / shapes['ours_xt_and_x0_frames']:.2f}x"]
    e = report["export"]
    lines += ["", f"export of 50 frames at 512x512: GIF {e['gif_50x512_s']:.2f} s, MP4 {e['mp4_50x512_s']:.2f} s"]
    if "app" in report:
        from .app import format_rows

        lines += ["", "app (Chromium, one app process, the embedded model):", format_rows(report["app"])]
    return "\n".join(lines)
