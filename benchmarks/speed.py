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


SECTIONS = {
    "squant": ("SQuant rounding against one round-to-nearest pass", section_squant, render_squant),
    "quantize": ("the whole quantize call: first in a process and warm, by stage", section_quantize, render_quantize),
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
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/speed.py" + "".join(f" --only {s}" for s in args.only or []) + (f" --threads {args.threads}" if args.threads else "")
    command += f" --repeat {args.repeat}" if args.repeat != 7 else ""
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
