"""vLLM plugin (``vllm.general_plugins`` entry point): serves auto_round checkpoints through
quantize.kernels. Not implemented yet; vLLM's built-in "auto-round" handling reads our checkpoints
meanwhile, since they use AutoRound's layout."""
