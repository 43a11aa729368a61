"""Checkpoint writers, one module per format; importing this package fills the registry."""

from quantize.export import auto_round, awq, compressed_tensors, fake, fp8, gguf, gptq  # noqa: F401  (each registers its exporter)
