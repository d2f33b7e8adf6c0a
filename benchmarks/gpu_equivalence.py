"""GPU against CPU: the same Genie run on both devices gives the same result up to float noise.

    python benchmarks/gpu_equivalence.py --synthetic out/syn/resnet20_genie_n256_it150_seed0.safetensors

Needs a machine with CUDA (the lent device) and the shared assets (DFQUANT_ASSETS). Three checks,
each run on the CPU and on the GPU of that same machine with the same seed:

1. Genie-D synthesis (ResNet-20): the images after 1, 10 and ``--distill-iters`` steps. One step
   differs only by float rounding (the CPU and cuDNN sum in different orders); the optimization
   then amplifies that, so the later images differ pixel by pixel but reach the same BN loss.
2. Genie-M reconstruction at W4A4 from the same synthetic images (``--synthetic``): the share of
   weight codes that agree, the learned step sizes, and top-1 on the CIFAR-10 images of each result.
3. Determinism on the GPU: synthesis and reconstruction run twice on CUDA with the same seed; and
   a short run of both under ``torch.use_deterministic_algorithms(True)`` (in a child process with
   ``CUBLAS_WORKSPACE_CONFIG`` set), which raises at any op that has no deterministic CUDA kernel.

Writes benchmarks/results/gpu_equivalence.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import dfquant
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz
from dfquant.genie import bn_statistics_loss, synthesize
from dfquant.io.images import load_images
from dfquant.qmodules import QuantConv2d, QuantLinear

RESULTS = Path(__file__).parent / "results" / "gpu_equivalence"


def codes_and_steps(q: torch.nn.Module):
    """Every quantized layer's (weight codes, weight step sizes, activation step) in module order."""
    out = []
    for name, m in q.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            a = m.input_quant.scale.detach().cpu().reshape(1) if m.input_quant is not None else torch.zeros(1)
            out.append((name, m.weight_int.detach().cpu(), m.weight_scale.detach().cpu(), a))
    return out


def compare_models(qa, qb) -> dict:
    la, lb = codes_and_steps(qa), codes_and_steps(qb)
    same = sum(int((a[1] == b[1]).sum()) for a, b in zip(la, lb))
    total = sum(a[1].numel() for a in la)
    differ_by_one = sum(int(((a[1].int() - b[1].int()).abs() == 1).sum()) for a, b in zip(la, lb))
    w_rel = max(float(((a[2] - b[2]).abs() / a[2].abs().clamp_min(1e-12)).max()) for a, b in zip(la, lb))
    a_rel = max(float(((a[3] - b[3]).abs() / a[3].abs().clamp_min(1e-12)).max()) for a, b in zip(la, lb))
    return dict(codes_equal=same / total, codes_off_by_one=differ_by_one / total, n_codes=total, max_rel_weight_step=w_rel, max_rel_act_step=a_rel)


