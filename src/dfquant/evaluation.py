"""Top-1 / top-5 accuracy of a (quantized or float) classifier on an evaluation set, and paired
tests on the same images: do two models' accuracies really differ (McNemar), and is one of them
closer to the FP32 model on more images (sign test).

Bad data is refused rather than scored: labels must be integer class indices inside the model's
output size (an out-of-range label can never match, so it would silently read as 0 % accuracy),
and a ``reference`` model must produce logits of the model's shape. NumPy arrays are accepted and
converted to tensors."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .errors import DfquantError
from .progress import progress_bar

EvalData = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Tuple[torch.Tensor, torch.Tensor]]]


def _tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(v))
        except TypeError:
            raise DfquantError(f"{what} must be a numeric array, got dtype {v.dtype}") from None
    raise DfquantError(f"{what} must be a torch tensor or a numpy array, got {type(v).__name__}")


def _batches(data: EvalData, batch_size: int):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
        x, y = _tensor(data[0], "images"), _tensor(data[1], "labels")
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise DfquantError(f"images and labels differ in count: {tuple(x.shape)[:1]} vs {tuple(y.shape)[:1]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    else:
        for batch in data:
            try:
                x, y = batch
            except (TypeError, ValueError):
                raise DfquantError("evaluation data must be an (images, labels) pair or an iterable of (images, labels) batches") from None
            yield _tensor(x, "images"), _tensor(y, "labels")


def _check_labels(y: torch.Tensor, n_out: int) -> None:
    if y.dim() != 1:
        raise DfquantError(f"labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DfquantError(f"labels must be integer class indices, got {str(y.dtype).replace('torch.', '')}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_out):
        raise DfquantError(
            f"labels must be class indices in 0..{n_out - 1} (the model has {n_out} outputs), found {int(y.min())}..{int(y.max())}"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: EvalData,
    batch_size: int = 256,
    progress: bool = False,
    device: str = "cpu",
    reference: "nn.Module | torch.Tensor | None" = None,
    predictions: bool = False,
) -> Dict[str, Any]:
    """Accuracy (%) of ``model`` on ``data``: an (images, labels) pair or an iterable of batches.

    With a ``reference`` model (the FP32 original), also ``agree_top1``: the share of images whose
    top-1 class matches the reference's, and ``logit_mse``: the mean squared difference of the two
    models' logits; both measure quantization damage with less noise than accuracy. With
    ``predictions=True`` also ``predictions`` (each image's top-1 class) and ``correct`` (whether it
    is right), in data order, for a paired comparison of two models (:func:`paired_comparison`);
    with a ``reference`` too, ``logit_sq_err``: each image's mean squared logit difference from the
    reference (their mean is ``logit_mse``), for :func:`paired_error_comparison`. ``reference`` may
    also be the reference's logits on ``data``, in data order (:func:`reference_logits`), so that
    many models are compared with one run of the float model.
    """
    # evaluated in eval mode; each module's mode is put back afterwards (the caller's model is theirs)
    modes = [(m, m.training) for net in (model, reference) if isinstance(net, nn.Module) for m in net.modules()]
    try:
        if isinstance(reference, nn.Module):
            reference = reference.eval().to(device)
        elif reference is not None and not (isinstance(reference, torch.Tensor) and reference.dim() == 2):
            raise DfquantError(f"reference must be a model or its (images, classes) logits, got {type(reference).__name__}", param="reference")
        return _evaluate(model.eval().to(device), data, batch_size, progress, device, reference, predictions)
    finally:
        for m, training in modes:
            m.training = training


def _evaluate(model, data, batch_size, progress, device, reference, predictions) -> Dict[str, Any]:
    correct1 = correct5 = total = agree = 0
    sq_err = 0.0
    preds, hits, errs = [], [], []
    for x, y in progress_bar(_batches(data, batch_size), desc="evaluating", enable=progress):
        x, y = x.to(device), y.to(device)
        try:
            logits = model(x)
        except RuntimeError as exc:
            raise DfquantError(f"the model cannot run on these inputs of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}") from None
        if not isinstance(logits, torch.Tensor):
            raise DfquantError(f"the model must return a (batch, classes) tensor of logits, got a {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise DfquantError(f"the model must return (batch, classes) logits, got shape {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise DfquantError("the model's outputs contain NaN or inf: its weights or BN statistics are not finite, or it overflows")
        _check_labels(y, logits.shape[1])
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y.unsqueeze(1))
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        total += int(y.numel())
        if predictions:
            preds.append(top[:, 0].cpu())
            hits.append(hit[:, 0].cpu())
        if reference is not None:
            try:
                ref_logits = reference[total - len(y) : total].to(device) if isinstance(reference, torch.Tensor) else reference(x)
            except RuntimeError as exc:
                raise DfquantError(f"the reference model cannot run on these inputs of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}") from None
            if tuple(ref_logits.shape) != tuple(logits.shape):
                raise DfquantError(
                    f"the reference model's output shape {tuple(ref_logits.shape)} differs from the model's {tuple(logits.shape)}: compare models of the same task"
                )
            agree += int((ref_logits.argmax(dim=1) == top[:, 0]).sum())
            per_image = ((logits - ref_logits) ** 2).mean(dim=1)
            sq_err += float(per_image.sum())
            if predictions:
                errs.append(per_image.cpu())
    if total == 0:
        raise DfquantError("evaluation data is empty")
    if isinstance(reference, torch.Tensor) and reference.shape[0] != total:
        raise DfquantError(f"reference holds the logits of {reference.shape[0]} images, the data has {total}", param="reference")
    out = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "n": total}
    if reference is not None:
        out["agree_top1"] = 100.0 * agree / total
        out["logit_mse"] = sq_err / total
    if predictions:
        out["predictions"] = torch.cat(preds).tolist()
        out["correct"] = torch.cat(hits).tolist()
        if reference is not None:
            out["logit_sq_err"] = torch.cat(errs).tolist()
    return out


@torch.no_grad()
def reference_logits(model: nn.Module, data: EvalData, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """``model``'s logits on every image of ``data``, in data order: a ``reference`` for
    :func:`evaluate` that runs the float model once for many comparisons."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model = model.eval().to(device)
        return torch.cat([model(x.to(device)).cpu() for x, _ in _batches(data, batch_size)])
    finally:
        for m, training in modes:
            m.training = training


