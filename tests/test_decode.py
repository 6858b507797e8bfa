"""Decoding every step: the streaming decoder's frames are the exact VAE frames, batched where it pays."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from visualizer import api
from visualizer.engine.decode import StreamingDecoder, decode_batch_size, decode_workers, gpu_batch, use_cores, vae_decode
from visualizer.engine.denoise import generate
from visualizer.engine.run import Settings


def test_cpu_batches_small_frames_and_decodes_large_ones_one_by_one(tiny_pipe):
    vae = tiny_pipe.vae  # downsamples by 4
    assert decode_batch_size(vae, torch.zeros(1, 4, 8, 8)) == 8  # 32x32 frames
    assert decode_batch_size(vae, torch.zeros(1, 4, 32, 32)) == 2  # 128x128
    assert decode_batch_size(vae, torch.zeros(1, 4, 64, 64)) == 1  # 256x256


def test_a_gpu_decodes_as_many_frames_at_once_as_fit_in_half_its_free_memory():
    gib = 2 ** 30
    assert gpu_batch(80 * gib, 512 * 512) == 8  # at most GPU_BATCH
    assert gpu_batch(12 * gib, 512 * 512) == 5  # 6 GiB / 1.2 GB per frame
    assert gpu_batch(24 * gib, 1024 * 1024) == 2  # SDXL / Flux size: 12 GiB / 4.7 GB per frame
    assert gpu_batch(2 * gib, 1024 * 1024) == 1  # never fewer than one


def _run_with(decoder, tiny_model, tiny_pipe, seen):
    def on_step(event):
        decoder(event)
        decoded = decoder.frames.get(0, {}).get("xt")
        seen.append(max(decoded) + 1 if decoded else None)  # the newest step with an exact frame

    return generate(Settings(prompt="a red circle", model=tiny_model, num_inference_steps=10, seed=2), tiny_pipe,
                    callback=on_step)


def test_without_a_budget_each_block_is_decoded_as_it_completes(tiny_model, tiny_pipe):
    decoder, seen = StreamingDecoder(tiny_pipe.vae, budget=None), []
    run = _run_with(decoder, tiny_model, tiny_pipe, seen)
    assert seen == [1, 1, 1, 1, 5, 5, 5, 5, 9, 9]  # step 1 alone, then blocks of 4 steps x 2 kinds (32x32)
    assert list(decoder.drain([run])) == [1, 0]  # the last, partial block: the final image alone, then x0-hat
    assert list(decoder.drain([run])) == [0]  # nothing left: still one "done" after the loop (on it the app shows
    decoder.finish([run])                     # the final image at once)
    for kind in ("xt", "x0"):  # batched and one-by-one convolutions may round differently: 2/255 at most
        exact = vae_decode(tiny_pipe.vae, run.tensors[kind], batch_size=1).astype(int)
        assert np.abs(np.stack(run.frames[kind]).astype(int) - exact).max() <= 2, kind


def test_the_budget_leaves_blocks_for_after_the_loop_and_the_final_image_comes_first(tiny_model, tiny_pipe):
    decoder, seen = StreamingDecoder(tiny_pipe.vae, budget=0.0), []
    run = _run_with(decoder, tiny_model, tiny_pipe, seen)
    assert seen == [1] * 10  # a zero budget: only the first block, step 1 (nothing was decoded before it)
    drain = decoder.drain([run])
    left = next(drain)
    assert sorted(decoder.frames[0]["xt"]) == [0, 9] and left == 17  # the final image before the rest
    assert list(drain)[-1] == 0
    decoder.finish([run])
    assert len(run.frames["xt"]) == len(run.frames["x0"]) == 10
    exact = vae_decode(tiny_pipe.vae, run.tensors["x0"], batch_size=1).astype(int)
    assert np.abs(np.stack(run.frames["x0"]).astype(int) - exact).max() <= 2
    # the final image is the last x_t frame, decoded alone: exactly a lone decode of the final latents
    lone = vae_decode(tiny_pipe.vae, run.tensors["latents"][-1:])[0]
    assert np.array_equal(run.final_image, run.frames["xt"][-1]) and np.array_equal(run.final_image, lone)


def _run_on_a_clock(tiny_model, tiny_pipe, monkeypatch, budget):
    """A 10-step run where, by the decoder's clock, each step takes 1 s and each decoded frame 0.1 s."""
    now = [0.0]
    decode = tiny_pipe.vae.decode

    def timed_decode(latents, **kwargs):
        now[0] += 0.1 * len(latents)
        return decode(latents, **kwargs)

    monkeypatch.setattr(tiny_pipe.vae, "decode", timed_decode)
    decoder, seen, shares = StreamingDecoder(tiny_pipe.vae, budget=budget, clock=lambda: now[0]), [], []

    def on_step(event):
        now[0] += 1.0
        decoder(event)
        decoded = decoder.frames.get(0, {}).get("xt")
        seen.append(max(decoded) + 1 if decoded else None)
        shares.append(decoder._decoding / (now[0] - decoder._started + 1.0))  # + step 1, before the first call

    generate(Settings(prompt="a red circle", model=tiny_model, num_inference_steps=10, seed=2), tiny_pipe,
             callback=on_step)
    return seen, shares


