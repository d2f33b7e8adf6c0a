"""``dfquant demo``: the embedded default, end to end, with nothing downloaded, in under a minute.

Trains (or loads from the cache) the small BN CNN on scikit-learn's digits, then quantizes it
without data where the methods differ: W4A4, W3A3, W2A4, and MP2/6 (DF-MPC's pairs: each pair's
first layer at 2 bits, everything else at 6, weights only). Rows: round-to-nearest, SQuant,
RTN + DFQ's equalization and bias correction, DF-MPC (the paper's, and with our BN re-calibration)
and Genie at a tiny budget (its synthetic images made once and shared). Each row: top-1 on the
held-out split, the drop from FP32, an exact McNemar p against RTN at the same setting, and the
median time of the quantize call. The last line says what the table shows.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from typing import Any, Dict, List, Optional

from .api import quantize
from .data import digits_model, load_digits_split
from .evaluation import evaluate, paired_comparison
from .progress import progress_bar

#: (label, w_bits, a_bits, low_bits): the settings shown.
SETTINGS = [("W4A4", 4, 4, None), ("W3A3", 3, 3, None), ("W2A4", 2, 4, None), ("MP2/6", 6, None, 2)]
TIMING_REPEATS = 3  # the time shown is the median of these calls (after one warm-up call)
#: Genie at a tiny budget: the digits CNN is small, so 64 images and 40 iterations per unit do.
GENIE_TINY = dict(recon_iters=40, batch_size=16, seed=0)
SYNTH_TINY = dict(iters=30, batch_size=32, seed=0)


def _methods(setting: str, low: Optional[int]):
    """(label, method, options) of the rows of one setting."""
    mp = dict(low_bits=low, compensation="none") if low else {}
    rows = [("RTN", "rtn", mp), ("SQuant", "squant", mp), ("RTN+CLE+BC", "rtn", dict(mp, cle=True, bias_correction=True))]
    if low:
        rows += [("DF-MPC (paper)", "dfmpc", dict(low_bits=low)), ("DF-MPC, BN re-cal.", "dfmpc", dict(low_bits=low, compensation="none", bn_recal="moments"))]
    return rows + [("Genie (tiny)", "genie", {})]


def _timed(model, method: str, w: int, a, repeats: int, **options):
    """The model of one call and the median wall time of ``repeats`` calls (every call is the same model)."""
    times = []
    for _ in range(repeats):
        gc.collect()  # a full collection inside a timed call costs 100+ ms, not the method's time
        t = time.perf_counter()
        qmodel, report = quantize(model, method, w, a, **options)
        times.append(time.perf_counter() - t)
    return qmodel, statistics.median(times)


def run_demo(json_out: bool = False, progress: bool = False, retrain: bool = False, plot: Optional[str] = None) -> List[Dict[str, Any]]:
    from .genie import synthesize

    t = time.perf_counter()
    model = digits_model(progress=progress, retrain=retrain)
    load_s = time.perf_counter() - t
    _, test = load_digits_split()
    fp = evaluate(model, test, predictions=True)
    images = synthesize(model, 64, progress=False, **SYNTH_TINY)
    quantize(model, "rtn", 8, 8)  # untimed: the first call in a process pays one-off imports
    rows: List[Dict[str, Any]] = []
    jobs = [(s, w, a, low, label, m, o) for s, w, a, low in SETTINGS for label, m, o in _methods(s, low)]
    base: Dict[str, Dict[str, Any]] = {}
    for s, w, a, low, label, m, opts in progress_bar(jobs, desc="quantizing", enable=progress):
        if m == "genie":
            opts = dict(opts, synthetic=images, **GENIE_TINY)
            if low:  # the same layers at 2 bits as DF-MPC's pairs
                from .dfmpc import plan_pairs

                opts["layer_w_bits"] = {n: low for n in plan_pairs(model).low_layers}
        qmodel, dt = _timed(model, m, w, a, TIMING_REPEATS if m != "genie" else 1, **opts)
        ev = evaluate(qmodel, test, predictions=True)
        row = dict(setting=s, method=label, top1=ev["top1"], drop=ev["top1"] - fp["top1"], time_ms=1000 * dt)
        if label == "RTN":
            base[s] = ev
        else:
            row["p_vs_rtn"] = paired_comparison(ev["correct"], base[s]["correct"])["p_value"]
        rows.append(row)
    summary = _summary(rows)
    doc = {"model": "digits_cnn", "n_eval": fp["n"], "fp32_top1": fp["top1"], "rows": rows, "summary": summary}
    if plot:
        _plot(rows, plot)
    if json_out:
        print(json.dumps(doc))
    else:
        _print(doc, load_s)
        if plot:
            print(f"drew {plot}")
    return rows


def _summary(rows: List[Dict[str, Any]]) -> str:
    """One sentence from the numbers: where RTN breaks, and which data-free method holds best there."""
    by = {(r["setting"], r["method"]): r for r in rows}
    worst = min((r for r in rows if r["method"] == "RTN"), key=lambda r: r["drop"])
    s = worst["setting"]
    best = max((r for r in rows if r["setting"] == s and r["method"] != "RTN"), key=lambda r: r["top1"])
    sq = by[(s, "SQuant")]
    return (
        f"At {s} round-to-nearest falls to {worst['top1']:.1f} % ({worst['drop']:+.1f} points); without any data SQuant holds "
        f"{sq['top1']:.1f} % (McNemar p = {sq['p_vs_rtn']:.1g}) and {best['method']} {best['top1']:.1f} % (p = {best['p_vs_rtn']:.1g})."
    )


def _print(doc: Dict[str, Any], load_s: float) -> None:
    print(f"dfquant demo: digits CNN (scikit-learn 8x8 digits), {doc['n_eval']} held-out images; no data used to quantize")
    print(f"model ready in {load_s:.1f} s (trained on first use, then cached); FP32 top-1 {doc['fp32_top1']:.2f} %\n")
    print(f"{'setting':<8} {'method':<20} {'top-1 %':>8} {'drop':>7} {'p vs RTN':>9} {'time (ms)':>10}")
    print("-" * 66)
    last = None
    for r in doc["rows"]:
        if last is not None and r["setting"] != last:
            print()
        last = r["setting"]
        p = f"{r['p_vs_rtn']:.1g}" if "p_vs_rtn" in r else "-"
        print(f"{r['setting']:<8} {r['method']:<20} {r['top1']:>8.2f} {r['drop']:>+7.2f} {p:>9} {r['time_ms']:>10.0f}")
    print("\np: exact McNemar test against RTN at the same setting, on the same images. time: the whole quantize call,")
    print(f"median of {TIMING_REPEATS} (Genie: one call on images synthesized once). MP2/6: DF-MPC's pairs, 2-bit low layers, 6-bit others, weights only.")
    print(doc["summary"])


def _plot(rows: List[Dict[str, Any]], path: str) -> None:
    from .plots import plot_drops

    settings = [s for s, *_ in SETTINGS]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    drop = {(r["setting"], r["method"]): -r["drop"] for r in rows}
    panel = {"settings": settings, "methods": {m: [drop.get((s, m)) for s in settings] for m in methods}}
    plot_drops({"digits CNN": panel}, path, "dfquant demo: top-1 drop from FP32")
