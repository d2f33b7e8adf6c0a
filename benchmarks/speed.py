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
* ``genie``: Genie W4A4 (Genie-D synthesis + Genie-M reconstruction) on the CIFAR-10 ResNet-20 at the
  CPU budget, the former implementation (``benchmarks/genie_former/``) and the current one in one run:
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


# --- section: genie --------------------------------------------------------------------------

#: ``--genie-budget smoke``: a few iterations, to check the section's code path (not a result).
GENIE_SMOKE = dict(samples=32, distill_iters=3, distill_batch=16, recon_iters=3)


def _genie_run(impl: str, seed: int, budget: dict, model, data) -> dict:
    """One Genie W4A4 quantization of ``model`` by ``impl`` ("new": dfquant.genie; "former": the frozen
    benchmarks/genie_former, swapped into the pipeline's learned step), timed and scored against FP32."""
    import contextlib
    from unittest import mock

    import dfquant.learned as learned

    patch = contextlib.nullcontext()
    if impl == "former":
        sys.path.insert(0, str(HERE))
        import genie_former

        patch = mock.patch.multiple(learned, synthesize=genie_former.synthesize, reconstruct_model=genie_former.reconstruct_model)
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

    sys.path.insert(0, str(HERE))
    import genie_former as former

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
        "`former`: the implementation before issue #21, frozen in `benchmarks/genie_former/` (main's `src/dfquant/genie` at 9d3bcda), swapped",
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
