"""The module that replaces nn.Linear for a layer of an FP or activation-quantized auto_round checkpoint
(MXFP4, MXFP8, NVFP4 and their A16 variants, FP8_STATIC: quantize.export.auto_round_fp), ours or Intel's.

On the CPU it emulates the served computation exactly: the weight dequantized once after loading by the
scheme's numerics module (quantize.weight_rules), and the input fake-quantized as the serving kernel
quantizes it (quantize.act_quant: MX dynamic groups, NVFP4 under the stored ``input_global_scale``, FP8 under
the stored ``input_scale``). This is exactly what the tuned model in memory computes, so logits match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantize import act_quant, weight_rules
from quantize.scheme import Scheme


def checkpoint_tensors(scheme: Scheme, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of one layer's tensors in the auto_round FP layout."""
    n, k = out_features, in_features
    rule = weight_rules.rule_name(scheme)
    t = {}
    if scheme.bits == 4:
        t["weight_packed"] = ((n, k // 2), torch.uint8)
    else:
        t["weight"] = ((n, k), torch.float8_e4m3fn)
    if rule == "mx_fp":
        t["weight_scale"] = ((n, k // scheme.group_size), torch.uint8)
    elif rule == "nv_fp":
        t["weight_scale"] = ((n, k // scheme.group_size), torch.float8_e4m3fn)
        t["weight_global_scale"] = ((1,), torch.float32)
        if scheme.quantizes_activations:
            t["input_global_scale"] = ((1,), torch.float32)
    elif rule == "fp8":
        t["weight_scale"] = ((n,), torch.float32)
        if scheme.static_activations:
            t["input_scale"] = ((1,), torch.float32)
    else:
        raise ValueError(f"{scheme.name} has no auto_round FP layout")
    return t


class FPQuantLinear(nn.Module):
    def __init__(self, scheme: Scheme, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = in_features, out_features
        self.tensor_names = tuple(checkpoint_tensors(scheme, in_features, out_features))
        for name, (shape, dt) in checkpoint_tensors(scheme, in_features, out_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        self.dtype = dtype
        self.act = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}"

    def prepare(self) -> None:
        """Dequantize the weight once (exact, in the model's dtype) and set up the input quantization."""
        rule = weight_rules.rule_name(self.scheme)
        data = self.weight_packed if self.scheme.bits == 4 else self._buffers["weight"]
        scales = self.weight_scale
        extra = {k: getattr(self, k).float() for k in ("weight_global_scale", "input_global_scale", "input_scale") if k in self._buffers}
        if rule == "fp8":
            scales = scales.float().reshape(-1, 1)
        w = weight_rules.dequantize(data, scales, torch.zeros(0, dtype=torch.uint8), extra, self.scheme, self.dtype)
        self.register_buffer("k_weight", w, persistent=False)
        self.act = act_quant.quantizer(self.scheme, extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.k_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
