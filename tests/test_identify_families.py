"""Identification on every supported family (tiny random models): gates at 1 are the unpatched model, gates at 0
are the deployed all-streaming model (local layers keep their window in both), and a short run moves the gates of
the global layers only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from identify_helpers import random_samples

from duoattn import HeadPattern, duo_attention
from duoattn.identify.gates import GateSet, gated_attention, student_forward, teacher_forward
from duoattn.identify.train import IdentifyConfig, train_gates
from duoattn.models import sliding_windows

LAYERS, HEADS, KV_HEADS, SINK, RECENT = 4, 4, 2, 2, 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(4))


def build(family: str):
    return FAMILIES[family].build(num_layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS)


def tolerance(family: str) -> float:
    # eager attention (Gemma 2 before patching) takes its softmax in float32 even in a float64 model
    return 1e-5 if FAMILIES[family].attn == "eager" else 1e-10


def gated(model, value: float, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    gates = torch.full((LAYERS, KV_HEADS), value, dtype=torch.float32)
    gate_set = GateSet(gates, HEADS, SINK, RECENT, sliding_windows(model.config))
    with torch.no_grad(), gated_attention(model, gate_set):
        return teacher_forward(model, gate_set, ids), student_forward(model, gate_set, ids, start)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gates_at_one_are_the_unpatched_model(family, ids):
    model = build(family)
    with torch.no_grad():
        expected = model.base_model(ids, use_cache=False).last_hidden_state
    teacher, student = gated(model, 1.0, ids, start=SINK + RECENT)
    tol = tolerance(family)
    torch.testing.assert_close(teacher, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(student, expected[:, SINK + RECENT:], rtol=tol, atol=tol)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gates_at_zero_are_the_deployed_streaming_model(family, ids):
    model = build(family)
    _, student = gated(model, 0.0, ids, start=SINK + RECENT)
    with torch.no_grad(), duo_attention(model, HeadPattern.uniform(LAYERS, KV_HEADS, 0.0, sink=SINK, recent=RECENT)):
        expected = model.base_model(ids, use_cache=False).last_hidden_state
    tol = tolerance(family)
    torch.testing.assert_close(student, expected[:, SINK + RECENT:], rtol=tol, atol=tol)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_short_run_moves_the_gates_of_the_global_layers(family, tmp_path: Path):
    model = build(family)
    config = IdentifyConfig(out=str(tmp_path), steps=4, lr=0.05, sink=SINK, recent=RECENT, min_len=96, max_len=96)
    result = train_gates(model, random_samples(96, 40), config, config.settings(), tmp_path / "ckpt", progress=False)
    local = torch.tensor([w is not None for w in sliding_windows(model.config)])
    gates = result.gates
    assert torch.isfinite(gates).all() and gates.min() >= 0 and gates.max() <= 1
    moved = gates[~local] < 0.95  # four steps at lr 0.05: the regulariser pulls, distillation may hold a head up
    assert moved.float().mean() >= 0.5, gates
    assert (gates[local] == 1).all()  # local layers are not gated
    assert result.history[0]["distill"] < 1e-10  # at gates 1 the student is the teacher
    assert result.history[-1]["distill"] > 0
