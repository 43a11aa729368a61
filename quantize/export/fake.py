"""The fake format: every quantized layer's dequantized weight in the model's dtype, a plain model
folder any tool loads (for evaluating the quantized model where no quantized kernel exists)."""

from __future__ import annotations

from pathlib import Path

from quantize.export.hf_folder import write_hf_folder
from quantize.export.registry import exporter
from quantize.export.source import ExportSource


def holds(scheme) -> str | None:
    if scheme.quantizes_activations:
        return (f"fake holds dequantized weights only: the activation quantization of {scheme.name} would be lost; "
                "use llm_compressor or auto_round")
    return None


@exporter("fake", summary="dequantized weights in the original dtype; loads anywhere", holds=holds)
def write_fake(source: ExportSource, folder: Path, option: str | None = None) -> None:
    state = dict(source.tensors)
    state.update({f"{name}.weight": source.dequantized(name) for name in source.layers})
    write_hf_folder(source, folder, state, None)