def sign_test_p(k_a: int, k_b: int) -> float:
    """Two-sided exact binomial p of a split k_a : k_b of fair coin flips (the sign test)."""
    n = k_a + k_b
    # exact integer arithmetic: 2.0**n overflows a float beyond n = 1023 flips
    tail = sum(math.comb(n, k) for k in range(min(k_a, k_b) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_comparison(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> Dict[str, Any]:
    """Exact McNemar test of two models scored on the same images.

    ``correct_a`` / ``correct_b``: per image, whether model A / B classified it correctly (the
    ``correct`` list of :func:`evaluate` with ``predictions=True``). Only the discordant images
    carry information: ``a_only`` (A right, B wrong) and ``b_only``. Under the hypothesis that both
    models are equally accurate each discordant image is a fair coin, so the two-sided p-value is
    ``min(1, 2 * P(Binomial(a_only + b_only, 1/2) <= min(a_only, b_only)))``. On a few hundred
    images a difference of a handful of images is typically far from significant; this says how far.
    """
    a = [bool(v) for v in correct_a]
    b = [bool(v) for v in correct_b]
    if len(a) != len(b):
        raise DfquantError(f"paired comparison needs the same images for both models: {len(a)} vs {len(b)} results")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    return {
        "n": len(a),
        "a_only": a_only,
        "b_only": b_only,
        "diff_points": 100.0 * (a_only - b_only) / max(len(a), 1),
        "p_value": sign_test_p(a_only, b_only),
    }


def paired_error_comparison(err_a: Sequence[float], err_b: Sequence[float]) -> Dict[str, Any]:
    """Exact sign test of which of two models is closer to the FP32 model, image by image.

    ``err_a`` / ``err_b``: per image, each quantized model's error against the same reference (the
    ``logit_sq_err`` list of :func:`evaluate` with ``reference`` and ``predictions=True``). Counts the
    images where A's error is lower (``a_closer``) and where B's is (``b_closer``); ties carry no
    information and are dropped. Under the hypothesis that neither model is closer more often, each
    untied image is a fair coin: ``p_value`` is the two-sided exact binomial probability of a split
    at least this uneven. Every image counts here, not only those whose top-1 changes, so it resolves
    differences in fidelity that an accuracy comparison on a few hundred images cannot; it says
    which model is nearer the original more often, not that it is more accurate.
    """
    a = [float(v) for v in err_a]
    b = [float(v) for v in err_b]
    if len(a) != len(b):
        raise DfquantError(f"paired comparison needs the same images for both models: {len(a)} vs {len(b)} results")
    if any(math.isnan(v) for v in a + b):
        raise DfquantError("paired error comparison: an error value is NaN")
    a_closer = sum(x < y for x, y in zip(a, b))
    b_closer = sum(y < x for x, y in zip(a, b))
    diffs = sorted(x - y for x, y in zip(a, b))
    median = (diffs[(len(diffs) - 1) // 2] + diffs[len(diffs) // 2]) / 2 if diffs else 0.0
    return {
        "n": len(a),
        "a_closer": a_closer,
        "b_closer": b_closer,
        "ties": len(a) - a_closer - b_closer,
        "median_diff": median,
        "p_value": sign_test_p(a_closer, b_closer),
    }
