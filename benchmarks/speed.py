"""Speed benchmarks, one named section each.

    python benchmarks/speed.py --threads 1                  # every section
    python benchmarks/speed.py --only squant --threads 1    # one section (repeat --only for more)
    python benchmarks/speed.py --only squant --profile      # also print where the time goes

Writes benchmarks/results/speed.json and speed.md. A run replaces the entries of the sections it
ran and keeps the others; each entry records its own command, CPU model, torch version and threads.
Times are medians over interleaved repeats (each repeat runs every variant once, in turn), so the
ratios between variants are measured side by side even on a shared, noisy machine.

Sections (add yours to SECTIONS, with a function returning a result dict and one rendering it):

* ``squant``: ``dfquant.squant.squant_round`` over every conv/linear weight of ImageNet models
  (random init, seed 0: the rounding's speed does not depend on training) on 4-bit per-channel
  min/max grids, at each level (E, K, C, K+C), against one round-to-nearest pass over the same
  grid tensors, for the current implementation and the former one (tests/squant_reference.py).
* ``quantize``: the whole ``dfquant.quantize`` call (rtn, squant, squant+CLE+bias correction,
  dfmpc) on ResNet-20/56 and MobileNetV1-0.75 with real weights, the first call of a fresh process
  and warm, by stage (``QuantReport.stage_times``), beside the former pipeline (a git worktree of
  ``FORMER_QUANTIZE``), with a check that both give the same state_dict.
* ``genie``: Genie W4A4 (Genie-D synthesis + Genie-M reconstruction) on the CIFAR-10 ResNet-20 at the
  CPU budget, the former implementation (``dfquant.genie`` at ``FORMER_QUANTIZE``, read from git) and the current one in one run:
  seconds per Genie-D iteration and per Genie-M unit iteration, totals, and the logit MSE against
  FP32 on the 846 CIFAR-10 images with a sign test (``paired_error_comparison``) new vs former.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dfquant
from dfquant.quantizer import to_grid, weight_params
from dfquant.squant import squant_round

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speed"
sys.path.insert(0, str(HERE.parent / "tests"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved(variants: dict, repeat: int) -> dict:
    """Median wall-clock and process-CPU seconds of each variant, repeats interleaved."""
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for f in variants.values():  # warm-up
        f()
    for _ in range(repeat):
        for k, f in variants.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - w)
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k])} for k in variants}


# --- section: squant -------------------------------------------------------------------------

LEVELS = {"E": (False, False), "K": (True, False), "C": (False, True), "K+C": (True, True)}


def squant_models() -> tuple[list[str], str]:
    names = dfquant.list_models()
    v1 = [n for n in names if n.startswith("mobilenet_v1")]
    if v1:
        return ["resnet50", v1[0]], ""
    return ["resnet50", "resnet18", "mobilenet_v2"], "MobileNetV1-0.75 is not in the model registry here: ResNet-18 and MobileNetV2 instead."


def grid_tensors(name: str):
    torch.manual_seed(0)
    model = dfquant.create_model(name)
    grids = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach()
            qp = weight_params(w, 4)
            grids.append((to_grid(w, qp), qp.qmin, qp.qmax))
    return grids


def run_all(fn, grids, **kw):
    for x, lo, hi in grids:
        fn(x, lo, hi, **kw)


def section_squant(args) -> dict:
    from squant_reference import squant_round as former

    names, note = squant_models()
    models = {}
    for name in names:
        grids = grid_tensors(name)
        same = all(
            torch.equal(squant_round(x, lo, hi, kernel=k, channel=c), former(x, lo, hi, kernel=k, channel=c))
            for x, lo, hi in grids
            for k, c in LEVELS.values()
        )
        variants = {"RTN": lambda grids=grids: run_all(lambda w, a, b: torch.clamp(torch.round(w), a, b), grids)}
        for impl, fn in (("new", squant_round), ("former", former)):
            for level, (k, c) in LEVELS.items():
                variants[f"{impl} {level}"] = lambda fn=fn, k=k, c=c, grids=grids: run_all(fn, grids, kernel=k, channel=c)
        times = interleaved(variants, args.repeat)
        models[name] = {"layers": len(grids), "weights": sum(x.numel() for x, _, _ in grids), "same_codes": same, "times": times}
        rtn = times["RTN"]
        print(f"{name}: {len(grids)} layers, {models[name]['weights'] / 1e6:.1f} M weights, codes identical to the former: {same}")
        for level in LEVELS:
            n, f = times[f"new {level}"], times[f"former {level}"]
            print(f"  {level:4s} new {n['wall_s'] * 1e3:8.1f} ms ({n['wall_s'] / rtn['wall_s']:5.1f}x RTN)   former {f['wall_s'] * 1e3:8.1f} ms ({f['wall_s'] / rtn['wall_s']:5.1f}x RTN)   speed-up {f['wall_s'] / n['wall_s']:5.1f}x")
        print(f"  RTN  {rtn['wall_s'] * 1e3:8.1f} ms")
        if args.profile:
            print_profile(name, grids, former)
    return {"models": models, "note": note, "repeat": args.repeat}


def print_profile(name, grids, former, top=12):
    from torch.profiler import ProfilerActivity, profile

    for label, fn in (("new", squant_round), ("former", former)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_all(fn, grids)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"  where the time goes, {label} K+C on {name} (self CPU by op, {total / 1e3:.0f} ms under the profiler):")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"    {e.key:28s} {e.self_cpu_time_total / 1e3:8.1f} ms {100 * e.self_cpu_time_total / total:5.1f} %  {e.count:6d} calls")


def render_squant(res: dict) -> list[str]:
    lines = [
        "Weights of ImageNet models from `dfquant.create_model` (random init, seed 0), 4-bit per-channel min/max grids (`weight_params` + `to_grid`).",
        "RTN: one `torch.clamp(torch.round(x), qmin, qmax)` per layer over the same grid tensors. `new`: `dfquant.squant.squant_round`; `former`: the",
        "implementation it replaced (`tests/squant_reference.py`), which gives the same codes. E: `kernel=False, channel=False`; K: kernel only; C: channel only; K+C: both (the default).",
        f"Medians of {res['repeat']} interleaved repeats; ratios from wall-clock time (process CPU time in brackets). On a shared machine the",
        "RTN pass (two fresh tensors per layer) varies more between runs than the rounding does, and the ratios to it with it; former / new is steadier.",
    ]
    if res["note"]:
        lines.append(res["note"])
    for name, m in res["models"].items():
        t = res["models"][name]["times"]
        rtn = t["RTN"]
        lines += ["", f"### {name}: {m['layers']} layers, {m['weights'] / 1e6:.1f} M weights; codes identical to the former: {'yes' if m['same_codes'] else 'NO'}", "",
                  f"RTN pass: {rtn['wall_s'] * 1e3:.1f} ms ({rtn['cpu_s'] * 1e3:.1f} ms CPU).", "",
                  "| level | new ms | new / RTN | former ms | former / RTN | former / new |", "|---|---|---|---|---|---|"]
        for level in LEVELS:
            n, f = t[f"new {level}"], t[f"former {level}"]
            lines.append(
                f"| {level} | {n['wall_s'] * 1e3:.1f} | {n['wall_s'] / rtn['wall_s']:.1f} ({n['cpu_s'] / rtn['cpu_s']:.1f}) | {f['wall_s'] * 1e3:.1f} | "
                f"{f['wall_s'] / rtn['wall_s']:.1f} ({f['cpu_s'] / rtn['cpu_s']:.1f}) | {f['wall_s'] / n['wall_s']:.1f} ({f['cpu_s'] / n['cpu_s']:.1f}) |"
            )
    return lines


# --- section: quantize -----------------------------------------------------------------------

#: main at the branch point of the single-trace pipeline: the former implementation of the call.
FORMER_QUANTIZE = "9d3bcdab79230dfe3e4d66b9855416e2dd7ffccf"
QUANTIZE_MODELS = ("resnet20", "resnet56", "mobilenet_v1")
#: (method, options) per variant; MobileNetV1's ReLU6 is replaced (relu6_to_relu) where CLE or DF-MPC needs ReLU.
QUANTIZE_VARIANTS = {
    "rtn": ("rtn", dict(a_bits=4)),
    "squant": ("squant", dict(a_bits=4)),
    "squant+cle+bc": ("squant", dict(a_bits=4, cle=True, bias_correction=True)),
    "dfmpc": ("dfmpc", {}),
}
QUANTIZE_FRESH_RUNS = 3  # fresh processes per (implementation, model, variant)

#: One fresh process: imports and the model (timed apart), the first quantize call, then warm calls.
_QUANTIZE_WORKER = """
import json, statistics, sys, time
t = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[1]))
import dfquant, dfquant.api
from dfquant.assets import MODEL_WEIGHTS, asset_path
imports = time.perf_counter() - t
name, method, options, warm, save = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
t = time.perf_counter()
model = dfquant.create_model(name, weights=str(asset_path(MODEL_WEIGHTS[name])))
create = time.perf_counter() - t
runs = []
for _ in range(1 + warm):
    t, c = time.perf_counter(), time.process_time()
    q, report = dfquant.quantize(model, method, 4, **options)
    runs.append((time.perf_counter() - t, time.process_time() - c, getattr(report, "stage_times", {})))
