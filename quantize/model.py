"""Loading causal LMs and finding the decoder blocks that SignRound tunes one at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Where known decoder-only families keep their blocks (dotted paths from the CausalLM module).
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")
SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, Phi-3, OPT and other decoder-only models whose blocks sit in a ModuleList"


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix; the CLI prints it and exits 2."""


@dataclass
class Blocks:
    prefix: str  # e.g. "model.layers"
    modules: nn.ModuleList

    def name(self, i: int) -> str:
        return f"{self.prefix}.{i}"


def compute_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    # On the CPU activations and master weights stay float32; bf16 comes in through autocast (default_amp).
    return model_dtype if device.type == "cuda" else torch.float32


def cpu_bf16_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices faster than float32: AMX tiles or AVX512_BF16 (an AMX Xeon:
    ~4x). AVX2-only CPUs have no bf16 arithmetic and run bf16 matmuls far slower than float32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def default_amp(device: torch.device) -> bool:
    """bf16 autocast for tuning: on CUDA, and on CPUs with bf16 matrix instructions."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_fast())


def uses_amp(requested: bool | None, device: torch.device) -> bool:
    """Whether tuning autocasts to bf16: ``requested`` (``TuneConfig.amp``, ``--amp/--no-amp``) when set."""
    return default_amp(device) if requested is None else requested


def describe_compute(device: torch.device, amp: bool) -> str:
    """The run header's word on how tuning computes, and why."""
    if device.type != "cpu":
        return "bf16 autocast" if amp else "float32"
    if amp:
        return "bf16 autocast, float32 master weights" + (" (this CPU has bf16 matrix instructions)" if cpu_bf16_fast() else " (--amp)")
    return "float32" + (" (no bf16 matrix instructions on this CPU)" if not cpu_bf16_fast() else " (--no-amp)")


def resolve_model_path(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None). Local paths are checked here, with a clear error;
    a hub id stays an id for transformers to fetch, unless ModelScope is chosen (quantize.hub)."""
    local = local_model_path(spec)
    if local is not None:
        return local
    from quantize import hub

    where = hub.resolve(spec, "model")
    return (spec, None) if where == spec else resolve_model_path(where)


def local_model_path(spec: str) -> tuple[str, str | None] | None:
    """:func:`resolve_model_path` of a local path (a clear error if it holds no model), None for a hub id:
    the CLI checks this before it prints anything or loads data."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return str(path), ggufs[0].name
        raise UserError(f"{path} has neither a config.json nor a .gguf file: point at a Hugging Face model folder")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec!r} does not exist: check the path, or pass a hub id like 'org/name'")
    return None


