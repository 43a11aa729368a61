"""Quantization schemes: what one linear layer's weights (and, for some schemes, its input activations) become.

Weight data types (``data_type``, AutoRound 0.16.1's spellings) and the numerics module of each
(``quantize.weight_rules`` dispatches to them):

- ``int``: integer weights with 16-bit activations (``numerics``, the GPTQ-style unsigned codes); with
  quantized activations (``act_bits`` 8 or 4: INT8 W8A8, INT4 W4A4) signed absmax codes per output channel
  (``numerics_int8``).
- ``mx_fp``: MXFP4 / MXFP8 (``numerics_mx``), groups of 32 with a power-of-two E8M0 scale.
- ``nv_fp``: NVFP4 (``numerics_nvfp4``), groups of 16, FP8 group scales and a float32 global scale.
- ``fp``: FP8 E4M3 (``numerics_fp8``); ``group_size`` -1 = per output channel, 0 = per tensor,
  128 = 128x128 blocks (DeepSeek-style FP8_BLOCK).

Activations (``act_bits < 16``): ``act_data_type`` (``int``, ``fp``, ``mx_fp``, ``nv_fp4_with_static_gs``),
``act_group_size`` (-1 per token, 0 per tensor, else channels per group) and ``act_dynamic`` (False: one
calibrated static scale). Every combination is checked here, once; the rest of the code trusts a Scheme.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
DATA_TYPES = ("int", "mx_fp", "nv_fp", "fp")
FP8_BLOCK = 128  # the fp data type's group_size 128 means 128x128 weight blocks
# Activation rules per weight data type: (act_bits, act_data_type, act_group_size, act_dynamic) allowed.
_ACT_RULES = {
    "int": {(8, "int", -1, True), (4, "int", -1, True)},
    "mx_fp": {(4, "mx_fp", 32, True), (8, "mx_fp", 32, True)},
    "nv_fp": {(4, "nv_fp4_with_static_gs", 16, True)},
    "fp": {(8, "fp", 0, False), (8, "fp", 128, True)},
}


@dataclass(frozen=True)
class Scheme:
    """How one layer is quantized. ``group_size == -1``: one group per output row."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16
    act_data_type: str | None = None
    act_group_size: int | None = None
    act_dynamic: bool | None = None

    def __post_init__(self):
        if self.data_type not in DATA_TYPES:
            raise ValueError(f"data_type={self.data_type!r} is not supported; choose one of {DATA_TYPES}")
        try:
            getattr(self, f"_check_{self.data_type}")()
        except ValueError as e:
            raise ValueError(str(e) if self.data_type == "int" else f"data_type={self.data_type!r}: {e}") from None
        if self.act_bits < 16:
            act = (self.act_bits, self.act_data_type, self.act_group_size, self.act_dynamic)
            allowed = _ACT_RULES[self.data_type]
            if act not in allowed:
                raise ValueError(
                    f"activations (act_bits, act_data_type, act_group_size, act_dynamic)={act} are not supported with "
                    f"{self.data_type} weights; supported: {sorted(allowed, key=str)} or act_bits=16"
                )
            if self.data_type in ("int", "mx_fp") and self.act_bits != self.bits:
                raise ValueError(f"{self.data_type} weights of {self.bits} bits take activations of the same width, not {self.act_bits}")
        elif self.act_bits != 16:
            raise ValueError(f"act_bits={self.act_bits} is not supported; 16 (not quantized), or 8/4 where the weights allow")

    def _check_int(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size} is not supported; choose one of {SUPPORTED_GROUP_SIZES} (-1 = per channel)"
            )
        if self.act_bits < 16 and (self.group_size != -1 or not self.sym):
            raise ValueError(f"act_bits={self.act_bits}: integer weights with quantized activations (W8A8, W4A4) are symmetric per "
                             f"channel (group_size -1, sym), not group_size={self.group_size}, sym={self.sym}")

    def _check_mx_fp(self):
        if self.bits not in (4, 8) or self.group_size != 32 or not self.sym:
            raise ValueError(f"mx_fp weights are 4 or 8 bits (FP4 E2M1 / FP8 E4M3), symmetric, in groups of 32; got bits={self.bits}, group_size={self.group_size}, sym={self.sym}")

    def _check_nv_fp(self):
        if self.bits != 4 or self.group_size != 16 or not self.sym:
            raise ValueError(f"nv_fp (NVFP4) weights are 4-bit, symmetric, in groups of 16; got bits={self.bits}, group_size={self.group_size}, sym={self.sym}")

    def _check_fp(self):
        if self.bits != 8 or self.group_size not in (-1, 0, FP8_BLOCK) or not self.sym:
            raise ValueError(f"fp (FP8 E4M3) weights are 8-bit, symmetric, per channel (group_size -1), per tensor (0) or in "
                             f"128x128 blocks (128); got bits={self.bits}, group_size={self.group_size}, sym={self.sym}")

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16

    @property
    def static_activations(self) -> bool:
        """Whether the activations need calibrated statistics: a static scale (FP8_STATIC's input_scale) or a
        static global scale (NVFP4's input_global_scale)."""
        return self.quantizes_activations and (not self.act_dynamic or self.act_data_type.startswith("nv_fp"))

    @property
    def k_multiple(self) -> int | None:
        """What a layer's in_features must be a multiple of (None: any). FP8 weight blocks may be partial, but
        FP8_BLOCK's 1x128 activation groups (vLLM's per-token-group quantization) need whole groups."""
        if self.group_size in (-1, 0) or (self.data_type == "fp" and self.group_size == FP8_BLOCK):
            weights = None
        else:
            weights = self.group_size
        acts = self.act_group_size if self.quantizes_activations and (self.act_group_size or 0) > 0 else None
        if weights and acts:
            return math.lcm(weights, acts)
        return weights or acts

    @property
    def integer_weight_only(self) -> bool:
        """The schemes of the integer formats (auto_gptq, auto_awq, gguf, pack-quantized)."""
        return self.data_type == "int" and not self.quantizes_activations

    @property
    def name(self) -> str:
        if not self.integer_weight_only:
            preset = next((k for k, v in SCHEMES.items() if v == self), None)
            return preset or f"{self.data_type}{self.bits} g{self.group_size} A{self.act_bits}"
        g = "" if self.group_size == 128 else ("C" if self.group_size == -1 else f"G{self.group_size}")
        return f"W{self.bits}A16{g}" + ("" if self.sym else " asym")

    def to_dict(self) -> dict:
        return asdict(self)


