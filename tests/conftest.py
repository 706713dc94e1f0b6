"""Fixtures shared by the test modules."""

import pytest
import torch

from helpers import make_cifar_folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
