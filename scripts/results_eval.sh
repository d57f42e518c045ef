#!/usr/bin/env bash
# Every evaluation figure and table of docs/results.md for the embedded SmolLM2-135M-Instruct, on one GPU.
#
#   scripts/results_eval.sh OUT_ROOT [flags added to every run, e.g. --model FILE.gguf --pattern DIR]
#
# Writes OUT_ROOT/{niah,ruler,sweep,quant-passkey,quant-niah,quant-w8}/ (config.json, cells.jsonl, results.json, PNGs), OUT_ROOT/timings.txt,
# and OUT_ROOT.tar.gz holding all of it. Rerunning with the same OUT_ROOT continues where a run stopped.
# Sized for about 5 minutes on one H200 (see docs/evaluation.md, "Sizing the GPU run"). PARALLEL=1 runs the stages
# side by side, each in its own process (a 135M model leaves most of the GPU idle).
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUT_ROOT [flags for every run, e.g. --model FILE.gguf --pattern DIR]" >&2
    exit 2
fi
ROOT=${1%/}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# Instruct model: the chat template, so that answers end with the end-of-turn token instead of running on.
COMMON=(--device "${DEVICE:-cuda}" "$@")
mkdir -p "$ROOT"

run_stage() {
    local name=$1
    shift
    local start=$SECONDS
    "$PY" -m duoattn eval "$@" --out "$ROOT/$name" "${COMMON[@]}"
    echo "$name $((SECONDS - start)) s" | tee -a "$ROOT/timings.txt"
}

stage() {
    if [[ ${PARALLEL:-0} == 1 ]]; then
        run_stage "$@" >"$ROOT/$1.log" 2>&1 &
    else
        run_stage "$@"
    fi
}

# 1. Needle in a haystack, 1K to 8K x 5 depths: full, DuoAttention 25% and 50% retrieval heads, StreamingLLM.
stage niah niah --chat-template --lengths 1024,2048,4096,6144,8192 --depths 0,0.25,0.5,0.75,1 \
    --methods full,duo,streaming --sparsity 0.75,0.5 --max-new-tokens 24

# 2. RULER at 2K and 4K: the eight niah tasks, vt, cwe, fwe, qa_1; same methods.
stage ruler ruler --chat-template --lengths 2048,4096 --samples 2 \
    --tasks niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe,qa_1 \
    --methods full,duo,streaming --sparsity 0.75,0.5 --max-new-tokens 48

# 3. Budget sweep on the needle task: DuoAttention and random heads (2 seeds) at five budgets.
stage sweep niah --chat-template --lengths 2048,4096,8192 --depths 0.25,0.5,0.75 \
    --methods full,duo,streaming,random --sparsity 0,0.25,0.5,0.75,0.9 --random-seeds 2 --max-new-tokens 24

# 4. What a quantised retrieval cache costs (raw passkey prompts, like the demo; NIAH as in stage 1).
stage quant-passkey passkey --lengths 2048,4096 --samples 20 --seed 20261202 \
    --methods duo --sparsity 0.75,0.5,0 --kv-bits 16,8,4
stage quant-niah niah --chat-template --lengths 2048,4096 --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 \
    --methods duo --sparsity 0.75,0.5,0 --kv-bits 16,8,4 --max-new-tokens 24
stage quant-w8 passkey --lengths 2048,4096 --samples 20 --seed 20261202 --weight-bits 8 \
    --methods full,duo --sparsity 0.75 --kv-bits 16,4

wait
tar czf "$ROOT.tar.gz" -C "$(dirname "$ROOT")" "$(basename "$ROOT")"
echo "archive: $ROOT.tar.gz"
