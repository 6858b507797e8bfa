"""Score the embedded model's prompt adherence on held-out (colour, shape, position) triples.

    python -m visualizer.demo_model.evaluate [--model assets/demo-model] [--seeds 3]

Each generated image is read back by the scene detector; an image adheres when colour, shape and
position all match the prompt. Prints one summary line per guidance setting.
"""
from __future__ import annotations

import argparse
from collections import Counter

from ..engine.decode import vae_decode
from ..engine.denoise import generate
from ..engine.run import DEFAULTS, Settings
from . import scenes
from PIL import Image


def held_out_prompts() -> list[tuple[str, tuple[str, str, str]]]:
    """(prompt, (colour, shape, position)) for every held-out triple."""
    out = []
    for color, shape, position in scenes.HELD_OUT:
        scene = scenes.Scene(color, shape, position, "large", "gray")
        out.append((scenes.caption(scene).replace(" of a gray background", ""), (color, shape, position)))
    return out


def adherence(pipe, seeds=(0, 1, 2), samplers=("Euler", "DDIM", "DPM++ 2M"), guidances=(DEFAULTS["guidance_scale"], 1.0),
              steps: int = 25) -> dict:
    """{guidance: {"all": rate, "color": rate, "shape": rate, "position": rate, "n": count}}"""
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
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", default="Euler,DDIM,DPM++ 2M")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    scores = adherence(pipe, seeds=tuple(range(args.seeds)), samplers=tuple(args.samplers.split(",")),
                       steps=args.steps)
    for guidance, s in scores.items():
        print(f"guidance {guidance}: adherence {s['all']:.0%} (colour {s['color']:.0%}, shape {s['shape']:.0%}, "
              f"position {s['position']:.0%}; {s['n']} images, held-out prompts, samplers {args.samplers})")


if __name__ == "__main__":
    main()
