"""Identification at scale, on tiny models: the student's streaming kernels against the deployed kernel and the
dense oracle, the FlexAttention block mask against the token rule, the late student start against a whole-sequence
pass, activation checkpointing against keeping the activations (same gates), memory that grows with the layer
boundaries only, the paper preset, and ``duoattn bench-identify`` on the tiny shape."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_llama
from identify_helpers import CharTokenizer, one_long_range_head_model, random_samples
from test_identify_data import TEXT

from duoattn.bench.shapes import build_random_model
from duoattn.bench.tensor_memory import PeakTensorMemory
from duoattn.cli import PRESET_FLAGS, build_parser, main
from duoattn.identify import IdentifyConfig, identify
from duoattn.identify.gates import GateSet, gated_attention, student_forward, teacher_forward
from duoattn.identify.memory import checkpointed_layers, resolve_checkpointing
from duoattn.identify.streaming import FLEX_BLOCK, blocked_streaming_attention, flex_streaming_attention, flex_window
from duoattn.identify.train import PRESETS, train_gates
from duoattn.kernels.attention import streaming_attention
from duoattn.kernels.reference import reference_attention
from duoattn.models import sliding_windows

pytestmark = pytest.mark.usefixtures("one_thread")


def streaming_problem(c: int, sink: int, recent: int, run_start: int, hq: int = 4, hkv: int = 2, d: int = 8,
                      seed: int = 0):
    """Queries at the last ``c`` of the run ``run_start..``, sink keys ``0..sink-1``; the run covers the windows."""
    gen = torch.Generator().manual_seed(seed)
    first = max(run_start + recent - 1, sink + recent)  # position of the first query
    run_len = first + c - run_start
    shapes = ((hq, c), (hkv, sink), (hkv, sink), (hkv, run_len), (hkv, run_len))
    return [torch.randn(1, h, n, d, generator=gen, dtype=torch.float64) for h, n in shapes], run_start


def dense_streaming(q, k_sink, v_sink, k_run, v_run, run_start, recent, scale, softcap=None):
    """The oracle over the whole sequence: positions ``0..T-1`` rebuilt from the sink keys and the run."""
    num_sink, c = k_sink.shape[2], q.shape[2]
    total = run_start + k_run.shape[2]
    keys = torch.zeros(1, k_run.shape[1], total, q.shape[3], dtype=q.dtype)
    values = torch.zeros_like(keys)
    keys[:, :, run_start:], values[:, :, run_start:] = k_run, v_run
    keys[:, :, :num_sink], values[:, :, :num_sink] = k_sink, v_sink
    queries = torch.zeros(1, q.shape[1], total, q.shape[3], dtype=q.dtype)
    queries[:, :, total - c:] = q
    no_retrieval = torch.zeros(k_run.shape[1], dtype=torch.bool)
    out = reference_attention(queries, keys, values, no_retrieval, num_sink, recent, scale=scale, softcap=softcap)
    return out[:, :, total - c:]


# --------------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("c, sink, recent, run_start, block, pairs, softcap", [
    (70, 3, 7, 0, 16, 1 << 22, None),    # one chunk
    (70, 3, 7, 2, 16, 300, None),        # several chunks (recomputed in backward), the run starts inside the sink
    (129, 0, 16, 20, 32, 1000, None),    # no sink
    (50, 4, 9, 6, 8, 200, 2.0),          # soft-capped, chunked
    (33, 5, 40, 0, None, 1 << 22, None),  # a window longer than the queries
])
def test_blocked_kernel_matches_the_oracle_and_the_deployed_kernel(c, sink, recent, run_start, block, pairs, softcap):
    inputs, run_start = streaming_problem(c, sink, recent, run_start)
    scale = 0.3
    leaves = [x.clone().requires_grad_() for x in inputs]
    got = blocked_streaming_attention(*leaves[:5], run_start, recent, scale, softcap=softcap, block=block,
                                      chunk_pairs=pairs)
    want = dense_streaming(*inputs, run_start, recent, scale, softcap)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    deployed = streaming_attention(*inputs, run_start, recent, scale, block=block, softcap=softcap)
    torch.testing.assert_close(got, deployed, rtol=1e-10, atol=1e-10)
    # gradients: chunks recomputed in the backward pass against one unchunked call
    dout = torch.randn_like(got)
    got.backward(dout)
    ref_leaves = [x.clone().requires_grad_() for x in inputs]
    blocked_streaming_attention(*ref_leaves[:5], run_start, recent, scale, softcap=softcap, block=block,
                                chunk_pairs=1 << 30).backward(dout)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert leaves[0].grad.abs().max() > 0


def test_blocked_kernel_refuses_a_run_that_misses_window_keys():
    inputs, _ = streaming_problem(20, 2, 8, 0)
    q, k_sink, v_sink, k_run, v_run = inputs
    with pytest.raises(ValueError, match="need the keys from"):  # drop the first window keys of the first query
        blocked_streaming_attention(q, k_sink, v_sink, k_run[:, :, 5:], v_run[:, :, 5:], 5, 8, 0.3)


@pytest.mark.parametrize("c, sink, recent, run_start, softcap", [
    (300, 3, 7, 0, None), (300, 130, 200, 100, None), (129, 0, 16, 20, None), (260, 4, 140, 6, 2.0),
])
def test_flex_kernel_matches_the_blocked_kernel(c, sink, recent, run_start, softcap):
    # eager FlexAttention (a dense reference that ignores the block mask) checks mask_mod and the key layout;
    # FlexAttention has no CPU backward, so only the forward is compared here
    inputs, run_start = streaming_problem(c, sink, recent, run_start, seed=1)
    got = flex_streaming_attention(*inputs, run_start, recent, 0.3, softcap=softcap, compiled=False)
    want = blocked_streaming_attention(*inputs, run_start, recent, 0.3, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c, q_start, num_sink, recent, run_start", [
    (1000, 400, 64, 256, 145), (300, 3, 3, 7, 0), (700, 500, 130, 200, 100), (129, 20, 0, 16, 5), (257, 9, 9, 1, 9),
])
def test_flex_block_mask_lists_every_block_with_a_visible_key(c, q_start, num_sink, recent, run_start):
    run_len = q_start + c - run_start
    window = flex_window(recent, torch.device("cpu"))
    mask = window.block_mask(c, q_start, num_sink, run_len, run_start)
    q_idx = torch.arange(c)[:, None]
    kv_idx = torch.arange(num_sink + run_len)[None, :]
    visible = window.mask_mod(0, 0, q_idx, kv_idx)  # the token rule, by absolute position
    q_pos, k_pos = q_start + q_idx, torch.where(kv_idx < num_sink, kv_idx, kv_idx - num_sink + run_start)
    expected = (k_pos <= q_pos) & ((kv_idx < num_sink) | ((q_pos - k_pos < recent) & (k_pos >= num_sink)))
    assert torch.equal(visible, expected)
    nq, nkv = math.ceil(c / FLEX_BLOCK), math.ceil((num_sink + run_len) / FLEX_BLOCK)
    needed = torch.zeros(nq * FLEX_BLOCK, nkv * FLEX_BLOCK, dtype=torch.bool)
    needed[:c, : num_sink + run_len] = visible
    needed = needed.view(nq, FLEX_BLOCK, nkv, FLEX_BLOCK).any(dim=(1, 3))
    listed = mask.to_dense()[0, 0].bool()
    assert not (needed & ~listed).any()  # nothing visible is skipped
    assert torch.equal(listed, needed)  # and nothing is computed in vain


# ----------------------------------------------------------------------------------------- the student's start
def gate_gradient(model, gates: torch.Tensor, ids: torch.Tensor, loss_from: int, start: int | None, sink: int,
                  recent: int, record: bool = True):
    """(student hidden states at ``loss_from..``, gradient of their squared error to the teacher)."""
    gates = torch.nn.Parameter(gates.clone())
    gate_set = GateSet(gates, model.config.num_attention_heads, sink, recent, sliding_windows(model.config))
    first = gate_set.student_start(loss_from) if start is None else start
    with gated_attention(model, gate_set):
        target = teacher_forward(model, gate_set, ids, first if record else None)[0, loss_from:]
        hidden = student_forward(model, gate_set, ids, first, exact_from=loss_from)[0, loss_from - first:]
        (hidden - target).pow(2).mean().backward()
    return hidden.detach(), gates.grad


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_student_pass_from_the_latest_start_is_exact_at_the_loss(family):
    model = tiny_llama(num_layers=3) if family == "llama" else FAMILIES[family].build(num_layers=4)
    sink, recent = 2, 5
    layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    ids = torch.randint(3, 97, (1, 90), generator=torch.Generator().manual_seed(5))
    gates = torch.rand(layers, kv, generator=torch.Generator().manual_seed(6), dtype=torch.float32) * 0.8 + 0.1
    loss_from = 80
    gate_set = GateSet(gates, model.config.num_attention_heads, sink, recent, sliding_windows(model.config))
    first_gated = 0 if family == "llama" else 1  # Gemma 3 here: local, global, local, global
    reach = sum(gate_set.window(layer)[1] - 1 for layer in range(first_gated + 1, layers))
    latest = gate_set.student_start(loss_from)
    assert latest == loss_from - reach > sink + recent  # well past the prefix rule of sink + recent
    whole_hidden, whole_grad = gate_gradient(model, gates, ids, loss_from, 0, sink, recent, record=False)
    late_hidden, late_grad = gate_gradient(model, gates, ids, loss_from, None, sink, recent)
    torch.testing.assert_close(late_hidden, whole_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(late_grad, whole_grad, rtol=1e-8, atol=1e-14)
    assert whole_grad.abs().max() > 0
    # one position later and the keys the teacher hands over reach the loss: the bound is tight
    with pytest.raises(ValueError, match="start must be"):
        gate_gradient(model, gates, ids, loss_from, latest + 1, sink, recent)
    gate_set = GateSet(gates, model.config.num_attention_heads, sink, recent, sliding_windows(model.config))
    with torch.no_grad(), gated_attention(model, gate_set):
        teacher_forward(model, gate_set, ids, None)
        gate_set.student_start = lambda first_loss: latest + 1  # bypass the check to see the error it prevents
        beyond = student_forward(model, gate_set, ids, latest + 1, exact_from=loss_from)[0, loss_from - latest - 1:]
    assert (beyond - whole_hidden).abs().max() > 1e-6


def test_the_teacher_keeps_only_what_the_student_reads(tiny_model):
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(1))
    gate_set = GateSet(torch.ones(3, 2), 4, 4, 16)
    start = 150
    with torch.no_grad(), gated_attention(tiny_model, gate_set):
        teacher_forward(tiny_model, gate_set, ids, start)
        record = gate_set.teacher[1]
        assert record.full.shape[1] == 50 and record.full_from == start
        assert record.k_sink.shape[2] == 4 and record.k_run.shape[2] == 15 and record.run_from == 135
        assert record.full.untyped_storage().nbytes() == record.full.numel() * 8  # its own memory, not a view
        with pytest.raises(RuntimeError, match="recorded for a student start of 150"):
            student_forward(tiny_model, gate_set, ids, 100, exact_from=150)


# ------------------------------------------------------------------------------------------------ checkpointing
def run(model, tmp_path: Path, name: str, sample_fn, **kwargs):
    # min_len / max_len only have to pass the config check (> sink + recent): the samples come from sample_fn
    values = dict(out=str(tmp_path / name), steps=6, lr=0.05, sink=2, recent=8, min_len=64, max_len=64)
    config = IdentifyConfig(**{**values, **kwargs})
    return train_gates(model, sample_fn, config, config.settings(), tmp_path / name / "ckpt", progress=False)


@pytest.mark.parametrize("chunk_pairs", [None, 300])  # 300: attention in chunks, checkpointed inside the layers
def test_checkpointing_gives_the_same_gates(tmp_path, monkeypatch, chunk_pairs):
    if chunk_pairs is not None:
        monkeypatch.setattr("duoattn.identify.streaming.CHUNK_PAIRS", chunk_pairs)
    samples = random_samples(120, 60)  # loss on the last 60 tokens: the student starts at 53, 67 queries
    plain = run(one_long_range_head_model(), tmp_path, "plain", samples, checkpointing="off")
    recomputed = run(one_long_range_head_model(), tmp_path, "recomputed", samples, checkpointing="on")
    assert not plain.checkpointing and recomputed.checkpointing
    torch.testing.assert_close(recomputed.gates, plain.gates, rtol=1e-12, atol=1e-12)
    assert [r["distill"] for r in recomputed.history] == pytest.approx([r["distill"] for r in plain.history], rel=1e-10)
    assert (plain.gates < 0.99).any()


def test_the_late_start_and_checkpointing_give_the_gates_of_a_whole_sequence_pass(tmp_path, monkeypatch):
    samples = random_samples(120, 10)
    new = run(one_long_range_head_model(), tmp_path, "new", samples, checkpointing="on")
    # the rule before: start at sink + recent (or the first loss position), whatever the number of layers
    monkeypatch.setattr(GateSet, "student_start", lambda self, first: min(self.sink + self.recent, first))
    old = run(one_long_range_head_model(), tmp_path, "old", samples, checkpointing="off")
    torch.testing.assert_close(new.gates, old.gates, rtol=1e-9, atol=1e-12)


def test_resume_with_checkpointing_repeats_an_uninterrupted_run_bit_for_bit(tmp_path):
    samples = random_samples(120, 10)
    whole = run(one_long_range_head_model(), tmp_path, "a", samples, checkpointing="on", steps=5, save_every=2)

    def interrupted(step):
        if step == 3:
            raise KeyboardInterrupt
        return samples(step)

    with pytest.raises(KeyboardInterrupt):
        run(one_long_range_head_model(), tmp_path, "b", interrupted, checkpointing="on", steps=5, save_every=2)
    resumed = run(one_long_range_head_model(), tmp_path, "b", samples, checkpointing="on", steps=5, save_every=2,
                  resume=True)
    assert torch.equal(resumed.gates, whole.gates)
    assert [r["distill"] for r in resumed.history] == [r["distill"] for r in whole.history]


def test_checkpointing_leaves_the_model_as_it_was(tiny_model):
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    before = tiny_model(ids).logits
    gate_set = GateSet(torch.ones(3, 2), 4, 2, 8)
    with gated_attention(tiny_model, gate_set), checkpointed_layers(tiny_model, gate_set):
        assert all("forward" in layer.__dict__ for layer in tiny_model.model.layers)
    assert not any("forward" in layer.__dict__ for layer in tiny_model.model.layers)
    torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)
    assert resolve_checkpointing("auto", torch.device("cpu")) is False
    assert resolve_checkpointing("auto", torch.device("cuda")) is True
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        resolve_checkpointing("yes", torch.device("cpu"))


def student_peak(num_layers: int, length: int, checkpointing: bool) -> int:
    """Peak bytes of the tensors one student pass and its backward create (the teacher pass runs before)."""
    model = tiny_llama(num_layers=num_layers)
    ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(0))
    gates = torch.nn.Parameter(torch.full((num_layers, 2), 0.5))
    gate_set = GateSet(gates, 4, 2, 8)
    model.requires_grad_(False)
    start = 10  # = sink + recent; the loss is on every position after it, so no layer's work can be skipped
    with gated_attention(model, gate_set), (checkpointed_layers(model, gate_set) if checkpointing else nullcontext()):
        target = teacher_forward(model, gate_set, ids, start)[0, start:]
        with PeakTensorMemory() as tracker:
            hidden = student_forward(model, gate_set, ids, start)[0]
            (hidden - target).pow(2).mean().backward()
    return tracker.peak


def test_student_memory_grows_with_the_layer_boundaries_only():
    hidden_bytes = 32 * 8  # one float64 hidden state of the tiny model, per token
    length = 400
    peaks = {(layers, t, ckpt): student_peak(layers, t, ckpt) for layers in (2, 4) for t in (length, 2 * length)
             for ckpt in (False, True)}
    per_layer = {ckpt: (peaks[4, length, ckpt] - peaks[2, length, ckpt]) / 2 / (length * hidden_bytes)
                 for ckpt in (False, True)}
    # checkpointed, a layer adds its input hidden state (plus rounding); kept, it adds all its activations
    assert per_layer[True] < 1.5, per_layer
    assert per_layer[False] > 10, per_layer
    # layers x length four times larger: kept activations grow four times, checkpointed ones about twice
    growth = {ckpt: peaks[4, 2 * length, ckpt] / peaks[2, length, ckpt] for ckpt in (False, True)}
    assert growth[False] > 3.5 and growth[True] < 2.5, growth


# ----------------------------------------------------------------------------------------------------- presets
def test_the_paper_preset_and_explicit_settings(tmp_path):
    paper = IdentifyConfig.preset("paper", out=str(tmp_path))
    assert (paper.steps, paper.min_len, paper.max_len, paper.num_passkeys, paper.passkey_words) == (2000, 1000, 32000,
                                                                                                    10, 32)
    assert (paper.lr, paper.reg, paper.sink, paper.recent, paper.fit_context, paper.fit_min_len) == (
        0.02, 0.05, 128, 256, True, True)
    default = IdentifyConfig.preset("default", out=str(tmp_path))
    assert default == IdentifyConfig(out=str(tmp_path)) and not default.fit_context and not default.fit_min_len
    asked = IdentifyConfig.preset("paper", out=str(tmp_path), max_len=4000)  # a length asked for is kept
    assert not asked.fit_context and asked.fit_min_len and asked.max_len == 4000
    with pytest.raises(ValueError, match="unknown preset"):
        IdentifyConfig.preset("fast", out=str(tmp_path))
    args = build_parser().parse_args(["identify", "--out", str(tmp_path), "--preset", "paper", "--steps", "7"])
    given = {k: getattr(args, k) for k in PRESET_FLAGS if getattr(args, k) is not None}
    assert given == {"steps": 7} and args.preset == "paper" and set(PRESETS) == {"default", "paper"}


def test_the_paper_preset_fits_the_lengths_to_the_model(tmp_path):
    haystack = tmp_path / "text.txt"
    haystack.write_text(TEXT * 2, encoding="utf-8")
    config = IdentifyConfig.preset("paper", out=str(tmp_path / "run"), steps=1, num_passkeys=3, passkey_words=8,
                                   sink=4, recent=32, haystack=(str(haystack),))
    result = identify(config, model=one_long_range_head_model(), tokenizer=CharTokenizer(modulo=96), progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # the tiny model's context is 4096 tokens; 3 passkeys of 8 words in characters need more than 1000
    assert saved["max_len"] == 4096 and 1000 < saved["min_len"] < 4096
    assert saved["min_len"] <= result.history[0]["length"] <= 4096
    assert saved["student_kernel"] == "blocks" and saved["checkpointing"] is False


# -------------------------------------------------------------------------------------------- bench-identify
def test_bench_identify_on_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench-identify", "--shape", "tiny", "--lengths", "300,700", "--steps", "1", "--warmup", "0",
                 "--loss-tokens", "64", "--sink", "4", "--recent", "32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["shape"] == "tiny" and summary["longest_ok"] == 700 and summary["paper_preset_estimate"] is None
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert [r["length"] for r in rows] == [300, 700] and all(r["status"] == "ok" for r in rows)
    # 2 layers: the student starts at most recent - 1 positions before the first loss position
    assert [r["student_positions"] for r in rows] == [64 + 31, 64 + 31]
    weights = sum(p.numel() * 4 for p in build_random_model("tiny", "cpu", torch.float32).parameters())
    assert all(r["peak_gib"] * (1 << 30) > weights and r["seconds_per_step"] > 0 for r in rows)
    assert all(r["kernel"] == "blocks" and r["checkpointing"] is False for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["bench"]["lengths"] == [300, 700] and config["shape"]["num_hidden_layers"] == 2
    assert (out / "identify.png").read_bytes().startswith(b"\x89PNG") and "| 700 |" in (out / "table.md").read_text()
    assert code == 0 and main(["bench-identify", "--shape", "nope", "--out", str(out)]) == 2


def test_paper_estimate_interpolates_measured_rows_and_needs_the_range():
    """Hours of 2000 steps of uniform 1000-32000 tokens, from rows at 4K and 32K: a hand computation of the mean of
    the linear interpolation (flat below 4K); rows that do not cover the range give no estimate."""
    from duoattn.bench.identify import paper_estimate

    def row(length, seconds):
        return {"length": length, "seconds_per_step": seconds, "status": "ok"}

    got = paper_estimate([row(4096, 1.0), row(32768, 3.0)], max_len=32000)
    grid = np.linspace(1000, 32000, 256)
    by_hand = np.where(grid <= 4096, 1.0, 1.0 + 2.0 * (grid - 4096) / (32768 - 4096)).mean()
    assert got["mean_seconds_per_step"] == pytest.approx(by_hand, abs=1e-3)
    assert got["hours"] == pytest.approx(by_hand * 2000 / 3600, abs=0.01)
    assert paper_estimate([row(262144, 42.9)], max_len=32000) is None  # one row far beyond the range
    assert paper_estimate([row(4096, 1.0), row(16384, 2.0)], max_len=32000) is None  # short of 32K
