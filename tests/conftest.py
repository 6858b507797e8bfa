"""Shared fixtures: a tiny random Stable Diffusion pipeline saved to disk and loaded like a real model."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from visualizer.demo_model.architecture import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny SD pipeline folder (32x32 images) built from configs with save_pretrained."""
    return str(tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from visualizer.models import load_pipeline

    return load_pipeline(tiny_model)
