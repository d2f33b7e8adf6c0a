"""The pipeline's learned step (``method="genie"`` / ``"zeroq"``): calibration images, Genie-M, the report.
The images step (:func:`images_for`) also serves DF-MPC's compensation with synthetic images.

The images are synthesized (Genie-D for genie, ZeroQ's pixels for zeroq) or given (a tensor, or
files written by :func:`dfquant.io.images.save_images`, concatenated in order); then Genie-M refines
the rounding-initialised model on them (:func:`dfquant.genie.reconstruct_model`). This module is
where the learned methods meet files; :mod:`dfquant.genie` itself reads and writes none.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from . import distributed
from .config import QuantConfig
from .devices import resolve_device
from .errors import DfquantError
from .genie import GenieConfig, reconstruct_model, synthesize
from .graph import fold_bn
from .modelcheck import check_runs
from .qmodules import QUANT_LAYERS
from .quantizer import to_grid
from .report import QuantReport
from .squant import rounding_error_sums


def check_data_options(gcfg: GenieConfig, data: Dict[str, Any]) -> None:
    """Before any work: the images' options agree with the settings, and the output can be written."""
    if data.get("synthetic") is not None and gcfg.distill_iters is not None:
        raise DfquantError("distill_iters sets the synthesis, but synthetic uses the given images and synthesizes none", param=("distill_iters", "synthetic"))
    if data.get("save_synthetic") is not None and distributed.is_main():  # checked before minutes of synthesis; rank 0 writes it
        from .io.images import images_path
        from .io.serialization import check_output_paths

        check_output_paths((images_path(data["save_synthetic"]),))


def _given_images(model: nn.Module, synthetic: Any, gcfg: GenieConfig, input_size) -> Tuple[torch.Tensor, Dict[str, Any]]:
    files = None
    if isinstance(synthetic, (str, Path)) or (isinstance(synthetic, (list, tuple)) and synthetic and all(isinstance(p, (str, Path)) for p in synthetic)):
        from .io.images import load_image_files

        files = [str(p) for p in ([synthetic] if isinstance(synthetic, (str, Path)) else synthetic)]
        synthetic, _ = load_image_files(files)
    if not isinstance(synthetic, torch.Tensor) or synthetic.dim() != 4 or synthetic.shape[0] < 1:
        raise DfquantError("synthetic must be a non-empty (N, C, H, W) tensor of images", param="synthetic")
    if gcfg.samples is not None:
        if gcfg.samples > synthetic.shape[0]:
            raise DfquantError(f"samples={gcfg.samples} but only {synthetic.shape[0]} synthetic images were given", param="samples")
        synthetic = synthetic[: gcfg.samples]
    expected = input_size if input_size is not None else getattr(model, "input_size", None)
    if expected is not None and tuple(synthetic.shape[1:]) != tuple(int(s) for s in expected):
        raise DfquantError(f"synthetic images have shape {tuple(synthetic.shape[1:])} per image; the model expects {tuple(expected)}", param="synthetic")
    if expected is None:
        check_runs(model, tuple(synthetic.shape[1:]))
    info: Dict[str, Any] = dict(source="given", n=int(synthetic.shape[0]))
    if files is not None:
        info.update(source="files", files=files)
    return synthetic.detach().float().cpu(), info


def calibration_images(model: nn.Module, method: str, gcfg: GenieConfig, resolved: GenieConfig, data: Dict[str, Any], input_size, progress: bool):
    """The images Genie-M trains on and what the report says of them (source, count, time)."""
    t0 = time.perf_counter()
    data_method = "zeroq" if method == "zeroq" else "genie"
    if data.get("synthetic") is not None:
        images, info = _given_images(model, data["synthetic"], gcfg, input_size)
    else:
        images = synthesize(model, resolved.samples, resolved, method=data_method, input_size=tuple(input_size) if input_size is not None else None, progress=progress)
        info = dict(source=f"synthesized ({data_method})", n=int(images.shape[0]), distill_iters=resolved.distill_iters, distill_batch=resolved.distill_batch)
    if not torch.isfinite(images).all():
        raise DfquantError(f"the {info['source']} calibration images contain NaN or inf values: nothing can be reconstructed on them")
    elapsed = time.perf_counter() - t0
    if data.get("save_synthetic") is not None and distributed.is_main():  # in a job, rank 0 writes
        from .io.images import save_images

        written = save_images(images, data["save_synthetic"], metadata=dict(method=data_method, seed=resolved.seed, source=info["source"]))
        info["saved_to"] = str(written)
    return images, info, elapsed


