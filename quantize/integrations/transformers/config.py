"""transformers' view of an auto_round ``quantization_config``: the raw dict, validated on load."""

from __future__ import annotations

import copy

from transformers.utils.quantization_config import QuantizationConfigMixin

from quantize.checkpoint import QUANT_METHOD, CheckpointConfig


class AutoRoundConfig(QuantizationConfigMixin):
    """Keeps every field as written (so saving the model writes the same config back) and parses it
    into a :class:`~quantize.checkpoint.CheckpointConfig` at once, so a bad config fails here."""

    def __init__(self, **fields):
        self.quant_method = QUANT_METHOD
        self.kernel = fields.pop("kernel", None)  # a loading option, not part of the checkpoint
        self._fields = {k: v for k, v in fields.items() if k != "quant_method"}
        self.checkpoint = CheckpointConfig.from_dict({**self._fields, "quant_method": QUANT_METHOD})

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        return {**copy.deepcopy(self._fields), "quant_method": QUANT_METHOD}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def get_loading_attributes(self) -> dict:
        return {"kernel": self.kernel}