def _fp_presets() -> dict[str, Scheme]:
    """The floating-point and activation-quantized presets, as AutoRound 0.16.1 names them (plus the
    weight-only A16 variants compressed-tensors names)."""
    mx4 = Scheme(4, 32, True, "mx_fp")
    mx8 = Scheme(8, 32, True, "mx_fp")
    nv4 = Scheme(4, 16, True, "nv_fp")
    return {
        "MXFP4": replace(mx4, act_bits=4, act_data_type="mx_fp", act_group_size=32, act_dynamic=True),
        "MXFP4A16": mx4,
        "MXFP8": replace(mx8, act_bits=8, act_data_type="mx_fp", act_group_size=32, act_dynamic=True),
        "MXFP8A16": mx8,
        "NVFP4": replace(nv4, act_bits=4, act_data_type="nv_fp4_with_static_gs", act_group_size=16, act_dynamic=True),
        "NVFP4A16": nv4,
        "FP8_STATIC": Scheme(8, -1, True, "fp", 8, "fp", 0, False),
        "FP8_BLOCK": Scheme(8, FP8_BLOCK, True, "fp", 8, "fp", 128, True),
        "FPW8A16": Scheme(8, -1, True, "fp"),
        "INT8": Scheme(8, -1, True, "int", 8, "int", -1, True),
        "INT4": Scheme(4, -1, True, "int", 4, "int", -1, True),
    }


def _preset_schemes() -> dict[str, Scheme]:
    presets = {}
    for bits in SUPPORTED_BITS:
        presets[f"W{bits}A16"] = Scheme(bits, 128)
        for g in (32, 64):
            presets[f"W{bits}A16G{g}"] = Scheme(bits, g)
    return presets


SCHEMES: dict[str, Scheme] = {**_preset_schemes(), **_fp_presets()}
ALIASES = {"INT8_W8A8": "INT8", "W8A8": "INT8", "W4A4": "INT4"}


def get_scheme(name: str, **overrides) -> Scheme:
    """A preset scheme by name (case-insensitive), with any field overridden (None means keep)."""
    key = name.upper()
    key = ALIASES.get(key, key)
    if key not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return replace(SCHEMES[key], **{k: v for k, v in overrides.items() if v is not None})


def match_name(pattern: str, name: str) -> bool:
    """A layer-config key matches a layer by exact name, else as a regular expression searched in the name."""
    if pattern == name:
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False
