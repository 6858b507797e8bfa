"""Train the 2D playground's denoisers: `python -m visualizer.toy.train [--out assets/toy] [--iterations N]`.

One small MLP per pattern (toy.PATTERNS), trained with the DDPM loss (predict the noise added at a random
timestep of toy.SCHEDULER_CONFIG's schedule); patterns with labels drop the label 15% of the time so the
same model also predicts unconditionally (classifier-free guidance). About 50 s per pattern on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from . import model as toy

MODEL = {"hidden": 256, "layers": 3, "embed": 32}
ITERATIONS = 6000  # optimiser steps of 1,024 points each
LABEL_DROPOUT = 0.15  # share of training rows whose label is replaced by "no label"


def train(pattern: str, iterations: int = ITERATIONS, batch: int = 1024, seed: int = 0) -> toy.Denoiser:
    """A denoiser for `pattern`, trained from scratch (deterministic for a seed on one machine)."""
    torch.manual_seed(seed)
    labels = toy.PATTERNS[pattern][1]
    model = toy.Denoiser(labels=len(labels), **MODEL)
    alphas = DDPMScheduler.from_config(toy.SCHEDULER_CONFIG).alphas_cumprod
    data, data_labels = toy.sample_pattern(pattern, 200_000, seed=seed)
    data, data_labels = torch.from_numpy(data), torch.from_numpy(data_labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=iterations)
    for _ in range(iterations):
        rows = torch.randint(0, len(data), (batch,))
        x0, label = data[rows], data_labels[rows]
        if not labels:
            label = torch.full_like(label, len(labels))
        else:
            label = torch.where(torch.rand(batch) < LABEL_DROPOUT, len(labels), label)
        t = torch.randint(0, len(alphas), (batch,))
        abar = alphas[t][:, None]
        noise = torch.randn_like(x0)
        loss = torch.nn.functional.mse_loss(model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, label), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=toy.TOY_DIR)
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--patterns", default=",".join(toy.PATTERNS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for pattern in args.patterns.split(","):
        started = time.perf_counter()
        model = train(pattern, args.iterations)
        # fp16 on disk: half the size, the same points to the eye
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, args.out / f"{pattern}.safetensors")
        (args.out / f"{pattern}.json").write_text(json.dumps(
            {"model": {"labels": model.labels, **MODEL}, "labels": list(toy.PATTERNS[pattern][1]),
             "iterations": args.iterations, "scheduler": toy.SCHEDULER_CONFIG}, indent=1))
        print(f"{pattern}: {time.perf_counter() - started:.0f} s -> {args.out / pattern}.safetensors")


if __name__ == "__main__":
    main()
