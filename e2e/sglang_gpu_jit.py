"""Pre-builds SGLang 0.5.17's JIT kernels that serving a Llama-shaped model on an H200 reaches first and
that take long to compile (Marlin: a few hundred template instances in one translation unit), for sm_90a,
into a TVM-FFI cache folder that the GPU machine then reads (TVM_FFI_CACHE_DIR): SGLang loads a module
from ``<cache>/<name>__arch_9.0a__tvmffi_<version>/<name>.so`` without compiling when the file is there
(sglang.kernels.jit.utils.compile.load_jit; the name hashes the kernel sources, so only the same SGLang
sources find it).

Runs on a machine without a GPU, with nvcc 13.0 (/usr/local/cuda) and any Python that has torch (CPU) and
apache-tvm-ffi of the kit's version; PYTHONPATH must reach the kit's sglang package. Called by
e2e/sglang_gpu_kit.sh. The small kernels (norms, rope, KV-cache store) are left to compile on the GPU
machine at first use (seconds each).
"""

from __future__ import annotations

import argparse
import os
import time


def _bare_sglang_package() -> None:
    """``sglang`` as an empty package over its folder: its __init__ imports the whole server (transformers,
    torchvision), which the compiler does not need."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.submodule_search_locations, "PYTHONPATH must reach the kit's sglang"
    module = types.ModuleType("sglang")
    module.__path__ = list(spec.submodule_search_locations)
    sys.modules["sglang"] = module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", required=True, help="TVM-FFI cache folder to fill")
    p.add_argument("--dtypes", default="bfloat16,float16")
    args = p.parse_args()
    os.environ["TVM_FFI_CACHE_DIR"] = os.path.abspath(args.cache)
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    import torch

    _bare_sglang_package()
    from sglang.kernels.jit.utils.arch import override_jit_cuda_arch

    from sglang.kernels.ops.quantization import gptq_marlin, gptq_marlin_repack

    builders = [("gptq_marlin_repack", gptq_marlin_repack._jit_gptq_marlin_repack_module, ())]
    for name in args.dtypes.split(","):
        builders.append((f"gptq_marlin[{name}]", gptq_marlin._jit_gptq_marlin_module, (getattr(torch, name),)))
    with override_jit_cuda_arch(9, 0):
        for label, build, build_args in builders:
            t0 = time.time()
            build(*build_args)
            print(f"built {label} in {time.time() - t0:.0f} s", flush=True)
    for root, _, files in os.walk(args.cache):
        for f in files:
            if f.endswith(".so"):
                path = os.path.join(root, f)
                print(f"{os.path.getsize(path) / 2**20:7.1f} MiB  {os.path.relpath(path, args.cache)}")


if __name__ == "__main__":
    main()
