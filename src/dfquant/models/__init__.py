"""Model registry: plain definitions, registered by name (the timm way).

Each entry knows its default input size (C, H, W), class count, dataset and input preprocessing
(:class:`~dfquant.data.preprocessing.Preprocessing`: how pixels become the model's input, and so
the range of valid inputs), used by data loading, data synthesis and the CLI. State-dict keys
follow the common checkpoints (torchvision names for ImageNet models, the widely used
``akamaster`` layout for CIFAR ResNets, the Keras/darknet layouts of the shared MobileNetV1 and
Tiny Darknet files), so users load their own weights as they are.

An entry may read its architecture's free sizes from a checkpoint (``arch_from_state``: the width of
a MobileNetV1, the kernel sizes of a Tiny Darknet): :func:`create_model` with ``weights`` then builds
the model the file describes, and loads it with the usual strict key and shape checks.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..data.preprocessing import Preprocessing
from ..errors import DfquantError

# Reads builder keyword arguments from a state dict; None when the dict is not of its layout.
ArchFromState = Callable[[Dict[str, torch.Tensor]], Optional[Dict[str, Any]]]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_size: Tuple[int, int, int]
    num_classes: int
    dataset: str
    preprocessing: Preprocessing
    arch_from_state: Optional[ArchFromState] = None


_REGISTRY: Dict[str, ModelSpec] = {}


def register_model(
    name: str,
    input_size: Tuple[int, int, int],
    num_classes: int,
    dataset: str,
    preprocessing: Optional[Preprocessing] = None,
    arch_from_state: Optional[ArchFromState] = None,
):
    """Decorator adding a model builder to the registry. ``preprocessing``: the model's input
    scaling (default: the dataset's usual one, :func:`dfquant.data.input_normalization`)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        from ..data import dataset_preprocessing

        pre = preprocessing if preprocessing is not None else dataset_preprocessing(dataset)
        if pre.channels not in (1, input_size[0]):
            raise DfquantError(f"model {name!r}: preprocessing has {pre.channels} channels, the input {input_size[0]}")
        _REGISTRY[name] = ModelSpec(name, fn, input_size, num_classes, dataset, pre, arch_from_state)
        return fn

    return deco


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise DfquantError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int | None = None, weights: str | None = None, **arch: Any) -> nn.Module:
    """Build a registered model in eval mode, optionally loading a weights file.

    ``arch``: the builder's own size options (``width=0.5`` for ``mobilenet_v1``). With ``weights``,
    a model whose entry reads its sizes from a checkpoint is built with the file's sizes (given
    ``arch`` options must agree with them: the strict load checks every shape). The model carries
    ``input_size``, ``preprocessing`` and ``dataset`` attributes from its registry entry, and ``arch_options``:
    the builder options it was built with (JSON-able), so that ``create_model(name,
    **model.arch_options)`` rebuilds the same architecture (what a saved file needs to be reloaded).
    """
    spec = model_spec(name)
    state = None
    if weights is not None:
        from .weights import read_state_dict

        state = read_state_dict(weights)
        if spec.arch_from_state is not None and not arch:
            arch = spec.arch_from_state(state) or {}  # None: not this layout; the strict load says why
    params = inspect.signature(spec.builder).parameters
    unknown = sorted(k for k in arch if k not in params or k == "num_classes")
    if unknown:
        options = [p for p in params if p != "num_classes"]
        raise DfquantError(f"model {name!r} has no option {', '.join(unknown)}; its options: {', '.join(options) or 'none'}")
    model = spec.builder(num_classes=num_classes or spec.num_classes, **arch)
    model.input_size = spec.input_size  # type: ignore[attr-defined]
    model.preprocessing = spec.preprocessing  # type: ignore[attr-defined]
    model.dataset = spec.dataset  # type: ignore[attr-defined]
    model.arch_options = _jsonable(arch)  # type: ignore[attr-defined]
    if state is not None:
        from .weights import load_state

        load_state(model, state, weights)
    return model.eval()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def preprocessing_of(model: Union[str, nn.Module, Preprocessing]) -> Preprocessing:
    """A model's input scaling: by registry name, from a model built by :func:`create_model` (its
    ``preprocessing`` attribute), or a :class:`Preprocessing` itself."""
    if isinstance(model, Preprocessing):
        return model
    if isinstance(model, str):
        return model_spec(model).preprocessing
    pre = getattr(model, "preprocessing", None)
    if not isinstance(pre, Preprocessing):
        raise DfquantError(
            "cannot tell the model's input preprocessing: build it with dfquant.create_model, or give a registry model name or a Preprocessing"
        )
    return pre


def input_range_of(model: Union[str, nn.Module, Preprocessing]) -> Tuple[float, float]:
    """The per-tensor range ``(lo, hi)`` of a model's valid (preprocessed) image inputs; see
    :meth:`Preprocessing.input_range`. What ``quantize_first_input``'s ``input_range`` should be."""
    return preprocessing_of(model).input_range()


def input_size_of(model: nn.Module) -> Tuple[int, int, int]:
    """The (C, H, W) a model expects, from its registry attribute."""
    size = getattr(model, "input_size", None)
    if size is None:
        raise DfquantError(
            "cannot tell the model's input size: pass input_size=(C, H, W) or build it with dfquant.create_model"
        )
    return tuple(size)  # type: ignore[return-value]


# Import the definitions so they register themselves.
from . import (  # noqa: E402,F401  # noqa: E402,F401
    cifar_resnet,
    darknet,
    digits_cnn,
    imagenet,  # noqa: E402,F401
    mobilenet_v1,
)
