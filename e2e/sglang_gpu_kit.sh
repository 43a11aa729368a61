#!/bin/bash
# Builds the files that put SGLang 0.5.17 (torch 2.11 + CUDA 13, Python 3.12: the GPU machine's) on the GPU
# machine of the `device` tool, which has no network (e2e/README.md, "SGLang on the GPU machine").
#   bash e2e/sglang_gpu_kit.sh .gpu-sglang-kit        (DEST inside the repo and ignored: /.gpu-sglang-kit/ in
#                                                      .git/info/exclude)
# Output: DEST/part-* (the packages: chunks of at most 56 MiB, each carried in its own `run` call, back to
# back) and DEST/jit.tar.xz (SGLang's JIT kernels pre-built for sm_90a, a few MiB: carried with the last part).
# Steps: download the wheels of e2e/sglang_gpu_requirements.txt (cp312, manylinux); install them --no-deps
# under pyenv's Python 3.12 into one folder; drop what an H200 (sm_90) never loads; compress; split. Then
# pre-build the JIT kernels that take minutes to compile (Marlin, one translation unit of a few hundred
# template instances per activation dtype: about 13 minutes each on 2 busy cores) with this machine's nvcc
# 13.0 (e2e/sglang_gpu_jit.py): on the GPU machine they would compile at first use, in device time.
# Env: PY312 (interpreter), NO_JIT=1 / JIT_ONLY=1 (skip / do only the pre-build), JIT_DTYPES (activation
# dtypes to pre-build Marlin for; default bfloat16,float16), WORK (scratch folder; kept
# if set, and its jit_cache is reused).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); dest=${1:?usage: sglang_gpu_kit.sh DEST}
work=${WORK:-$(mktemp -d)}; mkdir -p "$dest" "$work/whl"; dest=$(realpath "$dest")
s=$work/site
if [ "${JIT_ONLY:-0}" != 1 ]; then
  rm -rf "$s"; mkdir -p "$s"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux_2_24_x86_64 -r "$here/sglang_gpu_requirements.txt" -d "$work/whl"
  # pip refuses cp312 wheels under another Python: take pyenv's 3.12 interpreter itself (its shim refuses
  # `python3.12` unless that version is selected).
  py312=${PY312:-$(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
  py312=${py312:-python3.12}
  "$py312" -m pip install -q --no-index --no-deps --no-compile --target "$s" "$work"/whl/*.whl
  # sgl_kernel: FlashAttention 3 (1.1 GB; its import is optional, serve with --attention-backend triton),
  # the Blackwell build of the common ops (sm90/ is what loads on compute capability 9.0), FlashMLA and
  # InfLLM (DeepSeek / MiniCPM attention, loaded lazily).
  rm -f "$s/sgl_kernel/flash_ops.abi3.so" "$s/sgl_kernel/flashmla_ops.abi3.so" "$s"/sgl_kernel/infllm_ops.*.so
  rm -rf "$s/sgl_kernel/sm100"
  # SGLang: the diffusion-model server and test suites, which serving an LLM never imports; data nothing
  # here reads: xgrammar's static library, Mistral's tokenizer files, jedi's typeshed stubs (IPython
  # completion), pycountry's translations.
  rm -rf "$s/sglang/multimodal_gen" "$s/sglang/test/srt" "$s/sglang/test/manual" "$s/sglang/benchmark" \
         "$s/xgrammar/lib" "$s/mistral_common/data" "$s/jedi/third_party/typeshed" "$s/pycountry/locales"
  find "$s" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$s" -cf - . | xz -T0 -6 > "$work/kit.tar.xz"
  rm -f "$dest"/part-*; split -b 56M "$work/kit.tar.xz" "$dest/part-"
  du -sh "$s"
fi
if [ "${NO_JIT:-0}" != 1 ]; then
  # The compiler runs under this machine's python3 (with torch, CPU is enough): it gets tvm-ffi of the
  # kit's version for that interpreter, and SGLang's package folder alone. SGLang finds a module at
  # <TVM_FFI_CACHE_DIR>/<name>__arch_9.0a__tvmffi_<version>/<name>.so (the name hashes the sources).
  tvm=$(grep -i '^apache-tvm-ffi==' "$here/sglang_gpu_requirements.txt")
  rm -rf "$work/jitenv"; python3 -m pip install -q --no-deps --target "$work/jitenv" "$tvm"
  ln -sfn "$s/sglang" "$work/jitenv/sglang"
  PYTHONPATH="$work/jitenv" python3 "$here/sglang_gpu_jit.py" --cache "$work/jit_cache" --dtypes "${JIT_DTYPES:-bfloat16,float16}"
  rm -rf "$work/jitenv"
  (cd "$work/jit_cache" && find . -name '*.so' -print0 | tar --null -T - -cf - | xz -6 > "$dest/jit.tar.xz")
fi
ls -la "$dest"
[ -n "${WORK:-}" ] || rm -rf "$work"
