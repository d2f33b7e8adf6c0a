"""Device selection and the deterministic-cuDNN guard (runs without a GPU: it only sets flags)."""
from __future__ import annotations

import pytest
import torch

from dfquant.devices import deterministic_cudnn, resolve_device
from dfquant.errors import DfquantError


@pytest.fixture
def cudnn_flags():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def test_deterministic_cudnn_sets_and_restores_flags(cudnn_flags):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    with deterministic_cudnn(torch.device("cuda")):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_cudnn(torch.device("cuda")):
            raise RuntimeError("boom")
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)


def test_deterministic_cudnn_leaves_cpu_runs_alone(cudnn_flags):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    with deterministic_cudnn(torch.device("cpu")):
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DfquantError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DfquantError, match="CUDA is not available"):
            resolve_device("cuda")
