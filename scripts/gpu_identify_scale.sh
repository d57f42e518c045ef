#!/usr/bin/env bash
# Identification at a real model's scale (issue 12), on one GPU (an H200 for the published numbers): train_gates on
# the Llama-3-8B shape with random bf16 weights and float32 gates, samples of random tokens with the loss on the last
# 640 (where 10 passkeys of 32 words put their questions and answers), sink 128 / recent 256 (the paper preset).
#
# 1. A check that the student's FlexAttention kernel trains the same gates as the blocked SDPA kernel (4K samples,
#    3 steps each; bf16 weights, so the gates agree to rounding). A failure is recorded, not fatal.
# 2. Seconds per step and peak GiB at 4K, 8K, 16K, 32K, 64K, then 128K and 256K while the time budget allows (out
#    of memory is caught and recorded per length, and longer lengths are then skipped): the longest length that
#    fits, and the time of a 2000-step paper-preset run (1K-32K samples) interpolated from the measured steps.
#
# Run from the repository root on the GPU machine: bash scripts/gpu_identify_scale.sh   (under 4 minutes)
# Settings: LENGTHS (comma-separated sample lengths), STEPS (timed steps per length), TIME_S (wall-time cap).
# Results: ${OUT:-runs}/identify-scale/{results.json,table.md,identify.png,config.json,flex_vs_blocks.json}; the
# table and the paper-preset estimate are printed at the end. results.json is rewritten after every length, so a
# run cut short keeps what it measured.
set -euo pipefail
PYTHON="${PYTHON:-python}"
export OUT_DIR="${OUT:-runs}/identify-scale"
mkdir -p "$OUT_DIR"
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export CUBLAS_WORKSPACE_CONFIG=:4096:8

timeout "${TIME_S:-230}" "$PYTHON" - <<'PY'
import json, os, tempfile, time
from pathlib import Path

import torch
import transformers

from duoattn.bench.identify import IdentifyBenchConfig, random_samples, run_identify_bench, table
from duoattn.bench.shapes import build_random_model
from duoattn.identify.train import IdentifyConfig, train_gates

tic = time.perf_counter()
out = Path(os.environ["OUT_DIR"])
print(torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__, flush=True)
model = build_random_model("llama-3-8b", "cuda", torch.bfloat16)
print(f"model built in {time.perf_counter() - tic:.0f} s", flush=True)

# 1. flex against blocks, end to end
samples = random_samples(4096, 640, model.config.vocab_size, seed=1)
check = {}
for kernel in ("flex", "blocks"):
    with tempfile.TemporaryDirectory() as tmp:
        config = IdentifyConfig(out=tmp, steps=3, min_len=4096, max_len=4096, sink=128, recent=256, lr=0.05,
                                dtype="bfloat16", device="cuda", student_kernel=kernel, save_every=3)
        start = time.perf_counter()
        try:
            result = train_gates(model, samples, config, config.settings(), Path(tmp) / "ckpt", progress=False)
            check[kernel] = {"seconds": round(time.perf_counter() - start, 1), "gates": result.gates.tolist(),
                             "distill": [r["distill"] for r in result.history],
                             "step_seconds": [round(r["seconds"], 3) for r in result.history]}
        except Exception as err:  # noqa: BLE001 - recorded for the report
            check[kernel] = {"error": f"{type(err).__name__}: {str(err)[:800]}"}
        torch.cuda.empty_cache()
if "gates" in check["flex"] and "gates" in check["blocks"]:
    a, b = torch.tensor(check["flex"]["gates"]), torch.tensor(check["blocks"]["gates"])
    check["max_gate_difference"] = float((a - b).abs().max())
    check["mean_gate_drop"] = float(1 - b.mean())
(out / "flex_vs_blocks.json").write_text(json.dumps(check, indent=1) + "\n")
print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "gates"} if isinstance(v, dict) else v)
                  for k, v in check.items()}), flush=True)

# 2. the scale table, in the time left (the flex check above compiled the kernel for this model already)
budget = int(os.environ.get("TIME_S", 230)) - 15 - (time.perf_counter() - tic)
bench = IdentifyBenchConfig(out=str(out), shape="llama-3-8b", lengths=[int(n) for n in os.environ.get("LENGTHS", "4096,8192,16384,32768,65536,131072,262144").split(",")],
                            steps=int(os.environ.get("STEPS", 2)), warmup=1, loss_tokens=640, sink=128, recent=256, device="cuda",
                            time_budget_s=budget)
report = run_identify_bench(bench, progress=False, model=model)
print(table(report["rows"]))
print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
PY
