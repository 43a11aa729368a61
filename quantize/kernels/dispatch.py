"""One table of kernels; the best available one is picked per layer, or forced by name."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quantize.packing import PACKED_TENSORS
from quantize.scheme import Scheme

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


@dataclass(frozen=True)
class FPLinearSpec:
    """A floating-point or activation-quantized layer in the auto_round FP layout (quantize.fp_layout):
    its scheme and shape. Kernels for it declare ``spec_type = FPLinearSpec``; their ``prepare`` takes the
    layer's checkpoint tensors as a list of fused parts (one per q/k/v or gate/up slice in an engine's merged
    layer, each a dict by checkpoint name) instead of the packed triple."""

    scheme: Scheme
    in_features: int
    out_features: int
    act_dtype: torch.dtype | None = None


# name -> kernel class with static methods: ``unsupported(spec, device)`` (None, or why it cannot run),
# ``prepare(spec, qweight, qzeros, scales) -> dict`` (working tensors derived once after loading) and
# ``apply(spec, state, x, bias)``; ``priority`` (higher wins) orders the candidates; ``spec_type``
# (default LinearSpec) says which layers it computes.
KERNELS: dict[str, type] = {}
_announced: set[tuple] = set()


def kernel_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``apply`` reads for one layer: its checkpoint tensors, overridden by the tensors the kernel's
    ``prepare`` derived (held as buffers named ``k_<key>``)."""
    state = {name: getattr(module, name) for name in PACKED_TENSORS if hasattr(module, name)}
    state.update({k[2:]: t for k, t in module._buffers.items() if k.startswith("k_")})
    return state


def register_kernel(name: str):
    def decorate(cls):
        cls.name = name
        KERNELS[name] = cls
        return cls

    return decorate


def _why_not(kernel: type, spec: LinearSpec | FPLinearSpec, device: torch.device) -> str | None:
    if not isinstance(spec, getattr(kernel, "spec_type", LinearSpec)):
        return "computes integer layers" if isinstance(spec, FPLinearSpec) else "computes FP layers"
    return kernel.unsupported(spec, device)


def _describe(spec: LinearSpec | FPLinearSpec) -> str:
    if isinstance(spec, FPLinearSpec):
        return f"{spec.scheme.name}"
    return f"{spec.bits}-bit g{spec.group_size} {'sym' if spec.sym else 'asym'} {spec.layout}"


def select_kernel(spec: LinearSpec | FPLinearSpec, device: torch.device, force: str | None = None) -> type:
    """The highest-priority kernel that supports ``spec`` on ``device`` (or ``force``, checked). A forced
    kernel applies to the kind of layer it computes (integer or FP): the others of a mixed checkpoint are
    picked as usual."""
    if force is not None and force not in KERNELS:
        raise ValueError(f"unknown kernel {force!r}; available: {', '.join(KERNELS)}")
    if force is not None and isinstance(spec, getattr(KERNELS[force], "spec_type", LinearSpec)):
        why = _why_not(KERNELS[force], spec, device)
        if why:
            raise ValueError(f"kernel {force!r} cannot run this layer ({spec}): {why}")
        chosen = KERNELS[force]
    else:
        usable = [k for k in KERNELS.values() if _why_not(k, spec, device) is None]
        if not usable:
            reasons = {name: _why_not(k, spec, device) for name, k in KERNELS.items()}
            raise ValueError(f"no kernel runs {spec} on {device}: {reasons}")
        chosen = max(usable, key=lambda k: k.priority)
    key = (chosen.name, device.type, _describe(spec))
    if key not in _announced:
        _announced.add(key)
        log.info("kernel %s for %s layers on %s", chosen.name, key[2], device.type)
    return chosen
