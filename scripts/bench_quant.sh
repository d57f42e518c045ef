#!/usr/bin/env bash
# The quantisation table of docs/benchmarks.md: on one GPU (an H200 for the published numbers), for the Llama-3-8B
# shape with random weights, the longest context that decodes and the decode ms/token at 1M tokens, for full
# attention (bf16) and DuoAttention 50% / 25% with bf16 / int8 / int4 KV, without and with 8-bit weights.
#
# Run from the repository root on the GPU machine: bash scripts/bench_quant.sh
# Results: ${OUT:-runs}/bench-quant/{results.json,capacity.png,config.json}; the table is printed at the end.
# About 5-7 minutes on an H200: correctness tests first (they stop the script on failure), then the benchmark.
set -euo pipefail
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT:-runs}/bench-quant"
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

"$PYTHON" -c "import torch, transformers, triton; assert torch.cuda.is_available(); \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__, \
'triton', triton.__version__)"

# 1. Correctness on this GPU: the Triton kernel and the int8 matmul against their references (bf16 tolerances),
#    plus the CPU-side quantisation tests.
"$PYTHON" -m pytest -q -s -m "not slow" tests/test_quant_kv.py tests/test_quant_cache.py tests/test_quant_weights.py \
    tests/test_triton_quant.py

# 2. Capacity (estimated from bytes per token, then checked by filling the cache and decoding) and decode ms/token.
"$PYTHON" -m duoattn bench --out "$OUT_DIR" --shapes llama-3-8b --ratios 1.0,0.5,0.25 --kv-bits 16,8,4 \
    --weight-bits 16,8 --contexts 1048576 --steps 10 --warmup 3 --sink 64 --recent 256 --reserve-gib 3
