"""Shared fixtures: the digits default (trained once per session into a temporary cache) and the
real CIFAR-10 assets from ../shared (tests that need them skip with a reason when absent), and two
small hand-written models with a shared conv and an affine-free BN."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from dfquant.assets import CIFAR10_TEST_NPZ, CIFAR_RESNET_WEIGHTS, asset_path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` each worker has a core: one torch thread each (and in the CLI
    # subprocesses it starts), so two workers do not oversubscribe the two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


class SharedConv(nn.Module):
    """One conv run twice, each run followed by its own BN: neither BN may be folded into it."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c, self.b1, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b1(self.c(x)))
        x = torch.relu(self.b2(self.c(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class AffineFreeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()



@pytest.fixture
def with_bn_stats():
    """The function that gives a model's BatchNorm layers non-trivial statistics (and eval mode)."""
    return _with_running_stats


@pytest.fixture
def shared_conv_model() -> nn.Module:
    """A small BN CNN whose conv ``c`` runs twice (weight sharing), BN statistics set."""
    return _with_running_stats(SharedConv())


@pytest.fixture
def affine_free_bn_model() -> nn.Module:
    """A small CNN whose first BN has no affine parameters; it pools with ``x.mean((2, 3))``."""
    return _with_running_stats(AffineFreeBN())
