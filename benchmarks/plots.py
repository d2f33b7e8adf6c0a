"""Turn committed benchmark results into PNGs: top-1 drop from FP32 against the bit setting, per method and model.

    python benchmarks/plots.py            # writes benchmarks/results/plots/*.png (overwritten on re-run)

Reads only committed result files (no model is run); a result file that is absent is skipped with a note.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dfquant.plots import plot_drops

RESULTS = Path(__file__).parent / "results"

#: figure -> (result file, the methods to draw (None: all), title)
FIGURES = {
    "rounding_cifar": ("dfq_cifar.json", ("RTN", "RTN+BC", "RTN+CLE+BC", "SQuant", "SQuant+BC"), "Rounding methods and DFQ steps (846 CIFAR-10 images)"),
    "headline_cifar": ("genie_cifar_headline.json", None, "Every method at the CPU budget, seed 0 (846 CIFAR-10 images)"),
}


def _bits(setting: str):
    """W4A8 -> (4, 8): settings from the most bits to the fewest."""
    w, _, a = setting[1:].partition("A")
    return int(w), int(a) if a.isdigit() else 32


def panels(doc: dict, methods) -> dict:
    out = {}
    for model, m in doc["models"].items():
        settings = sorted(dict.fromkeys(r["setting"] for r in m["rows"]), key=_bits, reverse=True)
        names = methods or list(dict.fromkeys(r["method"] for r in m["rows"]))
        drop = {(r["setting"], r["method"]): m["fp32_top1"] - r["top1"] for r in m["rows"]}
        label = lambda s: s.replace(", act. ranges from data", "")  # noqa: E731 - the headline's long names
        out[model] = {"settings": settings, "methods": {label(n): [drop.get((s, n)) for s in settings] for n in names}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "plots"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    for name, (file, methods, title) in FIGURES.items():
        path = RESULTS / file
        if not path.is_file():
            print(f"skipped {name}: {path} not found")
            continue
        written = plot_drops(panels(json.loads(path.read_text()), methods), out / f"{name}.png", title)
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
