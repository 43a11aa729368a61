"""Quantization schemes: what one linear layer's weights become."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
DATA_TYPES = ("int",)


@dataclass(frozen=True)
class Scheme:
    """Weight-only integer quantization of one layer. ``group_size == -1``: one group per output row."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size} is not supported; choose one of {SUPPORTED_GROUP_SIZES} (-1 = per channel)"
            )
        if self.data_type not in DATA_TYPES:
            raise ValueError(f"data_type={self.data_type!r} is not supported; choose one of {DATA_TYPES}")

    @property
    def name(self) -> str:
        g = "" if self.group_size == 128 else ("C" if self.group_size == -1 else f"G{self.group_size}")
        return f"W{self.bits}A16{g}" + ("" if self.sym else " asym")

    def to_dict(self) -> dict:
        return asdict(self)


def _preset_schemes() -> dict[str, Scheme]:
    presets = {}
    for bits in SUPPORTED_BITS:
        presets[f"W{bits}A16"] = Scheme(bits, 128)
        for g in (32, 64):
            presets[f"W{bits}A16G{g}"] = Scheme(bits, g)
    return presets


SCHEMES: dict[str, Scheme] = _preset_schemes()


def get_scheme(name: str, **overrides) -> Scheme:
    """A preset scheme by name (case-insensitive), with any field overridden (None means keep)."""
    key = name.upper()
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
