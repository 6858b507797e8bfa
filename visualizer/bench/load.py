"""Load test a running app: `python -m visualizer.bench.load --url http://127.0.0.1:7860/ --sessions 8`.

Starts N concurrent gradio_client sessions with different seeds, generate and compare mixed, then repeats
every request alone, one at a time, and checks each concurrent result is identical to its lone twin.
Sends traffic only to the given URL (meant for a local server). Prints one summary line; exit 1 on mismatch.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..engine.run import Settings

def _digest(path: str) -> str:
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def _form(settings: Settings) -> dict:
    """The API's arguments for `settings` (its size: 0 = the model's native size)."""
    return dict(prompt=settings.prompt, negative_prompt=settings.negative_prompt, seed=settings.seed,
                num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                width=0, height=0, model=settings.model)


def request(url: str, index: int, model: str, steps: int) -> tuple[str, str]:
    """One session's job: ('generate' | 'compare', digest of every frame it produced)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    settings = Settings(prompt="red apple" if index % 2 == 0 else "rocket", model=model, seed=1000 + index,
                        num_inference_steps=steps, guidance_scale=7.5, sampler="Euler a").validate()
    if index % 2 == 0:
        result = client.predict(**_form(settings), sampler=settings.sampler, api_name="/generate")
        frames = [client.predict(result["run_id"], i, "xt", api_name="/frame")[0]
                  for i in range(1, len(result["steps"]) + 1)]
        return "generate", hashlib.sha256("".join(map(_digest, frames)).encode()).hexdigest()
    result = client.predict(**_form(settings), samplers=["Euler", "DDIM", "Heun"], api_name="/compare")
    return "compare", _digest(result["grid_image"])


def run_load_test(url: str, sessions: int = 8, model: str = "embedded", steps: int = 8) -> dict:
    with ThreadPoolExecutor(sessions) as pool:
        together = list(pool.map(lambda i: request(url, i, model, steps), range(sessions)))
    alone = [request(url, i, model, steps) for i in range(sessions)]
    mismatches = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    return {"sessions": sessions, "completed": len(together), "mismatches": mismatches,
            "kinds": [k for k, _ in together]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    result = run_load_test(args.url, args.sessions, args.model, args.steps)
    print(f"{result['completed']}/{result['sessions']} sessions completed, "
          f"{len(result['mismatches'])} differ from the same request run alone")
    return 1 if result["mismatches"] or result["completed"] != result["sessions"] else 0


if __name__ == "__main__":
    sys.exit(main())
