"""Benchmark: the rounding methods on the two ImageNet-1k models of ../shared (MobileNetV1-0.75 and
Tiny Darknet), on the 1000 labelled held-out photos (224x224), under three protocols.

    python benchmarks/imagenet.py --threads 1     # writes benchmarks/results/imagenet.{md,json}

Settings W8A8, W6A6, W4A8 and W4A4. Rows under dfquant's protocol (per-channel min/max weights, BN
kept, image input float, classifier input 8 bits, activation ranges from BN statistics: ``act_range``
dfq): RTN, SQuant (E+K+C), RTN + DFQ's cross-layer equalization and bias correction per-channel
and per-tensor (MobileNetV1: with ReLU6 -> ReLU first, as DFQ does, which changes the float model;
Tiny Darknet: its LeakyReLU pairs are not equalized, so bias correction alone); under the SQuant
paper's (``protocol="squant"``: the authors' noise rule for activations): RTN, SQuant; under the
Genie release's (``protocol="genie"``: first conv and classifier at 8-bit weights, the second
layer's input at 8 bits; neither model has a residual add): RTN, SQuant, except at W8A8 where it is
dfquant's protocol bit for bit. Each row: top-1, top-5, drop from FP32, top-1 agreement and logit
MSE against FP32, quantization and evaluation times, and paired tests on the same photos (exact sign
test on the per-image logit error, exact McNemar on correctness) against RTN and SQuant of the same
setting and protocol, and, for the other protocols' rows, against the same method under dfquant's.
The photos only measure: quantization sees none of them. The learned methods run at W4A4 only, at
a tiny CPU budget (row ``genie_tiny``: Genie-D at 224x224 costs about 0.3 s per image and iteration
on one core, so the CPU budget of the CIFAR tables would take hours).

Resumable: every finished row is cached (metrics and the per-image correctness and logit errors the
paired tests need) under ``--cache``; a rerun skips cached rows and rewrites the tables from the
cache, listing rows not run yet. ``--max-minutes`` stops starting new rows after that long. A row
the cache lacks but the result file being rewritten holds, with the same options, is kept from it
and marked "(kept)": ``--settings``/``--rows`` re-run some rows (and the baselines they are paired
with) without re-running the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

import dfquant
from dfquant.assets import MODEL_WEIGHTS, asset_path
from dfquant.data import load_eval_data
from dfquant.devices import cpu_name

RESULTS = Path(__file__).parent / "results" / "imagenet"
CACHE = Path(__file__).parent / ".cache" / "imagenet"
MODELS = ("mobilenet_v1", "tiny_darknet")
SETTINGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
_CLE = {"mobilenet_v1": dict(cle=True, bias_correction=True, relu6_to_relu=True), "tiny_darknet": dict(bias_correction=True)}
_CLE_LABEL = {"mobilenet_v1": "RTN+CLE+BC (ReLU6->ReLU)", "tiny_darknet": "RTN+BC (no CLE pair)"}
_GENIE_TINY = dict(init="squant", samples=16, distill_iters=50, distill_batch=16, recon_iters=100, batch_size=8, seed=0)
# key -> (label, method, options or a per-model dict of options, protocol)
ROWS = {
    "rtn": ("RTN", "rtn", {}, "dfquant"),
    "squant": ("SQuant", "squant", {}, "dfquant"),
    "rtn_cle_bc": ("{cle}, per-channel", "rtn", _CLE, "dfquant"),
    "rtn_cle_bc_pt": ("{cle}, per-tensor", "rtn", {m: dict(o, per_channel=False) for m, o in _CLE.items()}, "dfquant"),
    "genie_rtn": ("RTN", "rtn", {}, "genie"),
    "genie_squant": ("SQuant", "squant", {}, "genie"),
    "squant_rtn": ("RTN", "rtn", {}, "squant"),
    "squant_squant": ("SQuant", "squant", {}, "squant"),
    "genie_tiny": ("Genie, SQuant init, tiny CPU budget", "genie", _GENIE_TINY, "dfquant"),
    "genie_tiny_r1000": ("Genie, SQuant init, tiny CPU budget, 1000 reconstruction iterations", "genie", dict(_GENIE_TINY, recon_iters=1000), "dfquant"),
}
#: Rows run at W4A4 only: Genie-D at 224x224 costs about 0.3 s per image and iteration on one core,
#: so the learned rows get a tiny budget (16 images, 50 synthesis and 100 reconstruction iterations;
#: ``genie_tiny_r1000``: the same images, 1000 reconstruction iterations, to tell synthesis from
#: reconstruction as the budget that limits the row).
W4A4_ONLY = ("genie_tiny", "genie_tiny_r1000")


def row_plan(name: str, setting: str):
    """``(key, label, method, options)`` of the rows of one model and setting, in run order."""
    for key, (label, method, opts, protocol) in ROWS.items():
        if (protocol == "genie" and setting == "W8A8") or (key in W4A4_ONLY and setting != "W4A4"):
            continue  # 8-bit ends and second input at W8A8: dfquant's protocol exactly
        opts = dict(opts.get(name, {}) if name in opts else opts)
        if protocol != "dfquant":
            opts["protocol"] = protocol
        yield key, label.format(cle=_CLE_LABEL[name]), method, opts


def _cache_file(cache: Path, name: str, setting: str, key: str, options: dict, limit) -> Path:
    spec = json.dumps(dict(options=options, limit=limit, version=2), sort_keys=True)
    return cache / f"{name}_{setting}_{key}_{hashlib.sha256(spec.encode()).hexdigest()[:10]}.json"


def _fp32(name: str, cache: Path, limit):
    """The float model, the photos and its logits on them (the FP32 figures and logits cached)."""
    path = asset_path(MODEL_WEIGHTS[name])
    if path is None:
        raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
    model = dfquant.create_model(name, weights=str(path))
    data = load_eval_data("imagenet", preprocessing=model, limit=limit)
    fp_path, ref_path = cache / f"{name}_fp32_{limit}.json", cache / f"{name}_fp32_{limit}.pt"
    if not (fp_path.exists() and ref_path.exists()):
        fp = dfquant.evaluate(model, data)
        ref = dfquant.reference_logits(model, data)
        torch.save(ref, ref_path)
        figures = dict(top1=fp["top1"], top5=fp["top5"], n=fp["n"])
        if any(isinstance(m, torch.nn.ReLU6) for m in model.modules()):  # what CLE's ReLU6 -> ReLU costs in float
            from dfquant.dfq import replace_relu6

            relu = dfquant.evaluate(replace_relu6(model)[0], data, reference=ref)
            figures["relu"] = dict(top1=relu["top1"], top5=relu["top5"], logit_mse=relu["logit_mse"])
        fp_path.write_text(json.dumps(figures))
    return model, data, torch.load(ref_path, weights_only=True)


def run_rows(name: str, protocol: str, args, deadline: float, counter: list, total: int) -> None:
    """Run every row of ``name`` under ``protocol`` not in the cache (until ``deadline``), caching each as it ends."""
    loaded = None
    for setting, (w, a) in SETTINGS.items():
        for key, label, method, opts in row_plan(name, setting):
            if ROWS[key][3] != protocol or setting not in args.settings or key not in args.rows:
                continue
            counter[0] += 1
            path = _cache_file(args.cache, name, setting, key, opts, args.limit)
            if path.exists():
                continue
            if time.time() > deadline:
                print(f"[{counter[0]}/{total}] {name} {setting} {protocol} {label}: not started (--max-minutes)", flush=True)
                continue
            if loaded is None:
                loaded = _fp32(name, args.cache, args.limit)
            model, data, ref = loaded
            t = time.perf_counter()
            q, report = dfquant.quantize(model, method, w, a, **opts)
            dt = time.perf_counter() - t
            t = time.perf_counter()
            ev = dfquant.evaluate(q, data, reference=ref, predictions=True)
            de = time.perf_counter() - t
            row = dict(setting=setting, key=key, method=label, protocol=report.config["protocol"], options=opts, top1=ev["top1"], top5=ev["top5"],
                       agree_top1=ev["agree_top1"], logit_mse=ev["logit_mse"], quantize_s=dt, evaluate_s=de,
                       float_inputs=[n for n, _ in report.float_inputs], correct=[bool(c) for c in ev["correct"]],
                       logit_sq_err=[float(e) for e in ev["logit_sq_err"]])
            path.write_text(json.dumps(row))
            print(f"[{counter[0]}/{total}] {name} {setting} {row['protocol']:<7} {label:<28} top-1 {ev['top1']:6.2f}  mse {ev['logit_mse']:8.4f}  "
                  f"quantize {dt:5.1f} s, evaluate {de:5.1f} s", flush=True)


def _versus(row: dict, by_key: dict) -> list:
    """The paired tests of one row: against RTN and SQuant of its protocol, and dfquant's same method."""
    prefix = {"dfquant": "", "genie": "genie_", "squant": "squant_"}[row["protocol"]]
    bases = [prefix + "rtn", prefix + "squant"]
    if row["protocol"] != "dfquant":
        bases.append(row["key"][len(prefix):])
    if row["protocol"] == "genie" and row["setting"] == "W8A8":
        bases = []
    out = []
    for base in dict.fromkeys(bases):
        other = by_key.get(base)
        if other is None or base == row["key"]:
            continue
        out.append(dict(row=base, method=other["method"], protocol=other["protocol"],
                        mcnemar=dfquant.paired_comparison(row["correct"], other["correct"]),
                        sign_test=dfquant.paired_error_comparison(row["logit_sq_err"], other["logit_sq_err"])))
    return out


