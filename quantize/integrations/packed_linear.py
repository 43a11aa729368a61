"""What the vLLM and SGLang adapters share: which scheme an engine's fused layer gets, whether a rank's
slice of the packed tensors can be cut, the packed parameters, and compute through quantize.kernels.

Both engines build linear layers the same way (``create_weights`` / ``process_weights_after_loading`` /
``apply``, parameters whose loaders cut their tensor-parallel shard) and their parameter classes have the
same constructors, so one implementation serves both; each adapter names its engine's parameter module
and, where the engine has one, its own Marlin kernel.

Shard arithmetic, for a layer that holds ``K`` inputs and ``N`` outputs of this rank:
- qweight of the gptq / native layouts is packed along K (``K*b/32`` rows), so a row-parallel shard is
  whole words only when ``K*b`` is a multiple of 32; awq packs qweight along N instead.
- qzeros are packed along N in every layout, so each output partition (q, k, v; gate, up; a column
  shard) must fill whole words: ``n*b`` a multiple of 32.
- scales and zeros have one row per group: a row-parallel shard must cover whole groups (``K`` a
  multiple of the group size). Per-channel layers (group_size -1) keep their single row on every rank.
"""

from __future__ import annotations

import math
from fractions import Fraction
from types import ModuleType

import torch

from quantize.checkpoint import QUANT_METHOD, CheckpointConfig, ConfigError, is_auto_round
from quantize.fp_layout import has_layout
from quantize.kernels import LinearSpec, kernel_state, select_kernel
from quantize.packing import PACKED_TENSORS
from quantize.scheme import Scheme, match_name


def claimed_method(hf_quant_cfg: dict, user_quant: str | None) -> str | None:
    """Both engines' ``override_quantization_method``: take auto_round checkpoints unless the user named
    another method (e.g. vLLM's own "inc")."""
    if is_auto_round(hf_quant_cfg.get("quant_method")) and user_quant in (None, QUANT_METHOD):
        return QUANT_METHOD
    return None


class CheckpointConfigMethods:
    """The parts of both engines' ``QuantizationConfig`` that only describe the checkpoint; mixed in ahead
    of each engine's base class. Needs ``self.checkpoint`` (a :class:`CheckpointConfig`)."""

    def __repr__(self) -> str:
        c = self.checkpoint
        return f"{type(self).__name__}(bits={c.bits}, group_size={c.group_size}, sym={c.sym}, packing_format={c.packing_format})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # what Triton needs; the portable torch path runs anywhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantization_config.json"]

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict, user_quant: str | None, *args, **kwargs) -> str | None:
        return claimed_method(hf_quant_cfg, user_quant)


def refuse_quantized_lm_head(config: CheckpointConfig, prefix: str, engine: str) -> None:
    named = prefix in config.extra_config or any(match_name(p, prefix) for p in config.extra_config)
    if not named and any(prefix.startswith(b + ".") for b in config.block_name_to_quantize):
        return  # an MTP layer's shared head sits inside the blocks: written 16-bit (quantize.mtp)
    if config.layer_scheme(prefix) is not None:
        raise ConfigError(
            f"layer {prefix}: a quantized lm_head is not served by this plugin ({engine} pads and shards the "
            f"vocabulary of its lm_head); re-quantize without --quant-lm-head, or load it with transformers"
        )


