#!/bin/bash
# Builds the files that put SGLang 0.5.17 (torch 2.11 + CUDA 13, Python 3.12: the GPU machine's) on the GPU
# machine of the `device` tool, which has no network. Output: DEST/part-* chunks of at most 56 MiB, each
# carried in its own `run` call, back to back (e2e/README.md, "SGLang on the GPU machine").
#   bash e2e/sglang_gpu_kit.sh .gpu-sglang-kit        (DEST inside the repo and ignored: /.gpu-sglang-kit/ in
#                                                      .git/info/exclude)
# Steps: download the wheels of e2e/sglang_gpu_requirements.txt (cp312, manylinux); install them --no-deps
# under pyenv's Python 3.12 into one folder; drop what an H200 (sm_90) never loads; pre-build SGLang's JIT
# kernels (Marlin, norms, ...) for sm_90a with this machine's nvcc 13.0 (e2e/sglang_gpu_jit.py; they
# would otherwise compile on the GPU machine at first use, minutes of device time); compress; split.
# Env: PY312 (interpreter), NO_JIT=1 (skip the pre-build), WORK (scratch folder, kept if set).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); dest=${1:?usage: sglang_gpu_kit.sh DEST}
work=${WORK:-$(mktemp -d)}; mkdir -p "$dest" "$work/whl"
rm -rf "$work/site"; mkdir -p "$work/site"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux_2_24_x86_64 -r "$here/sglang_gpu_requirements.txt" -d "$work/whl"
# pip refuses cp312 wheels under another Python: take pyenv's 3.12 interpreter itself (its shim refuses
# `python3.12` unless that version is selected).
py312=${PY312:-$(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
py312=${py312:-python3.12}
"$py312" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$work"/whl/*.whl
s=$work/site
# sgl_kernel: FlashAttention 3 (1.1 GB; its import is optional, serve with --attention-backend triton),
# the Blackwell build of the common ops (sm90/ is what loads on compute capability 9.0), FlashMLA and InfLLM
# (DeepSeek / MiniCPM attention, loaded lazily).
rm -f "$s/sgl_kernel/flash_ops.abi3.so" "$s/sgl_kernel/flashmla_ops.abi3.so" "$s"/sgl_kernel/infllm_ops.*.so
rm -rf "$s/sgl_kernel/sm100"
# SGLang: the diffusion-model server and the test suites, which serving an LLM never imports.
rm -rf "$s/sglang/multimodal_gen" "$s/sglang/test/srt" "$s/sglang/test/manual" "$s/sglang/benchmark"
# Data nothing here reads: xgrammar's static library, Mistral's tokenizer files, jedi's typeshed stubs
# (IPython completion), pycountry's translations.
rm -rf "$s/xgrammar/lib" "$s/mistral_common/data" "$s/jedi/third_party/typeshed" "$s/pycountry/locales"
find "$s" -name __pycache__ -prune -exec rm -rf {} +
if [ "${NO_JIT:-0}" != 1 ]; then
  # Pre-built JIT kernels go where SGLang looks first (TVM_FFI_CACHE_DIR, set by the run recipe).
  PYTHONPATH="$s" python3 "$here/sglang_gpu_jit.py" --cache "$s/_jit_cache"
fi
tar -C "$s" -cf - . | xz -T0 -6 > "$work/kit.tar.xz"
rm -f "$dest"/part-*; split -b 56M "$work/kit.tar.xz" "$dest/part-"
ls -la "$dest"; du -sh "$s"
[ -n "${WORK:-}" ] || rm -rf "$work"
