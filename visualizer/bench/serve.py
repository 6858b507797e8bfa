"""`python -m visualizer bench --replicas 1,2 [--replica-threads 1]`: throughput of the Ray Serve replicas.

Four sessions start a 40-step run each at the same time (Euler, DDIM, Euler a, Heun; the embedded model, every
frame decoded and streamed to this process as the app receives them); the row is the wall time until all four
runs are back, the median of `repeats`, for each replica count on a local Ray.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from ..engine.run import Settings

SAMPLERS = ["Euler", "DDIM", "Euler a", "Heun"]
PROMPT = "red apple"


def concurrent_runs(replicas, steps: int) -> float:
    """Seconds until one run per sampler, all started at once, have all finished on `replicas`."""
    def one(seed: int, sampler: str) -> None:
        for _ in replicas.stream(Settings(prompt=PROMPT, sampler=sampler, num_inference_steps=steps, seed=seed)):
            pass

    started = time.perf_counter()
    with ThreadPoolExecutor(len(SAMPLERS)) as pool:
        list(pool.map(one, range(len(SAMPLERS)), SAMPLERS))
    return time.perf_counter() - started


def main(counts: list[int], threads: int, steps: int = 40, repeats: int = 3) -> dict:
    import ray

    from .. import serve

    ray.init(num_cpus=max(counts) * threads, include_dashboard=False, namespace=serve.APP_NAME, log_to_driver=False)
    try:
        walls = {}
        for count in counts:
            replicas = serve.Replicas(count, threads)
            concurrent_runs(replicas, steps)  # every replica has run once
            walls[count] = statistics.median(concurrent_runs(replicas, steps) for _ in range(repeats))
            print(f"{count} replica(s) x {threads} torch thread(s): 4 concurrent {steps}-step runs "
                  f"({', '.join(SAMPLERS)}) in {walls[count]:.2f} s", flush=True)
    finally:
        ray.shutdown()
    base = walls[counts[0]]
    for count in counts[1:]:
        print(f"{count} replicas / {counts[0]}: {walls[count] / base:.2f}x the wall time")
    return walls
