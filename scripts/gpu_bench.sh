#!/usr/bin/env bash
# The figures of docs/benchmarks.md on one H200: everything through model.generate under duo_attention.
#
#   scripts/gpu_bench.sh OUT_ROOT [speed|quant|capacity ...]   (default: all three)
#
# speed: stock transformers, full attention and DuoAttention 50% / 25% on the same path, bf16 KV, decode at
#        32K / 128K / 512K and a real 128K prefill; quant: DuoAttention 25% with int8 / int4 KV up to 10M tokens;
#        capacity: the longest context that fits and decodes, bf16 / int8 / int4 KV, bf16 and 8-bit weights.
set -euo pipefail
ROOT=${1:?usage: $0 OUT_ROOT [speed|quant|capacity ...]}
shift
PARTS=("${@:-speed quant capacity}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
for part in ${PARTS[@]}; do
    case $part in
        speed) "$PY" -m duoattn bench --shapes llama-3-8b --ratios 1,0.5,0.25 --contexts 32768,131072,524288 \
                   --prefill-contexts 131072 --steps 32 --out "$ROOT/speed" ;;
        quant) "$PY" -m duoattn bench --shapes llama-3-8b --ratios 0.25 --kv-bits 8,4 \
                   --contexts 131072,1048576,10485760 --no-stock --steps 32 --out "$ROOT/quant" ;;
        capacity) "$PY" -m duoattn bench --shapes llama-3-8b --ratios 1,0.25 --kv-bits 16,8,4 --weight-bits 16,8 \
                   --contexts 1048576 --no-stock --no-step-rows --capacity --steps 8 --out "$ROOT/capacity" ;;
        *) echo "unknown part $part (speed, quant, capacity)" >&2; exit 2 ;;
    esac
done
