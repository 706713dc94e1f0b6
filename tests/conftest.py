"""Fixtures shared by the test modules."""

import pytest
import torch

from helpers import make_cifar_folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _deterministic_algorithms():
    """A Trainer(deterministic=True) switches torch's deterministic algorithms on for the whole
    process; put the setting back so that a later test (on CUDA, where some backward passes have
    no deterministic kernel) runs as it would alone."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(scope="session")
def tiny_c10(tmp_path_factory):
    """A generated CIFAR-10 image folder: 20 training images (2 per class), 10 test images."""
    return make_cifar_folder(
        tmp_path_factory.mktemp("c10"), "cifar10", train_per_class=2, test_per_class=1
    )


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A teacher cache shared by the suite: the tiny recipe's teacher is trained once."""
    return tmp_path_factory.mktemp("teachers")