def test_a_block_is_decoded_live_only_if_its_cost_fits_the_budget(tiny_model, tiny_pipe, monkeypatch):
    # blocks of 4 steps x 2 kinds = 0.8 s; step 1 = 0.3 s (the start alone, then its x_t and x0-hat), always decoded;
    # time counts from the first callback. With 10%, decoding steps 2-5 at step 5 would make it 1.1 s of 4.3 s: they
    # wait for the end of the loop, and so does every later block (the old rule, "decode while decoding has used at
    # most 10% so far", decoded them)
    seen, shares = _run_on_a_clock(tiny_model, tiny_pipe, monkeypatch, budget=0.10)
    assert seen == [1] * 10
    assert max(shares[4:]) <= 0.10  # once step 1's frames are paid off
    # with 30%, steps 2-5 fit at step 5 (1.1 s of 4.3 s), and steps 6-9 at step 9 (1.9 s of 9.1 s)
    seen, shares = _run_on_a_clock(tiny_model, tiny_pipe, monkeypatch, budget=0.30)
    assert seen == [1, 1, 1, 1, 5, 5, 5, 5, 9, 9]
    assert max(shares[1:]) <= 0.30


def test_frames_are_bit_identical_whatever_the_timing(tiny_model, tiny_pipe):
    """Fixed blocks: a frame's batch does not depend on how fast the run went (the load test relies on it)."""
    runs = []
    for budget in (None, 0.0):
        decoder = StreamingDecoder(tiny_pipe.vae, budget=budget)
        run = _run_with(decoder, tiny_model, tiny_pipe, [])
        decoder.finish([run])
        runs.append(run)
    for kind in ("xt", "x0"):
        assert all(np.array_equal(a, b) for a, b in zip(runs[0].frames[kind], runs[1].frames[kind])), kind


def test_a_step_update_previews_the_newest_exact_frame_or_says_it_is_approximate(tiny_model):
    seen = []
    for item in api.stream(Settings(prompt="a red circle", model=tiny_model, num_inference_steps=6, seed=2)):
        if isinstance(item, api.StepUpdate):
            seen.append(item.preview())
    assert seen[0].exact and seen[0].step == 1  # step 1 is decoded at once
    assert all(p.image.dtype == np.uint8 and p.step <= i + 1 for i, p in enumerate(seen))
    assert all(p.exact or "preview" in p.label for p in seen)


WORKERS_SCRIPT = """
import json, sys, torch
import numpy as np
from visualizer.engine.decode import StreamingDecoder, decode_workers, use_cores
from visualizer.engine.denoise import generate
from visualizer.engine.models import load_pipeline
from visualizer.engine.run import Settings

pipe = load_pipeline(sys.argv[1])
frames, left = [], []
for workers in (1, 2):
    decoder = StreamingDecoder(pipe.vae, budget=0.0, workers=workers)
    run = generate(Settings(prompt="a red circle", model=sys.argv[1], num_inference_steps=10, seed=2), pipe,
                   callback=decoder)
    left.append(list(decoder.drain([run])))
    decoder.finish([run])
    frames.append(np.stack(run.frames["xt"] + run.frames["x0"]))
default = decode_workers(pipe.vae)
use_cores(2)
print(json.dumps({"threads": torch.get_num_threads(), "default": default, "workers": decode_workers(pipe.vae),
                  "left": left,
                  "identical": bool(np.array_equal(*frames))}))
"""


def test_with_one_torch_thread_the_frames_left_after_the_loop_are_decoded_on_every_core_bit_for_bit(tiny_model):
    """As app.py runs on 2 cores (OMP_NUM_THREADS=1): each block on a thread of its own gives the same frames."""
    done = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, str(tiny_model)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["threads"] == 1 and result["default"] == 1 and result["workers"] == 2  # only where asked
    assert result["left"][0] == result["left"][1] == [17, 9, 1, 0]  # the final image alone, then blocks of 8
    assert result["identical"]


