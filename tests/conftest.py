"""Shared fixtures: a tiny random Stable Diffusion pipeline saved to disk and loaded like a real model."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from visualizer.demo_model.architecture import tiny_pipeline


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny SD pipeline folder (32x32 images) built from configs with save_pretrained."""
    return str(tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from visualizer.engine.models import load_pipeline

    return load_pipeline(tiny_model)


@pytest.fixture
def load_options():
    """Set this process's LoadOptions (models.configure) for one test; the previous ones come back after it."""
    from visualizer.engine.models import LoadOptions, configure

    previous = configure(LoadOptions())
    yield configure
    configure(previous)


def tiny_family_model(tmp_path_factory, builder: str, **kw) -> tuple[str, object]:
    """(folder, pipeline) of a tiny random model made by `demo_model.architecture.<builder>` (e.g.
    "tiny_sd3_pipeline"), saved with save_pretrained and loaded like a real one."""
    from visualizer.demo_model import architecture
    from visualizer.engine.models import load_pipeline

    folder = str(getattr(architecture, builder)(tmp_path_factory.mktemp(builder), **kw))
    return folder, load_pipeline(folder)


def check_latent_colour_preview(pipe, factors, bias) -> None:
    """`pipe`'s cheap preview uses its family's latent -> RGB `factors` and `bias`, says it is a preview, and shows
    all-zero latents as the bias colour."""
    import numpy as np
    import torch

    from visualizer.engine.decode import CheapPreview, latent_rgb_factors

    got_factors, got_bias = latent_rgb_factors(pipe)
    assert torch.equal(got_factors, torch.tensor(factors)) and torch.equal(got_bias, torch.tensor(bias))
    preview = CheapPreview(pipe, use_taesd=False)(torch.zeros(1, len(factors), 8, 8), step=1)
    assert not preview.exact and "preview" in preview.label
    assert (preview.image[0, 0] == np.round((np.array(bias) / 2 + 0.5) * 255)).all()


def check_taesd_lookup(family: str, variable: str, folder, monkeypatch, latent_channels: int = 16) -> None:
    """`family`'s TAESD is loaded from the folder its environment `variable` names."""
    import torch
    from diffusers import AutoencoderTiny

    from visualizer.engine.decode import load_taesd

    AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8, 8, 8, 8),
                    decoder_block_out_channels=(8, 8, 8, 8)).save_pretrained(folder)
    monkeypatch.setenv(variable, str(folder))
    assert load_taesd(torch.device("cpu"), family) is not None
