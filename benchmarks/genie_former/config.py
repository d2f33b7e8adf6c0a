"""Every setting of Genie-D (synthesis) and Genie-M (reconstruction), validated once: :class:`GenieConfig`.

The values are the authors' release (``SamsungLabs/Genie``: ``main.py``, ``distill.py``,
``reconstruct.py``) unless a comment says otherwise. ``None`` means "the budget's value":
:data:`GPU_BUDGET` is the paper's, :data:`CPU_BUDGET` a far smaller one for a 2-core CPU (our
choice; its measured effect is in ``benchmarks/README.md``). :meth:`GenieConfig.resolve` fills them
in for a device. The rounding learning rate follows the budget (:func:`lr_round_for`; a deviation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from dfquant.checks import check_bool, check_choice, check_float, check_int, fail, option

#: The paper's budget (release ``main.py``): 1024 images, 20000 iterations per unit, batches of 32.
#: ``None`` synthesis settings: the synthesis method's published values (:data:`DISTILL_DEFAULTS`).
GPU_BUDGET: Dict[str, Optional[int]] = dict(samples=1024, distill_iters=None, distill_batch=None, recon_iters=20000, batch_size=32)

#: Ours, for a 2-core CPU: 256 images in batches of 128 at 150 synthesis iterations, then 500
#: iterations per unit on batches of 32 (40x fewer than the paper); every other setting the release's.
CPU_BUDGET: Dict[str, Optional[int]] = dict(samples=256, distill_iters=150, distill_batch=128, recon_iters=500, batch_size=32)

#: The synthesis methods' published settings: Genie-D (release ``distill.py``) and ZeroQ (Cai et
#: al. 2020, release ``distill_data.py``). Genie's release names its two rates the other way round;
#: these name what they apply to (lr_g: the generator, lr_z: the latents or ZeroQ's pixels).
DISTILL_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "genie": dict(iters=4000, batch_size=128, lr_g=0.01, lr_z=0.1, latent_dim=256, swing=True),
    "zeroq": dict(iters=500, batch_size=32, lr_z=0.5, swing=False),
}

#: The release's rounding learning rate and the iteration count it was set for (see lr_round_for).
RELEASE_LR_ROUND, RELEASE_RECON_ITERS = 1e-3, 20000

#: The largest default rounding learning rate (the rule's value at 200 iterations).
LR_ROUND_CAP = 0.1

BUDGETS = ("auto", "cpu", "gpu")
ACT_CALIB = ("data", "bn")
DATA_METHODS = ("genie", "zeroq")


def lr_round_for(recon_iters: int) -> float:
    """Default Adam lr of the rounding variables: the release's lr x iterations (1e-3 x 20000), at
    most :data:`LR_ROUND_CAP`. Adam moves a parameter by about ``lr`` per step, so this keeps the
    distance each ``V`` may travel over a unit's training equal to the release's (our choice)."""
    return min(LR_ROUND_CAP, RELEASE_LR_ROUND * RELEASE_RECON_ITERS / max(int(recon_iters), 1))


@dataclass(frozen=True)
class GenieConfig:
    """Settings of Genie-D + Genie-M (``method="genie"``) and of the ZeroQ-data baseline (``"zeroq"``)."""

    budget: str = option("auto", "defaults for the settings left unset: gpu = the paper's, cpu = ours for a CPU, auto = by the device", choices=BUDGETS)
    device: str = option("auto", "where synthesis and reconstruction run: auto, cpu, cuda or cuda:K")
    seed: int = option(0, "seed of all randomness (same seed, same model)")
    # Genie-D / ZeroQ synthesis
    samples: Optional[int] = option(None, "number of synthetic images (default: the budget's)")
    distill_iters: Optional[int] = option(None, "synthesis iterations per batch (default: the budget's)")
    distill_batch: Optional[int] = option(None, "images per synthesis batch (default: the budget's)", cli=False)
    lr_g: Optional[float] = option(None, "Genie-D generator Adam lr (default 0.01)", cli=False)
    lr_z: Optional[float] = option(None, "Adam lr of Genie-D's latents (0.1) or ZeroQ's pixels (0.5)", cli=False)
    latent_dim: Optional[int] = option(None, "Genie-D latent size (default 256)", cli=False)
    swing: Optional[bool] = option(None, "swing convolutions during synthesis (default: on for genie, off for zeroq)", cli=False)
    # Genie-M reconstruction
    recon_iters: Optional[int] = option(None, "reconstruction iterations per unit (default: the budget's; 0: none)")
    batch_size: Optional[int] = option(None, "reconstruction batch size (default: the budget's)", cli=False)
    act_calib: Optional[str] = option(None, "activation steps start from a search on the synthetic data (data, default) or from the BN ranges (bn)", choices=ACT_CALIB)
    lr_w_scale: float = option(1e-4, "Adam lr of the weight step sizes (cosine-annealed)", cli=False)
    lr_a_scale: float = option(4e-5, "Adam lr of the activation step sizes (cosine-annealed)", cli=False)
    lr_round: Optional[float] = option(None, "Adam lr of the rounding variables (default: 1e-3 x 20000 / recon-iters, at most 0.1)")
    round_weight: float = option(1.0, "lambda of the rounding regulariser", cli=False)
    beta: Tuple[float, float] = option((20.0, 2.0), "the regulariser exponent's annealing range (start, end)", cli=False)
    warmup: float = option(0.2, "fraction of the iterations before the regulariser starts", cli=False)
    drop_prob: float = option(0.5, "QDrop: probability that an activation keeps its float value", cli=False)
    keep_best: bool = option(False, "restore a unit's start when training raised its error (ours)", cli=False)

    def validate(self) -> "GenieConfig":
        check_choice(self.budget, "budget", BUDGETS)
        if not isinstance(self.device, str):
            raise fail("device", f"device must be a string (auto, cpu, cuda or cuda:K), got {self.device!r}")
        check_int(self.seed, "seed")
        for name, minimum in (("samples", 1), ("distill_iters", 1), ("distill_batch", 1), ("latent_dim", 1), ("recon_iters", 0), ("batch_size", 1)):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, minimum)
        for name in ("lr_g", "lr_z"):
            if getattr(self, name) is not None:
                check_float(getattr(self, name), name, 0.0, lo_open=True)
        if self.swing is not None:
            check_bool(self.swing, "swing")
        if self.act_calib is not None:
            check_choice(self.act_calib, "act_calib", ACT_CALIB)
        for name in ("lr_w_scale", "lr_a_scale", "round_weight"):
            check_float(getattr(self, name), name, 0.0)
        if self.lr_round is not None:
            check_float(self.lr_round, "lr_round", 0.0)
        if not isinstance(self.beta, (tuple, list)) or len(self.beta) != 2:
            raise fail("beta", f"beta must be a pair (start, end), got {self.beta!r}")
        beta = (check_float(self.beta[0], "beta start", 0.0, lo_open=True), check_float(self.beta[1], "beta end", 0.0, lo_open=True))
        check_float(self.warmup, "warmup", 0.0, 1.0)
        check_float(self.drop_prob, "drop_prob", 0.0, 1.0)
        check_bool(self.keep_best, "keep_best")
        return dataclasses.replace(self, beta=beta)

    def resolve(self, device_type: str, method: str = "genie") -> "GenieConfig":
        """The validated config with every budget setting filled in for ``device_type`` ("cpu"/"cuda")
        and the synthesis settings of ``method`` ("genie": Genie-D; "zeroq": ZeroQ's pixels)."""
        cfg = self.validate()
        check_choice(method, "method", DATA_METHODS)
        if method == "zeroq" and (cfg.lr_g is not None or cfg.latent_dim is not None):
            raise fail("lr_g", "lr_g and latent_dim apply only to method='genie' (ZeroQ optimizes the pixels)")
        budget = cfg.budget if cfg.budget != "auto" else ("gpu" if device_type == "cuda" else "cpu")
        base = GPU_BUDGET if budget == "gpu" else CPU_BUDGET
        published = DISTILL_DEFAULTS[method]
        fill: Dict[str, Any] = {k: (getattr(cfg, k) if getattr(cfg, k) is not None else v) for k, v in base.items()}
        fill["distill_iters"] = fill["distill_iters"] if fill["distill_iters"] is not None else published["iters"]
        fill["distill_batch"] = fill["distill_batch"] if fill["distill_batch"] is not None else published["batch_size"]
        for key in ("lr_g", "lr_z", "latent_dim", "swing"):
            if getattr(cfg, key) is None and key in published:
                fill[key] = published[key]
        fill["act_calib"] = cfg.act_calib or "data"
        fill["lr_round"] = cfg.lr_round if cfg.lr_round is not None else lr_round_for(fill["recon_iters"])
        return dataclasses.replace(cfg, budget=budget, **fill)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


GENIE_FIELDS = tuple(f.name for f in dataclasses.fields(GenieConfig))
#: The settings Genie-D / ZeroQ synthesis reads (``dfquant.synthesize`` takes these keywords).
SYNTHESIS_FIELDS = ("budget", "device", "seed", "distill_iters", "distill_batch", "lr_g", "lr_z", "latent_dim", "swing")
