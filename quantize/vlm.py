"""Vision-language models: only the language model's decoder blocks are quantized.

As in Intel AutoRound 0.16: the vision tower and the multi-modal projector stay 16-bit (they sit outside
the language model's blocks, so the layer plan never reaches them; :func:`kept_towers` names them in the
summary), and calibration is text-only: the model runs on calibration text alone, its language blocks see
exactly the hidden states they see in a text-only request.

Mllama (Llama 3.2 Vision) interleaves cross-attention layers that attend to image features among its
self-attention layers; the model skips them when there is no image. With text-only calibration they have
no inputs, so their linear layers stay 16-bit (:func:`cross_attention_keep`) and, while tuning, they pass
hidden states through as the model does (:func:`prepare_text_only`). AutoRound asks for image-text
calibration for mllama instead; that is not built here.

The processor files (image processor, chat template) are copied into the checkpoint so that
``AutoProcessor`` loads it (:data:`PROCESSOR_FILES`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

# Files beside the model that AutoProcessor / AutoImageProcessor read.
PROCESSOR_FILES = (
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "chat_template.json",
    "chat_template.jinja",
)
TOWER_HINTS = ("visual", "vision", "multi_modal_projector", "mm_projector", "merger", "image_newline", "audio")


def is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def _is_cross_attention_layer(layer: nn.Module) -> bool:
    """A decoder layer that attends to image features (Mllama's MllamaCrossAttentionDecoderLayer); its
    self-attention layers take the same arguments, so the class name and ``cross_attn`` child decide."""
    return "CrossAttention" in type(layer).__name__ and "DecoderLayer" in type(layer).__name__ or (
        "DecoderLayer" in type(layer).__name__ and isinstance(getattr(layer, "cross_attn", None), nn.Module)
    )


def cross_attention_keep(model: nn.Module, block_prefix: str) -> dict[str, str]:
    """Linear layers of decoder blocks that attend to image features (Mllama's cross-attention layers):
    name -> why they stay 16-bit."""
    try:
        blocks = model.get_submodule(block_prefix)
    except AttributeError:
        return {}
    keep = {}
    for i, layer in enumerate(blocks):
        if _is_cross_attention_layer(layer):
            for name, m in layer.named_modules():
                if isinstance(m, nn.Linear):
                    keep[f"{block_prefix}.{i}.{name}"] = (
                        "cross-attention layer (image features): text-only calibration never runs it"
                    )
    return keep


def prepare_text_only(model: nn.Module) -> int:
    """Cross-attention decoder layers called without image features pass the hidden states through, as
    the model itself skips them in a text-only request; returns how many layers this applies to."""
    count = 0
    for m in model.modules():
        if not _is_cross_attention_layer(m) or "forward" in m.__dict__:
            continue
        full = m.forward

        def forward(hidden_states, cross_attention_states=None, *args, _full=full, **kwargs):
            if cross_attention_states is None and kwargs.get("past_key_values") is None:
                return hidden_states
            return _full(hidden_states, cross_attention_states, *args, **kwargs)

        m.forward = forward
        count += 1
    return count


def kept_towers(model: nn.Module, block_prefix: str) -> dict[str, str]:
    """The vision tower / projector modules (outside the quantized blocks) with their linear-layer count,
    for the summary: module name -> why it stays 16-bit."""
    if not is_vlm(getattr(model, "config", None)):
        return {}
    out = {}
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if not name or block_prefix.startswith(name) or not any(h in leaf for h in TOWER_HINTS):
            continue
        if any(name.startswith(k + ".") for k in out):
            continue
        n = sum(isinstance(x, nn.Linear) for x in m.modules())
        out[name] = f"vision tower / projector stays 16-bit ({n} linear layers)"
    return out


def copy_processor_files(source_dir, folder: Path) -> list[str]:
    """Copy the processor files found in ``source_dir`` (the model's local folder) into ``folder``."""
    if not source_dir:
        return []
    src = Path(source_dir)
    if not src.is_dir():
        return []
    copied = []
    for f in PROCESSOR_FILES:
        if (src / f).is_file() and not (folder / f).exists():
            shutil.copyfile(src / f, folder / f)
            copied.append(f)
    return copied
