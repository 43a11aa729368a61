"""SGLang integration: registers the auto_round quantization config with SGLang. Not implemented yet."""
