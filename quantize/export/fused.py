"""Projections that serving engines fuse into one layer.

vLLM (and SGLang) load q/k/v and gate/up as one matrix, so a per-layer setting (another bit width, or
staying unquantized) only reaches the fused layer when every shard has it: configs must name the fused
layer as well, and a setting that differs between shards cannot be served.
"""

from __future__ import annotations

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_groups(names) -> dict[str, list[str]]:
    """``parent.fused_name`` -> the full names of its shards present in ``names``."""
    present = set(names)
    groups = {}
    for name in sorted(present):
        parent, _, child = name.rpartition(".")
        for fused, shards in FUSED.items():
            if child in shards:
                groups.setdefault(f"{parent}.{fused}", [f"{parent}.{s}" for s in shards if f"{parent}.{s}" in present])
    return groups
