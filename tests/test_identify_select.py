"""Validation of binarised patterns and budget-aware selection: the validation split, the per-budget report against
the dense oracle, the greedy swap refinement, the re-ranked gates, and the per-layer minimum of binarisation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from identify_helpers import LONG_HEAD, CharTokenizer, one_long_range_head_model
from oracle import binarize as oracle_binarize
from oracle import oracle
from test_identify_data import TEXT

from duoattn import HeadPattern
from duoattn.checks import UsageError
from duoattn.cli import main
from duoattn.data.passkeys import PasskeyConfig, PasskeyDataset
from duoattn.identify import IdentifyConfig, identify
from duoattn.identify.run import SELECTION_FILE, VALIDATION_FILE, VALIDATION_PLOT
from duoattn.identify.select import RAMP, rank_gates, refine, strength_order
from duoattn.identify.validate import Validator, budget_report, validation_lengths, validation_samples

pytestmark = pytest.mark.usefixtures("one_thread")

SINK, RECENT = 4, 32
PASSKEYS = PasskeyConfig(num_passkeys=2, passkey_words=3, min_len=1200, max_len=1400)


def samples(seed: int, count: int = 2):
    return validation_samples(PasskeyDataset(CharTokenizer(modulo=96), TEXT, PASSKEYS, seed), count)


# ------------------------------------------------------------------------------------------- validation split
def test_validation_samples_are_not_training_samples():
    config = IdentifyConfig(out="o", steps=20, min_len=1200, max_len=1400, val_samples=5, val_min_len=1250,
                            val_max_len=1390, num_passkeys=2, passkey_words=3, sink=SINK, recent=RECENT)
    assert config.validation_seed == 43 and config.validation_lengths == (1250, 1390)
    tok = CharTokenizer(modulo=96)
    train = PasskeyDataset(tok, TEXT, config.passkeys, config.seed)
    low, high = config.validation_lengths
    val = validation_samples(PasskeyDataset(tok, TEXT, PasskeyConfig(2, 3, low, high), config.validation_seed), 5)
    # Lengths spread evenly over the range, ends included: 1250, 1285, 1320, 1355, 1390.
    assert [s.length for s in val] == [1250, 1285, 1320, 1355, 1390] == validation_lengths(5, 1250, 1390)
    trained = [train.sample(k) for k in range(config.steps)]
    for v in val:
        for t in trained:
            assert not (v.length == t.length and torch.equal(v.input_ids, t.input_ids))
            assert v.passkeys != t.passkeys
    with pytest.raises(UsageError, match=r"val_seed must differ from seed \(42\)"):
        IdentifyConfig(out="o", val_seed=42)
    with pytest.raises(UsageError, match=r"val_seed must differ from seed \(7\)"):
        IdentifyConfig(out="o", seed=7, val_seed=7)
    with pytest.raises(UsageError, match=r"val_min_len \(2000\) must not exceed val_max_len \(1500\)"):
        IdentifyConfig(out="o", val_min_len=2000, val_max_len=1500)
    with pytest.raises(UsageError, match=r"budgets must be distinct fractions .* got \[0.5, 1.5\]"):
        IdentifyConfig(out="o", budgets=(0.5, 1.5))
    with pytest.raises(UsageError, match="refine needs validation samples"):
        IdentifyConfig(out="o", val_samples=0, refine=(0.25,))


def test_sample_of_a_chosen_length_keeps_the_other_draws():
    tok = CharTokenizer(modulo=96)
    dataset = PasskeyDataset(tok, TEXT, PASSKEYS, 5)
    drawn, chosen = dataset.sample(3), dataset.sample(3, 1333)
    assert chosen.length == 1333 and chosen.passkeys == drawn.passkeys
    for (a, b), key in zip(chosen.answer_spans, chosen.passkeys):  # the answer spans hold the passkey's words
        assert chosen.input_ids[a:b].tolist() == tok([" " + key])["input_ids"][0]
    with pytest.raises(ValueError, match=r"length must be in \[min_len, max_len\] = \[1200, 1400\], got 1100"):
        dataset.sample(0, 1100)


# ----------------------------------------------------------------------------------- report against the oracle
def oracle_loss(model, sample_list, roles) -> float:
    """The mean over samples of the MSE at the loss positions between the unpatched model and the model under the
    dense oracle with ``roles``."""
    losses = []
    for s in sample_list:
        ids = s.input_ids[None]
        with torch.no_grad():
            full = model.base_model(ids, use_cache=False).last_hidden_state[0, s.loss_positions]
            with oracle(model, roles, SINK, RECENT):
                mixed = model.base_model(ids, use_cache=False).last_hidden_state[0, s.loss_positions]
        losses.append(float((mixed.double() - full.double()).pow(2).mean()))
    return float(np.mean(losses))


def test_report_loss_equals_the_oracle_and_is_deterministic():
    model = tiny_llama(num_layers=3, heads=4, kv_heads=2, seed=1)
    val = samples(43)
    gates = np.array([[0.9, 0.2], [0.4, 0.7], [0.1, 0.6]])
    budgets = (1 / 6, 0.5, 5 / 6)
    rows = budget_report(Validator(model, val, SINK, RECENT, progress=False), gates, budgets, progress=False)
    again = budget_report(Validator(model, val, SINK, RECENT, progress=False), gates, budgets, progress=False)
    assert rows == again  # the same numbers, bit for bit
    for row, budget in zip(rows, budgets):
        roles = oracle_binarize(gates, sparsity=1 - budget)
        assert row["retrieval_heads"] == int(roles.sum()) == round(6 * budget)
        assert row["heads"] == [[int(l), int(h)] for l, h in np.argwhere(roles)]
        expected = oracle_loss(model, val, roles)
        assert expected > 1e-8
        assert math.isclose(row["loss"], expected, rel_tol=1e-9), (budget, row["loss"], expected)
    assert rows[0]["loss"] > rows[2]["loss"]  # more retrieval heads, closer to the full model on this model


# ---------------------------------------------------------------------------------------------- refinement
def test_refinement_finds_the_one_head_the_model_needs():
    model = one_long_range_head_model()
    validator = Validator(model, samples(43), SINK, RECENT, progress=False)
    gates = np.array([[0.9, 0.8], [0.1, 0.7]])  # the long-range head (1, 0) ranked last
    result = refine(lambda r: validator.evaluate(r).loss, gates, [0.25], validator.layers, window=3, max_evals=5,
                    progress=False)
    (chosen,) = result.budgets
    assert chosen.start == [(0, 0)] and chosen.final == [LONG_HEAD]
    assert chosen.loss_before > 1e-4 and chosen.loss_after < 1e-20  # every other head outputs zero
    # (0, 0) out, (0, 1), (1, 1), (1, 0) in: the zero-valued heads change the loss by rounding at most
    assert len(chosen.trials) <= 3 and chosen.trials[-1].accepted and chosen.trials[-1].added == LONG_HEAD
    roles = oracle_binarize(result.gates, sparsity=0.75)
    assert [tuple(x) for x in np.argwhere(roles)] == [LONG_HEAD]


def set_loss(weights: np.ndarray, pair: np.ndarray):
    """A loss of a role table with interactions between heads: sum of dropped heads' weights plus pair terms."""

    def loss(roles: np.ndarray) -> float:
        dropped = (~roles).reshape(-1).astype(float)
        return float(dropped @ weights.reshape(-1) + dropped @ pair @ dropped)

    return loss


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), st.integers(1, 3), st.integers(0, 10_000), st.integers(0, 12), st.integers(1, 4),
       st.integers(0, 1), st.lists(st.sampled_from([0.2, 0.25, 0.5, 0.6, 0.75, 0.9]), min_size=1, max_size=3,
                                   unique=True))
