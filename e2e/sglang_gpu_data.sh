#!/bin/bash
# The checkpoints e2e/sglang_gpu.py serves on the GPU machine, made here on the CPU (RTN, --iters 0), plus
# this project as a wheel (SGLang finds the plugin through its entry point, i.e. the wheel's dist-info),
# packed into DEST/data-* chunks of at most 56 MiB to carry like the kit (e2e/README.md).
#   bash e2e/sglang_gpu_data.sh .gpu-sglang-data       (ignored: /.gpu-sglang-data/ in .git/info/exclude)
# The checkpoints are written by the `quantize` that python3 imports from $work (set PYTHONPATH to a
# wheel's install of a clean export to leave a checkout's uncommitted edits out).
# Checkpoints of the reference model (../shared/models/gutenberg-llama-29m; MODEL=... for another):
#   w4sym (gptq layout, SGLang's Marlin), w4asym (awq layout), w3asym (auto_round layout), w2sym (g64),
#   w8sym (Marlin, uint8b128), mixed (W4 with 8-bit down_proj, 2-bit g64 attention in layer 1 and two
#   16-bit MLP layers), intel-w4sym (written by Intel's auto-round 0.16.1, format auto_round).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd); dest=${1:?usage: sglang_gpu_data.sh DEST}
model=${MODEL:-$repo/../shared/models/gutenberg-llama-29m}
work=${WORK:-$(mktemp -d)}; mkdir -p "$dest" "$work/ckpt" "$work/wheel"
cd "$work"  # not the checkout: `python -m quantize` would import it from the current folder before PYTHONPATH
q() { local name=$1; shift
  [ -f "$work/ckpt/$name/config.json" ] || python3 -m quantize "$model" --iters 0 --nsamples 4 --batch_size 2 --seqlen 128 --no-eval --quiet --output_dir "$work/ckpt/$name" "$@"; }
q w4sym --scheme W4A16
q w4asym --scheme W4A16 --asym
q w3asym --scheme W3A16 --asym
q w2sym --scheme W2A16G64
q w8sym --scheme W8A16
q mixed --scheme W4A16 --layer_config '{"mlp\\.down_proj": {"bits": 8}, "layers\\.1\\.self_attn": {"bits": 2, "group_size": 64}, "layers.7.mlp.gate_proj": {"bits": 16}, "layers.7.mlp.up_proj": {"bits": 16}}'
# Intel's writer, in an interpreter that never imports this project.
[ -f "$work/ckpt/intel-w4sym/config.json" ] || QUANTIZE_LLM_NO_AUTOLOAD=1 python3 - "$model" "$work/ckpt/intel-w4sym" "$repo/quantize/data/calib.txt" <<'PY'
import sys
from pathlib import Path
from auto_round import AutoRound
from transformers import AutoTokenizer
model, out, calib = sys.argv[1:4]
texts = [t for t in Path(calib).read_text().split("\n\n") if len(t) > 200][:16]
tok = AutoTokenizer.from_pretrained(model)
ar = AutoRound(model, tokenizer=tok, bits=4, group_size=128, sym=True, iters=0, disable_opt_rtn=True,
               disable_model_free=True, dataset=texts, nsamples=4, seqlen=32, batch_size=2, device_map="cpu", seed=0)
ar.quantize_and_save(out, format="auto_round")
assert "quantize" not in sys.modules
PY
# Intel's saver nests the files one folder down in some versions: serve the folder that holds config.json.
inner=$(dirname "$(find "$work/ckpt/intel-w4sym" -name config.json | head -1)")
[ "$inner" = "$work/ckpt/intel-w4sym" ] || { mv "$inner" "$work/intel.tmp"; rm -rf "$work/ckpt/intel-w4sym"; mv "$work/intel.tmp" "$work/ckpt/intel-w4sym"; }
# The wheel from SRC (default: this checkout; e.g. a `git archive HEAD` export to leave uncommitted edits out).
rm -f "$work"/wheel/*.whl; python3 -m pip wheel -q --no-deps --no-build-isolation "$(realpath "${SRC:-$repo}")" -w "$work/wheel"
cp "$work"/wheel/*.whl "$work/ckpt/"
tar -C "$work/ckpt" -cf - . | xz -T0 -6 > "$work/data.tar.xz"
rm -f "$dest"/data-*; split -b 56M "$work/data.tar.xz" "$dest/data-"
ls -la "$dest"; du -sh "$work"/ckpt/*
[ -n "${WORK:-}" ] || rm -rf "$work"
