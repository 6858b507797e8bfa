"""Decoding every step: the streaming decoder's frames are the exact VAE frames, batched where it pays."""
import numpy as np
import torch

from visualizer.decode import StreamingDecoder, decode_batch_size, vae_decode
from visualizer.denoise import generate
from visualizer.run import Settings


def test_cpu_batches_small_frames_and_decodes_large_ones_one_by_one(tiny_pipe):
    vae = tiny_pipe.vae  # downsamples by 4
    assert decode_batch_size(vae, torch.zeros(1, 4, 8, 8)) == 8  # 32x32 frames
    assert decode_batch_size(vae, torch.zeros(1, 4, 32, 32)) == 2  # 128x128
    assert decode_batch_size(vae, torch.zeros(1, 4, 64, 64)) == 1  # 256x256


def test_streaming_frames_exist_during_the_run_and_equal_the_exact_decode(tiny_model, tiny_pipe):
    decoder = StreamingDecoder(tiny_pipe.vae)
    seen = []

    def on_step(event):
        decoder(event)
        seen.append(decoder.latest(0, "xt"))

    run = generate(Settings(prompt="a red circle", model=tiny_model, num_inference_steps=10, seed=2), tiny_pipe,
                   callback=on_step)
    decoder.finish([run])
    assert seen[3] is not None and seen[3][0] == 4  # 4 steps x 2 kinds = one batch of 8, decoded at step 4
    for kind in ("xt", "x0"):  # batched and one-by-one convolutions may round differently: 2/255 at most
        exact = vae_decode(tiny_pipe.vae, run.tensors[kind], batch_size=1).astype(int)
        assert np.abs(np.stack(run.frames[kind]).astype(int) - exact).max() <= 2, kind
    # the final image is the last x_t frame (decoded in a batch): equal to a lone decode up to that rounding
    lone = vae_decode(tiny_pipe.vae, run.tensors["latents"][-1:])[0].astype(int)
    assert np.array_equal(run.final_image, run.frames["xt"][-1]) and np.abs(run.final_image - lone).max() <= 2