def part_names(prefix: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """The checkpoint layer names behind an engine layer: ``...qkv_proj`` is q_proj, k_proj and v_proj."""
    parent, _, leaf = prefix.rpartition(".")
    parts = packed_modules_mapping.get(leaf)
    if not parts:
        return [prefix]
    return [f"{parent}.{p}" if parent else p for p in parts]


def merged_scheme(config: CheckpointConfig, prefix: str, packed_modules_mapping: dict[str, list[str]], engine: str) -> Scheme | None:
    """The one scheme every part of layer ``prefix`` shares (None: stored unquantized)."""
    names = part_names(prefix, packed_modules_mapping)
    schemes = {name: config.layer_scheme(name) for name in names}
    if len(set(schemes.values())) > 1:
        detail = ", ".join(f"{n}: {s.name if s else '16-bit'}" for n, s in schemes.items())
        raise ConfigError(
            f"layer {prefix}: {engine} fuses {', '.join(n.rpartition('.')[2] for n in names)} into one matrix, but the "
            f"checkpoint quantizes them differently ({detail}); re-quantize with one scheme for these layers "
            f"(e.g. a layer_config entry that covers all of them)"
        )
    scheme = schemes[names[0]]
    if scheme is not None and not scheme.integer_weight_only and not has_layout(scheme):
        raise ConfigError(
            f"layer {prefix}: {scheme.name} (data_type {scheme.data_type}, act_bits {scheme.act_bits}) auto_round checkpoints "
            f"are not served by quantize-llm's {engine} plugin; write the model with --format llm_compressor, which "
            f"{engine}'s built-in compressed-tensors support serves"
        )
    return scheme


def check_partition(prefix: str, scheme: Scheme, layout: str, in_per_rank: int, in_full: int, out_parts: list[int]) -> None:
    """Refuse, naming the layer, a rank's slice that the packed tensors cannot be cut into."""
    b, g = scheme.bits, scheme.group_size
    split = f" (this rank holds {in_per_rank} of {in_full} inputs: try a smaller tensor-parallel size)" if in_per_rank != in_full else ""
    if layout != "awq" and (in_per_rank * b) % 32:
        raise ConfigError(f"layer {prefix}: {in_per_rank} inputs x {b} bits do not fill whole 32-bit words{split}")
    if g != -1 and in_per_rank % g:
        raise ConfigError(f"layer {prefix}: {in_per_rank} inputs are not a whole number of groups of {g}{split}")
    for n in out_parts:
        if (n * b) % 32:
            raise ConfigError(
                f"layer {prefix}: an output partition of {n} columns x {b} bits does not fill whole 32-bit words "
                f"(qzeros are packed along the outputs); needs a multiple of {32 // math.gcd(32, b)} columns per partition"
            )


def make_parameters(classes: ModuleType, scheme: Scheme, layout: str, in_per_rank: int, out_per_rank: int, weight_loader) -> dict:
    """qweight / qzeros / scales of one rank, as the engine's parameters (``classes``: its parameter
    module) that know how to take their shard."""
    b = scheme.bits
    factor = Fraction(32, b)  # codes per word; the shard helpers divide sizes by it (exact: see check_partition)
    per_channel = scheme.group_size == -1
    groups = 1 if per_channel else in_per_rank // scheme.group_size
    if layout == "awq":
        qweight = classes.PackedvLLMParameter(
            data=torch.empty(in_per_rank, out_per_rank * b // 32, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=1, packed_factor=factor, weight_loader=weight_loader,
        )
    else:
        qweight = classes.PackedvLLMParameter(
            data=torch.empty(in_per_rank * b // 32, out_per_rank, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=factor, weight_loader=weight_loader,
        )
    zeros = torch.empty(groups, out_per_rank * b // 32, dtype=torch.int32)
    scales = torch.empty(groups, out_per_rank, dtype=torch.float16)
    if per_channel:
        # One row shared by every input shard: replicated on each rank, split only along the outputs.
        qzeros = classes.PackedColumnParameter(data=zeros, output_dim=1, packed_dim=1, packed_factor=factor, weight_loader=weight_loader)
        scales_p = classes.ChannelQuantScaleParameter(data=scales, output_dim=1, weight_loader=weight_loader)
    else:
        qzeros = classes.PackedvLLMParameter(data=zeros, input_dim=0, output_dim=1, packed_dim=1, packed_factor=factor, weight_loader=weight_loader)
        scales_p = classes.GroupQuantScaleParameter(data=scales, input_dim=0, output_dim=1, weight_loader=weight_loader)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales_p}


class PackedLinearMethod:
    """The linear method both engines get, mixed into each engine's ``LinearMethodBase``: packed
    parameters in the checkpoint's layout; after loading, the layer computes with the engine's Marlin
    where it applies (:meth:`engine_marlin`) and with quantize.kernels otherwise. ``kernel`` forces a
    quantize.kernels entry (or "marlin")."""

    engine = ""  # the engine's name, for messages
    parameter_classes: ModuleType  # the engine's module of parameter classes

    def __init__(self, scheme: Scheme, layout: str, prefix: str, kernel: str | None = None):
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix
        self.force_kernel = kernel
        self.marlin = None

    def engine_marlin(self, layer: torch.nn.Module):
        """The engine's Marlin kernel for this layer (an object with ``process_weights_after_loading(layer)``
        and ``apply_weights(layer, x, bias)``), or None where it does not apply."""
        return None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        check_partition(self.prefix, self.scheme, self.layout, input_size_per_partition, input_size, output_partition_sizes)
        out_per_rank = sum(output_partition_sizes)
        params = make_parameters(
            self.parameter_classes, self.scheme, self.layout, input_size_per_partition, out_per_rank,
            extra_weight_attrs.get("weight_loader"),
        )
        for name, p in params.items():
            layer.register_parameter(name, p)
        layer.quant_spec = LinearSpec(
            self.scheme.bits, self.scheme.group_size, self.scheme.sym, self.layout, input_size_per_partition, out_per_rank,
            params_dtype,
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        spec = layer.quant_spec
        if self.force_kernel in (None, "marlin"):
            self.marlin = self.engine_marlin(layer)
            if self.marlin is None and self.force_kernel == "marlin":
                raise ConfigError(
                    f"layer {self.prefix}: {self.engine}'s Marlin kernel cannot run {self.scheme.name} ({self.layout} layout) here"
                )
        if self.marlin is not None:
            # Marlin wants scales in the activation dtype; the checkpoint stores float16.
            layer.scales.data = layer.scales.data.to(layer.params_dtype)
            self.marlin.process_weights_after_loading(layer)
            layer.quant_kernel = type(self.marlin)
            return
        # Plain tensors from here on (the engines' parameter subclasses only matter while loading).
        for name in PACKED_TENSORS:
            data = getattr(layer, name).data
            delattr(layer, name)
            layer.register_buffer(name, data)
        layer.quant_kernel = select_kernel(spec, layer.qweight.device, self.force_kernel)
        for key, t in layer.quant_kernel.prepare(spec, layer.qweight, layer.qzeros, layer.scales).items():
            # A kernel's own form of a checkpoint tensor replaces it (engines never save these layers back).
            layer.register_buffer(key if key in PACKED_TENSORS else f"k_{key}", t)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.marlin is not None:
            return self.marlin.apply_weights(layer, x, bias)
        return layer.quant_kernel.apply(layer.quant_spec, kernel_state(layer), x, bias)
