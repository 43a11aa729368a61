"""One table of kernels; the best available one is picked per layer, or forced by name."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quantize.packing import PACKED_TENSORS

log = logging.getLogger("quantize.kernels")


@dataclass(frozen=True)
class LinearSpec:
    """What a kernel must handle: one quantized linear layer's format and shape."""

    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    layout: str  # quantize.packing layout: gptq, auto_round, awq
    in_features: int
    out_features: int
    # The activations' dtype where the loader knows it (the model's dtype): some kernels take only
    # 16-bit activations. None: not known, and such kernels are not picked.
    act_dtype: torch.dtype | None = None

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else self.in_features // self.group_size


# name -> kernel class with static methods: ``unsupported(spec, device)`` (None, or why it cannot run),
# ``prepare(spec, qweight, qzeros, scales) -> dict`` (working tensors derived once after loading) and
# ``apply(spec, state, x, bias)``; ``priority`` (higher wins) orders the candidates.
KERNELS: dict[str, type] = {}
_announced: set[tuple] = set()


def kernel_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``apply`` reads for one layer: its checkpoint tensors, overridden by the tensors the kernel's
    ``prepare`` derived (held as buffers named ``k_<key>``)."""
    state = {name: getattr(module, name) for name in PACKED_TENSORS}
    state.update({k[2:]: t for k, t in module._buffers.items() if k.startswith("k_")})
    return state


def register_kernel(name: str):
    def decorate(cls):
        cls.name = name
        KERNELS[name] = cls
        return cls

    return decorate


def select_kernel(spec: LinearSpec, device: torch.device, force: str | None = None) -> type:
    """The highest-priority kernel that supports ``spec`` on ``device`` (or ``force``, checked)."""
    if force is not None:
        if force not in KERNELS:
            raise ValueError(f"unknown kernel {force!r}; available: {', '.join(KERNELS)}")
        why = KERNELS[force].unsupported(spec, device)
        if why:
            raise ValueError(f"kernel {force!r} cannot run this layer ({spec}): {why}")
        chosen = KERNELS[force]
    else:
        usable = [k for k in KERNELS.values() if k.unsupported(spec, device) is None]
        if not usable:
            reasons = {name: k.unsupported(spec, device) for name, k in KERNELS.items()}
            raise ValueError(f"no kernel runs {spec} on {device}: {reasons}")
        chosen = max(usable, key=lambda k: k.priority)
    key = (chosen.name, device.type, spec.bits, spec.group_size, spec.sym, spec.layout)
    if key not in _announced:
        _announced.add(key)
        log.info("kernel %s for %d-bit g%d %s %s layers on %s", *key[:1], spec.bits, spec.group_size,
                 "sym" if spec.sym else "asym", spec.layout, device.type)
    return chosen