def images_for(model: nn.Module, method: str, gcfg: GenieConfig, data: Dict[str, Any], input_size, progress: bool):
    """The run's images with ``gcfg`` resolved for its device (ZeroQ's pixels for zeroq, Genie-D
    otherwise; the learned methods and DF-MPC's compensation step share this): ``(images, what the
    report says of them, seconds, the resolved GenieConfig, the device)``."""
    dev = distributed.rank_device(resolve_device(gcfg.device))  # in a job: this process's own GPU
    resolved = gcfg.resolve(dev.type, "zeroq" if method == "zeroq" else "genie")
    images, info, elapsed = calibration_images(model, method, gcfg, resolved, data, input_size, progress)
    return images, info, elapsed, resolved, dev


def learn(model: nn.Module, qmodel: nn.Module, cfg: QuantConfig, gcfg: GenieConfig, report: QuantReport, *, input_size, data: Dict[str, Any], progress: bool) -> None:
    """Refine ``qmodel`` (a rounding-initialised copy of ``model``) in place; record it in ``report``."""
    images, data_info, synth_time, resolved, dev = images_for(model, cfg.method, gcfg, data, input_size, progress)
    t1 = time.perf_counter()
    ref = fold_bn(model) if cfg.fold_bn else model  # fold_bn works on a copy
    # An image input range given explicitly (quantize_first_input with input_range) is the caller's.
    keep = [report.layers[0].name] if cfg.quantize_first_input and cfg.input_range is not None and report.layers else []
    out = reconstruct_model(ref, qmodel, images, resolved, keep_ranges=keep, progress=progress)
    recon_time = time.perf_counter() - t1
    info = _record(resolved, cfg, dev, data_info, out)
    info.update(synthesis_time_s=synth_time, reconstruction_time_s=recon_time)
    report.config["genie"] = info
    update_layer_reports(report, qmodel, ref)
    records = out["units"]
    changed, nweights = sum(r["codes_changed"] for r in records), max(1, sum(r["weights"] for r in records))
    report.notes.append(
        f"Genie-M ({resolved.budget} budget, init={cfg.init}, act_calib={resolved.act_calib}): {len(records)} units x "
        f"{resolved.recon_iters} iterations on {images.shape[0]} images ({data_info['source']}); "
        f"{changed} of {nweights} weight codes changed ({100.0 * changed / nweights:.1f}%); "
        f"unit output error before -> after: {sum(r['before'] for r in records):.4g} -> {sum(r['after'] for r in records):.4g} (sum over units); "
        f"synthesis {synth_time:.1f} s, reconstruction {recon_time:.1f} s"
    )
    if out["units_not_run"]:
        report.notes.append("Genie-M: units not reached by the forward pass were left as initialised: " + ", ".join(out["units_not_run"]))


def _record(resolved: GenieConfig, cfg: QuantConfig, dev: torch.device, data_info: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, Any]:
    """``report.config["genie"]``: the settings used, the images' source and the per-unit records."""
    keys = ("seed", "act_calib", "recon_iters", "batch_size", "lr_w_scale", "lr_a_scale", "lr_round", "round_weight", "beta", "warmup", "drop_prob", "keep_best")
    settings = resolved.to_dict()
    info: Dict[str, Any] = dict(budget=resolved.budget, device=str(dev), init=cfg.init)
    info.update({k: settings[k] for k in keys})
    if distributed.active():
        info["processes"] = distributed.world_size()
    info.update(data=data_info, units=out["units"])
    if out["units_not_run"]:
        info["units_not_run"] = out["units_not_run"]
    return info


@torch.no_grad()
def update_layer_reports(report: QuantReport, qmodel: nn.Module, ref: nn.Module) -> None:
    """Per-layer weight error, rounding-error sums and activation range after reconstruction."""
    for lr in report.layers:
        try:
            lay = qmodel.get_submodule(lr.name)
            w = ref.get_submodule(lr.name).weight.detach().float()
        except AttributeError:
            continue
        if not isinstance(lay, QUANT_LAYERS):
            continue
        lr.rel_weight_error = float((lay.weight - w).norm() / w.norm().clamp_min(1e-12))
        grid = to_grid(w, lay.weight_qparams)
        lr.kernel_err_max, lr.channel_err_max = rounding_error_sums(lay.weight_int, grid if grid.dim() > 1 else grid.unsqueeze(1))
        if lay.input_quant is not None:
            lr.a_range = lay.input_quant.range
        lr.note = (lr.note + "; " if lr.note else "") + "Genie-M: learned rounding and step sizes"

