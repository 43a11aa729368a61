"""The ``quantization_config`` of an auto_round checkpoint: parsed and validated once, used by the
exporter and by every loader. Field names and meanings follow Intel AutoRound 0.16."""

from __future__ import annotations

from dataclasses import dataclass, field

from quantize.packing import PACKED_TENSORS, packed_shapes
from quantize.scheme import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, Scheme, match_name

QUANT_METHOD = "auto-round"
# packing_format -> tensor layout (quantize.packing). Aliases are spellings Intel's loader accepts too.
PACKING_FORMATS = {
    "auto_round:auto_gptq": "gptq",
    "auto_round:gptq": "gptq",
    "auto_round:gptqmodel": "gptq",
    "auto_round:auto_awq": "awq",
    "auto_round:awq": "awq",
    "auto_round": "auto_round",
    # Intel 0.16.1's FP layouts (quantize.export.auto_round_fp): per-layer tensors named as compressed-tensors'
    "auto_round:llm_compressor": "fp",
    "auto_round:fp8_static": "fp",
}
FP_PACKING = {"auto_round:llm_compressor", "auto_round:fp8_static"}
ACT_KEYS = ("act_bits", "act_data_type", "act_group_size", "act_dynamic")
_SCHEME_KEYS = {"bits", "group_size", "sym", "data_type"}
# Activation fields Intel writes; only 16-bit activations (weight-only) are served here.
_ACT_KEYS = ("act_bits",)


class ConfigError(ValueError):
    """A malformed or unsupported quantization_config; the message names the field (and layer)."""


def is_auto_round(quant_method) -> bool:
    """Intel writes "auto-round"; "auto_round" is accepted as the same method."""
    return str(quant_method).replace("_", "-") == QUANT_METHOD


def check_layer_tensors(name: str, layout: str, bits: int, group_size: int, in_features: int, out_features: int, shapes: dict) -> None:
    """Every packed tensor of layer ``name`` present in ``shapes`` (tensor name -> shape) with the shape its
    scheme implies; refused naming the layer and the tensor otherwise."""
    groups = 1 if group_size == -1 else in_features // group_size
    expected = packed_shapes(layout, bits, in_features, out_features, groups)
    for tensor in PACKED_TENSORS:
        key = f"{name}.{tensor}"
        if key not in shapes:
            raise ConfigError(f"layer {name}: tensor {key} is missing from the checkpoint")
        if tuple(shapes[key]) != expected[tensor]:
            raise ConfigError(
                f"layer {name}: tensor {key} has shape {list(shapes[key])}, expected {list(expected[tensor])} for "
                f"bits={bits}, group_size={group_size}, layout {layout} ({in_features} -> {out_features})"
            )


def packing_format_for(schemes: list[Scheme]) -> str:
    """The packing format AutoRound picks: GPTQ layout when every layer is symmetric, AWQ when every
    layer is 4-bit asymmetric, the native layout (raw zero points) otherwise."""
    if all(s.sym for s in schemes):
        return "auto_round:auto_gptq"
    if all(s.bits == 4 and not s.sym for s in schemes):
        return "auto_round:auto_awq"
    return "auto_round"


def layout_for(scheme: Scheme) -> str | None:
    """The tensor layout a layer of this scheme gets when it sets the checkpoint's packing format (None for
    the FP and activation-quantized schemes: their tensors are not bit-packed integer words)."""
    if not scheme.integer_weight_only:
        return None
    return PACKING_FORMATS[packing_format_for([scheme])]


def _fp_or_act(d: dict) -> bool:
    """FP weights or quantized activations: checked whole by Scheme (quantize.scheme), not field by field."""
    quantized = not (isinstance(d.get("bits"), int) and d["bits"] >= 16)
    act = d.get("act_bits")
    return quantized and (d.get("data_type", "int") != "int" or (isinstance(act, int) and act < 16))


def _check_scheme_fields(d: dict, where: str) -> None:
    if _fp_or_act(d):
        return
    if "bits" in d and d["bits"] not in SUPPORTED_BITS and not (isinstance(d["bits"], int) and d["bits"] >= 16):
        raise ConfigError(f"{where}: bits={d['bits']} is not supported (supported: {SUPPORTED_BITS}, or 16 to keep a layer)")
    if "group_size" in d and d["group_size"] not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(f"{where}: group_size={d['group_size']} is not supported (supported: {SUPPORTED_GROUP_SIZES})")
    if "sym" in d and not isinstance(d["sym"], bool):
        raise ConfigError(f"{where}: sym must be true or false, got {d['sym']!r}")
    if d.get("data_type", "int") != "int" and not (isinstance(d.get("bits"), int) and d["bits"] >= 16):  # Intel: 16-bit "fp"
        raise ConfigError(f"{where}: data_type={d['data_type']!r} is not supported (only integer weights: 'int')")
    for key in _ACT_KEYS:
        if d.get(key) is not None and d[key] < 16:
            raise ConfigError(f"{where}: {key}={d[key]} (quantized activations) is not supported; only weight-only (A16) checkpoints")