def test_refinement_never_increases_the_loss(layers, heads, seed, max_evals, window, min_per_layer, budgets):
    rng = np.random.default_rng(seed)
    gates = rng.choice([0.0, 0.3, 0.5, 1.0], size=(layers, heads)) if seed % 2 else rng.random((layers, heads))
    n = layers * heads
    loss = set_loss(rng.random((layers, heads)), rng.normal(size=(n, n)) * 0.3)
    selected = np.ones(layers, dtype=bool)
    feasible = [b for b in budgets if n - math.floor((1 - b) * n + 0.5) >= min_per_layer * layers]
    if not feasible:
        return
    calls = []
    result = refine(lambda r: calls.append(r.copy()) or loss(r), gates, feasible, selected, window, max_evals,
                    min_per_layer, progress=False)
    previous: set = set()
    for chosen in result.budgets:
        assert chosen.loss_after <= chosen.loss_before
        assert len(chosen.trials) <= max_evals
        current = chosen.loss_before
        for trial in chosen.trials:
            assert trial.accepted == (trial.loss < current)
            if trial.accepted:
                current = trial.loss
        assert chosen.loss_after == current
        roles = np.zeros((layers, heads), dtype=bool)
        for l, h in chosen.final:
            roles[l, h] = True
        assert loss(roles) == chosen.loss_after
        assert len(chosen.final) == n - math.floor((1 - chosen.budget) * n + 0.5)
        assert previous <= set(chosen.final)  # nested: a budget keeps the smaller budgets' heads
        assert roles.sum(axis=1).min() >= min_per_layer
        # the re-ranked gates binarise to the refined set (independent binarisation)
        assert np.array_equal(oracle_binarize(result.gates, sparsity=1 - chosen.budget), roles)
        previous = set(chosen.final)
    assert len(calls) == sum(1 + len(c.trials) for c in result.budgets)
    # the values are the trained ones, sorted along the new order, within the ramp
    np.testing.assert_allclose(np.sort(result.gates, axis=None), np.sort(gates, axis=None), atol=RAMP)


