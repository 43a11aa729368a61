"""Engine integrations (installed as ``quantize.integrations``): transformers, vLLM, SGLang."""