@dataclass
class CheckpointConfig:
    bits: int
    group_size: int
    sym: bool
    packing_format: str
    block_name_to_quantize: list[str]
    data_type: str = "int"
    extra_config: dict[str, dict] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # tuning settings and any other keys, kept as written

    @property
    def layout(self) -> str:
        return PACKING_FORMATS[self.packing_format]

    @property
    def act_fields(self) -> dict:
        """The activation fields as written (Intel writes them beside the weights'), when activations are quantized."""
        act = {k: self.metadata[k] for k in ACT_KEYS if self.metadata.get(k) is not None}
        return act if act.get("act_bits", 16) < 16 else {}

    @property
    def default_scheme(self) -> Scheme:
        try:
            return Scheme(self.bits, self.group_size, self.sym, self.data_type, **self.act_fields)
        except ValueError as e:
            raise ConfigError(f"quantization_config: {e}") from e

    @classmethod
    def from_dict(cls, d: dict) -> "CheckpointConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        if not is_auto_round(d.get("quant_method", "")):
            raise ConfigError(f"quant_method={d.get('quant_method')!r}: expected {QUANT_METHOD!r}")
        for key in ("bits", "group_size", "sym"):
            if key not in d:
                raise ConfigError(f"quantization_config has no {key!r} field")
        _check_scheme_fields(d, "quantization_config")
        if d["bits"] >= 16:
            raise ConfigError(f"quantization_config: bits={d['bits']} means not quantized; supported: {SUPPORTED_BITS}")
        fmt = d.get("packing_format", "auto_round:auto_gptq")
        fmt = "auto_round:auto_gptq" if fmt == "auto" else fmt
        if fmt not in PACKING_FORMATS:
            raise ConfigError(f"packing_format={fmt!r} is not supported; supported: {', '.join(PACKING_FORMATS)}")
        blocks = d.get("block_name_to_quantize") or d.get("to_quant_block_names")
        if isinstance(blocks, str):
            blocks = [b.strip() for b in blocks.split(",") if b.strip()]
        if not blocks:
            raise ConfigError("quantization_config has no block_name_to_quantize: which blocks are quantized is unknown")
        extra = d.get("extra_config") or {}
        if not isinstance(extra, dict):
            raise ConfigError("extra_config must be an object mapping layer names to settings")
        for name, spec in extra.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"extra_config[{name!r}] must be an object, got {spec!r}")
            _check_scheme_fields(spec, f"extra_config[{name!r}]")
        known = {"quant_method", "bits", "group_size", "sym", "data_type", "packing_format", "block_name_to_quantize", "extra_config"}
        meta = {k: v for k, v in d.items() if k not in known}
        cfg = cls(d["bits"], d["group_size"], d["sym"], fmt, list(blocks), d.get("data_type", "int"), dict(extra), meta)
        scheme = cfg.default_scheme  # FP and activation fields: validated whole, here
        if (fmt in FP_PACKING) == scheme.integer_weight_only:
            raise ConfigError(f"packing_format={fmt!r} does not hold {scheme.name} (data_type={scheme.data_type!r}, act_bits={scheme.act_bits})")
        for name in extra:
            cfg.layer_scheme(name)
        return cfg

    def to_dict(self) -> dict:
        return {
            **self.metadata,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "data_type": self.data_type,
            "block_name_to_quantize": ",".join(self.block_name_to_quantize),
            "quant_method": QUANT_METHOD,
            "packing_format": self.packing_format,
            **({"extra_config": self.extra_config} if self.extra_config else {}),
        }

    def layer_scheme(self, name: str) -> Scheme | None:
        """The scheme of linear layer ``name``, or None when it is stored unquantized."""
        spec = self.extra_config.get(name)
        if spec is None:
            spec = next((s for pattern, s in self.extra_config.items() if match_name(pattern, name)), None)
        in_block = any(name.startswith(b + ".") for b in self.block_name_to_quantize)
        if spec is None:
            return self.default_scheme if in_block else None
        if spec.get("bits", self.bits) >= 16:
            return None
        merged = {k: spec.get(k, getattr(self.default_scheme, k)) for k in (*_SCHEME_KEYS, *ACT_KEYS)}
        if merged["act_bits"] is None or merged["act_bits"] >= 16:
            merged.update(act_bits=16, act_data_type=None, act_group_size=None, act_dynamic=None)
        try:
            return Scheme(**merged)
        except ValueError as e:
            raise ConfigError(f"extra_config[{name!r}]: {e}") from e
