#!/bin/bash
# On the GPU machine, after the kit and data parts were carried into /tmp/kit (e2e/README.md, "SGLang on the
# GPU machine"): unpacks them once (while the machine stays warm), sets the environment and runs a step.
#   bash e2e/sglang_gpu_run.sh e2e [args for e2e/sglang_gpu.py]
#   bash e2e/sglang_gpu_run.sh bench [args for benchmarks/sglang_gpu.py]
#   bash e2e/sglang_gpu_run.sh shell 'command'
# Writes logs and JSON under $OUT (and keeps SGLang's JIT cache there as jitcache.tgz for a later machine).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -f /tmp/sgl/.unpacked ]; then
  t0=$SECONDS
  mkdir -p /tmp/sgl /tmp/sgl-jit /tmp/sgdata /tmp/qz
  cat /tmp/kit/part-* | tar -xJ -C /tmp/sgl || exit 1
  [ -f /tmp/kit/jit.tar.xz ] && tar -xJf /tmp/kit/jit.tar.xz -C /tmp/sgl-jit
  [ -f /tmp/kit/jitcache.tgz ] && tar -xzf /tmp/kit/jitcache.tgz -C /tmp/sgl-jit
  cat /tmp/kit/data-* | tar -xJ -C /tmp/sgdata || exit 1
  python3 -m pip install -q --no-index --no-deps --target /tmp/qz /tmp/sgdata/*.whl || exit 1
  touch /tmp/sgl/.unpacked
  echo "unpacked in $((SECONDS - t0)) s"
fi
export PYTHONPATH=/tmp/qz:/tmp/sgl TVM_FFI_CACHE_DIR=/tmp/sgl-jit QUANTIZE_SITE=/tmp/qz HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
step=${1:-e2e}; shift || true
case $step in
  e2e)
    python3 e2e/sglang_gpu.py --ckpts /tmp/sgdata --json "$OUT/sglang_e2e.json" "$@" 2>&1 | tee "$OUT/e2e.log"
    cp /tmp/sglang_e2e_engine.log "$OUT/" 2>/dev/null
    cat /tmp/sglang_server_*.log > "$OUT/sglang_server.log" 2>/dev/null ;;
  bench)
    python3 benchmarks/sglang_gpu.py --work /tmp/sb --tokenizer /tmp/sgdata/w4sym --json /tmp/sglang_bench.json "$@" 2>&1 | tee "$OUT/bench.log"
    cp /tmp/sglang_bench.json "$OUT/" ;;
  shell) bash -c "$*" 2>&1 | tee "$OUT/shell.log" ;;
esac
tar -C /tmp/sgl-jit -czf "$OUT/jitcache.tgz" . 2>/dev/null
