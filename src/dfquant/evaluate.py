"""Top-1 / top-5 accuracy of a (quantized or float) classifier on an evaluation set, and a paired
test for whether two models' accuracies on the same images really differ."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import DfquantError
from .progress import progress_bar

EvalData = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Tuple[torch.Tensor, torch.Tensor]]]


def _batches(data: EvalData, batch_size: int):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise DfquantError(f"images and labels differ in count: {x.shape[0]} vs {y.shape[0]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    else:
        yield from data


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: EvalData,
    batch_size: int = 256,
    progress: bool = False,
    device: str = "cpu",
    reference: "nn.Module | None" = None,
    predictions: bool = False,
) -> Dict[str, Any]:
    """Accuracy (%) of ``model`` on ``data``: an (images, labels) pair or an iterable of batches.

    With a ``reference`` model (the FP32 original), also ``agree_top1``: the share of images whose
    top-1 class matches the reference's, and ``logit_mse``: the mean squared difference of the two
    models' logits; both measure quantization damage with less noise than accuracy. With
    ``predictions=True`` also ``predictions`` (each image's top-1 class) and ``correct`` (whether it
    is right), in data order, for a paired comparison of two models (:func:`paired_comparison`).
    """
    model = model.eval().to(device)
    if reference is not None:
        reference = reference.eval().to(device)
    correct1 = correct5 = total = agree = 0
    sq_err = 0.0
    preds, hits = [], []
    for x, y in progress_bar(_batches(data, batch_size), desc="evaluating", enable=progress):
        x, y = x.to(device), y.to(device)
        try:
            logits = model(x)
        except RuntimeError as exc:
            raise DfquantError(f"the model cannot run on these inputs of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}") from None
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
            ref_logits = reference(x)
            agree += int((ref_logits.argmax(dim=1) == top[:, 0]).sum())
            sq_err += float(((logits - ref_logits) ** 2).mean(dim=1).sum())
    if total == 0:
        raise DfquantError("evaluation data is empty")
    out = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "n": total}
    if reference is not None:
        out["agree_top1"] = 100.0 * agree / total
        out["logit_mse"] = sq_err / total
    if predictions:
        out["predictions"] = torch.cat(preds).tolist()
        out["correct"] = torch.cat(hits).tolist()
    return out


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
    n = a_only + b_only
    # exact integer arithmetic: 2.0**n overflows a float beyond n = 1023 discordant images
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return {
        "n": len(a),
        "a_only": a_only,
        "b_only": b_only,
        "diff_points": 100.0 * (a_only - b_only) / max(len(a), 1),
        "p_value": min(1.0, 2.0 * tail),
    }
