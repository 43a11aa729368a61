"""Tuning settings and the named presets users know from AutoRound."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TuneConfig:
    iters: int = 200  # 0 = round-to-nearest, no tuning
    lr: float | None = None  # None: 1 / iters, decayed linearly to 0
    minmax_lr: float | None = None  # None: same as lr
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    grad_accum: int = 1
    quantized_inputs: bool = True  # block i tunes on the outputs of the already-quantized blocks < i
    minmax_tuning: bool = True
    amp: bool | None = None  # None: bf16 autocast on CUDA and on CPUs with bf16 matrix instructions (default_amp)
    # torch.compile each block's tuning step (quantize-dequantize, forward, backward) and its forward passes.
    # None: on CUDA for blocks of at least COMPILE_MIN_WEIGHTS weights, on the CPU for runs of at least
    # CPU_COMPILE_MIN_STEPS steps (iters x blocks): where it pays for its compile time.
    compile: bool | None = None
    # Backward products in float8 (quantize.fp8_grads: the descent reads only gradient signs). Off by
    # default: 5% faster on a 7B block, but 0.4% worse perplexity on average in four side-by-side runs.
    fp8_grads: bool = False
    # Start each group's range factors from the clipping that minimises the activation-weighted rounding
    # error (instead of 1.0, the full range). None: for layers of 2 and 3 bits.
    init_clip: bool | None = None
    seed: int = 42

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.iters < 0:
            raise ValueError(f"iters must be 0 (RTN) or more, got {self.iters}")
        if self.batch_size * self.grad_accum > self.nsamples:
            raise ValueError(
                f"batch_size x grad_accum ({self.batch_size} x {self.grad_accum}) exceeds nsamples ({self.nsamples})"
            )
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def minmax_learning_rate(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.learning_rate

    def describe(self) -> str:
        if self.iters == 0:
            search = ", clipping searched (optimized RTN)" if self.init_clip else ""
            return f"RTN (iters=0){search}, nsamples={self.nsamples}, seqlen={self.seqlen}"
        return (
            f"iters={self.iters}, lr={self.learning_rate:g}, minmax_lr={self.minmax_learning_rate:g}, "
            f"nsamples={self.nsamples}, seqlen={self.seqlen}, batch_size={self.batch_size}, grad_accum={self.grad_accum}"
            + {True: ", clipping search", False: "", None: ", clipping search on 2/3-bit layers"}[self.init_clip]
            + (", float8 gradients" if self.fp8_grads else "")
        )


PRESETS: dict[str, TuneConfig] = {
    "auto-round": TuneConfig(iters=200, nsamples=128, seqlen=2048, batch_size=8),
    "auto-round-best": TuneConfig(iters=1000, nsamples=512, seqlen=2048, batch_size=8),
    "auto-round-light": TuneConfig(iters=50, lr=5e-3, nsamples=128, seqlen=2048, batch_size=8),
    # Round-to-nearest needs no data: a few samples only measure each block's loss for the log.
    "rtn": TuneConfig(iters=0, nsamples=8, seqlen=512, batch_size=8),
}


def get_preset(name: str, **overrides) -> TuneConfig:
    """A preset with any field overridden (None means keep the preset's value)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("iters") == 0:  # any preset at iters 0 is RTN: no calibration set to capture
        given = {"nsamples": PRESETS["rtn"].nsamples, "seqlen": PRESETS["rtn"].seqlen,
                 "batch_size": PRESETS["rtn"].batch_size, **given}
    return replace(PRESETS[name], **given)