def test_rank_gates_orders_ties_and_keeps_local_rows():
    gates = np.array([[0.0, 0.0], [1.0, 1.0], [0.4, 0.0]])
    layers = np.array([True, False, True])
    order = [(0, 1), (2, 1), (0, 0), (2, 0)]
    ranked = rank_gates(gates, order, layers)
    assert strength_order(ranked, layers) == order
    np.testing.assert_array_equal(ranked[1], [1.0, 1.0])
    assert abs(ranked[0, 1] - 0.4) <= RAMP and ranked.min() >= 0 and ranked.max() <= 1
    with pytest.raises(ValueError, match="every head of the selected layers once"):
        rank_gates(gates, order[:3], layers)


# ------------------------------------------------------------------------------------------------ identify
def test_identify_writes_the_refined_pattern(tmp_path: Path):
    haystack = tmp_path / "text.txt"
    haystack.write_text(TEXT, encoding="utf-8")
    config = IdentifyConfig(out=str(tmp_path / "run"), steps=2, min_len=1200, max_len=1400, num_passkeys=2,
                            passkey_words=3, sink=SINK, recent=RECENT, haystack=(str(haystack),), val_samples=2,
                            budgets=(0.25, 0.5, 0.75), refine=(0.25, 0.5), refine_evals=3, refine_window=2)
    result = identify(config, model=one_long_range_head_model(), tokenizer=CharTokenizer(modulo=96), progress=False)
    out = tmp_path / "run"
    selection = json.loads((out / SELECTION_FILE).read_text())
    validation = json.loads((out / VALIDATION_FILE).read_text())
    assert (out / VALIDATION_PLOT).read_bytes().startswith(b"\x89PNG")
    assert validation == json.loads(json.dumps(result.validation))
    assert [s["length"] for s in validation["samples"]] == [1200, 1400]
    pattern = HeadPattern.load(out)
    for chosen in selection["budgets"]:
        roles = oracle_binarize(pattern.gates, sparsity=1 - chosen["budget"])
        assert [list(map(int, x)) for x in np.argwhere(roles)] == sorted(chosen["final"])
        assert chosen["loss_after"] <= chosen["loss_before"]
        row = next(r for r in validation["selected"] if r["budget"] == chosen["budget"])
        assert row["loss"] == chosen["loss_after"]
    trained = next(r for r in validation["trained"] if r["budget"] == 0.25)
    assert trained["loss"] == selection["budgets"][0]["loss_before"]
    np.testing.assert_allclose(np.sort(pattern.gates, axis=None), np.sort(selection["trained_gates"], axis=None),
                               atol=RAMP)
    meta = json.loads((out / "config.json").read_text())["validation"]
    assert meta["refine"] == [0.25, 0.5] and meta["selected"] is True and meta["val_seed"] == 43


def test_cli_reports_bad_validation_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["identify", "--out", str(out), "--val-seed", "42"]) == 2
    assert "val_seed must differ from seed (42)" in capsys.readouterr().err
    assert main(["identify", "--out", str(out), "--refine", "0.25", "--val-samples", "0"]) == 2
    assert "refine needs validation samples" in capsys.readouterr().err
    # 30 layers cannot each keep a retrieval head with 25% of 90 heads (22): refused before any training step
    assert main(["identify", "--out", str(out), "--min-per-layer", "1", "--steps", "1"]) == 2
    assert "budget 0.1: sparsity 0.9 leaves 9 retrieval heads, fewer than min_per_layer=1" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------- per-layer minimum