def _committed(args) -> dict:
    """The result file this run rewrites, for the rows its cache lacks: (model, setting, key) ->
    row, and model -> model section. Empty for a --limit run (other photos)."""
    path = Path(args.out).with_suffix(".json")
    if args.limit is not None or not path.exists():
        return {}
    doc = json.loads(path.read_text())
    out = {name: m for name, m in doc.get("models", {}).items()}
    out.update({(name, r["setting"], r["key"]): r for name, m in doc.get("models", {}).items() for r in m["rows"]})
    return out


def collect(args) -> dict:
    """The results document from the cache: every row run so far, with its paired tests. A row the
    cache lacks is kept from the result file being rewritten when it holds that row with the same
    options (marked ``kept``: made by an earlier run of this plan, its paired tests as they were)."""
    doc = dict(command=args.command, machine=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), models={})
    committed = _committed(args)
    for name in MODELS:  # every model and row of the plan: those not run yet are listed
        fp_path = args.cache / f"{name}_fp32_{args.limit}.json"
        if not fp_path.exists():
            if name in committed:
                doc["models"][name] = dict(committed[name], rows=[dict(r, kept=True) for r in committed[name]["rows"]])
            else:
                doc.setdefault("not_run", []).append(name)
            continue
        fp = json.loads(fp_path.read_text())
        m = dict(fp32_top1=fp["top1"], fp32_top5=fp["top5"], n_images=fp["n"], rows=[], not_run=[])
        if "relu" in fp:
            m["fp32_relu6_to_relu"] = fp["relu"]
        for setting in SETTINGS:
            by_key, kept = {}, {}
            for key, label, _, opts in row_plan(name, setting):
                path = _cache_file(args.cache, name, setting, key, opts, args.limit)
                old = committed.get((name, setting, key))
                if path.exists():
                    by_key[key] = json.loads(path.read_text())
                elif old is not None and old.get("options") == opts:
                    kept[key] = dict(old, kept=True)
                else:
                    m["not_run"].append(f"{setting} {label} ({ROWS[key][3]})")
            for key, _, _, _ in row_plan(name, setting):
                if key in kept:
                    m["rows"].append(kept[key])
                elif key in by_key:
                    row = by_key[key]
                    row["drop"] = row["top1"] - fp["top1"]
                    row["versus"] = _versus(row, by_key)
                    m["rows"].append({k: v for k, v in row.items() if k not in ("correct", "logit_sq_err")})
        doc["models"][name] = m
    return doc