def test_with_torch_on_several_cores_the_frames_left_are_decoded_on_the_engine_thread_alone(tiny_pipe):
    if api.on_engine(torch.get_num_threads) == 1:
        pytest.skip("torch runs one thread here")
    use_cores(2)
    try:
        assert api.on_engine(decode_workers, tiny_pipe.vae) == 1
    finally:
        use_cores(1)


def _fresh(folder):
    """A pipeline of its own (the tests below change dtypes and configs), loaded like a real model."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def test_frames_decode_in_the_dtype_the_familys_pipeline_decodes_in(tiny_model, tmp_path_factory):
    """On the CPU every frame is the fp32 VAE's; where the pipeline runs in fp16 / bf16 (a GPU), SD 1.x / 2.x, SD 3 and
    Flux decode frames in that dtype, and SDXL upcasts unless its VAE says it need not (force_upcast False)."""
    from conftest import tiny_family_model
    from visualizer.engine.decode import frame_vae

    sd = _fresh(tiny_model)
    assert frame_vae(sd) is sd.vae  # fp32 models: no copy
    sd.unet.to(torch.float16)
    half = frame_vae(sd)
    assert half is not sd.vae and half.dtype == torch.float16 and sd.vae.dtype == torch.float32
    assert frame_vae(sd) is half  # made once per pipeline
    xl = _fresh(tiny_family_model(tmp_path_factory, "tiny_sdxl_pipeline")[0])
    xl.unet.to(torch.float16)
    assert frame_vae(xl) is xl.vae  # force_upcast (SDXL's own VAE): its pipeline decodes in fp32
    xl.vae.register_to_config(force_upcast=False)  # an fp16-fixed VAE
    assert frame_vae(xl).dtype == torch.float16
    sd3 = _fresh(tiny_family_model(tmp_path_factory, "tiny_sd3_pipeline")[0])
    sd3.transformer.to(torch.bfloat16)
    assert frame_vae(sd3).dtype == torch.bfloat16


def test_frames_in_another_dtype_leave_the_final_image_the_fp32_vaes(tiny_model, tiny_pipe):
    """A bf16 frame VAE (on the CPU; fp16 on a GPU): the frames within a few levels of the fp32 decode, the start
    included; the final image decoded alone by the fp32 VAE, bit for bit, live or after the loop."""
    from visualizer.engine.decode import decode_run, frame_vae

    settings = Settings(prompt="a red circle", model=tiny_model, num_inference_steps=9, seed=2)
    exact = StreamingDecoder(tiny_pipe.vae, budget=None)
    reference = generate(settings, tiny_pipe, callback=exact)
    exact.finish([reference])
    for budget in (None, 0.0):  # every block live (the last one holds the final x_t), or all after the loop
        decoder = StreamingDecoder(tiny_pipe.vae, budget=budget, frames_vae=frame_vae(tiny_pipe, torch.bfloat16))
        run = generate(settings, tiny_pipe, callback=decoder)
        decoder.finish([run])
        assert np.array_equal(run.final_image, reference.final_image)
        assert np.array_equal(run.frames["xt"][-1], reference.final_image)
        for kind in ("xt", "x0"):
            diff = np.abs(np.stack(run.frames[kind][:-1]).astype(int) - np.stack(reference.frames[kind][:-1]).astype(int))
            assert 0 < diff.max() <= 8, (kind, diff.max())  # another dtype, and close to fp32
        assert 0 < np.abs(run.start_frame.astype(int) - reference.start_frame.astype(int)).max() <= 8
    again = dataclasses.replace(run, frames={}, start_frame=None, final_image=None)
    decode_run(again, tiny_pipe.vae, frames_vae=frame_vae(tiny_pipe, torch.bfloat16))
    assert np.array_equal(again.final_image, reference.final_image)


def test_a_frame_vae_that_gives_nan_falls_back_to_the_fp32_vae(tiny_pipe):
    """fp16 VAEs can overflow (black frames): a batch with NaN or infinite values is decoded again by the fp32 VAE."""
    import copy

    broken = copy.deepcopy(tiny_pipe.vae)
    with torch.no_grad():
        broken.decoder.conv_out.bias.fill_(float("nan"))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = vae_decode(tiny_pipe.vae, latents)
    assert np.array_equal(vae_decode(broken, latents, fallback=tiny_pipe.vae), exact)
    assert not np.array_equal(vae_decode(broken, latents), exact)  # without the fallback: the broken frames
