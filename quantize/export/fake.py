"""The fake format: every quantized layer's dequantized weight in the model's dtype, a plain model
folder any tool loads (for evaluating the quantized model where no quantized kernel exists)."""

from __future__ import annotations

from pathlib import Path

from quantize.export.hf_folder import write_hf_folder
from quantize.export.registry import exporter
from quantize.export.source import ExportSource


@exporter("fake", summary="dequantized weights in the original dtype; loads anywhere")
def write_fake(source: ExportSource, folder: Path, option: str | None = None) -> None:
    state = dict(source.tensors)
    state.update({f"{name}.weight": source.dequantized(name) for name in source.layers})
    write_hf_folder(source, folder, state, None)
