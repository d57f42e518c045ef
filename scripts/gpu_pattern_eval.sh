#!/usr/bin/env bash
# Passkey and NIAH at 1K-8K on one pattern (full / duo 25% / duo 50% / random heads), one process per task and
# length (a 135M model leaves the GPU idle). Same prompts as scripts/gpu_accuracy.sh (seed 20261201, 50 depths), so
# the numbers compare with docs/results.md.
#
#   scripts/gpu_pattern_eval.sh OUT_ROOT MODEL.gguf PATTERN_DIR
#
# Environment (defaults in brackets): LENGTHS [1024,2048,4096,8192], SAMPLES [50], METHODS [full,duo,random],
# SPARSITY [0.75,0.5], DEVICE [cuda], PYTHON [python3], PARALLEL [1: every task and length at once; 0: one after
# the other, for a CPU].
set -euo pipefail
ROOT=${1:?usage: $0 OUT_ROOT MODEL.gguf PATTERN_DIR}
MODEL=${2:?usage: $0 OUT_ROOT MODEL.gguf PATTERN_DIR}
PATTERN=${3:?usage: $0 OUT_ROOT MODEL.gguf PATTERN_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LENGTHS=${LENGTHS:-1024,2048,4096,8192} SAMPLES=${SAMPLES:-50} METHODS=${METHODS:-full,duo,random}
SPARSITY=${SPARSITY:-0.75,0.5} DEVICE=${DEVICE:-cuda} PARALLEL=${PARALLEL:-1}
DEPTHS=$("$PY" -c "print(','.join(f'{i/($SAMPLES-1 if $SAMPLES>1 else 1):.4f}' for i in range($SAMPLES)))")
mkdir -p "$ROOT"
start=$SECONDS
status=0
launch() {  # in the background, or in the foreground with PARALLEL=0
    if [[ $PARALLEL == 0 ]]; then "$@" || status=1; else "$@" & fi
}
IFS=, read -r -a LENS <<<"$LENGTHS"
for L in "${LENS[@]}"; do
    # A passkey prompt is about L tokens and generates 8 more: at the context's end it must leave room for them.
    PL=$((L >= 8192 ? L - 16 : L))
    launch "$PY" -m duoattn eval passkey --model "$MODEL" --pattern "$PATTERN" --out "$ROOT/passkey-$L" \
        --lengths $PL --samples "$SAMPLES" --seed 20261201 --methods "$METHODS" --sparsity "$SPARSITY" \
        --random-seeds 1 --device "$DEVICE" >"$ROOT/passkey-$L.log" 2>&1
    launch "$PY" -m duoattn eval niah --model "$MODEL" --pattern "$PATTERN" --out "$ROOT/niah-$L" --lengths $L \
        --depths "$DEPTHS" --chat-template --max-new-tokens 24 --methods "$METHODS" --sparsity "$SPARSITY" \
        --random-seeds 1 --device "$DEVICE" >"$ROOT/niah-$L.log" 2>&1
done
for job in $(jobs -p); do wait "$job" || status=1; done
echo "eval $((SECONDS - start)) s" | tee -a "$ROOT/timings.txt"
"$PY" "$REPO/scripts/pattern_summary.py" "$ROOT" | tee "$ROOT/summary.txt"
if [[ $status != 0 ]]; then
    # Name each failed run and its error (many processes on one GPU can run out of its memory).
    for log in $(grep -l "Traceback" "$ROOT"/*.log); do
        echo "failed: $log: $(tail -n 1 "$log" | cut -c 1-200)" >&2
    done
    echo "an eval process failed: see $ROOT/*.log" >&2
    exit 1
fi
