"""The auto_awq format: AutoAWQ's GEMM checkpoint (``quant_method: "awq"``, ``version: "gemm"``).

AWQ holds 4-bit weights with one group size and a zero point per group (a symmetric layer is the zero
point ``8``). Any other layer (another bit width or group size) is stored as its dequantized weight, in
the model's dtype, and listed in ``modules_to_not_convert``: the served weights are still exactly ours.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantize.export.fused import fused_groups
from quantize.export.hf_folder import write_hf_folder
from quantize.export.registry import ExportError, exporter
from quantize.export.source import ExportSource
from quantize.packing import layout_fits, pack


def awq_group_size(source: ExportSource) -> int | None:
    sizes = Counter(w.scheme.group_size for w in source.layers.values() if w.scheme.bits == 4 and w.scheme.group_size != -1)
    return sizes.most_common(1)[0][0] if sizes else None


def awq_layers(source: ExportSource, group_size: int) -> list[str]:
    """The quantized block layers AWQ can hold; a fused group (q/k/v, gate/up) only if all its shards fit."""
    def fits(name: str) -> bool:
        w = source.layers.get(name)
        if w is None or not source.in_block(name):
            return False
        n, k = source.linear_shapes[name]
        return w.scheme.bits == 4 and w.scheme.group_size == group_size and layout_fits("awq", 4, k, n) is None

    ok = {name for name in source.layers if fits(name)}
    for shards in fused_groups(source.linear_shapes).values():
        if not all(s in ok for s in shards):
            ok -= set(shards)
    return sorted(ok)


@exporter("auto_awq", summary="AWQ GEMM layout, 4-bit; other layers stored dequantized in modules_to_not_convert")
def write_awq(source: ExportSource, folder: Path, option: str | None = None) -> None:
    group_size = awq_group_size(source)
    converted = awq_layers(source, group_size) if group_size else []
    if not converted:
        raise ExportError(
            "no layer can be stored as AWQ: it holds 4-bit layers with a group size (32, 64 or 128) only; "
            "quantize with --bits 4 and a group size, or export auto_gptq / llm_compressor"
        )
    state = dict(source.tensors)
    for name in source.layers:
        if name in converted:
            w = source.layers[name]
            packed = pack("awq", w.q, w.scales, w.zeros, 4)
            state.update({f"{name}.qweight": packed.qweight, f"{name}.qzeros": packed.qzeros, f"{name}.scales": packed.scales})
        else:
            state[f"{name}.weight"] = source.dequantized(name)
    config = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "modules_to_not_convert": sorted(n for n in source.linear_shapes if n not in converted),
    }
    write_hf_folder(source, folder, state, config)
