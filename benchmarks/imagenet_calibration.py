"""Benchmark: is Genie on Tiny Darknet W4A4 limited by its synthetic images, by their activation
ranges or by its reconstruction budget? The same Genie-M run (SQuant init, the tiny CPU budget of
``benchmarks/imagenet.py``) on 16 Genie-D images and on 16 real photos.

    python benchmarks/imagenet_calibration.py --threads 2   # writes benchmarks/results/imagenet_calibration.{md,json}

The real photos are the first 16 of the 1000 in ../shared; every row is measured on the other 984,
so no row sees a photo it is scored on. The real-photo rows are *not* data-free: they bound what
better images could give at this budget. Rows (dfquant's protocol, Tiny Darknet, W4A4 and W4A8):

- ``squant``: SQuant (E+K+C), the reference every row is paired against;
- ``genie_syn``: Genie-M, 100 reconstruction iterations, on 16 Genie-D images (seed 0, one batch,
  50 synthesis iterations: the tiny budget);
- ``genie_real``: the same on the 16 photos;
- ``genie_syn_r0`` / ``genie_real_r0``: 0 reconstruction iterations: SQuant's rounding with the
  activation steps Genie-M starts from (searched on those images), to tell ranges from rounding.

Each row: top-1, top-5, top-1 agreement and logit MSE against FP32, and paired tests on the 984
photos (sign test on the per-image logit error, exact McNemar) against SQuant and against the
row it differs from by one thing (``PAIRS``). Resumable: finished rows are cached under
``--cache`` (with the synthetic images); a rerun skips them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import dfquant
from dfquant.assets import MODEL_WEIGHTS, asset_path
from dfquant.data import load_eval_data
from dfquant.devices import cpu_name

RESULTS = Path(__file__).parent / "results" / "imagenet_calibration"
CACHE = Path(__file__).parent / ".cache" / "imagenet_calibration"
MODEL = "tiny_darknet"
N_CALIB = 16
SETTINGS = {"W4A4": (4, 4), "W4A8": (4, 8)}
TINY = dict(init="squant", recon_iters=100, batch_size=8, seed=0)
#: Genie-D's 16 images: seed 0, one batch of 16, 50 iterations (the tiny budget).
SYNTHESIS = {"syn": 50}
# key -> (label, images (a SYNTHESIS key, "real", or None for SQuant), reconstruction iterations)
ROWS = {
    "squant": ("SQuant", None, 0),
    "genie_syn": ("Genie-M, 16 Genie-D images, 100 it.", "syn", 100),
    "genie_real": ("Genie-M, 16 real photos, 100 it.", "real", 100),
    "genie_syn_r0": ("SQuant + act. steps searched on 16 Genie-D images (0 it.)", "syn", 0),
    "genie_real_r0": ("SQuant + act. steps searched on 16 real photos (0 it.)", "real", 0),
}
#: Each real-photo row is also paired against the synthetic-image row of the same budget.
PAIRS = {"genie_real": "genie_syn", "genie_real_r0": "genie_syn_r0"}


def _data(cache: Path):
    """The float model, the 16 calibration photos, the 984 scoring photos and FP32 logits on them."""
    path = asset_path(MODEL_WEIGHTS[MODEL])
    if path is None:
        raise SystemExit(f"missing shared weights for {MODEL}: set DFQUANT_ASSETS")
    model = dfquant.create_model(MODEL, weights=str(path))
    batches = list(load_eval_data("imagenet", preprocessing=model))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    calib, score = x[:N_CALIB].clone(), (x[N_CALIB:], y[N_CALIB:])
    ref_path, fp_path = cache / "fp32_ref.pt", cache / "fp32.json"
    if not (ref_path.exists() and fp_path.exists()):
        fp = dfquant.evaluate(model, score)
        torch.save(dfquant.reference_logits(model, score), ref_path)
        fp_path.write_text(json.dumps(dict(top1=fp["top1"], top5=fp["top5"], n=fp["n"])))
    return model, calib, score, torch.load(ref_path, weights_only=True)


def _synthetic(model, cache: Path, key: str) -> torch.Tensor:
    path = cache / f"genie_d_16_{SYNTHESIS[key]}.pt"
    if not path.exists():
        t = time.perf_counter()
        images = dfquant.synthesize(model, N_CALIB, seed=0, iters=SYNTHESIS[key], batch_size=N_CALIB, progress=False)
        torch.save(dict(images=images, seconds=time.perf_counter() - t), path)
    return torch.load(path, weights_only=True)["images"]


def run(args) -> None:
    loaded = None
    plan = [(s, k) for s in SETTINGS for k in ROWS]
    for i, (setting, key) in enumerate(plan, 1):
        path = args.cache / f"{setting}_{key}.json"
        if path.exists():
            continue
        if loaded is None:
            loaded = _data(args.cache)
        model, calib, score, ref = loaded
        label, images, iters = ROWS[key]
        w, a = SETTINGS[setting]
        t = time.perf_counter()
        if images is None:
            q, _ = dfquant.quantize(model, "squant", w, a)
        else:
            data = calib if images == "real" else _synthetic(model, args.cache, images)
            q, _ = dfquant.quantize(model, "genie", w, a, synthetic=data, **dict(TINY, recon_iters=iters))
        dt = time.perf_counter() - t
        ev = dfquant.evaluate(q, score, reference=ref, predictions=True)
        row = dict(setting=setting, key=key, method=label, top1=ev["top1"], top5=ev["top5"], agree_top1=ev["agree_top1"],
                   logit_mse=ev["logit_mse"], quantize_s=dt, correct=[bool(c) for c in ev["correct"]],
                   logit_sq_err=[float(e) for e in ev["logit_sq_err"]])
        path.write_text(json.dumps(row))
        print(f"[{i}/{len(plan)}] {setting} {label:<40} top-1 {ev['top1']:6.2f}  mse {ev['logit_mse']:8.4f}  quantize {dt:6.1f} s", flush=True)


def collect(args) -> dict:
    fp = json.loads((args.cache / "fp32.json").read_text())
    doc = dict(command=args.command, machine=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(),
               model=MODEL, calibration_photos=N_CALIB, fp32=fp, rows=[], not_run=[])
    doc["synthesis_s"] = {f"{it} it.": torch.load(p, weights_only=True)["seconds"]
                          for it in SYNTHESIS.values() if (p := args.cache / f"genie_d_16_{it}.pt").exists()}
    for setting in SETTINGS:
        by_key = {k: json.loads((args.cache / f"{setting}_{k}.json").read_text())
                  for k in ROWS if (args.cache / f"{setting}_{k}.json").exists()}
        doc["not_run"] += [f"{setting} {r[0]}" for k, r in ROWS.items() if k not in by_key]
        for key, row in by_key.items():
            versus = []
            for base in ("squant", PAIRS.get(key)):
                other = by_key.get(base)
                if other is None or base == key:
                    continue
                versus.append(dict(row=base, method=other["method"],
                                   sign_test=dfquant.paired_error_comparison(row["logit_sq_err"], other["logit_sq_err"]),
                                   mcnemar=dfquant.paired_comparison(row["correct"], other["correct"])))
            out = {k: v for k, v in row.items() if k not in ("correct", "logit_sq_err")}
            doc["rows"].append(dict(out, drop=row["top1"] - fp["top1"], versus=versus))
    return doc


def to_markdown(doc: dict) -> str:
    fp = doc["fp32"]
    lines = [
        "# Tiny Darknet: Genie-M on synthetic images against Genie-M on real photos, at the tiny CPU budget",
        "",
        f"Command: `{doc['command']}`. Machine: {doc['machine']}, torch {doc['torch']}, {doc['threads']} thread(s).",
        f"Protocol: dfquant's. Scored on photos {doc['calibration_photos']}..999 of ../shared ({fp['n']} photos; FP32 top-1 "
        f"{fp['top1']:.2f} %, top-5 {fp['top5']:.2f} %); the real-photo rows reconstruct on photos 0..{doc['calibration_photos'] - 1}"
        " (not data-free: an upper bound on what better images give at this budget).",
        "Genie-M: SQuant init, activation steps searched on its images, batch 8, seed 0 (0 it.: the search and SQuant's rounding",
        "only). Genie-D: 16 images in one batch, seed 0; synthesis times: "
        + (", ".join(f"{k} {v:.0f} s" for k, v in doc["synthesis_s"].items()) or "none run") + ".",
        "Paired tests: sign test on the per-image logit error against FP32 (this row closer : other closer), exact McNemar",
        "(this row right only : other right only).",
        "",
        "| setting | row | top-1 % | top-5 % | drop | top-1 agreement % | logit MSE | quantize s | paired tests: against (sign test; McNemar) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        tests = "<br>".join(f"{v['method']}: {v['sign_test']['a_closer']}:{v['sign_test']['b_closer']} (p {v['sign_test']['p_value']:.2g}); "
                            f"{v['mcnemar']['a_only']}:{v['mcnemar']['b_only']} (p {v['mcnemar']['p_value']:.2g})" for v in r["versus"]) or "-"
        lines.append(f"| {r['setting']} | {r['method']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['drop']:+.2f} | {r['agree_top1']:.1f} | "
                     f"{r['logit_mse']:.4g} | {r['quantize_s']:.1f} | {tests} |")
    if doc["not_run"]:
        lines += ["", "Not run yet: " + "; ".join(doc["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=CACHE)
    args = p.parse_args()
    args.command = "python benchmarks/imagenet_calibration.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    run(args)
    doc = collect(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    RESULTS.with_suffix(".md").write_text(to_markdown(doc))
    print(to_markdown(doc))


if __name__ == "__main__":
    main()
