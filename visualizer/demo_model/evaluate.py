"""Score an embedded model's prompt adherence.

    python -m visualizer.demo_model.evaluate --model emoji [--captions 200]
    python -m visualizer.demo_model.evaluate --model shapes [--seeds 3]

Emoji: one image per caption (captions sampled with a fixed seed) at the default settings and seed 0; an
image is a top-k hit when the asked emoji is among the k training emoji nearest it (RGB at 32x32 on white).
Shapes: each generated image is read back by the scene detector on held-out (colour, shape, position)
triples; it adheres when all three match the prompt.
"""
from __future__ import annotations

import argparse
import random
from collections import Counter

import numpy as np
import torch
from PIL import Image

from ..engine.decode import vae_decode
from ..engine.denoise import generate
from ..engine.run import DEFAULTS, Settings
from . import emoji, scenes


def sample_captions(n: int, seed: int = 0) -> list[str]:
    """`n` emoji captions drawn without replacement with a fixed seed."""
    return random.Random(seed).sample(emoji.captions(), n)


def recall(pictures, asked: list[str]) -> dict:
    """{"top1", "top5": share of pictures whose asked emoji is the nearest / among the 5 nearest, "n"}"""
    index = {caption: i for i, caption in enumerate(emoji.captions())}
    found = emoji.nearest(pictures, k=5)
    wanted = np.array([index[caption] for caption in asked])[:, None]
    return {"top1": round(float((found[:, :1] == wanted).any(1).mean()), 3),
            "top5": round(float((found == wanted).any(1).mean()), 3), "n": len(asked)}


@torch.no_grad()
def emoji_recall(pipe, captions: list[str], batch: int = 50, steps: int = 25) -> dict:
    """Recall of a diffusers pipeline called directly on batches of captions (the training progress check)."""
    pictures = []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=DEFAULTS["guidance_scale"],
                   generator=[torch.Generator().manual_seed(0) for _ in chunk], output_type="np")
        pictures += [(image * 255).round().astype(np.uint8) for image in out.images]
    return recall(pictures, captions)


def engine_recall(pipe, captions: list[str], **settings) -> tuple[dict, list[Image.Image]]:
    """Recall of the app's own runs (default Settings, seed 0, one run per caption) and the final images."""
    pictures = []
    for caption in captions:
        run = generate(Settings(prompt=caption, **settings), pipe)
        pictures.append(Image.fromarray(vae_decode(pipe.vae, run.tensors["latents"][-1:])[0]))
    return recall(pictures, captions), pictures


def held_out_prompts() -> list[tuple[str, tuple[str, str, str]]]:
    """(prompt, (colour, shape, position)) for every held-out shapes triple."""
    out = []
    for color, shape, position in scenes.HELD_OUT:
        scene = scenes.Scene(color, shape, position, "large", "gray")
        out.append((scenes.caption(scene).replace(" of a gray background", ""), (color, shape, position)))
    return out


def adherence(pipe, seeds=(0, 1, 2), samplers=("Euler", "DDIM", "DPM++ 2M"), guidances=(DEFAULTS["guidance_scale"], 1.0),
              steps: int = 25) -> dict:
    """Shapes model: {guidance: {"all": rate, "color": rate, "shape": rate, "position": rate, "n": count}}"""
    results = {}
    for guidance in guidances:
        guidance = DEFAULTS["guidance_scale"] if guidance is None else guidance
        hits, total = Counter(), 0
        for prompt, (color, shape, position) in held_out_prompts():
            for sampler in samplers:
                for seed in seeds:
                    settings = Settings(prompt=prompt, sampler=sampler, num_inference_steps=steps,
                                        guidance_scale=guidance, seed=seed)
                    run = generate(settings, pipe)
                    image = Image.fromarray(vae_decode(pipe.vae, run.tensors["latents"][-1:])[0])
                    got = scenes.matches(scenes.detect(image), color, shape, position)
                    hits.update({k for k, v in got.items() if v})
                    hits["all"] += all(got.values())
                    total += 1
        results[guidance] = {k: round(hits[k] / total, 3) for k in ("all", "color", "shape", "position")}
        results[guidance]["n"] = total
    return results


def main(argv: list[str] | None = None) -> None:
    from ..engine.models import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emoji", help="emoji, shapes, or a model folder")
    parser.add_argument("--captions", type=int, default=200, help="emoji: how many captions to score")
    parser.add_argument("--seeds", type=int, default=3, help="shapes: seeds per held-out prompt")
    parser.add_argument("--samplers", default="Euler,DDIM,DPM++ 2M", help="shapes: samplers to score")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"], help="emoji: guidance scale")
    parser.add_argument("--sheet", help="emoji: also save a contact sheet of the first 48 images here")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    if args.model != "shapes":
        captions = sample_captions(args.captions)
        score, pictures = engine_recall(pipe, captions, num_inference_steps=args.steps, guidance_scale=args.guidance)
        print(f"guidance {args.guidance:g}: top-1 {score['top1']:.0%}, top-5 {score['top5']:.0%} ({score['n']} captions "
              f"sampled with seed 0, one image each, {args.steps} steps of the default sampler, seed 0; nearest "
              "training emoji at 32x32 on white)")
        if args.sheet:
            contact_sheet(pictures[:48]).save(args.sheet)
        return
    scores = adherence(pipe, seeds=tuple(range(args.seeds)), samplers=tuple(args.samplers.split(",")),
                       steps=args.steps)
    for guidance, s in scores.items():
        print(f"guidance {guidance}: adherence {s['all']:.0%} (colour {s['color']:.0%}, shape {s['shape']:.0%}, "
              f"position {s['position']:.0%}; {s['n']} images, held-out prompts, samplers {args.samplers})")


def contact_sheet(pictures: list[Image.Image], columns: int = 8) -> Image.Image:
    size = pictures[0].size[0]
    rows = -(-len(pictures) // columns)
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % columns) * size, (i // columns) * size))
    return sheet


if __name__ == "__main__":
    main()
