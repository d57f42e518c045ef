"""Tensor-parallel DuoAttention decode: ms per token at long contexts, each rank holding its own KV heads.

    torchrun --nproc-per-node 2 scripts/tp_decode_bench.py --model DIR --contexts 131072,524288 --out runs/tp2
    torchrun --nproc-per-node 2 scripts/tp_decode_bench.py --shape llama-3-8b --contexts 131072,524288 --out runs/tp2

The model is loaded with ``from_pretrained(..., tp_plan="auto")``; without ``--model``, rank 0 first saves a
random-weight model of ``--shape`` to ``--out``/model (nothing is downloaded). Each rank's cache is filled with
random keys and values to the context (a stand-in for the prefill: only decode speed is measured), then decode
ms/token is the difference of two ``generate`` calls on the same filled cache (2 and 2 + steps new tokens), as in
``duoattn bench``. Rank 0 writes ``results.json`` (per context: ms/token, each rank's KV bytes and retrieval heads,
peak memory) and ``tp_decode.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from duoattn import HeadPattern, duo_attention
from duoattn.bench.run import greedy, random_ids
from duoattn.bench.shapes import build_random_model
from duoattn.bench.timing import peak_bytes, reset_peak, time_once_s
from duoattn.deploy import cache_kwarg
from duoattn.distributed import init_world
from duoattn.io import atomic_write_text, save_figure
from duoattn.models import text_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="directory or hub id (default: a random model of --shape)")
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--pattern", default=None, help="pattern directory (default: random gates)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--balance-ranks", action="store_true", help="the same retrieval heads per rank in every layer")
    p.add_argument("--contexts", default="131072,524288")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--out", default="runs/tp-decode")
    args = p.parse_args()

    world = init_world(args.device)
    out = Path(args.out)
    dtype = torch.bfloat16 if world.device.type == "cuda" else torch.float32
    model_dir = args.model
    if model_dir is None:
        model_dir = str(out / "model")
        if world.is_main and not (out / "model" / "config.json").exists():
            build_random_model(args.shape, "cpu", dtype).save_pretrained(model_dir)
        dist.barrier()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=dtype)
    cfg = text_config(model)
    pattern = (HeadPattern.load(args.pattern) if args.pattern else
               HeadPattern.random(cfg.num_hidden_layers, cfg.num_key_value_heads, seed=0))
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        row = {"context": context, "ranks": world.size}
        try:
            with duo_attention(model, pattern, sparsity=args.sparsity, cuda_graphs=not args.no_cuda_graphs,
                               balance_ranks=world.size if args.balance_ranks else None) as handle:
                cache = handle.new_cache(context + 2 * args.steps + 8, batch_size=1)
                cache.fill_random(context, torch.Generator(device=world.device).manual_seed(0))
                ids = random_ids(model, context + 1, world.device, 0)
                name = cache_kwarg(model)

                def generate(new: int) -> None:
                    cache.set_length(context)
                    with torch.no_grad():
                        model.generate(ids, generation_config=greedy(new), **{name: cache})

                reset_peak(world.device)
                row["first_call_s"] = time_once_s(lambda: generate(2), world.device)
                short = time_once_s(lambda: generate(2), world.device)
                long = time_once_s(lambda: generate(2 + args.steps), world.device)
                row["ms_per_token"] = max(long - short, 0.0) / args.steps * 1e3
                local = torch.tensor([cache.kv_bytes(), sum(r.num_retrieval for r in handle.layer_roles if r),
                                      peak_bytes(world.device) or 0], dtype=torch.float64, device=world.device)
                gathered = [torch.empty_like(local) for _ in range(world.size)]
                dist.all_gather(gathered, local)
                row["kv_gib_per_rank"] = [round(g[0].item() / 2**30, 3) for g in gathered]
                row["retrieval_heads_per_rank"] = [int(g[1].item()) for g in gathered]
                row["peak_gib_per_rank"] = [round(g[2].item() / 2**30, 3) for g in gathered]
                row["status"] = "ok"
        except torch.OutOfMemoryError as err:
            row.update(status="out of memory", note=str(err).split("\n")[0][:160])
        rows.append(row)
        if world.is_main:
            print(json.dumps(row), flush=True)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps({"model": model_dir, "rows": rows}, indent=1) + "\n")
        _plot(rows, out / "tp_decode.png", f"tensor parallel x{world.size}, sparsity {args.sparsity}")
    dist.destroy_process_group()


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["context"] for r in ok], [r["ms_per_token"] for r in ok], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    try:
        save_figure(fig, path, bbox_inches="tight")
    finally:
        plt.close(fig)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