def test_binarize_with_a_per_layer_minimum():
    pattern = HeadPattern(np.array([[0.9, 0.8], [0.1, 0.2], [0.7, 0.6]]))
    # 3 of 6 retrieval heads: by gate (0,0), (0,1), (2,0); with one per layer, layer 1's best (1,1) replaces (0,1).
    np.testing.assert_array_equal(pattern.binarize(sparsity=0.5), [[1, 1], [0, 0], [1, 0]])
    np.testing.assert_array_equal(pattern.binarize(sparsity=0.5, min_per_layer=1), [[1, 0], [0, 1], [1, 0]])
    # 4 heads: one per layer, then the strongest remaining gate (0,1)
    np.testing.assert_array_equal(pattern.binarize(sparsity=2 / 6, min_per_layer=1), [[1, 1], [0, 1], [1, 0]])
    np.testing.assert_array_equal(pattern.binarize(threshold=0.5, min_per_layer=1), [[1, 1], [0, 1], [1, 1]])
    np.testing.assert_array_equal(pattern.binarize(sparsity=0.5, min_per_layer=0), pattern.binarize(sparsity=0.5))
    with pytest.raises(ValueError, match="leaves 2 retrieval heads, fewer than min_per_layer=1 in each of 3 layers"):
        pattern.binarize(sparsity=4 / 6, min_per_layer=1)
    with pytest.raises(ValueError, match=r"min_per_layer must be an integer in \[0, 2\]"):
        pattern.binarize(sparsity=0.5, min_per_layer=3)


# --------------------------------------------------------------------------------- the embedded model (slow)
@pytest.mark.slow
def test_validation_accuracy_is_greedy_exact_match_on_the_deployment_path(smol):
    """On the embedded model: the Validator's passkey count equals greedy ``generate`` on the cached deployment
    path (one question at a time, the true text before it), for full attention and a binarised pattern."""
    from duoattn.data.haystack import load_essays
    from duoattn.deploy import duo_attention

    model, tokenizer = smol
    dataset = PasskeyDataset(tokenizer, load_essays(), PasskeyConfig(2, 4, 560, 560), seed=3)
    sample = dataset.sample(0)
    sink, recent = 16, 64
    validator = Validator(model, [sample], sink, recent, progress=False)
    shipped = HeadPattern.from_pretrained("SmolLM2-135M-Instruct")
    roles = shipped.binarize(sparsity=0.75)

    def greedy(duo: bool) -> int:
        count = 0
        for a, b in sample.answer_spans:
            prompt = sample.input_ids[None, :a]
            if duo:
                with duo_attention(model, HeadPattern(roles.astype(float), sink=sink, recent=recent)):
                    got = model.generate(prompt, max_new_tokens=b - a, do_sample=False)
            else:
                got = model.generate(prompt, max_new_tokens=b - a, do_sample=False)
            count += bool(torch.equal(got[0, a:], sample.input_ids[a:b]))
        return count

    assert validator.full.correct == (greedy(False),)
    assert validator.evaluate(roles).correct == (greedy(True),)


def test_validation_token_accuracy_counts_answer_tokens_by_hand(smol):
    """Token accuracy: answer tokens that are the argmax of the model's own logits one position earlier, counted
    here from ``model(ids).logits`` (full attention, and under duo_attention for a binarised pattern)."""
    from duoattn.data.haystack import load_essays
    from duoattn.deploy import duo_attention

    model, tokenizer = smol
    dataset = PasskeyDataset(tokenizer, load_essays(), PasskeyConfig(2, 4, 560, 560), seed=5)
    sample = dataset.sample(0)
    sink, recent = 16, 64
    validator = Validator(model, [sample], sink, recent, progress=False)
    roles = HeadPattern.from_pretrained("SmolLM2-135M-Instruct").binarize(sparsity=0.75)
    total = sum(b - a for a, b in sample.answer_spans)

    def by_hand(duo: bool) -> float:
        with torch.no_grad():
            if duo:
                with duo_attention(model, HeadPattern(roles.astype(float), sink=sink, recent=recent)):
                    logits = model(sample.input_ids[None]).logits[0]
            else:
                logits = model(sample.input_ids[None]).logits[0]
        right = sum(int((logits[a - 1 : b - 1].argmax(-1) == sample.input_ids[a:b]).sum())
                    for a, b in sample.answer_spans)
        return right / total

    assert validator.full.token_accuracy == pytest.approx(by_hand(False))
    assert validator.evaluate(roles).token_accuracy == pytest.approx(by_hand(True))
    assert 0 < validator.full.token_accuracy <= 1
