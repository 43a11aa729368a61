"""The auto_round checkpoint: Intel AutoRound 0.16's layout, so its loaders and vLLM read ours."""

from __future__ import annotations

import json
from pathlib import Path

from quantize import __version__
from quantize.checkpoint import CheckpointConfig, packing_format_for
from quantize.export.atomic import atomic_dir
from quantize.model import UserError
from quantize.packing import layout_fits, pack
from quantize.quantizer import QuantizationResult
from quantize.scheme import Scheme


def checkpoint_config(result: QuantizationResult, scheme: Scheme) -> CheckpointConfig:
    schemes = [w.scheme for w in result.weights.values()]
    extra: dict[str, dict] = {}
    in_block = result.blocks.prefix + "."
    for name, w in result.weights.items():
        diff = {k: v for k, v in w.scheme.to_dict().items() if v != getattr(scheme, k) or not name.startswith(in_block)}
        if diff:
            extra[name] = diff
    for name in result.plan.keep:
        if name.startswith(in_block):
            extra[name] = {"bits": 16}
    cfg = result.tune
    meta = {
        "iters": cfg.iters,
        "lr": cfg.learning_rate,
        "minmax_lr": cfg.minmax_learning_rate,
        "nsamples": cfg.nsamples,
        "seqlen": cfg.seqlen,
        "batch_size": cfg.batch_size,
        "enable_quanted_input": cfg.quantized_inputs,
        "quantizer": f"quantize-llm {__version__}",
    }
    return CheckpointConfig(
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
        data_type=scheme.data_type,
        packing_format=packing_format_for(schemes),
        block_name_to_quantize=[result.blocks.prefix],
        extra_config=extra,
        metadata=meta,
    )


def packed_state_dict(model, result: QuantizationResult, layout: str) -> dict:
    state = dict(model.state_dict())
    for name, w in result.weights.items():
        module = model.get_submodule(name)
        why = layout_fits(layout, w.scheme.bits, module.in_features, module.out_features)
        if why:
            raise UserError(f"layer {name} cannot be stored in the {layout} layout: {why}")
        packed = pack(layout, w.q, w.scales, w.zeros, w.scheme.bits)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = packed.qweight
        state[f"{name}.qzeros"] = packed.qzeros
        state[f"{name}.scales"] = packed.scales
    return state


def save_auto_round(
    model, tokenizer, result: QuantizationResult, scheme: Scheme, output_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write the checkpoint atomically; returns its folder."""
    config = checkpoint_config(result, scheme)
    state = packed_state_dict(model, result, config.layout)
    qcfg = config.to_dict()
    with atomic_dir(output_dir, overwrite) as tmp:
        model.config.quantization_config = qcfg
        try:
            model.save_pretrained(tmp, state_dict=state, max_shard_size="4GB")
        finally:
            del model.config.quantization_config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "quantization_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return Path(output_dir).expanduser().resolve()
