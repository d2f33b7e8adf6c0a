"""The settings of one quantization run, :class:`QuantConfig`, validated once and saved with the model.

Every method's own settings live beside it (Genie's in :class:`dfquant.genie.GenieConfig`, DF-MPC's
compensation step's in :class:`dfquant.dfmpc.DfmpcConfig`); this config holds what all methods
share: bits, grids, which inputs are quantized and how their ranges are set (the paper protocols'
choices are the defaults), the DFQ steps. ``validate()`` returns the config with its defaults
resolved; errors name the parameter (the CLI names its flag instead).

``a_bits`` is 4 in a ``QuantConfig`` built by hand; :func:`dfquant.quantize`'s keyword default
resolves per method (:func:`default_a_bits`): weight-only for ``dfmpc`` (the paper's protocol).
:data:`CONFIG_VERSION` is saved with every model; files without it (version 1) load unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .activation_ranges import SQUANT_NOISE_S
from .checks import check_bits, check_bool, check_choice, check_float, check_int, check_range, fail, option
from .quantizer import W_GRID_CHOICES, WEIGHT_RANGES, grid_for_bits

#: Version of the saved config's layout (1: before it carried a version).
CONFIG_VERSION = 2

#: Methods that decide each weight's rounding from the weight alone (no data, no training).
ROUNDING_METHODS = ("rtn", "squant-e", "squant-k", "squant-c", "squant")
#: Methods that start from a rounding and then learn on synthetic images (dfquant.genie).
LEARNED_METHODS = ("genie", "zeroq")
#: DF-MPC (Chen et al. 2023): the paper's per-tensor grids, mixed-precision pairs and compensation.
DFMPC_METHOD = "dfmpc"
METHODS = ROUNDING_METHODS + (DFMPC_METHOD,) + LEARNED_METHODS

ACT_RANGES = ("dfq", "mse", "squant")
INITS = ("rtn", "squant")
#: Whose protocol a run follows. dfquant's (the default); the SQuant paper's (Guo et al. 2022, Sec. 5:
#: every weight at w_bits, image input float, classifier input 8 bits) with its authors' activation
#: rule; the Genie release's (SamsungLabs/Genie, ``reconstruct.py`` ``quantize_model``, which follows
#: BRECQ: first conv and classifier at 8-bit weights, image input float, the second layer's and the
#: classifier's inputs at 8 bits, residual shortcuts quantized with the block input's quantizer).
PROTOCOLS = ("dfquant", "squant", "genie")
#: What a protocol fixes; keyword calls get these values unless they give the field, a whole
#: QuantConfig must hold them. The activation fields apply only when activations are quantized
#: (a_bits set); :data:`WEIGHT_PROTOCOL_FIELDS` always.
PROTOCOL_SETTINGS = {
    "squant": dict(act_range="squant", first_last_w_bits=None, quantize_first_input=False, last_input_bits=8, second_input_bits=None, quantize_shortcuts=False),
    "genie": dict(first_last_w_bits=8, quantize_first_input=False, last_input_bits=8, second_input_bits=8, quantize_shortcuts=True),
}
#: The fields of a protocol's settings that concern weights (fixed even for weight-only runs).
WEIGHT_PROTOCOL_FIELDS = ("first_last_w_bits",)


def protocol_settings(protocol: "Optional[str]", a_bits: "Optional[int]") -> Dict[str, Any]:
    """What ``protocol`` fixes for a run with ``a_bits`` activation bits (None: weight-only)."""
    fixed = PROTOCOL_SETTINGS.get(protocol or "dfquant", {})
    return {k: v for k, v in fixed.items() if a_bits is not None or k in WEIGHT_PROTOCOL_FIELDS}


def default_a_bits(method: str) -> "Optional[int]":
    """``quantize``'s activation bits when the caller gives none: weight-only (None) for dfmpc, whose
    paper quantizes weights only (Sec. 5.1: "FP32 activations"); 4 for every other method."""
    return None if method == DFMPC_METHOD else 4


@dataclass(frozen=True)
class QuantConfig:
    """Every setting a quantization run shares across methods (saved with the model)."""

    method: str = option("squant", "quantization method", choices=METHODS)
    protocol: str = option(
        "dfquant",
        "whose protocol: dfquant (BN-statistics activation ranges), squant (the SQuant paper's: every weight at w_bits, "
        "image input float, classifier input 8 bits, the authors' noise rule act_range squant) or genie (the Genie release's: "
        "first and last weights at 8 bits, the second layer's and the classifier's inputs at 8 bits, residual shortcuts quantized)",
        choices=PROTOCOLS,
    )
    w_bits: int = option(4, "weight bit-width, 2..8")
    a_bits: Optional[int] = option(4, "activation bit-width 2..8, or none for weight-only (quantize's default: none for dfmpc)")
    squant_kernel: bool = option(True, "SQuant's kernel (K) level, on unless --no-kernel", flag="--no-kernel")
    squant_channel: bool = option(True, "SQuant's output-channel (C) level, on unless --no-channel", flag="--no-channel")
    fold_bn: bool = option(False, "fold BatchNorm into the preceding conv before quantizing (SQuant's protocol keeps it)")
    act_range: str = option(
        "dfq",
        "activation range rule: dfq (BN statistics, beta + n*gamma), mse (BN statistics, MSE-optimal clip) or squant "
        "(the SQuant authors' rule: alpha = s*std of each input on one batch of uniform noise)",
        choices=ACT_RANGES,
    )
    n_sigma: Optional[float] = option(None, "dfq rule: n in beta + n*gamma (default per bit-width)")
    noise_s: Optional[float] = option(None, "squant rule: s in alpha = s*std (default the authors': 12 at 4 bits, 14 at 6, 25 at 8)")
    noise_seed: int = option(0, "squant rule: seed of the uniform-noise batch")
    quantize_first_input: bool = option(False, "also quantize the image input (its range from the model's input scaling of valid pixels)")
    first_input_bits: int = option(8, "bits of the image input when it is quantized", cli=False)
    input_range: Optional[Tuple[float, float]] = option(None, "the image input's range (lo, hi), needed to quantize it", cli=False)
    last_input_bits: Optional[int] = option(8, "bits of the classifier's input (none: the same as a_bits)")
    second_input_bits: Optional[int] = option(None, "bits of the second layer's input (none: a_bits; the Genie release's protocol: 8, as BRECQ)")
    quantize_shortcuts: bool = option(
        False,
        "quantize every residual shortcut with its block input's quantizer, so the residual add receives the quantized block "
        "input (the Genie release's protocol); layers reading one tensor share one input quantizer",
    )
    first_last_w_bits: Optional[int] = option(None, "weight bits of the first and last layers (none: w_bits)", cli=False)
    layer_w_bits: Dict[str, int] = option({}, "weight bit-width of single layers by name, overriding w_bits", flag="--layer-bits")
    per_channel: bool = option(True, "one weight scale per output channel, unless --per-tensor: one per layer (DFQ's protocol); min/max and lp grids", flag="--per-tensor")
    w_range: Optional[str] = option(None, "weight grid: minmax (SQuant's), lp (Genie's clipping search) or symmetric (zero point 0: integer runtimes' fast kernels); default lp for genie/zeroq", choices=WEIGHT_RANGES)
    w_grid: Optional[str] = option(
        None,
        "per-tensor weight grid of DF-MPC's paper instead of w_range's (rounding methods): twn (ternary, 2 bits), dorefa, "
        "or paper (twn at 2 bits, dorefa above; dfmpc's default)",
        choices=W_GRID_CHOICES,
    )
    skip: Tuple[str, ...] = option((), "layers to leave in float")
    init: str = option("rtn", "learned methods: the rounding they start from", choices=INITS)
    cle: bool = option(False, "DFQ cross-layer range equalization of the float model first (rounding methods)")
    bias_correction: bool = option(False, "DFQ analytic bias correction from BN statistics (rounding methods)")
    relu6_to_relu: bool = option(False, "replace ReLU6 by ReLU first, as DFQ does for MobileNetV2 (changes the float model)")
    int32_bias: bool = option(False, "round biases to the int32 accumulator grid integer kernels use (the evaluated model is the deployed one)")

    def validate(self) -> "QuantConfig":
        """This config with its defaults resolved, or a :class:`DfquantError` naming the bad parameter."""
        check_choice(self.method, "method", METHODS)
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        for name in ("first_input_bits", "last_input_bits", "second_input_bits", "first_last_w_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        for name in ("squant_kernel", "squant_channel", "fold_bn", "quantize_first_input", "per_channel", "cle", "bias_correction", "relu6_to_relu", "int32_bias", "quantize_shortcuts"):
            check_bool(getattr(self, name), name)
        if isinstance(self.skip, str):
            raise fail("skip", f"skip must be a list of layer names, got the string {self.skip!r} (write skip=({self.skip!r},))")
        if self.n_sigma is not None:
            check_float(self.n_sigma, "n_sigma", 0.0, lo_open=True)
        if self.noise_s is not None:
            check_float(self.noise_s, "noise_s", 0.0, lo_open=True)
        check_int(self.noise_seed, "noise_seed")
        rng = check_range(self.input_range, "input_range") if self.input_range is not None else None
        if not isinstance(self.layer_w_bits, dict):
            raise fail("layer_w_bits", f"layer_w_bits must map layer names to bit-widths, got {type(self.layer_w_bits).__name__}")
        for layer, bits in self.layer_w_bits.items():
            check_bits(bits, f"the weight bit-width of layer {layer!r}")
        check_choice(self.act_range, "act_range", ACT_RANGES)
        check_choice(self.protocol, "protocol", PROTOCOLS)
        w_grid = self.w_grid if self.w_grid is not None else ("paper" if self.method == DFMPC_METHOD else None)
        if w_grid is not None:
            check_choice(w_grid, "w_grid", W_GRID_CHOICES)
        w_range = self.w_range if self.w_range is not None else ("lp" if self.method in LEARNED_METHODS else None if w_grid else "minmax")
        if w_range is not None:
            check_choice(w_range, "w_range", WEIGHT_RANGES)
        check_choice(self.init, "init", INITS)
        self._check_combinations()
        self._check_grid(w_grid)
        return dataclasses.replace(self, w_range=w_range, w_grid=w_grid, skip=tuple(self.skip), layer_w_bits=dict(self.layer_w_bits), input_range=rng)

    def _check_grid(self, w_grid: Optional[str]) -> None:
        """``w_grid`` replaces the min/max and lp grids, so their settings are refused beside it."""
        if w_grid is None:
            return
        if self.method in LEARNED_METHODS:
            raise fail("w_grid", f"w_grid sets the grid of the rounding methods and dfmpc; {self.method!r} learns its step sizes from an lp grid")
        if self.w_range is not None:
            raise fail("w_range", f"w_range chooses the per-channel min/max, lp or symmetric grid, which w_grid={w_grid!r} replaces: give one")
        if not self.per_channel:
            raise fail("per_channel", f"per_channel: the grids of w_grid={w_grid!r} have one scale per layer already; drop the per-tensor request")
        if w_grid == "twn":
            bits = {self.w_bits, *(b for b in (self.first_last_w_bits,) if b is not None), *self.layer_w_bits.values()}
            if bits != {2}:
                raise fail("w_grid", f"w_grid='twn' is ternary (2 bits), but the config gives {sorted(bits)} bits; w_grid='paper' uses dorefa above 2 bits")

    def layer_grid(self, bits: int) -> Optional[str]:
        """The per-tensor grid (twn / dorefa) of a layer of ``bits`` bits, or None: ``w_range``'s grid."""
        return grid_for_bits(self.w_grid, bits)

    def _check_combinations(self) -> None:
        """Settings a method would silently ignore are refused: the model would not be the one asked for."""
        for name in ("cle", "bias_correction", "relu6_to_relu"):
            if getattr(self, name) and self.method in LEARNED_METHODS:
                raise fail(name, f"{name} is a DFQ step for the rounding methods ({', '.join(ROUNDING_METHODS)}), not for {self.method!r}")
        if self.protocol == "squant" and self.method in LEARNED_METHODS:
            raise fail("protocol", f"protocol='squant' is the SQuant paper's protocol for the rounding methods; {self.method!r} runs under 'dfquant' or 'genie'")
        for name, value in protocol_settings(self.protocol, self.a_bits).items():
            if getattr(self, name) != value:
                raise fail(name, f"protocol={self.protocol!r} fixes {name}={value!r}, got {getattr(self, name)!r}: use protocol='dfquant' to change it")
        if self.init != "rtn" and self.method not in LEARNED_METHODS:
            raise fail("init", f"init={self.init!r} applies to the learned methods ({', '.join(LEARNED_METHODS)}) only, not to {self.method!r}")
        if self.a_bits is None:
            unsets = (("n_sigma", None), ("act_range", "dfq"), ("noise_s", None), ("noise_seed", 0), ("quantize_first_input", False), ("input_range", None), ("second_input_bits", None), ("quantize_shortcuts", False))
            for name, unset in unsets:
                if getattr(self, name) != unset:
                    raise fail(name, f"{name} sets how activations are quantized, but a_bits=None quantizes none (weight-only)")
        if self.n_sigma is not None and self.act_range != "dfq":
            raise fail("n_sigma", f"n_sigma is the n of the dfq range rule (beta + n*gamma); act_range={self.act_range!r} does not use it")
        for name, unset in (("noise_s", None), ("noise_seed", 0)):
            if getattr(self, name) != unset and self.act_range != "squant":
                raise fail(name, f"{name} belongs to the squant activation range rule; act_range={self.act_range!r} does not use it")
        if self.act_range == "squant" and self.noise_s is None and self.a_bits is not None and self.a_bits not in SQUANT_NOISE_S:
            have = ", ".join(f"{b} bits: {v:g}" for b, v in SQUANT_NOISE_S.items())
            raise fail("noise_s", f"the SQuant authors give s only for 4-, 6- and 8-bit activations ({have}): give noise_s for a_bits={self.a_bits}")
        if self.input_range is not None and not self.quantize_first_input:
            raise fail("input_range", "input_range is the image's range for quantize_first_input=True; the image input stays float otherwise")
        if not (self.squant_kernel and self.squant_channel) and self.method != "squant":
            raise fail(
                "squant_kernel",
                f"squant_kernel/squant_channel switch SQuant's levels of method 'squant' only, not of {self.method!r} "
                "(the levels have their own methods: squant-e, squant-k, squant-c)",
            )

    @property
    def rounding(self) -> str:
        """The rounding method that sets the codes (for a learned method: its start; for dfmpc: rtn,
        which on the paper's grids is their own rule, TWN's threshold and DoReFa's nearest level)."""
        if self.method == DFMPC_METHOD:
            return "rtn"
        if self.method in ROUNDING_METHODS:
            if self.method == "squant" and not (self.squant_kernel and self.squant_channel):
                return {(True, False): "squant-k", (False, True): "squant-c", (False, False): "squant-e"}[(self.squant_kernel, self.squant_channel)]
            return self.method
        return self.init

    def to_dict(self) -> Dict[str, Any]:
        """The saved form: every field and the layout's version."""
        return dict({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, config_version=CONFIG_VERSION)


QUANT_FIELDS = tuple(f.name for f in dataclasses.fields(QuantConfig))
