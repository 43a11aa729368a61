"""The auto_round checkpoint: Intel AutoRound 0.16's layout, so its loaders and vLLM read ours."""

from __future__ import annotations

from pathlib import Path

from quantize import __version__
from quantize.checkpoint import CheckpointConfig, packing_format_for
from quantize.export.hf_folder import write_hf_folder, write_json
from quantize.export.registry import ExportError, FormatSpec, export, exporter
from quantize.export.source import ExportSource
from quantize.packing import layout_fits, pack
from quantize.streaming import deferred_parts
from quantize.quantizer import QuantizationResult
from quantize.scheme import Scheme


def tuning_notes(result: QuantizationResult) -> dict:
    """The tuning settings AutoRound records in its quantization_config."""
    cfg = result.tune
    return {
        "iters": cfg.iters,
        "lr": cfg.learning_rate,
        "minmax_lr": cfg.minmax_learning_rate,
        "nsamples": cfg.nsamples,
        "seqlen": cfg.seqlen,
        "batch_size": cfg.batch_size,
        "enable_quanted_input": cfg.quantized_inputs,
        "quantizer": f"quantize-llm {__version__}",
    }


def checkpoint_config(source: ExportSource) -> CheckpointConfig:
    extra: dict[str, dict] = {}
    for name, w in source.layers.items():
        diff = {k: v for k, v in w.scheme.to_dict().items() if v != getattr(source.scheme, k) or not source.in_block(name)}
        if diff:
            extra[name] = diff
    for name in source.kept_in_blocks:
        extra[name] = {"bits": 16}
    s = source.scheme
    return CheckpointConfig(
        bits=s.bits,
        group_size=s.group_size,
        sym=s.sym,
        data_type=s.data_type,
        packing_format=packing_format_for([w.scheme for w in source.layers.values()]),
        block_name_to_quantize=list(source.block_prefixes),
        extra_config=extra,
        metadata=dict(source.metadata),
    )


def packed_tensors(source: ExportSource, layout: str) -> dict:
    """The unquantized tensors plus ``qweight``/``qzeros``/``scales`` of every quantized layer, the latter
    as functions that pack on first call."""
    state = dict(source.tensors)
    for name, w in source.layers.items():
        n, k = source.linear_shapes[name]
        why = layout_fits(layout, w.scheme.bits, k, n)
        if why:
            raise ExportError(f"layer {name} cannot be stored in the {layout} layout: {why}")
        # Packed when its shard is written (hf_folder.write_weights): a streamed run never holds them all.
        packed = deferred_parts(lambda w=w: vars(pack(layout, w.q, w.scales, w.zeros, w.scheme.bits)),
                                ("qweight", "qzeros", "scales"))
        state.update({f"{name}.{part}": take for part, take in packed.items()})
    return state


def holds(scheme: Scheme) -> str | None:
    """Integer weight-only schemes in the GPTQ/AWQ/native layouts; MX, NV and FP8_STATIC in Intel's FP layouts."""
    from quantize.export import auto_round_fp

    return None if scheme.integer_weight_only else auto_round_fp.refusal(scheme)


@exporter("auto_round", summary="AutoRound's own format (packing chosen as AutoRound does)", holds=holds, streams=True)
def write_auto_round(source: ExportSource, folder: Path, option: str | None = None) -> None:
    if not all(w.scheme.integer_weight_only for w in source.layers.values()):
        from quantize.export import auto_round_fp

        return auto_round_fp.write(source, folder)
    config = checkpoint_config(source)
    qcfg = config.to_dict()
    write_hf_folder(source, folder, packed_tensors(source, config.layout), qcfg)
    write_json(folder / "quantization_config.json", qcfg)


def packed_state_dict(model, result: QuantizationResult, layout: str) -> dict:
    """The tensors a tuning run's auto_round checkpoint holds in ``layout``."""
    scheme = next(iter(result.weights.values())).scheme  # only the tensors are asked for, not the config
    state = packed_tensors(ExportSource.from_run(model, None, result, scheme), layout)
    return {k: v() if callable(v) else v for k, v in state.items()}


def save_auto_round(
    model, tokenizer, result: QuantizationResult, scheme: Scheme, output_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write the checkpoint atomically; returns its folder."""
    source = ExportSource.from_run(model, tokenizer, result, scheme, tuning_notes(result))
    return export(source, [FormatSpec("auto_round")], output_dir, overwrite)[0]