if save:
    torch.save(q.state_dict(), save)
print(json.dumps(dict(imports_s=imports, create_s=create, first_s=runs[0][0], first_cpu_s=runs[0][1], first_stages=runs[0][2],
                      warm_s=[r[0] for r in runs[1:]], warm_cpu_s=[r[1] for r in runs[1:]], warm_stages=[r[2] for r in runs[1:]])))
"""


def _former_tree(root: Path, commit: str) -> Path:
    """A git worktree of the former implementation, made once under the system's temporary folder."""
    import subprocess
    import tempfile

    tree = Path(tempfile.gettempdir()) / f"dfquant-former-{commit[:12]}"
    if not (tree / "src" / "dfquant" / "api.py").exists():
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "--force", str(tree), commit], check=True, capture_output=True)
    return tree


def _quantize_worker(src: Path, threads: int, model: str, variant: str, warm: int, save: str) -> dict:
    import subprocess

    from dfquant.assets import assets_dir

    method, options = QUANTIZE_VARIANTS[variant]
    if model.startswith("mobilenet") and variant in ("squant+cle+bc", "dfmpc"):
        options = dict(options, relu6_to_relu=True)
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads), DFQUANT_ASSETS=str(assets_dir()))
    argv = [sys.executable, "-c", _QUANTIZE_WORKER, str(threads), model, method, json.dumps(options), str(warm), save]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _median_stages(stage_dicts: list) -> dict:
    keys = [k for k in stage_dicts[0]] if stage_dicts and stage_dicts[0] else []
    return {k: statistics.median(d.get(k, 0.0) for d in stage_dicts) for k in keys}