def load_model(spec: str, dtype: torch.dtype | None = None):
    """Load a causal LM and its tokenizer from a folder, a .gguf file or a hub id. Stays on the CPU;
    the weights keep the checkpoint's dtype unless ``dtype`` is given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantize.requires import GGUF, LOADERS, require

    where, gguf = resolve_model_path(spec)
    if gguf:
        require(*GGUF, f"reading {gguf}")
    elif Path(where).is_dir():
        from quantize.shards import check_shards

        check_shards(Path(where))
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as e:
        if not Path(where).exists():
            raise UserError(
                f"could not fetch {where!r} from the Hugging Face hub ({e.__class__.__name__}); "
                "without network access, download the model elsewhere and pass its local folder"
            ) from e
        raise UserError(f"could not read the model config in {where}: {e}") from e
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{config.model_type} is an encoder-decoder model; supported: {SUPPORTED_FAMILIES}")
    method = (getattr(config, "quantization_config", None) or {}).get("quant_method")
    for package in LOADERS.get(method, ()):
        require(*package, f"loading the {method} checkpoint {spec}")
    from quantize.vlm import is_vlm, prepare_text_only

    auto = AutoModelForCausalLM
    if is_vlm(config):  # only the language model's blocks are quantized (quantize.vlm)
        from transformers import AutoModelForImageTextToText as auto
    try:
        model = auto.from_pretrained(where, config=config, dtype=dtype or "auto", **kwargs)  # read once (a GGUF parse is seconds)
    except ValueError as e:
        raise UserError(f"{config.model_type} is not a causal LM transformers can load: {e}. Supported: {SUPPORTED_FAMILIES}") from e
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if gguf and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantizes GGUF weights on load but keeps the model flagged "quantized", which
        # blocks dtype changes and saving; the weights are plain tensors now.
        model.hf_quantizer.remove_quantization_config(model)
    from quantize.moe import unfuse_experts

    unfuse_experts(model)  # MoE experts as per-expert nn.Linear layers (quantize.moe)
    prepare_text_only(model)  # Mllama's cross-attention layers without an image (quantize.vlm)
    model.eval()
    return model, tokenizer


def find_blocks(model: nn.Module) -> Blocks:
    for path in BLOCK_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) and linear_layers(module[0]):
            return Blocks(path, module)
    raise UserError(
        f"cannot find the decoder blocks of {type(model).__name__}: expected a ModuleList of blocks with "
        f"nn.Linear layers at one of {', '.join(BLOCK_PATHS)}. Supported: {SUPPORTED_FAMILIES}"
    )


def final_norm(model: nn.Module, blocks: Blocks) -> nn.Module | None:
    """The norm between the last block and the output projection (lm_head), or None where the model has
    none under a name we know."""
    parent = model.get_submodule(blocks.prefix.rpartition(".")[0]) if "." in blocks.prefix else model
    for attr in ("norm", "final_layer_norm", "ln_f", "final_norm"):
        if isinstance(getattr(parent, attr, None), nn.Module):
            return getattr(parent, attr)
    return None


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"weight {name} contains NaN or inf: the model is corrupted; re-download or re-export it")


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: Blocks, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
    inputs: list[dict] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering the first block for every calibration sample, ``[n, seqlen, hidden]`` on
    ``device``, and the keyword arguments the model passes to its blocks (attention mask, position ids
    and embeddings), captured once: every sample has the same length, so they are shared. ``inputs``:
    each sample's further model inputs (its image: quantize.calib_images), which lay out every sample alike."""
    captured: list[torch.Tensor] = []
    block_kwargs: dict = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.to(device, dtype))
        if not block_kwargs:
            block_kwargs.update({k: v for k, v in kwargs.items() if k not in ("hidden_states",)})
        raise _StopForward

    home = next(t for _, t in _non_block_tensors(model, blocks))
    _move_non_block(model, blocks, device)
    handle = blocks.modules[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, row in enumerate(ids):
            extra = _to(inputs[i], device, home.dtype) if inputs else {}
            try:
                model(row.unsqueeze(0).to(device), use_cache=False, **extra)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _move_non_block(model, blocks, home.device)
    block_kwargs.pop("past_key_values", None)
    block_kwargs.pop("past_key_value", None)
    block_kwargs["use_cache"] = False
    return torch.cat(captured), _to(block_kwargs, device, dtype)


def _to(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _non_block_tensors(model: nn.Module, blocks: Blocks):
    prefix = blocks.prefix + "."
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix):
            yield name, t


def _move_non_block(model: nn.Module, blocks: Blocks, device: torch.device) -> None:
    """Move everything outside the blocks (embeddings, rotary tables, final norm, head) to ``device``."""
    for _, t in _non_block_tensors(model, blocks):
        t.data = t.data.to(device)


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def per_block_kwargs(model: nn.Module, blocks: Blocks, shared: dict, sample: torch.Tensor, device: torch.device,
                     dtype: torch.dtype, sample_inputs: dict | None = None) -> list[dict]:
    """The keyword arguments each block gets, where they differ between blocks: models whose layers have
    types (``config.layer_types``: Gemma 2/3 sliding and full attention, with their own masks and, in
    Gemma 3, their own rotary tables) pass each type its own. ``shared`` (block 0's, from
    :func:`capture_block_inputs`) serves every block of block 0's type. The other types' arguments come
    from one forward pass on ``sample`` with every block stubbed out (they do not depend on the blocks'
    outputs). Models without layer types: ``shared`` for every block."""
    n = len(blocks.modules)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = list(getattr(text, "layer_types", None) or [])[:n]
    if len(types) != n or len(set(types)) < 2:
        return [shared] * n
    wanted = {}
    for i, t in enumerate(types):
        wanted.setdefault(t, i)
    wanted.pop(types[0])
    captured: dict[int, dict] = {}

    def stub(i):
        def forward(hidden_states=None, *args, **kwargs):
            if i in wanted.values():
                captured[i] = dict(kwargs)
                if len(captured) == len(wanted):
                    raise _StopForward
            return hidden_states
        return forward

    home = next(t for _, t in _non_block_tensors(model, blocks))
    _move_non_block(model, blocks, device)
    saved = [block.__dict__.get("forward") for block in blocks.modules]  # e.g. quantize.vlm's pass-through
    for i, block in enumerate(blocks.modules):
        block.forward = stub(i)
    try:
        model(sample.reshape(1, -1).to(device), use_cache=False, **_to(sample_inputs or {}, device, home.dtype))
    except _StopForward:
        pass
    finally:
        for block, forward in zip(blocks.modules, saved):
            del block.forward
            if forward is not None:
                block.forward = forward
        _move_non_block(model, blocks, home.device)
    if len(captured) != len(wanted):
        raise UserError(f"could not capture the block arguments of every layer type ({sorted(wanted)}) of {type(model).__name__}")
    by_type = {types[0]: shared}
    for t, i in wanted.items():
        kw = {k: v for k, v in captured[i].items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kw["use_cache"] = False
        by_type[t] = _to(kw, device, dtype)
    return [by_type[t] for t in types]
