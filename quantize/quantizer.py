"""Block-by-block quantization of a whole model: capture block inputs once, then tune each block."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantize import distributed
from quantize.calib_images import ImageCalibration
from quantize.layer_config import LayerPlan
from quantize.model import Blocks, UserError, capture_block_inputs, compute_dtype, final_norm, per_block_kwargs, uses_amp
from quantize.presets import TuneConfig
from quantize.resume import ResumeState, Stopped, fingerprint, open_resume
from quantize.signround import (QuantizedWeight, block_forward, compiles, round_block, searched_layers, settle_compile,
                                tune_block)
from quantize.streaming import Streamer


@dataclass
class QuantizationResult:
    weights: dict[str, QuantizedWeight]  # full layer name -> integer form
    plan: LayerPlan
    blocks: Blocks
    tune: TuneConfig
    seconds: float
    block_losses: list[tuple[float, float]] = field(default_factory=list)
    calibrated: bool = True  # calibration text ran through the blocks (not: round-to-nearest without a pass)


@torch.no_grad()
def _run_block(
    block: nn.Module, x: torch.Tensor, kwargs: dict, batch: int, amp: bool, out: torch.Tensor | None = None, compiled: bool = False
) -> torch.Tensor:
    """``block`` over ``x`` batch by batch, into ``out`` (which may be ``x`` itself: each batch's output
    depends only on that batch, so the inputs can be overwritten as they are consumed)."""
    out = torch.empty_like(x) if out is None else out
    forward = block_forward(compiled)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        for src, dst in zip(x.split(batch), out.split(batch)):
            dst.copy_(forward(block, src, kwargs))
    return out


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise UserError(
            f"NaN or inf in the activations {where}: the model overflows in this dtype or its weights are "
            "corrupted; try --dtype float32, or check the model with `python -m quantize eval`"
        )


@contextlib.contextmanager
def _stop_at_block_boundary(enabled: bool):
    """While ``enabled`` (a run that can resume), the first Ctrl-C lets the block in progress finish and be
    saved; a second stops at once. Yields a function that says whether a stop was asked for."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    asked: list[bool] = []

    def handler(_sig, _frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(True)
        print("\nCtrl-C: stopping once this block is saved (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


class _Head(nn.Module):
    """The final norm and lm_head as one block, so that round_block calibrates lm_head's static activation
    scales (and searches its clipping) on what lm_head sees in the model: the last block's outputs, normed."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


def _outside_blocks(model: nn.Module, blocks: Blocks, plan: LayerPlan, cfg: TuneConfig) -> dict[str, tuple]:
    """The planned layers outside the blocks (only lm_head: plan_layers plans nothing else there), each with
    its scheme and, where rounding it runs the calibration text through the head, the final norm in front of
    it (else None); refused up front where that needs a final norm we cannot find."""
    outside = {n: s for n, s in plan.quantize.items() if not n.startswith(blocks.prefix + ".")}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, scheme in outside.items():
        if model.get_submodule(name) is not head:
            raise ValueError(f"{name} is planned for quantization outside the blocks, but only lm_head can be")
        needs_inputs = scheme.static_activations or bool(searched_layers(cfg, {name: scheme}))
        norm = final_norm(model, blocks) if needs_inputs else None
        if needs_inputs and norm is None:
            raise UserError(
                f"{name} with {scheme.name}{' and a clipping search' if not scheme.static_activations else ''} needs its inputs, "
                f"the last block's outputs through the final norm, which {type(model).__name__} has under no name we know: "
                "drop --quant-lm-head, or quantize it with a weight-only scheme and without --init-clip")
        out[name] = (scheme, norm)
    return out


@torch.no_grad()
def _round_outside_blocks(model, outside, inputs, cfg, device, dtype, model_dtype, amp, log) -> dict[str, QuantizedWeight]:
    """Round ``outside`` (lm_head) to nearest after the blocks, as AutoRound does when it does not tune it
    (AutoRound tunes lm_head layer-wise on cached inputs when iters > 0; here it is never tuned).
    ``inputs``: the last block's outputs (None at round-to-nearest without a pass)."""
    weights = {}
    for name, (scheme, norm) in outside.items():
        t0 = time.time()
        module = model.get_submodule(name)
        head = _Head(norm if norm is not None else nn.Identity(), module).to(device, dtype)
        searched = searched_layers(cfg, {"lm_head": scheme})
        qw = round_block(head, {"lm_head": scheme}, inputs if norm is not None else None, {}, cfg.batch_size, amp, searched)["lm_head"]
        head.to("cpu", model_dtype)
        module.weight.data = qw.dequantize(model_dtype)  # what a loaded checkpoint computes with
        weights[name] = qw.to("cpu")
        how = ", ".join(["rounded to nearest"] + (["activation scale calibrated"] if scheme.static_activations else [])
                        + (["clipping searched"] if searched else []))
        log(f"{name}: {scheme.name}, {how} ({time.time() - t0:.1f} s)")
    return weights


def run_settings(plan: LayerPlan, cfg: TuneConfig, device: torch.device, model_dtype: torch.dtype, n_blocks: int) -> dict:
    """What decides a run's result, for the resume manifest."""
    return {
        "layers": {name: asdict(s) for name, s in sorted(plan.quantize.items())},
        "tuning": asdict(cfg),
        "device": device.type,
        "dtype": str(model_dtype),
        "blocks": n_blocks,
    }


def quantize_model(
    model: nn.Module,
    blocks: Blocks,
    plan: LayerPlan,
    calib_ids: torch.Tensor | ImageCalibration,
    cfg: TuneConfig,
    device: torch.device,
    progress: bool = True,
    resume_folder: Path | None = None,
    overwrite: bool = False,
    streamer: Streamer | None = None,
) -> QuantizationResult:
    """Quantize ``plan.quantize`` in place: on return those layers hold their dequantized weights (the
    model computes exactly what a loaded checkpoint will) and the result holds their integer form.

    ``calib_ids``: calibration token ids ``[n, seqlen]``, or an image-text calibration (quantize.calib_images).

    ``resume_folder``: keep resume state there (quantize.resume) and continue a run it holds;
    ``overwrite`` discards that state instead. ``streamer`` (quantize.streaming): the blocks' weights are read
    just before each block is tuned and freed after; the tuned layers are left in the resume folder, which
    it needs, and ``result.weights`` reads them from there."""
    if streamer is not None and resume_folder is None:
        raise ValueError("a streamed run keeps its tuned layers in the resume folder: pass resume_folder")
    start = time.time()
    calib_images = calib_ids if isinstance(calib_ids, ImageCalibration) else None
    calib_ids = calib_images.ids if calib_images else calib_ids
    model_dtype = next(blocks.modules.parameters()).dtype
    dtype = compute_dtype(device, model_dtype)
    amp = uses_amp(cfg.amp, device)
    team = distributed.current()
    team.check_batch(cfg.batch_size)
    state: ResumeState | None = None
    resumed = False
    if resume_folder is not None:
        # The leader keeps the resume state; the others read it when resuming.
        if team.leader:
            settings = run_settings(plan, cfg, device, model_dtype, len(blocks.modules))
            key = calib_ids if calib_images is None else calib_images.key()
            inputs = streamer.fingerprint(key) if streamer else fingerprint(model, key)
            state, resumed = open_resume(resume_folder, settings, inputs, overwrite)
        resumed = team.agree(resumed, device)
        state = state or ResumeState(resume_folder)
    cfg = settle_compile(cfg, device, list(blocks.modules))
    outside = _outside_blocks(model, blocks, plan, cfg)  # before tuning: a refusal costs nothing
    # Round-to-nearest with no activation scale to calibrate and no clipping search needs no forward pass
    # at all; otherwise one pass to calibrate (and search) and one for the next block's (quantized) inputs.
    searches = bool(searched_layers(cfg, plan.quantize))
    rounds_only = cfg.iters == 0 and not searches and not any(s.static_activations for s in plan.quantize.values())
    calibrates_only = cfg.iters == 0 and not rounds_only and cfg.quantized_inputs
    if rounds_only:
        fp_inputs, block_kwargs = torch.empty(0, device=device), [{}] * len(blocks.modules)
    else:
        images = calib_images.inputs if calib_images else None
        fp_inputs, kwargs = capture_block_inputs(model, blocks, calib_ids, device, dtype, images)
        block_kwargs = per_block_kwargs(model, blocks, kwargs, calib_ids[0], device, dtype, images and images[0])  # per layer type (Gemma 3)
        _check_finite(fp_inputs, "entering the first block")
    q_inputs = fp_inputs
    generator = torch.Generator().manual_seed(cfg.seed)
    result = QuantizationResult({}, plan, blocks, cfg, 0.0, calibrated=not rounds_only)
    first = 0
    if resumed:
        carry, done, losses = state.load(device, weights=streamer is None)
        if carry is not None:
            first = carry.next_block
            q_inputs, fp_inputs = carry.q_inputs, carry.fp_inputs
            generator.set_state(carry.generator_state)
            result.weights.update(done)
            result.block_losses.extend(losses)
            for name, qw in done.items():
                model.get_submodule(name).weight.data = qw.dequantize(model_dtype)
        n = len(blocks.modules)
        if team.leader:
            print(f"resuming from block {first + 1}/{n} ({state.folder})" if first < n else
                  f"all {n} blocks were tuned by an earlier run ({state.folder}): writing the checkpoint", file=sys.stderr)

    bar = tqdm(list(enumerate(blocks.modules))[first:], desc="quantizing blocks", disable=not progress or not team.leader, unit="block",
               initial=first, total=len(blocks.modules))
    with _stop_at_block_boundary(state is not None) as stop_asked:
        for i, block in bar:
            kwargs = block_kwargs[i]
            t0 = time.time()
            prefix = blocks.name(i) + "."
            layers = {n[len(prefix) :]: s for n, s in plan.quantize.items() if n.startswith(prefix)}
            if streamer:
                streamer.load(i)
            block.to(device, dtype).requires_grad_(False)  # as tuning leaves it: one compiled forward serves both passes
            # Two sets of activations live on the device, not three: the full-precision inputs become the
            # targets in place, unless the tuning inputs are the same tensor.
            shared = q_inputs is fp_inputs
            compiled = compiles(cfg, device, block, sum(block.get_submodule(n).weight.numel() for n in layers))
            losses = None
            if rounds_only:
                weights = round_block(block, layers)
            elif calibrates_only:
                searched = searched_layers(cfg, layers)
                if searched and not any(s.static_activations for s in layers.values()):
                    # One pass: the search's pass leaves the unrounded block's outputs as the next block's
                    # inputs, as AutoRound's importance matrix is gathered on the full-precision model.
                    weights = round_block(block, layers, q_inputs, kwargs, cfg.batch_size, amp, searched, outputs=q_inputs)
                else:
                    # Static scales are calibrated on the quantized model's activations, as tuning does.
                    weights = round_block(block, layers, q_inputs, kwargs, cfg.batch_size, amp, searched)
                    q_inputs = _run_block(block, q_inputs, kwargs, cfg.batch_size, amp, out=q_inputs, compiled=compiled)
                fp_inputs = q_inputs
                _check_finite(q_inputs, f"after block {i}")
            else:
                targets = _run_block(block, fp_inputs, kwargs, cfg.batch_size, amp, out=None if shared else fp_inputs, compiled=compiled)
                _check_finite(targets, f"after block {i}")
                weights = {}
                if layers:
                    tuned = tune_block(block, layers, q_inputs if cfg.quantized_inputs else fp_inputs, targets, kwargs, cfg, generator)
                    weights, losses = tuned.weights, (tuned.loss_before, tuned.loss_after)
                    result.block_losses.append(losses)
                if cfg.quantized_inputs and (layers or not shared):
                    q_inputs = _run_block(block, q_inputs, kwargs, cfg.batch_size, amp, out=q_inputs, compiled=compiled)
                else:
                    q_inputs = targets
                fp_inputs = targets
            # Integer forms wait on the host: on the device they would add up to half the model's size.
            host = {prefix + n: w.to("cpu") for n, w in weights.items()}
            if streamer is None:
                result.weights.update(host)
            if layers and team.leader:
                done = "rounded to nearest" if losses is None else f"loss {losses[0]:.3g} -> {losses[1]:.3g}"
                bar.write(f"block {i + 1}/{len(blocks.modules)}: {len(layers)} layers, {done} ({time.time() - t0:.1f} s)")
            if streamer:
                streamer.release(i)
            else:
                block.to("cpu", model_dtype)
            if layers and dtype != model_dtype and streamer is None:
                for name, qw in host.items():
                    # The exact weights a loaded checkpoint gives back, in the model's dtype (the block holds
                    # them in the compute dtype).
                    model.get_submodule(name).weight.data = qw.dequantize(model_dtype)
            if state is not None and team.leader:
                last = i + 1 == len(blocks.modules)
                state.save_block(i, host, losses, q_inputs, fp_inputs, generator, force_carry=last or stop_asked())
            if stop_asked() and i + 1 < len(blocks.modules):
                raise Stopped(f"stopped after block {i + 1}/{len(blocks.modules)}; run the same command again to resume "
                              f"from block {i + 2} (state in {state.folder})")
    if streamer and team.leader:
        result.weights, _ = state.stored(len(blocks.modules))
    if outside:
        log = bar.write if team.leader else (lambda _msg: None)
        result.weights.update(_round_outside_blocks(model, outside, None if rounds_only else q_inputs, cfg, device,
                                                    dtype, model_dtype, amp, log))
    result.seconds = time.time() - start
    return result
