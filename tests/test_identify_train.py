"""Gate training on tiny random models: the gated attention against independent references, gates that move the
right way, bit-for-bit resume, clamping, determinism, and a model left exactly as it was."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from identify_helpers import LONG_HEAD, one_long_range_head_model, random_samples
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from duoattn import HeadPattern, duo_attention
from duoattn.identify.checkpoint import load_checkpoint
from duoattn.identify.gates import GATE_ATTR, GateSet, gated_attention, student_forward, teacher_forward
from duoattn.identify.schedule import lr_factor
from duoattn.identify.train import IdentifyConfig, train_gates
from duoattn.kernels.reference import reference_attention
from duoattn.attention import duo_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path: Path, **kwargs) -> IdentifyConfig:
    values = dict(out=str(tmp_path / "out"), steps=12, lr=0.05, sink=2, recent=8, min_len=96, max_len=96)
    return IdentifyConfig(**{**values, **kwargs})


def interrupted_at(stop: int, sample_fn):
    """``sample_fn``, except that asking for sample ``stop`` interrupts the run (as Ctrl-C would)."""
    def samples(step):
        if step == stop:
            raise KeyboardInterrupt
        return sample_fn(step)
    return samples


def train(model, cfg: IdentifyConfig, sample_fn=None):
    sample_fn = sample_fn or random_samples(96, 16)
    return train_gates(model, sample_fn, cfg, cfg.settings(), Path(cfg.out) / "checkpoint", progress=False)


# ------------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_hand_computed_values():
    # 2000 steps: a 400-step ramp that starts at 0.1, flat, then down to 0.1
    got = [lr_factor(s, 2000) for s in (0, 39, 199, 399, 1000, 1600, 1800, 1999)]
    assert got == pytest.approx([0.1, 0.1, 0.5, 1.0, 1.0, 1.0, 0.5, 0.1])
    assert [lr_factor(s, 10) for s in range(10)] == pytest.approx([0.5] + [1.0] * 8 + [0.5])
    with pytest.raises(ValueError):
        lr_factor(10, 10)


# ------------------------------------------------------------------------------------------ gated attention
def gated_hidden(model, gates: torch.Tensor, ids: torch.Tensor, sink: int, recent: int, start: int = 0):
    """(teacher ``[1, T, hidden]``, student ``[1, T - start, hidden]``) through the registered gated attention."""
    gate_set = GateSet(gates, model.config.num_attention_heads, sink, recent)
    with torch.no_grad(), gated_attention(model, gate_set):
        teacher = teacher_forward(model, gate_set, ids)
        student = student_forward(model, gate_set, ids, start)
    return teacher, student


def reference_student(model, gates: torch.Tensor, ids: torch.Tensor, sink: int, recent: int):
    """The same mixture computed densely in float64, one query head at a time (the oracle of kernels/reference)."""
    recorded: dict[int, torch.Tensor] = {}
    group = model.config.num_attention_heads // model.config.num_key_value_heads

    def teacher_fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = reference_attention(query, key, value, torch.ones(key.shape[1], dtype=torch.bool), sink, recent, scale=scaling)
        recorded[module.layer_idx] = out
        return out.transpose(1, 2), None

    def student_fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
        stream = reference_attention(query, key, value, torch.zeros(key.shape[1], dtype=torch.bool), sink, recent, scale=scaling)
        out = torch.empty_like(stream)
        for h in range(query.shape[1]):
            alpha = float(gates[module.layer_idx, h // group])
            out[:, h] = alpha * recorded[module.layer_idx][:, h] + (1 - alpha) * stream[:, h]
        return out.transpose(1, 2), None

    hidden = []
    for name, fn in (("gref_teacher", teacher_fn), ("gref_student", student_fn)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, duo_mask)
        model.set_attn_implementation(name)
        with torch.no_grad():
            hidden.append(model.model(ids, use_cache=False).last_hidden_state)
    model.set_attn_implementation("sdpa")
    return hidden


@pytest.mark.parametrize("kv_heads, sink, recent, start", [(2, 3, 7, 0), (2, 3, 7, 10), (4, 0, 5, 4), (1, 4, 16, 2)])
def test_gated_attention_matches_dense_reference(kv_heads, sink, recent, start):
    model = tiny_llama(heads=4, kv_heads=kv_heads)
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(kv_heads))
    gates = torch.rand(3, kv_heads, generator=torch.Generator().manual_seed(sink))
    teacher, student = gated_hidden(model, gates, ids, sink, recent, start)
    ref_teacher, ref_student = reference_student(model, gates, ids, sink, recent)
    torch.testing.assert_close(teacher, ref_teacher, rtol=1e-7, atol=1e-7)
    # a student pass that starts late takes the earlier keys from the teacher and matches the whole-sequence oracle
    torch.testing.assert_close(student, ref_student[:, start:], rtol=1e-6, atol=1e-6)
    assert (student - teacher[:, start:]).abs().max() > 1e-3  # the gates really change something
    # before sink + recent, streaming attention sees everything: the oracle's student equals the teacher there
    torch.testing.assert_close(ref_student[:, : sink + recent], ref_teacher[:, : sink + recent], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="start must be"):
        gated_hidden(model, gates, ids, sink, recent, sink + recent + 1)


def test_late_start_gives_the_same_gradient(tiny_model):
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(4))
    grads = []
    for start in (0, 9):
        gates = torch.nn.Parameter(torch.full((3, 2), 0.6))
        gate_set = GateSet(gates, 4, 2, 7)
        with gated_attention(tiny_model, gate_set):
            target = teacher_forward(tiny_model, gate_set, ids)[0, 40:]
            hidden = student_forward(tiny_model, gate_set, ids, start)[0, 40 - start :]
        (hidden - target).pow(2).mean().backward()
        grads.append(gates.grad)
    assert grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


def test_gates_one_and_zero_are_full_and_streaming_attention(tiny_model):
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(2))
    unpatched = tiny_model.model(ids).last_hidden_state
    teacher, student = gated_hidden(tiny_model, torch.ones(3, 2), ids, 2, 6)
    assert torch.equal(student, teacher)  # alpha = 1 reproduces the teacher exactly
    torch.testing.assert_close(teacher, unpatched, rtol=1e-12, atol=1e-12)
    _, student = gated_hidden(tiny_model, torch.zeros(3, 2), ids, 2, 6)
    with torch.no_grad(), duo_attention(tiny_model, HeadPattern.uniform(3, 2, 0.0, sink=2, recent=6)):
        streaming = tiny_model.model(ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(student, streaming, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- training
def test_gate_of_the_long_range_head_stays_high_and_the_others_fall(tmp_path):
    model = one_long_range_head_model()
    result = train(model, config(tmp_path, steps=60))
    gates = result.gates
    assert gates[LONG_HEAD] > 0.9
    others = torch.ones_like(gates, dtype=torch.bool)
    others[LONG_HEAD] = False
    assert gates[others].max() < 0.05
    assert result.history[0]["distill"] < 1e-12  # all gates start at 1: the student is the teacher
    assert result.history[-1]["mean_gate"] == pytest.approx(float(gates.mean()), abs=1e-7)


def test_model_is_left_exactly_as_it_was(tmp_path, tiny_model):
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    before = tiny_model(ids).logits
    tiny_model.lm_head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in tiny_model.parameters()]
    tiny_model.train()
    train(tiny_model, config(tmp_path, steps=2), random_samples(40, 8))
    assert tiny_model.config._attn_implementation == "sdpa" and tiny_model.training
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert not any(hasattr(m, GATE_ATTR) for m in tiny_model.modules())
    tiny_model.eval()
    torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)


def test_gates_stay_clamped(tmp_path):
    model = one_long_range_head_model()
    seen = []
    sample_fn = random_samples(96, 16)

    def watching(step):
        seen.append(model.model.layers[0].self_attn.__dict__[GATE_ATTR].gates.detach().clone())
        return sample_fn(step)

    result = train(model, config(tmp_path, steps=15, lr=0.5), watching)
    seen.append(result.gates)
    gates = torch.stack(seen)
    assert gates.min() == 0.0 and gates.max() <= 1.0  # a step of 0.5 overshoots zero: the clamp catches it
    assert ((gates > 0) & (gates < 1)).any()


def test_resume_repeats_an_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = config(tmp_path / "a", steps=9, save_every=2)
    whole = train(one_long_range_head_model(), cfg)

    cfg_b = config(tmp_path / "b", steps=9, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(one_long_range_head_model(), cfg_b, interrupted_at(5, random_samples(96, 16)))
    ckpt = load_checkpoint(Path(cfg_b.out) / "checkpoint")
    assert ckpt.step == 4  # five steps ran, the last checkpoint holds four: at most save_every steps are lost
    with pytest.raises(ValueError, match="pass --resume"):
        train(one_long_range_head_model(), cfg_b)
    resumed = train(one_long_range_head_model(), config(tmp_path / "b", steps=9, save_every=2, resume=True))
    assert torch.equal(resumed.gates, whole.gates)
    keys = ("step", "loss", "distill", "reg", "mean_gate", "lr", "length")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in whole.history]
    assert not torch.equal(whole.gates, torch.ones_like(whole.gates))


def test_resume_refuses_other_settings(tmp_path):
    train(tiny_llama(), config(tmp_path, steps=2), random_samples(40, 8))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.05 -> 0.02\)"):
        train(tiny_llama(), config(tmp_path, steps=2, lr=0.02, resume=True), random_samples(40, 8))


def test_runs_are_deterministic_for_a_seed(tmp_path):
    a = train(one_long_range_head_model(), config(tmp_path / "a", steps=6), random_samples(96, 16, seed=1))
    b = train(one_long_range_head_model(), config(tmp_path / "b", steps=6), random_samples(96, 16, seed=1))
    c = train(one_long_range_head_model(), config(tmp_path / "c", steps=6), random_samples(96, 16, seed=2))
    assert torch.equal(a.gates, b.gates)
    assert [r["distill"] for r in a.history] == [r["distill"] for r in b.history]
    assert [r["distill"] for r in a.history] != [r["distill"] for r in c.history]


def test_config_validation(tmp_path):
    for bad in ({"steps": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"reg": -1.0}, {"recent": 0}, {"sink": -1},
                {"save_every": 0}, {"dtype": "int8"}, {"out": ""}, {"min_len": 900, "max_len": 800}):
        with pytest.raises(ValueError):
            config(tmp_path, **bad)
    assert np.isclose(config(tmp_path).settings()["max_depth"], 0.95)


def test_checkpoint_files_and_inconsistency(tmp_path):
    cfg = config(tmp_path, steps=3, save_every=1)
    train(tiny_llama(), cfg, random_samples(40, 8))
    directory = Path(cfg.out) / "checkpoint"
    assert sorted(p.name for p in directory.iterdir()) == ["state.json", "step-000003.safetensors"]
    ckpt = load_checkpoint(directory)
    assert ckpt.step == 3 and len(ckpt.history) == 3 and ckpt.gates.dtype == torch.float32
    assert set(ckpt.optimizer_state[0]) == {"step", "exp_avg", "exp_avg_sq"}
    state = json.loads((directory / "state.json").read_text())
    state["step"] = 2
    (directory / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="inconsistent"):
        load_checkpoint(directory)
    (directory / "step-000003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="which is missing"):
        load_checkpoint(directory)


def test_first_step_is_a_plain_adamw_step_and_is_recorded(tmp_path):
    # A regulariser this strong makes every gradient positive. AdamW's first step then moves each gate by
    # lr * g / (|g| + eps) = lr (bias correction cancels the moments), with no weight decay: 1 -> 1 - lr.
    # One step: the schedule's factor is 1 (warm-up (0 + 1) / 0.2 and decay 1 / 0.2, both above 1).
    cfg = config(tmp_path, steps=1, lr=0.05, reg=1000.0)
    tic = time.perf_counter()
    result = train(tiny_llama(num_layers=2), cfg, random_samples(96, 16))
    wall = time.perf_counter() - tic
    torch.testing.assert_close(result.gates, torch.full((2, 2), 0.95), rtol=0, atol=1e-6)
    (record,) = result.history
    assert record["step"] == 1 and record["lr"] == 0.05 and record["length"] == 96
    assert record["mean_gate"] == pytest.approx(0.95, abs=1e-6)
    assert 0 < record["seconds"] < wall


def test_checkpoints_are_written_every_save_every_steps(tmp_path):
    cfg = config(tmp_path, steps=8, save_every=3)
    sample_fn = random_samples(40, 8)
    steps_saved = []

    def interrupted(step):
        directory = Path(cfg.out) / "checkpoint"
        steps_saved.append(load_checkpoint(directory).step if directory.exists() else 0)
        if step == 5:
            raise KeyboardInterrupt
        return sample_fn(step)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(), cfg, interrupted)
    # before steps 1..6: nothing, then the checkpoint of step 3 (written after steps 3, 6, ... and the last)
    assert steps_saved == [0, 0, 0, 3, 3, 3]


def test_settings_a_resume_must_match_leave_out_where_and_how_a_run_computes(tmp_path):
    """A resume may move the run, change its checkpoint cadence, kernels, memory mode, timeouts and validation; it
    must not change what is trained."""
    base = dict(out=str(tmp_path / "a"), steps=4, min_len=96, max_len=96, sink=8, recent=16)
    settings = IdentifyConfig(**base).settings()
    for change in ({"out": str(tmp_path / "b")}, {"student_kernel": "blocks"}, {"checkpointing": "on"},
                   {"save_every": 3}, {"dist_timeout_s": 5.0}, {"val_samples": 2}, {"resume": True},
                   {"overwrite": True}):
        assert IdentifyConfig(**{**base, **change}).settings() == settings, change
    for change in ({"lr": 0.03}, {"seed": 5}, {"steps": 5}, {"max_len": 100}, {"reg": 0.1}):
        assert IdentifyConfig(**{**base, **change}).settings() != settings, change


@pytest.mark.parametrize("name, value", [("val_samples", -1), ("refine_evals", -1), ("refine_window", 0),
                                         ("min_per_layer", -1), ("val_seed", -1), ("val_min_len", 0),
                                         ("val_max_len", 0)])
def test_bad_validation_settings_are_refused_by_name(tmp_path, name, value):
    from duoattn.checks import UsageError

    minimum = value + 1
    with pytest.raises(UsageError, match=rf"^{name} must be an integer >= {minimum}, got {value}$"):
        IdentifyConfig(out=str(tmp_path), **{name: value})
    accepted = {name: minimum}
    if name in ("val_min_len", "val_max_len"):  # the shortest range is one token (min <= max)
        accepted = {"val_min_len": minimum, "val_max_len": minimum}
    IdentifyConfig(out=str(tmp_path), **accepted)  # the documented minimum itself is accepted


def test_identify_config_refusals_name_the_setting(tmp_path):
    from duoattn.checks import UsageError

    with pytest.raises(UsageError, match=r"^device must be cpu, cuda or cuda:N, got 'tpu'$"):
        IdentifyConfig(out=str(tmp_path), device="tpu")
    with pytest.raises(UsageError, match=r"^refine needs validation samples \(val_samples >= 1\)$"):
        IdentifyConfig(out=str(tmp_path), val_samples=0, refine=[0.25])


def test_progress_bar_counts_steps_from_where_a_run_resumes_and_shows_the_loss(tmp_path, capsys):
    import re

    cfg = config(tmp_path, steps=4, save_every=2)
    samples = random_samples(40, 8)
    with pytest.raises(KeyboardInterrupt):
        train_gates(tiny_llama(), interrupted_at(3, samples), cfg, cfg.settings(), Path(cfg.out) / "checkpoint",
                    progress=True)
    first = capsys.readouterr().err
    assert "identify" in first and re.search(r"loss=\d", first) and re.search(r"reg=\d", first)
    assert load_checkpoint(Path(cfg.out) / "checkpoint").step == 2
    again = config(tmp_path, steps=4, save_every=2, resume=True)
    train_gates(tiny_llama(), samples, again, again.settings(), Path(again.out) / "checkpoint", progress=True)
    resumed = capsys.readouterr().err
    assert "2/4" in resumed and "4/4" in resumed  # starts at the checkpoint's step, ends at the last
    assert "0/4" not in resumed and "1/4" not in resumed
