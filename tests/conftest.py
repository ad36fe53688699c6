"""Shared fixtures. Triton kernels run on CPU tensors here through its interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

import unioncam

from .models import TinyCNN, make_tiny_cnn  # noqa: F401  (tests import them from here)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def vgg_random():
    """Seeded random VGG16 (pixel-space input), shared by the session: never modify it in a test."""
    return unioncam.load_vgg16("random", seed=0)


@pytest.fixture
def tiny_cnn():
    return make_tiny_cnn()
