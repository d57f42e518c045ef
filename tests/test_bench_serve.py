"""``duoattn bench-serve`` on the CPU, tiny shape: the capacity count is the budget over one session's bytes
(computed here by hand from the cache layout), every session is really allocated and decoded in one batch, and the
outputs are written."""

from __future__ import annotations

import json

from duoattn.bench.serve import ServeBenchConfig, run_serve_bench
from duoattn.bench.shapes import SHAPES
from duoattn.cli import main


def session_bytes(ratio: float, kv_bits: int, tokens: int, sink: int, recent: int) -> int:
    """Key + value bytes of one float32 session of the tiny shape: retrieval heads hold every token (int4: half a
    byte per channel plus one float32 scale and zero point per vector), streaming heads sink + recent tokens."""
    shape = SHAPES["tiny"]
    heads = shape["num_hidden_layers"] * shape["num_key_value_heads"]
    d = shape["head_dim"]
    streaming = int((1 - ratio) * heads + 0.5)
    retrieval = heads - streaming
    dense = d * 4
    ret_vec = dense if kv_bits == 16 else d // 2 + 2 * 4
    return 2 * (retrieval * tokens * ret_vec + streaming * min(tokens, sink + recent) * dense)


def test_capacity_is_the_budget_over_the_session_bytes(tmp_path):
    budget = 3 << 20
    config = ServeBenchConfig(shape="tiny", contexts=[200], ratios=[1.0, 0.5], kv_bits=[16, 4], sink=4, recent=16,
                              steps=2, warmup=1, budget_gib=budget / 2**30, latency_batch=2, latency_context=100,
                              dtype="float32", device="cpu", out=str(tmp_path))
    report = run_serve_bench(config)
    rows = {(r["ratio"], r["kv_bits"]): r for r in report["rows"]}
    assert set(rows) == {(1.0, 16), (0.5, 16), (0.5, 4)}  # full attention only in the model dtype
    for (ratio, bits), row in rows.items():
        want = budget // session_bytes(ratio, bits, 200 + 1 + 2, 4, 16)
        assert row["session_bytes"] == session_bytes(ratio, bits, 203, 4, 16)
        assert row["expected_sessions"] == want and row["sessions"] == want > 1, row
        assert row["status"] == "ok" and row["tokens_per_s"] > 0
    assert rows[(0.5, 4)]["sessions"] > rows[(0.5, 16)]["sessions"] > rows[(1.0, 16)]["sessions"]
    assert all(r["ms_batch"] > 0 and r["ms_single"] > 0 for r in report["latency"])
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert saved["rows"] == report["rows"]
    assert json.loads((tmp_path / "config.json").read_text())["budget_gib"] == budget / 2**30
    assert (tmp_path / "serve.md").read_text().count("\n| 200 |") == 3
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_cli_refuses_a_cpu_run_without_a_budget(tmp_path, capsys):
    code = main(["bench-serve", "--shape", "tiny", "--device", "cpu", "--contexts", "64", "--out", str(tmp_path)])
    assert code == 2 and "budget_gib is needed off CUDA" in capsys.readouterr().err
