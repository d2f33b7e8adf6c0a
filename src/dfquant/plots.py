"""Pictures a person can read: a quantized model's per-layer errors, and results against bit-width.

matplotlib is an optional extra (``pip install -e ".[plot]"``); without it every function here
raises one :class:`DfquantError` naming the extra. Files are written atomically as PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from .errors import DfquantError
from .io.files import atomic_write, check_writable


def require_matplotlib():
    """matplotlib's pyplot on the file-only Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DfquantError('plots need matplotlib: pip install -e ".[plot]" (or pip install matplotlib)', param="plot") from None
    return plt


def _save(fig, path: "str | Path") -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DfquantError(f"{path}: give a .png file name for the plot", param="plot")
    check_writable(path)
    try:
        atomic_write(path, lambda p: fig.savefig(str(p), format="png", dpi=110, bbox_inches="tight"))
    finally:
        fig.clear()
        require_matplotlib().close(fig)
    return path


def plot_layers(report, baseline, path: "str | Path") -> Path:
    """Per layer: relative weight error and the largest |sum of rounding errors| per output channel
    of ``report``'s method against ``baseline`` (a report of the same model, usually RTN), the
    weight bits, and the layers whose input stayed float (marked)."""
    plt = require_matplotlib()
    names = [l.name for l in report.layers]
    base = {l.name: l for l in baseline.layers}
    x = list(range(len(names)))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.35 * len(names) + 2), 8), sharex=True)
    for ax, key, label in ((axes[0], "rel_weight_error", "||W_q - W|| / ||W||"), (axes[1], "channel_err_max", "max |sum err| per channel (steps)")):
        ax.plot(x, [getattr(base[n], key) if n in base else float("nan") for n in names], "o-", label=baseline.method, color="#999999")
        ax.plot(x, [getattr(l, key) for l in report.layers], "o-", label=report.method, color="#1f77b4")
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    floats = {n for n, _ in report.float_inputs}
    axes[2].bar(x, [l.w_bits for l in report.layers], color=["#d62728" if n in floats else "#2ca02c" for n in names])
    axes[2].set_ylabel("weight bits")
    axes[2].set_title("red: input left in float", fontsize=8, loc="left")
    axes[2].set_xticks(x)
    axes[2].set_xticklabels(names, rotation=90, fontsize=7)
    a = f"A{report.a_bits}" if report.a_bits else "Afp"
    fig.suptitle(f"{report.method} W{report.w_bits}{a}, per layer" + (f"; unsupported, left float: {', '.join(report.unsupported)}" if report.unsupported else ""))
    return _save(fig, path)


def plot_drops(panels: Dict[str, Dict[str, List[Any]]], path: "str | Path", title: str = "") -> Path:
    """One panel per model: top-1 drop from FP32 (points) against the setting, one line per method.

    ``panels``: model -> {"settings": [...], "methods": {method: [drop per setting or None]}}."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (model, panel) in zip(axes[0], panels.items()):
        settings: Sequence[str] = panel["settings"]
        for method, drops in panel["methods"].items():
            pts = [(i, d) for i, d in enumerate(drops) if d is not None]
            ax.plot([i for i, _ in pts], [d for _, d in pts], "o-", label=method)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings)
        ax.set_title(model)
        ax.set_ylabel("top-1 drop from FP32 (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
