"""Model registry: plain definitions, registered by name (the timm way).

Each entry knows its default input size (C, H, W) and class count, used by data synthesis and the
CLI. State-dict keys follow the common checkpoints (torchvision names for ImageNet models, the
widely used ``akamaster`` layout for CIFAR ResNets), so users load their own weights as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch.nn as nn

from ..errors import DfquantError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_size: Tuple[int, int, int]
    num_classes: int
    dataset: str


_REGISTRY: Dict[str, ModelSpec] = {}


def register_model(name: str, input_size: Tuple[int, int, int], num_classes: int, dataset: str):
    """Decorator adding a model builder to the registry."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelSpec(name, fn, input_size, num_classes, dataset)
        return fn

    return deco


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise DfquantError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int | None = None, weights: str | None = None) -> nn.Module:
    """Build a registered model in eval mode, optionally loading a weights file."""
    spec = model_spec(name)
    model = spec.builder(num_classes=num_classes or spec.num_classes)
    model.input_size = spec.input_size  # type: ignore[attr-defined]
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model.eval()


def input_size_of(model: nn.Module) -> Tuple[int, int, int]:
    """The (C, H, W) a model expects, from its registry attribute."""
    size = getattr(model, "input_size", None)
    if size is None:
        raise DfquantError(
            "cannot tell the model's input size: pass input_size=(C, H, W) or build it with dfquant.create_model"
        )
    return tuple(size)  # type: ignore[return-value]


# Import the definitions so they register themselves.
from . import cifar_resnet, digits_cnn  # noqa: E402,F401

try:  # ImageNet definitions live in their own module
    from . import imagenet  # noqa: E402,F401
except ImportError:  # pragma: no cover - only while that module is being written
    pass