def section_quantize(args) -> dict:
    """The whole ``dfquant.quantize`` call, first in a fresh process and warm, new beside former."""
    import tempfile

    root = HERE.parent
    impls = {"new": root / "src", "former": _former_tree(root, FORMER_QUANTIZE) / "src"}
    threads = args.threads or torch.get_num_threads()
    raw: dict = {}
    same: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(QUANTIZE_FRESH_RUNS):  # interleaved: every (model, variant) runs new then former, in turn
            for model in QUANTIZE_MODELS:
                for variant in QUANTIZE_VARIANTS:
                    for impl, src in impls.items():
                        save = str(Path(tmp) / f"{impl}-{model}-{variant}.pt") if run == 0 else ""
                        raw.setdefault((model, variant, impl), []).append(_quantize_worker(src, threads, model, variant, args.repeat, save))
                    if run == 0:
                        a, b = (torch.load(Path(tmp) / f"{i}-{model}-{variant}.pt", weights_only=True) for i in impls)
                        same[(model, variant)] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                    print(f"  run {run + 1}/{QUANTIZE_FRESH_RUNS} {model} {variant}", flush=True)
    models = {}
    for model in QUANTIZE_MODELS:
        rows = {}
        for variant in QUANTIZE_VARIANTS:
            row = {"same_state_dict": same[(model, variant)]}
            for impl in impls:
                runs = raw[(model, variant, impl)]
                row[impl] = {
                    "imports_s": statistics.median(r["imports_s"] for r in runs),
                    "create_s": statistics.median(r["create_s"] for r in runs),
                    "first_s": statistics.median(r["first_s"] for r in runs),
                    "first_cpu_s": statistics.median(r["first_cpu_s"] for r in runs),
                    "warm_s": statistics.median(w for r in runs for w in r["warm_s"]),
                    "warm_cpu_s": statistics.median(w for r in runs for w in r["warm_cpu_s"]),
                    "first_stages": _median_stages([r["first_stages"] for r in runs]),
                    "warm_stages": _median_stages([st for r in runs for st in r["warm_stages"]]),
                }
            n, f = row["new"], row["former"]
            print(f"{model} {variant}: first {n['first_s']:.3f} s, {n['first_cpu_s']:.3f} s CPU (former {f['first_s']:.3f}, {f['first_s'] / n['first_s']:.1f}x), "
                  f"warm {n['warm_s']:.3f} s, {n['warm_cpu_s']:.3f} s CPU (former {f['warm_s']:.3f}, {f['warm_s'] / n['warm_s']:.1f}x), same state_dict: {row['same_state_dict']}")
            rows[variant] = row
        models[model] = rows
    return {"models": models, "former": FORMER_QUANTIZE, "fresh_runs": QUANTIZE_FRESH_RUNS, "warm_calls": args.repeat}


def _stage_text(stages: dict) -> str:
    return ", ".join(f"{k} {v * 1e3:.0f}" for k, v in stages.items() if v * 1e3 >= 0.5)


