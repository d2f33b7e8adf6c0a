"""Shared fixtures: the digits default (trained once per session into a temporary cache) and the
real CIFAR-10 assets from ../shared (tests that need them skip with a reason when absent)."""
from __future__ import annotations

import os

import pytest
import torch

from dfquant.assets import CIFAR10_TEST_NPZ, CIFAR_RESNET_WEIGHTS, asset_path


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["DFQUANT_CACHE"] = str(tmp_path_factory.mktemp("dfquant-cache"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the tiny digits ops of the learned methods: on 2 shared cores, a
    second spinning OpenMP thread makes them many times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """(trained digits CNN, (x_test, y_test))."""
    from dfquant.data import digits_model, load_digits_split

    torch.manual_seed(0)
    return digits_model(), load_digits_split()[1]


def _need(rel: str):
    p = asset_path(rel)
    if p is None:
        pytest.skip(f"shared asset {rel} not found (set DFQUANT_ASSETS to the shared/ folder)")
    return p


@pytest.fixture(scope="session")
def cifar10():
    from dfquant.data import load_cifar10_npz

    return load_cifar10_npz(_need(CIFAR10_TEST_NPZ))


@pytest.fixture(scope="session")
def resnet20():
    from dfquant.models import create_model

    return create_model("resnet20", weights=str(_need(CIFAR_RESNET_WEIGHTS["resnet20"])))