def strict_check(model, synthetic: torch.Tensor) -> str:
    """A short synthesis and reconstruction on CUDA with deterministic algorithms enforced: 'ok' or the error."""
    torch.use_deterministic_algorithms(True)
    try:
        synthesize(model, 16, iters=3, device="cuda", seed=0, progress=False)
        dfquant.quantize(model, "genie", 4, 4, synthetic=synthetic[:64], recon_iters=3, device="cuda", seed=0)
        return "ok"
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--synthetic", required=True, help="synthetic images (safetensors) both reconstructions start from")
    ap.add_argument("--strict-only", action="store_true", help="only the deterministic-algorithms check (run as a child process)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--distill-iters", type=int, default=150)
    ap.add_argument("--recon-iters", type=int, default=500)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: run this on the lent GPU machine")
    model = dfquant.create_model(args.model, weights=str(asset_path(CIFAR_RESNET_WEIGHTS[args.model])))
    if args.strict_only:
        print("STRICT:", strict_check(model, load_images(args.synthetic)), flush=True)
        return
    data = load_cifar10_npz()
    res = {
        "command": f"python benchmarks/gpu_equivalence.py --model {args.model} --synthetic {args.synthetic} "
        f"--samples {args.samples} --distill-iters {args.distill_iters} --recon-iters {args.recon_iters}",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "synthesis": [],
    }

    # 1. synthesis
    for iters in (1, 10, args.distill_iters):
        imgs, times = {}, {}
        for dev in ("cpu", "cuda"):
            t = time.perf_counter()
            imgs[dev] = synthesize(model, 128, iters=iters, device=dev, seed=0, progress=False)
            times[dev] = time.perf_counter() - t
        with torch.no_grad():
            loss = {dev: float(bn_statistics_loss(model, imgs[dev])) for dev in imgs}
        diff = (imgs["cpu"] - imgs["cuda"]).abs()
        row = dict(iters=iters, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), image_std=float(imgs["cpu"].std()),
                   bn_loss_cpu=loss["cpu"], bn_loss_cuda=loss["cuda"], time_cpu_s=times["cpu"], time_cuda_s=times["cuda"])
        res["synthesis"].append(row)
        print("synthesis", json.dumps(row), flush=True)
    again = synthesize(model, 128, iters=args.distill_iters, device="cuda", seed=0, progress=False)
    res["synthesis_cuda_repeat_max_abs_diff"] = float((again - imgs["cuda"]).abs().max())
    print("synthesis on cuda twice, max abs diff", res["synthesis_cuda_repeat_max_abs_diff"], flush=True)
    child = subprocess.run(
        [sys.executable, __file__, "--model", args.model, "--synthetic", args.synthetic, "--strict-only"],
        env={**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, capture_output=True, text=True,
    )
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("STRICT:")]
    res["strict_deterministic_algorithms"] = lines[-1][len("STRICT:"):].strip() if lines else f"failed: {child.stderr.strip()[-300:]}"
    print("strict check:", res["strict_deterministic_algorithms"], flush=True)

    # 2. reconstruction, same images, cpu vs cuda; 3. cuda twice
    synthetic = load_images(args.synthetic)[: args.samples]
    runs = {}
    for key, dev in (("cpu", "cpu"), ("cuda", "cuda"), ("cuda_again", "cuda")):
        t = time.perf_counter()
        q, report = dfquant.quantize(model, "genie", 4, 4, synthetic=synthetic, recon_iters=args.recon_iters, device=dev, seed=0)
        dt = time.perf_counter() - t
        ev = dfquant.evaluate(q, data, reference=model, predictions=True)
        runs[key] = (q, ev)
        res[f"recon_{key}"] = dict(top1=ev["top1"], logit_mse=ev["logit_mse"], agree_top1=ev["agree_top1"], time_s=dt,
                                   reconstruction_s=report.config["genie"].get("reconstruction_time_s"))
        print(key, json.dumps(res[f"recon_{key}"]), flush=True)
    res["cpu_vs_cuda"] = compare_models(runs["cpu"][0], runs["cuda"][0])
    res["cpu_vs_cuda"]["same_prediction"] = sum(a == b for a, b in zip(runs["cpu"][1]["predictions"], runs["cuda"][1]["predictions"])) / len(runs["cpu"][1]["predictions"])
    res["cuda_vs_cuda"] = compare_models(runs["cuda"][0], runs["cuda_again"][0])
    res["cuda_vs_cuda"]["same_prediction"] = sum(a == b for a, b in zip(runs["cuda"][1]["predictions"], runs["cuda_again"][1]["predictions"])) / len(runs["cuda"][1]["predictions"])
    print("cpu_vs_cuda", json.dumps(res["cpu_vs_cuda"]), flush=True)
    print("cuda_vs_cuda", json.dumps(res["cuda_vs_cuda"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))


def to_markdown(res: dict) -> str:
    lines = [
        "# Genie on the GPU against the CPU (same machine, same seed)",
        "",
        f"Command: `{res['command']}`. GPU: {res['gpu']}, torch {res['torch']}, CPU side {res['cpu_threads']} threads.",
        "",
        "## Genie-D synthesis (128 images, seed 0)",
        "",
        "| iterations | max abs pixel diff | mean abs pixel diff | image std | BN loss CPU | BN loss GPU | CPU s | GPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["synthesis"]:
        lines.append(
            f"| {r['iters']} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | {r['image_std']:.3f} | {r['bn_loss_cpu']:.4f} | "
            f"{r['bn_loss_cuda']:.4f} | {r['time_cpu_s']:.1f} | {r['time_cuda_s']:.1f} |"
        )
    lines += [
        "",
        f"The same synthesis run twice on the GPU: max abs pixel difference {res['synthesis_cuda_repeat_max_abs_diff']:.2e}.",
        f"A short synthesis and reconstruction with `torch.use_deterministic_algorithms(True)`: {res['strict_deterministic_algorithms']}.",
        "",
        "## Genie-M reconstruction, W4A4, same synthetic images, seed 0",
        "",
        "| run | top-1 | logit MSE vs FP32 | agreement with FP32 | wall s |",
        "|---|---|---|---|---|",
    ]
    for key in ("cpu", "cuda", "cuda_again"):
        r = res[f"recon_{key}"]
        lines.append(f"| {key} | {r['top1']:.2f} | {r['logit_mse']:.4f} | {r['agree_top1']:.2f} % | {r['time_s']:.1f} |")
    lines += ["", "| pair | codes equal | codes off by one | max rel. weight-step diff | max rel. act-step diff | same prediction |", "|---|---|---|---|---|---|"]
    for key in ("cpu_vs_cuda", "cuda_vs_cuda"):
        r = res[key]
        lines.append(
            f"| {key.replace('_', ' ')} | {100 * r['codes_equal']:.3f} % | {100 * r['codes_off_by_one']:.3f} % | {r['max_rel_weight_step']:.2e} | "
            f"{r['max_rel_act_step']:.2e} | {100 * r['same_prediction']:.2f} % |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