def render_quantize(res: dict) -> list[str]:
    lines = [
        "One `dfquant.quantize(model, method, 4, ...)` call (W4A4; dfmpc: its default W4, weight-only) on real weights from `../shared`",
        "(CIFAR-10 ResNet-20/56, ImageNet MobileNetV1-0.75; on MobileNetV1, squant+cle+bc and dfmpc with `relu6_to_relu=True`). `first`: the first",
        f"call of a fresh process (after `import dfquant`, `dfquant.api` and the model, timed apart as `imports`); `warm`: the median of {res['warm_calls']} further calls in",
        f"each process. Medians over {res['fresh_runs']} fresh processes per cell, run new then former in turn. `former`: the same call at commit",
        f"`{res['former'][:10]}` (main before the single-trace pipeline), run from a git worktree. `same`: the quantized models' state_dicts are identical",
        "(new against former, first process). Stage times (ms, the new code's `QuantReport.stage_times`; `weights` is the grids and rounding) are",
        "medians per stage, so they need not add up to the total. On a shared 2-core machine a first call also pays Python's first full garbage",
        "collection after importing torch (about 0.1 s, in whichever stage it falls). `CPU`: the process's CPU time for the call (one thread: about",
        "what an idle core would take; wall-clock time on a loaded machine is longer). Ratios: former / new, wall-clock (CPU in brackets).",
    ]
    for model, rows in res["models"].items():
        lines += ["", f"### {model}", "", "| variant | imports s | first s | first CPU s | former first s (CPU) | ratio | warm s | warm CPU s | former warm s (CPU) | ratio | same |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for variant, row in rows.items():
            n, f = row["new"], row["former"]
            lines.append(f"| {variant} | {n['imports_s']:.2f} | {n['first_s']:.3f} | {n['first_cpu_s']:.3f} | {f['first_s']:.3f} ({f['first_cpu_s']:.3f}) | "
                         f"{f['first_s'] / n['first_s']:.1f} ({f['first_cpu_s'] / n['first_cpu_s']:.1f}) | {n['warm_s']:.3f} | {n['warm_cpu_s']:.3f} | "
                         f"{f['warm_s']:.3f} ({f['warm_cpu_s']:.3f}) | {f['warm_s'] / n['warm_s']:.1f} ({f['warm_cpu_s'] / n['warm_cpu_s']:.1f}) | {'yes' if row['same_state_dict'] else 'NO'} |")
        lines += ["", "| variant | first call, by stage (ms) | warm call, by stage (ms) |", "|---|---|---|"]
        for variant, row in rows.items():
            lines.append(f"| {variant} | {_stage_text(row['new']['first_stages'])} | {_stage_text(row['new']['warm_stages'])} |")
    return lines



# --- section: onnx ---------------------------------------------------------------------------

ONNX_MODELS = {"resnet20": ("cifar10", None), "mobilenet_v1": ("imagenet", None)}
ONNX_EXPORTS = {  # label -> export_onnx options
    "QDQ": {},
    "QDQ --fold-bn": {"fold_bn": True},
    "QDQ --integer-adds": {"fold_bn": True, "integer_adds": True},
}


def onnx_variants(name, tmp):
    """(float model, {label: ONNX file or torch model}, {label: quantized torch model the file came from})."""
    from dfquant.assets import MODEL_WEIGHTS, asset_path
    from dfquant.io.export import export_float_onnx, export_onnx

    model = dfquant.create_model(name, weights=str(asset_path(MODEL_WEIGHTS[name])))
    variants = {"torch FP32": model, "float ONNX": export_float_onnx(model, tmp / f"{name}_float.onnx")["path"]}
    summaries, sources = {}, {}
    for bits in (8, 4):
        qmodel, _ = dfquant.quantize(model, "squant", bits, bits)
        probes = {f"W{bits}A{bits} {k}": (qmodel, v) for k, v in ONNX_EXPORTS.items()}
        if bits == 8:  # SQuant's rounding on zero-point-0 grids (w_range="symmetric"), not SQuant's min/max grids
            symmetric, _ = dfquant.quantize(model, "squant", bits, bits, w_range="symmetric")
            probes["W8A8 --w-range symmetric --integer-adds"] = (symmetric, ONNX_EXPORTS["QDQ --integer-adds"])
        for label, (q, opts) in probes.items():
            path = tmp / (label.replace(" ", "_").replace("-", "") + ".onnx")
            summaries[label] = export_onnx(q, path, **opts)
            variants[label], sources[label] = summaries[label]["path"], q
    return model, variants, summaries, sources


def onnx_accuracy(name, model, variants, sources):
    """Top-1 on the real test images of each file (onnxruntime) and of torch FP32; McNemar of each file against its own unfolded QDQ export."""
    from dfquant.data import load_eval_data
    from dfquant.evaluation import evaluate, paired_comparison
    from dfquant.io.export import OnnxRuntimeModel

    data = load_eval_data(ONNX_MODELS[name][0], preprocessing=model)
    if not isinstance(data, tuple):
        data = tuple(torch.cat(t) for t in zip(*data))
    out = {}
    for label, v in variants.items():
        runner = v if isinstance(v, torch.nn.Module) else OnnxRuntimeModel(v, threads=1)
        out[label] = evaluate(runner, data, batch_size=50, predictions=True)
    res = {label: {"top1": r["top1"], "n": r["n"]} for label, r in out.items()}
    for label in res:
        base = label.split(" ")[0] + " QDQ"
        if label in sources and label != base and base in out:
            res[label]["vs_unfolded"] = {k: v for k, v in paired_comparison(out[label]["correct"], out[base]["correct"]).items() if k in ("a_only", "b_only", "p_value")}
    return res


def section_onnx(args) -> dict:
    import tempfile

    from dfquant.io.runtime import BenchConfig, bench, runtime_kernels

    models = {}
    for name in ONNX_MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model, variants, summaries, sources = onnx_variants(name, tmp)
            kernels = {label: runtime_kernels(variants[label]) for label in summaries}
            config = BenchConfig(threads=args.threads or 1, repeat=args.repeat, latency_runs=20 if name == "resnet20" else 5)
            times = bench(variants, model.input_size, config)
            accuracy = onnx_accuracy(name, model, variants, sources)
            profiles = {label: ort_profile(variants[label], model.input_size) for label in ("W8A8 QDQ --fold-bn", "W8A8 QDQ --integer-adds")}
        models[name] = {
            "times": times, "accuracy": accuracy, "bench": {k: getattr(config, k) for k in ("threads", "latency_batch", "throughput_batch", "latency_runs", "repeat")},
            "kernels": {k: {f: v[f] for f in ("ops", "convs", "integer_convs", "layers", "integer_layers", "float_layers")} for k, v in kernels.items()},
            "exports": {k: {f: v[f] for f in ("bytes", "folded_bn", "float_weights", "requantized_pads", "coarsened_channels")}
                        | {"residual_adds": sum(a["quantized"] for a in v["residual_adds"])} for k, v in summaries.items()},
            "profiles": profiles,
        }
        base = times["float ONNX"]
        print(f"{name}:")
        for label, t in times.items():
            k = kernels.get(label)
            share = f"{k['integer_convs']}/{k['convs']} int convs" if k else ""
            print(f"  {label:38s} {t['latency_ms']:8.2f} ms ({base['latency_ms'] / t['latency_ms']:4.2f}x)  {t['throughput_ips']:8.1f} img/s "
                  f"({t['throughput_ips'] / base['throughput_ips']:4.2f}x)  {share:16s} top-1 {accuracy[label]['top1']:.2f}")
    return {"models": models, "onnxruntime": _ort_version()}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def ort_profile(path, input_size, runs=5, top=6):
    """onnxruntime's own profile (SessionOptions.enable_profiling) of a file at batch 1: kernel time by op type and the slowest nodes."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "ort")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        x = torch.randn(1, *input_size).numpy()
        for _ in range(runs):
            sess.run(None, {sess.get_inputs()[0].name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, by_node = {}, {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0) + e["dur"] / runs / 1e3
            node = (e["name"][: -len("_kernel_time")], op)
            by_node[node] = by_node.get(node, 0) + e["dur"] / runs / 1e3
    total = sum(by_op.values())
    return {"total_ms": total, "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "slowest_nodes": [{"node": n, "op": op, "ms": ms} for (n, op), ms in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]]}


def render_onnx(res: dict) -> list[str]:
    lines = [
        f"ONNX Runtime {res['onnxruntime']} (CPUExecutionProvider, graph optimizations ORT_ENABLE_ALL) on the exported files of SQuant-quantized models",
        "(`dfquant.quantize(model, 'squant', b, b)`: SQuant's protocol, BN kept unfolded, per-channel min/max weight grids), real weights.",
        "`QDQ`: `export_onnx` as is; `--fold-bn`: BN folded into the quantized convs at export; `--integer-adds`: also the residual sums quantized at 8 bits",
        "(a deviation from dfquant's model, see docs/export.md); `--w-range symmetric`: `quantize(..., w_range='symmetric')`, SQuant's rounding on",
        "per-channel grids with zero point 0 (scale max|w| / 127; not SQuant's min/max grid) so that integer kernels take their fast path. `float ONNX`: the float model",
        "exported by the same exporter without Q/DQ; `torch FP32`: the float model in torch. Latency: batch 1 (ms per image, mean of the runs",
        "of one repeat); throughput: batch 64 (images/s); medians of the interleaved repeats; x: relative to the float ONNX file (higher is faster).",
        "int convs: convolutions onnxruntime runs as integer kernels (`QLinearConv`), read from its optimized graph (`dfquant.io.runtime.runtime_kernels`).",
        "Top-1: each file run by onnxruntime on the real test images (ResNet-20: the 846 CIFAR-10 images; MobileNetV1-0.75: the 1000 photos);",
        "p vs QDQ: exact McNemar against the same bits' unfolded `QDQ` file (images right only in this file / only in that one).",
    ]
    for name, m in res["models"].items():
        t, acc, k, ex = m["times"], m["accuracy"], m["kernels"], m["exports"]
        b = m["bench"]
        base = t["float ONNX"]
        lines += ["", f"### {name} ({b['threads']} thread, {b['repeat']} repeats, {b['latency_runs']} latency runs per repeat)", "",
                  "| variant | latency b=1 ms | x | throughput b=64 img/s | x | file KiB | int convs | top-1 | p vs QDQ |", "|---|---|---|---|---|---|---|---|---|"]
        for label, r in t.items():
            kk = k.get(label)
            share = f"{kk['integer_convs']}/{kk['convs']} ({100 * kk['integer_convs'] / kk['convs']:.0f} %)" if kk else "-"
            size = f"{r['bytes'] / 1024:.0f}" if "bytes" in r else "-"
            vs = acc[label].get("vs_unfolded")
            p = f"{vs['p_value']:.2g} ({vs['a_only']}/{vs['b_only']})" if vs else "-"
            lines.append(f"| {label} | {r['latency_ms']:.3f} | {base['latency_ms'] / r['latency_ms']:.2f} | {r['throughput_ips']:.1f} | "
                         f"{r['throughput_ips'] / base['throughput_ips']:.2f} | {size} | {share} | {acc[label]['top1']:.2f} | {p} |")
        lines += ["", "Layers onnxruntime runs in float, and why (from the exported graph):", ""]
        for label, kk in k.items():
            reasons = {}
            for row in kk["float_layers"]:
                reasons.setdefault(row["why"], []).append(row["layer"])
            text = "; ".join(f"{len(v)}x {why} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for why, v in reasons.items()) or "none"
            e = ex.get(label, {})
            extra = f" [export: {e['folded_bn']} BN folded, {e['residual_adds']} sums quantized, {e['requantized_pads']} pads requantized]" if e else ""
            lines.append(f"* {label}: {text}{extra}")
        lines += ["", "onnxruntime's profile at batch 1 (`SessionOptions.enable_profiling`, ms per run in kernels):", ""]
        for label, pr in m["profiles"].items():
            ops = ", ".join(f"{op} {ms:.2f}" for op, ms in list(pr["by_op_ms"].items())[:6])
            nodes = ", ".join(f"{n['node']} ({n['op']}) {n['ms']:.2f}" for n in pr["slowest_nodes"][:4])
            lines.append(f"* {label}: {pr['total_ms']:.2f} in all; by op {ops}; slowest nodes {nodes}.")
    return lines


# --- section: genie --------------------------------------------------------------------------

#: ``--genie-budget smoke``: a few iterations, to check the section's code path (not a result).
GENIE_SMOKE = dict(samples=32, distill_iters=3, distill_batch=16, recon_iters=3)


def _former_genie():
    """``dfquant.genie`` as it was at ``FORMER_QUANTIZE`` (main before the speed work), read from git into
    the system's temporary folder once and imported as the subpackage ``dfquant.genie_former``: its
    relative imports resolve to today's dfquant, so only the Genie code differs."""
    import importlib
    import io
    import shutil
    import subprocess
    import tarfile
    import tempfile

    root = Path(tempfile.gettempdir()) / f"dfquant-genie-{FORMER_QUANTIZE[:12]}"
    if not (root / "genie_former" / "__init__.py").exists():
        tar = subprocess.run(["git", "-C", str(HERE.parent), "archive", FORMER_QUANTIZE, "src/dfquant/genie"], check=True, capture_output=True).stdout
        shutil.rmtree(root, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(root / "tree", filter="data")
        (root / "tree" / "src" / "dfquant" / "genie").rename(root / "genie_former")
    if str(root) not in dfquant.__path__:
        dfquant.__path__.append(str(root))
    return importlib.import_module("dfquant.genie_former")


def _genie_run(impl: str, seed: int, budget: dict, model, data) -> dict:
    """One Genie W4A4 quantization of ``model`` by ``impl`` ("new": dfquant.genie; "former": the frozen
    one from git, :func:`_former_genie`, swapped into the pipeline's learned step), timed and scored against FP32."""
    import contextlib
    from unittest import mock

    import dfquant.learned as learned

    patch = contextlib.nullcontext()
    if impl == "former":
        former = _former_genie()
        patch = mock.patch.multiple(learned, synthesize=former.synthesize, reconstruct_model=former.reconstruct_model)
    with patch:
        wall, cpu = time.perf_counter(), time.process_time()
        q, report = dfquant.quantize(model, "genie", 4, 4, device="cpu", seed=seed, progress=False, **budget)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    info = report.config["genie"]
    units, recon_iters = len(info["units"]), info["recon_iters"]
    batches = -(-info["data"]["n"] // info["data"]["distill_batch"])
    d_iters = batches * info["data"]["distill_iters"]
    ev = dfquant.evaluate(q, data, reference=model, predictions=True)
    run = {"impl": impl, "seed": seed, "quantize_wall_s": wall, "quantize_cpu_s": cpu,
           "genie_d_s": info["synthesis_time_s"], "genie_d_iters": d_iters, "genie_d_s_per_iter": info["synthesis_time_s"] / d_iters,
           "genie_m_s": info["reconstruction_time_s"], "genie_m_unit_iters": units * recon_iters,
           "genie_m_s_per_unit_iter": info["reconstruction_time_s"] / max(units * recon_iters, 1),
           "top1": ev["top1"], "logit_mse": ev["logit_mse"], "logit_sq_err": [float(f"{v:.6g}") for v in ev["logit_sq_err"]]}
    run["total_s"] = run["genie_d_s"] + run["genie_m_s"]
    print(f"  {impl} seed {seed}: Genie-D {run['genie_d_s']:.0f} s ({run['genie_d_s_per_iter'] * 1e3:.0f} ms/iter), Genie-M {run['genie_m_s']:.0f} s "
          f"({run['genie_m_s_per_unit_iter'] * 1e3:.1f} ms/unit-iter), logit MSE {run['logit_mse']:.4f}, top-1 {run['top1']:.2f}", flush=True)
    return run


def section_genie(args) -> dict:
    """Genie (D + M) W4A4 on ResNet-20 at the CPU budget: the former implementation and the current one
    in one process, seed 0 each (then further former seeds for the seed spread), in turn."""
    from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
    from dfquant.data import load_cifar10_npz
    from dfquant.evaluation import paired_error_comparison
    from dfquant.genie import CPU_BUDGET

    budget = GENIE_SMOKE if args.genie_budget == "smoke" else {}
    model = dfquant.create_model("resnet20", weights=str(asset_path(CIFAR_RESNET_WEIGHTS["resnet20"])))
    data = load_cifar10_npz()
    runs = [_genie_run("former", 0, budget, model, data), _genie_run("new", 0, budget, model, data)]
    runs += [_genie_run("former", seed, budget, model, data) for seed in range(1, args.genie_former_seeds)]
    former, new = runs[0], runs[1]
    res = {"budget": args.genie_budget, "settings": {**CPU_BUDGET, **budget}, "n_images": len(new["logit_sq_err"]), "runs": runs,
           "ratio_total": former["total_s"] / new["total_s"], "ratio_genie_d": former["genie_d_s"] / new["genie_d_s"],
           "ratio_genie_m": former["genie_m_s"] / new["genie_m_s"],
           "new_vs_former": paired_error_comparison(new["logit_sq_err"], former["logit_sq_err"]),
           "former_seeds": [paired_error_comparison(r["logit_sq_err"], former["logit_sq_err"]) for r in runs[2:]]}
    t = res["new_vs_former"]
    print(f"  former / new: total {res['ratio_total']:.2f}x (Genie-D {res['ratio_genie_d']:.2f}x, Genie-M {res['ratio_genie_m']:.2f}x); "
          f"sign test new vs former: new closer on {t['a_closer']}, former on {t['b_closer']}, p = {t['p_value']:.3g}")
    if args.profile:
        print_genie_profile(model)
    return res


def print_genie_profile(model, top=10):
    """Where the time goes: torch.profiler over 3 Genie-D iterations (one batch of 128) and over a
    reconstruction of 64 random images with 3 iterations per unit, former and new implementation."""
    from unittest import mock

    from torch.profiler import ProfilerActivity, profile

    import dfquant.genie as new
    import dfquant.learned as learned

    former = _former_genie()

    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for label, impl in (("former", former), ("new", new)):
        jobs = {
            "Genie-D, 3 iterations": lambda impl=impl: impl.synthesize(model, 128, iters=3, batch_size=128, seed=0, device="cpu", progress=False),
            "Genie-M, 3 iterations per unit (with the captures and range searches)": lambda impl=impl: dfquant.quantize(
                model, "genie", 4, 4, synthetic=images, recon_iters=3, device="cpu", seed=0),
        }
        for what, job in jobs.items():
            with mock.patch.object(learned, "reconstruct_model", impl.reconstruct_model), profile(activities=[ProfilerActivity.CPU]) as prof:
                job()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            print(f"  where the time goes, {label} {what} (self CPU by op, {total / 1e3:.0f} ms under the profiler):")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
                print(f"    {e.key:34s} {e.self_cpu_time_total / 1e3:8.1f} ms {100 * e.self_cpu_time_total / total:5.1f} %  {e.count:6d} calls")


def render_genie(res: dict) -> list[str]:
    st = res["settings"]
    lines = [
        "Genie W4A4 (`dfquant.quantize(model, \"genie\", 4, 4, device=\"cpu\", seed=...)`, default init and act_calib) on the CIFAR-10 ResNet-20,",
        f"budget `{res['budget']}`: {st['samples']} images in batches of {st['distill_batch']}, {st['distill_iters']} Genie-D iterations per batch, {st['recon_iters']} Genie-M iterations per unit.",
        "`former`: the implementation before issue #21, main's `src/dfquant/genie` at 9d3bcda, read from git by `_former_genie`, swapped",
        "into the same pipeline; `new`: `dfquant.genie`. Run one after the other in one process (former, new, then the former's further seeds).",
        "Genie-D s/iter: synthesis time / (batches x iterations); Genie-M s/unit-iter: reconstruction time (with each unit's captures,",
        f"range search and error passes) / (units x iterations). Logit MSE against FP32 on the {res['n_images']} CIFAR-10 test images.",
        "",
        "| run | Genie-D s | Genie-D ms/iter | Genie-M s | Genie-M ms/unit-iter | total s | logit MSE | top-1 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(f"| {r['impl']}, seed {r['seed']} | {r['genie_d_s']:.1f} | {r['genie_d_s_per_iter'] * 1e3:.0f} | {r['genie_m_s']:.1f} | "
                     f"{r['genie_m_s_per_unit_iter'] * 1e3:.1f} | {r['total_s']:.1f} | {r['logit_mse']:.4f} | {r['top1']:.2f} |")
    t = res["new_vs_former"]
    lines += ["", f"Former / new time, seed 0: **{res['ratio_total']:.2f}x** in total (Genie-D {res['ratio_genie_d']:.2f}x, Genie-M {res['ratio_genie_m']:.2f}x).",
              f"Sign test on the per-image logit error, new vs former (seed 0 each; `paired_error_comparison`): new closer on {t['a_closer']} images, "
              f"former on {t['b_closer']}, {t['ties']} ties, median difference {t['median_diff']:.3g}, p = {t['p_value']:.3g}."]
    for r, c in zip(res["runs"][2:], res["former_seeds"]):
        lines.append(f"Seed noise, former seed {r['seed']} vs former seed 0: seed {r['seed']} closer on {c['a_closer']}, seed 0 on {c['b_closer']}, "
                     f"median difference {c['median_diff']:.3g}, p = {c['p_value']:.3g}.")
    return lines


SECTIONS = {
    "squant": ("SQuant rounding against one round-to-nearest pass", section_squant, render_squant),
    "quantize": ("the whole quantize call: first in a process and warm, by stage", section_quantize, render_quantize),
    "onnx": ("ONNX Runtime speed of the exported W8A8/W4A4 files against float", section_onnx, render_onnx),
    "genie": ("Genie W4A4 on ResNet-20 at the CPU budget, former and current implementation", section_genie, render_genie),
}


def to_markdown(results: dict) -> str:
    lines = ["# Speed", "", "Written by `benchmarks/speed.py`; each section gives the command that produced it.", ""]
    for name, entry in results.items():
        title, _, render = SECTIONS.get(name, (name, None, None))
        load = f", load average {entry['load']} when it ended (shared machine)" if entry.get("load") else ""
        lines += [f"## {name}: {title}", "", f"Command: `{entry['command']}`", "",
                  f"Machine: {entry['machine']}, {entry.get('cores', '?')} cores{load}; torch {entry['torch']}, {entry['threads']} thread(s).", ""]
        lines += (render(entry["result"]) if render else ["(no renderer for this section)"]) + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only this section (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved repeats per section")
    ap.add_argument("--profile", action="store_true", help="print a short profile of where the time goes")
    ap.add_argument("--genie-budget", choices=("cpu", "smoke"), default="cpu", help="genie: the CPU budget, or a few iterations (a check of the code, not a result)")
    ap.add_argument("--genie-former-seeds", type=int, default=2, help="genie: seeds of the former implementation (the first is compared with the new one)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/speed.py" + "".join(f" --only {s}" for s in args.only or []) + (f" --threads {args.threads}" if args.threads else "")
    command += f" --repeat {args.repeat}" if args.repeat != 7 else ""
    command += f" --genie-budget {args.genie_budget}" if args.genie_budget != "cpu" else ""
    command += f" --genie-former-seeds {args.genie_former_seeds}" if args.genie_former_seeds != 2 else ""
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        result = SECTIONS[name][1](args)
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        results[name] = {"command": command, "machine": cpu_model(), "cores": os.cpu_count(), "load": load, "torch": torch.__version__, "threads": torch.get_num_threads(), "result": result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(results))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
