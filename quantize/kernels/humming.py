"""humming-kernels (Apache-2.0, ``pip install humming-kernels``; vLLM pins it, so every vLLM install on
CUDA has it): tensor-core GEMMs for 1-8-bit integer weights, compiled at first use with the machine's
nvcc/NVRTC for the exact layer shape and GPU. The candidate for 2/3-bit, 8-bit and asymmetric layers, which
Marlin does not take and our Triton GEMV serves slowly (benchmarks/NOTES.md; its H100 table: W2 2.6x,
W3 2.4x fp16 at batch 1).

Its "standard" weight form is ours with other names: codes packed along K as the same little-endian bit
stream (``quantize.packing.pack_bits``, 3-bit codes straddling words alike), ``[N, K*b/32]``; scales
``[N, G]`` in the activation dtype; zero points as stored (no GPTQ ``-1``) packed along N,
``[N*b/32, G]``; sym layers carry no zero point (humming subtracts ``2**(b-1)``, our sym zero). One group
per row (``group_size -1``) is its "channel" scale (group size 0). ``prepare`` builds that form from any of
our layouts and lets humming pad and reorder it once; ``apply`` calls its ``humming::humming_gemm``
operator (a torch custom op with a fake implementation: torch.compile and CUDA graphs take it).
"""

from __future__ import annotations

import json

import torch

from quantize.kernels.dispatch import LinearSpec, register_kernel
from quantize.packing import PackedLinear, pack_bits, unpack

BITS = (2, 3, 4, 8)
ACT_DTYPES = (torch.bfloat16, torch.float16)
# vLLM pads humming layers this way (its kernels tile N by up to 256 and K by 128).
PAD_N, PAD_K = 256, 128
COMPUTE = json.dumps({"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"})
LOCKS = 1024  # int32 counters humming's split-K reduction uses (and leaves at zero), per layer as in vLLM

# Per spec (the layer description depends on the shape, bits, group and dtype only): the description
# humming's operator takes, and the compiled kernels' table it resolves that to (compiled in ``prepare``,
# so that no compilation happens on the first call, inside a CUDA-graph capture say).
_LAYER_CONFIGS: dict[LinearSpec, tuple[str, torch.Tensor]] = {}


def humming_unavailable() -> str | None:
    try:
        import humming  # noqa: F401
    except ImportError as e:
        return f"humming-kernels is not importable ({e}); pip install humming-kernels"
    return None


def standard_tensors(spec: LinearSpec, packed: PackedLinear) -> dict[str, torch.Tensor]:
    """A layer's checkpoint tensors in humming's standard form (names ``weight``, ``weight_scale``,
    ``zero_point``), with the scales in the activation dtype."""
    q, scales, zeros = unpack(spec.layout, packed, spec.bits, spec.in_features, spec.out_features)
    tensors = {"weight": pack_bits(q, spec.bits), "weight_scale": scales.to(spec.act_dtype)}
    if not spec.sym:
        tensors["zero_point"] = pack_bits(zeros.t(), spec.bits).t().contiguous()
    return tensors


def weight_config(spec: LinearSpec) -> dict:
    return {"quant_method": "humming", "dtype": f"uint{spec.bits}",
            "group_size": 0 if spec.group_size == -1 else spec.group_size, "has_zero_point": not spec.sym}


@register_kernel("humming")
class HummingKernel:
    priority = 30

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs a CUDA device"
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (7, 5):
            return "needs compute capability 7.5 or newer"
        if spec.bits not in BITS:
            return f"{spec.bits}-bit weights (supported: {', '.join(map(str, BITS))})"
        if spec.act_dtype not in ACT_DTYPES:
            return f"takes bfloat16/float16 models only (this one: {spec.act_dtype})"
        if (spec.out_features * spec.bits) % 32 or (spec.in_features * spec.bits) % 32:
            return "in/out features times bits must fill whole 32-bit words"
        return humming_unavailable()

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        from humming.layer import HummingLayerMethod
        from humming.schema import BaseWeightSchema, HummingInputSchema

        holder = torch.nn.Module()
        for name, t in standard_tensors(spec, PackedLinear(qweight, qzeros, scales)).items():
            holder.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        meta = HummingLayerMethod.prepare_layer_meta(
            holder, shape_n=spec.out_features, shape_k=spec.in_features,
            weight_schema=BaseWeightSchema.from_config(weight_config(spec)),
            input_schema=HummingInputSchema(), pad_n_to_multiple=PAD_N, pad_k_to_multiple=PAD_K,
            torch_dtype=spec.act_dtype,
        )
        HummingLayerMethod.transform_humming_layer(holder)
        if spec not in _LAYER_CONFIGS:
            from humming.kernel.humming import HummingKernel as Compiled

            _LAYER_CONFIGS[spec] = meta.to_str(), Compiled.prepare_kernels(meta.to_str(), COMPUTE, None)
        # humming's forms replace the checkpoint tensors: an engine then holds one copy of the weights
        empty = torch.empty(0, dtype=torch.int32, device=qweight.device)
        return {"qweight": holder.weight.data, "scales": holder.weight_scale.data,
                "qzeros": holder.zero_point.data if not spec.sym else empty,
                "locks": torch.zeros(LOCKS, dtype=torch.int32, device=qweight.device)}

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(spec.act_dtype)
        zero_point = state["qzeros"] if not spec.sym else None
        layer_config, kernels = _LAYER_CONFIGS[spec]
        tensors = (x2, state["qweight"], None, None, state["scales"], zero_point, None, None, None, None, None, None,
                   state["locks"], 1, 0)
        if torch.compiler.is_compiling():  # humming's operator, which torch.compile can trace
            y = torch.ops.humming.humming_gemm(layer_config, COMPUTE, None, *tensors)
        else:  # its launcher directly: the operator's Python dispatch costs ~50 us a call (H200), over the kernel
            y = torch.ops.humming.launch_kernel(kernels, *tensors)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], spec.out_features)
