"""vLLM's Marlin for MXFP4 / NVFP4 / MXFP8 auto_round layers (quantize.kernels.vllm_marlin_fp): what it
takes, and how fused NVFP4 parts with their own global scales map onto Marlin's one. Its arithmetic
against the emulation runs on a GPU with vLLM (tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from quantize import numerics_nvfp4
from quantize.kernels import KERNELS, FPLinearSpec, select_kernel
from quantize.kernels.vllm_marlin_fp import _nvfp4_scalars
from quantize.scheme import get_scheme

CPU = torch.device("cpu")
MARLIN = KERNELS["vllm_marlin_fp"]


@pytest.mark.parametrize("scheme, why", [
    ("FP8_STATIC", "computes MXFP4, MXFP8 and NVFP4"),
    ("NVFP4A16", "needs a CUDA device"),
    ("MXFP8", "needs a CUDA device"),
])
def test_says_what_it_cannot_run(scheme, why):
    spec = FPLinearSpec(get_scheme(scheme), 256, 64, torch.bfloat16)
    assert why in MARLIN.unsupported(spec, CPU)


def test_the_cpu_keeps_the_emulation():
    assert select_kernel(FPLinearSpec(get_scheme("NVFP4A16"), 256, 64, torch.bfloat16), CPU).name == "fp_emulate"


def _part(rows: int, amax: float) -> dict[str, torch.Tensor]:
    return {"weight_scale": torch.ones(rows, 16).to(torch.float8_e4m3fn),
            "weight_global_scale": numerics_nvfp4.global_scale(amax).reshape(1)}


def test_nvfp4_parts_sharing_a_global_scale_need_no_column_factors():
    mult, columns = _nvfp4_scalars([_part(8, 2.0), _part(4, 2.0)])
    assert columns is None
    assert mult == 1 / numerics_nvfp4.global_scale(2.0)  # vLLM's multiplier: the inverse of the stored scale


def test_nvfp4_parts_with_their_own_global_scales_rescale_their_columns():
    parts = [_part(8, 2.0), _part(4, 3.0), _part(2, 0.5)]
    mult, columns = _nvfp4_scalars(parts)
    assert columns.shape == (14,)
    # each part's columns come out under its own multiplier: Marlin's (the first part's) times the factor
    own = torch.cat([(1 / p["weight_global_scale"]).expand(len(p["weight_scale"])) for p in parts])
    torch.testing.assert_close(mult * columns, own, rtol=1e-7, atol=0)
    assert (columns[:8] == 1).all()
