#!/usr/bin/env bash
# Prefill modes on one GPU (an H200 for docs/results.md): prefill seconds and peak GPU memory of "streaming",
# "window:512" and "full" for the Llama-3-8B shape with random weights, a 128K-token prompt prefilled in 32K chunks
# through model.generate, 25% retrieval heads (2 of 8 KV heads in every layer), sink 64 / recent 256.
#
# Run from the repository root on the GPU machine: bash scripts/gpu_prefill_modes.sh
# Results: ${OUT:-runs}/prefill-modes.json (one row per mode; peak_vs_streaming is the number the target is about).
# About 2-3 minutes on an H200: a consistency check of each mode's chunked path on a tiny model first (it stops the
# script on a mismatch), then each mode at 128K, twice but for "full" (the first run compiles kernels and pins host
# memory).
set -euo pipefail
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT:-runs}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

"$PYTHON" -c "import torch, transformers; assert torch.cuda.is_available(); \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)"

"$PYTHON" scripts/prefill_modes_bench.py --check --shape llama-3-8b --context "${CONTEXT:-131072}" \
    --chunk "${CHUNK:-32768}" --retrieval 0.25 --modes "${MODES:-streaming,window:512,full}" --sink 64 --recent 256 \
    --out "$OUT_DIR/prefill-modes.json"
cat "$OUT_DIR/prefill-modes.json"
