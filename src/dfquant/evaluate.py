"""Top-1 / top-5 accuracy of a (quantized or float) classifier on an evaluation set."""
from __future__ import annotations

from typing import Dict, Iterable, Tuple, Union

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
def evaluate(model: nn.Module, data: EvalData, batch_size: int = 256, progress: bool = False, device: str = "cpu", reference: "nn.Module | None" = None) -> Dict[str, float]:
    """Accuracy (%) of ``model`` on ``data``: an (images, labels) pair or an iterable of batches.

    With a ``reference`` model (the FP32 original), also ``agree_top1``: the share of images whose
    top-1 class matches the reference's, and ``logit_mse``: the mean squared difference of the two
    models' logits; both measure quantization damage with less noise than accuracy.
    """
    model = model.eval().to(device)
    if reference is not None:
        reference = reference.eval().to(device)
    correct1 = correct5 = total = agree = 0
    sq_err = 0.0
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
    return out