def _tests(v: dict) -> str:
    s, c = v["sign_test"], v["mcnemar"]
    return f"{v['method']} ({v['protocol']}): {s['a_closer']}:{s['b_closer']} (p {s['p_value']:.2g}); {c['a_only']}:{c['b_only']} (p {c['p_value']:.2g})"


def to_markdown(doc: dict) -> str:
    lines = [
        "# The rounding methods on ImageNet-1k under three protocols: MobileNetV1-0.75 and Tiny Darknet",
        "",
        f"Command: `{doc['command']}`. Machine: {doc['machine']}, torch {doc['torch']}, {doc['threads']} thread(s).",
        "Rows are cached as they finish (benchmarks/.cache, not committed); `python benchmarks/imagenet.py --threads 1` runs, or",
        "resumes, the whole plan. Rows this run did not reach are listed under each model.",
        "Protocols: **dfquant** (per-channel min/max weight grid unless per-tensor, BN kept, image input float, classifier input",
        "8 bits, activation ranges from BN statistics), **squant** (the SQuant paper's: the same bits, activation ranges by the",
        "authors' noise rule, noise seed 0), **genie** (the Genie release's: first conv and classifier at 8-bit weights, second",
        "layer's input at 8 bits; these models have no residual add; at W8A8 it is dfquant's exactly, so not run).",
        "CLE+BC on MobileNetV1 replaces ReLU6 by ReLU first (DFQ Sec. 5; this changes the float model, whose FP32 figure is the",
        "ReLU6 one); Tiny Darknet's LeakyReLU pairs are not equalized by dfquant's CLE, so its row is bias correction alone.",
        "Photos: the 1000 labelled held-out ImageNet photos of ../shared (one photo = 0.1 point). Paired tests, row against",
        "another on the same photos: sign test on the per-image logit error (photos where the row is closer to FP32 : the other",
        "is) and exact McNemar on correctness (photos only the row gets right : only the other does). Times: quantization and",
        "evaluation of the 1000 photos, one process.",
        "Rows marked (kept) come from the earlier run of this plan whose result this run rewrote (its cache did not hold",
        "them; their code did not change): their paired tests are that run's.",
        "",
    ]
    for name, m in doc["models"].items():
        lines += [f"## {name} (FP32 top-1 {m['fp32_top1']:.2f} %, top-5 {m['fp32_top5']:.2f} %, {m['n_images']} photos)", "",
                  "| setting | protocol | row | top-1 % | top-5 % | drop | top-1 agreement % | logit MSE | quantize s | evaluate s | paired tests: against (sign test closer; McNemar correct only) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        if "fp32_relu6_to_relu" in m:
            r = m["fp32_relu6_to_relu"]
            lines[-2:-2] = [f"The float model with ReLU6 -> ReLU (before any quantization): top-1 {r['top1']:.2f} %, top-5 {r['top5']:.2f} %, logit MSE {r['logit_mse']:.4g} against FP32.", ""]
        for r in m["rows"]:
            tests = "<br>".join(_tests(v) for v in r["versus"]) or "-"
            lines.append(f"| {r['setting']} | {r['protocol']} | {r['method']}{' (kept)' if r.get('kept') else ''} | {r['top1']:.2f} | {r['top5']:.2f} | {r['drop']:+.2f} | {r['agree_top1']:.1f} | "
                         f"{r['logit_mse']:.4g} | {r['quantize_s']:.1f} | {r['evaluate_s']:.0f} | {tests} |")
        if m["not_run"]:
            lines += ["", "Not run yet (rerun the command to add them): " + "; ".join(m["not_run"]) + "."]
        lines.append("")
    if doc.get("not_run"):
        lines += [f"Not run yet: {', '.join(doc['not_run'])} (every row).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="the first N photos only (a quick check)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--cache", type=Path, default=CACHE, help="where finished rows are kept (a rerun skips them)")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new row after this long; the tables list the rows not run")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="run these settings only (the tables keep every cached row)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="run these rows only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = "".join(f" --{k} {v}" for k, v in (("threads", args.threads), ("limit", args.limit), ("out", args.out), ("max-minutes", args.max_minutes)) if v not in (None, str(RESULTS)))
    for name, chosen, every in (("models", args.models, MODELS), ("settings", args.settings, SETTINGS), ("rows", args.rows, ROWS)):
        flags += f" --{name} {' '.join(chosen)}" if list(chosen) != list(every) else ""
    args.command = "python benchmarks/imagenet.py" + flags
    args.cache.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    total = sum(1 for name in args.models for s in args.settings for k, *_ in row_plan(name, s) if k in args.rows)
    counter = [0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for protocol in ("dfquant", "genie", "squant"):  # every model's dfquant rows first: a cut-short run covers both
        for name in args.models:
            run_rows(name, protocol, args, deadline, counter, total)
            doc = collect(args)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        out.with_suffix(".md").write_text(to_markdown(doc))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
