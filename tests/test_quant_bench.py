"""The capacity / decode benchmark on a tiny random model on the CPU, with hand-computed bytes per token."""

from __future__ import annotations

import json

import pytest

from duoattn.cli import main
from duoattn.quant.bench import QuantBenchConfig, run_quant_bench


def test_quant_bench_tiny(tmp_path):
    config = QuantBenchConfig(out=str(tmp_path), shape="tiny", retrieval=[1.0, 0.5], kv_bits=[16, 4],
                              weight_bits=[16, 8], decode_len=40, steps=2, warmup=1, sink=4, recent=8,
                              fill_chunk=16, memory_budget_gib=2**-12)  # 256 KiB of KV memory
    results = run_quant_bench(config)
    rows = {(r["retrieval"], r["kv_bits"], r["weight_bits"]): r for r in results["rows"]}
    assert sorted(rows) == [(0.5, 4, 8), (0.5, 4, 16), (0.5, 16, 8), (0.5, 16, 16), (1.0, 16, 8), (1.0, 16, 16)]
    # tiny: 2 layers x 2 KV heads x head_dim 64, float32. Full: 2 x 2 x 64 x 4 bytes x (K, V) = 2048 bytes per token.
    # DuoAttention 50%: 2 retrieval heads; int4 = 32 bytes of codes + float32 scale and zero = 40 bytes per vector.
    assert rows[(1.0, 16, 16)]["kv_bytes_per_token"] == 2048
    assert rows[(0.5, 16, 16)]["kv_bytes_per_token"] == 1024
    assert rows[(0.5, 4, 16)]["kv_bytes_per_token"] == 2 * 40 * 2
    for row in rows.values():
        assert row["capacity_checked"] == row["capacity_estimate"] > 0  # no out-of-memory on the CPU
        assert row["decode_ms_per_token"] > 0
        assert row["kv_bytes_at_decode_len"] <= row["budget_bytes"]
    # 256 KiB at 2048 bytes per token: 128 tokens less the 3 decoded ones
    assert rows[(1.0, 16, 16)]["capacity_estimate"] == 2**18 // 2048 - 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    assert json.loads((tmp_path / "config.json").read_text())["shape"] == "tiny"
    assert (tmp_path / "capacity.png").stat().st_size > 0


def test_quant_bench_refuses_bad_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="retrieval ratios must be in"):
        QuantBenchConfig(out=str(tmp_path), retrieval=[0.0])
    assert main(["bench", "--out", str(tmp_path), "--kv-bits", "16,3"]) == 2
    assert "kv_bits must be some of (16, 8, 4)" in capsys.readouterr().err
    assert main(["bench", "--shapes", "tiny,llama-3-8b", "--weight-bits", "8"]) == 2
    assert "take one shape" in capsys.readouterr().err
    assert main(["bench", "--model", "x", "--kv-bits", "4"]) == 2
    assert "take no --model" in capsys.readouterr().err
