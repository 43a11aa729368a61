"""The HfQuantizer that loads auto_round checkpoints: swap nn.Linear for QuantLinear before the
weights load, check and prepare the kernels after."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers.base import HfQuantizer

from quantize.checkpoint import ConfigError, check_layer_tensors
from quantize.kernels import LinearSpec
from quantize.moe import checkpoint_namer, drop_expert_converters, unfuse_experts
from quantize.packing import layout_fits

from quantize.integrations.transformers.fp_modules import FPQuantLinear
from quantize.integrations.transformers.modules import QuantLinear


def replace_linear_layers(model: nn.Module, config, kernel: str | None = None) -> int:
    """Replace every linear layer the checkpoint stores quantized; returns how many."""
    ckpt = config.checkpoint
    count = 0
    rename = checkpoint_namer(model)  # the checkpoint's names (Mixtral: block_sparse_moe) for extra_config
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        scheme = ckpt.layer_scheme(rename(name + ".weight")[: -len(".weight")])
        if scheme is None:
            continue
        k, n = module.in_features, module.out_features
        if not scheme.integer_weight_only:  # MX / NV / FP8_STATIC (fp_modules)
            if scheme.k_multiple and k % scheme.k_multiple:
                raise ConfigError(f"layer {name}: group_size {scheme.group_size} does not divide in_features {k}")
            parent, _, child = name.rpartition(".")
            fp = FPQuantLinear(scheme, k, n, module.bias is not None, module.weight.dtype, kernel)
            setattr(model.get_submodule(parent) if parent else model, child, fp)
            count += 1
            continue
        if scheme.group_size != -1 and k % scheme.group_size:
            raise ConfigError(f"layer {name}: group_size {scheme.group_size} does not divide in_features {k}")
        why = layout_fits(ckpt.layout, scheme.bits, k, n)
        if why:
            raise ConfigError(f"layer {name}: {why} (packing_format {ckpt.packing_format})")
        spec = LinearSpec(scheme.bits, scheme.group_size, scheme.sym, ckpt.layout, k, n, module.weight.dtype)
        qlinear = QuantLinear(spec, module.bias is not None, module.weight.dtype, kernel)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, qlinear)
        count += 1
    if count == 0:
        raise ConfigError(
            f"no linear layer of {type(model).__name__} matches block_name_to_quantize="
            f"{ckpt.block_name_to_quantize}: the checkpoint does not belong to this architecture"
        )
    return count


def check_tensors(model: nn.Module, checkpoint_files: list[str]) -> None:
    """Every packed tensor present with the shape its layer's config implies, read from the safetensors
    headers before anything loads (transformers would fill a missing tensor with garbage)."""
    shapes = {}
    for path in checkpoint_files:
        if str(path).endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    if not shapes:
        return
    rename = checkpoint_namer(model)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            s = module.spec
            check_layer_tensors(rename(name + ".weight")[: -len(".weight")], s.layout, s.bits, s.group_size, s.in_features, s.out_features, shapes)


class AutoRoundQuantizer(HfQuantizer):
    requires_calibration = True  # loads pre-quantized checkpoints only; `python -m quantize` makes them

    def validate_environment(self, *args, **kwargs):
        pass

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # MoE experts load per expert, as the checkpoint stores them (quantize.moe)
        self.unfused = unfuse_experts(model)
        replace_linear_layers(model, self.quantization_config, self.quantization_config.kernel)
        if checkpoint_files:
            check_tensors(model, checkpoint_files)

    def update_dtype(self, dtype):
        self.load_dtype = dtype
        return dtype

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers keeps the checkpoint's dtype for tensors it renamed while loading a pre-quantized
        # model (Mixtral's block_sparse_moe.gate); give them the dtype the model was asked for.
        dtype, rename = getattr(self, "load_dtype", None), checkpoint_namer(model)
        if isinstance(dtype, torch.dtype):
            for name, p in model.named_parameters():
                if p.is_floating_point() and p.dtype != dtype and rename(name) != name:
                    p.data = p.data.to(dtype)
        for module in model.modules():
            if isinstance(module, (QuantLinear, FPQuantLinear)):
                module.prepare()
        return model

    def update_weight_conversions(self, weight_conversions, *args, **kwargs):
        # The skeleton's experts are per-expert modules: transformers must not fuse their tensors.
        # (transformers 5.24 added the model as an argument; 5.19 has none.)
        return drop_expert_converters(super().update_weight_conversions(weight_conversions, *args, **kwargs))

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, safe_serialization=None) -> bool:
        return True
