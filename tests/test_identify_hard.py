"""The student's own full-attention term and budget-aware (hard, straight-through) training, on tiny random models:
the student against a dense float64 reference of the paper's mixture and against the deployed model, gradients
against autograd through that reference, binarisation and score mapping against HeadPattern.binarize, training
that finds the one long-range head from the wrong start, and a resume across the switch to hard steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from identify_helpers import LONG_HEAD, one_long_range_head_model, random_samples
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from duoattn import HeadPattern, duo_attention
from duoattn.attention import duo_mask
from duoattn.identify.gates import GateSet, gated_attention, student_forward, teacher_forward
from duoattn.identify.schedule import lr_factor
from duoattn.identify.train import IdentifyConfig, hard_roles, scores_to_gates, train_gates
from duoattn.kernels.reference import reference_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path: Path, **kwargs) -> IdentifyConfig:
    values = dict(out=str(tmp_path / "out"), steps=12, lr=0.05, sink=2, recent=8, min_len=96, max_len=96)
    return IdentifyConfig(**{**values, **kwargs})


def train(model, cfg: IdentifyConfig, sample_fn=None):
    sample_fn = sample_fn or random_samples(96, 16)
    return train_gates(model, sample_fn, cfg, cfg.settings(), Path(cfg.out) / "checkpoint", progress=False)


def student_hidden(model, gates, ids, sink, recent, loss_from, hard=None):
    """The student's final hidden states at ``loss_from..T-1`` with the student full term (and ``hard`` roles)."""
    gate_set = GateSet(gates, model.config.num_attention_heads, sink, recent, full_term="student")
    gate_set.hard = hard
    with gated_attention(model, gate_set):
        start = gate_set.student_start(loss_from)
        teacher = teacher_forward(model, gate_set, ids, start)[0, loss_from:]
        student = student_forward(model, gate_set, ids, start, exact_from=loss_from)[0, loss_from - start :]
    return teacher, student, start


def reference_mixture(model, gates, ids, sink, recent):
    """The paper's mixture, densely in float64 with autograd to ``gates``: every query head is
    ``alpha * full + (1 - alpha) * streaming``, both over the layer's own queries and keys."""
    group = model.config.num_attention_heads // model.config.num_key_value_heads

    def fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
        t = key.shape[2]
        full = reference_attention(query, key, value, torch.ones(key.shape[1], dtype=torch.bool), sink, recent,
                                   scale=scaling)
        stream = reference_attention(query, key, value, torch.zeros(key.shape[1], dtype=torch.bool), sink, recent,
                                     scale=scaling)
        alpha = gates[module.layer_idx].repeat_interleave(group)[None, :, None, None].to(full.dtype)
        assert t == query.shape[2]
        return (alpha * full + (1 - alpha) * stream).transpose(1, 2), None

    AttentionInterface.register("gref_mixture", fn)
    AttentionMaskInterface.register("gref_mixture", duo_mask)
    model.set_attn_implementation("gref_mixture")
    try:
        return model.model(ids, use_cache=False).last_hidden_state[0]
    finally:
        model.set_attn_implementation("sdpa")


# --------------------------------------------------------------------------------------- student full term
@pytest.mark.parametrize("kv_heads, sink, recent", [(2, 3, 7), (1, 0, 5), (4, 4, 16)])
def test_student_full_term_matches_the_dense_mixture_and_its_gradient(kv_heads, sink, recent):
    model = tiny_llama(heads=4, kv_heads=kv_heads, seed=kv_heads)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(sink))
    values = torch.rand(3, kv_heads, generator=torch.Generator().manual_seed(recent), dtype=torch.float64)
    loss_from = 50

    ref_gates = values.clone().requires_grad_(True)
    reference = reference_mixture(model, ref_gates, ids, sink, recent)
    with torch.no_grad():
        target = model.model(ids, use_cache=False).last_hidden_state[0, loss_from:]
    (reference[loss_from:] - target).pow(2).mean().backward()

    gates = torch.nn.Parameter(values.clone())
    teacher, student, start = student_hidden(model, gates, ids, sink, recent, loss_from)
    assert start == min(sink + recent, loss_from)  # a full term reads every earlier position: no late start
    torch.testing.assert_close(teacher, target, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(student, reference[loss_from:], rtol=1e-7, atol=1e-7)
    (student - teacher).pow(2).mean().backward()
    assert ref_gates.grad.abs().min() > 0
    torch.testing.assert_close(gates.grad, ref_gates.grad, rtol=1e-6, atol=1e-10)


def test_teacher_full_term_differs_from_the_paper_mixture():
    """The two full terms are different students (else the option would mean nothing)."""
    model = tiny_llama(seed=5)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(5))
    gates = torch.full((3, 2), 0.5, dtype=torch.float64)
    _, own, _ = student_hidden(model, gates, ids, 2, 6, 40)
    gate_set = GateSet(gates, 4, 2, 6)
    with torch.no_grad(), gated_attention(model, gate_set):
        teacher_forward(model, gate_set, ids)
        taken = student_forward(model, gate_set, ids, 0)[0, 40:]
    assert (own - taken).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_roles_give_the_deployed_model_and_straight_through_gradients(seed):
    model = tiny_llama(seed=seed)
    ids = torch.randint(0, 97, (1, 72), generator=torch.Generator().manual_seed(seed))
    rng = np.random.default_rng(seed)
    roles = rng.random((3, 2)) < 0.5
    sink, recent, loss_from = 2, 6, 56
    with torch.no_grad(), duo_attention(model, HeadPattern(roles.astype(float), sink=sink, recent=recent)):
        deployed = model.model(ids, use_cache=False).last_hidden_state[0, loss_from:]

    scores = torch.nn.Parameter(torch.from_numpy(rng.normal(size=(3, 2))))  # any values: the forward uses roles
    _, hard, _ = student_hidden(model, scores, ids, sink, recent, loss_from, torch.from_numpy(roles))
    torch.testing.assert_close(hard, deployed, rtol=1e-9, atol=1e-9)
    # straight through: the gradient is the soft student's at gates equal to the roles
    target = model.model(ids, use_cache=False).last_hidden_state[0, loss_from:].detach()
    (hard - target).pow(2).mean().backward()
    soft = torch.nn.Parameter(torch.from_numpy(roles.astype(np.float64)))
    _, at_roles, _ = student_hidden(model, soft, ids, sink, recent, loss_from)
    (at_roles - target).pow(2).mean().backward()
    torch.testing.assert_close(scores.grad, soft.grad, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ binarising scores
def test_hard_roles_rank_unclamped_scores_as_binarize_ranks_gates():
    rng = np.random.default_rng(7)
    layers = np.array([True, False, True, True])
    for _ in range(20):
        gates = rng.integers(0, 4, size=(4, 3)) / 3.0  # many ties
        for budget in (0.1, 0.25, 0.5, 0.75):
            want = HeadPattern(gates).binarize(sparsity=1 - budget, layers=layers)
            # an order-preserving map to far outside [0, 1] changes nothing
            got = hard_roles(torch.from_numpy(10.0 * gates - 4.0), budget, layers)
            assert np.array_equal(got, want)
    with_floor = hard_roles(torch.tensor([[5.0, 4.0], [-1.0, -2.0]]), 0.5, np.ones(2, bool), min_per_layer=1)
    assert with_floor.tolist() == [[True, False], [True, False]]


def test_pinned_heads_are_kept_at_every_budget_whatever_their_scores():
    scores = torch.tensor([[3.0, -5.0], [2.0, 1.0], [0.5, 4.0]], dtype=torch.float64)
    layers = np.ones(3, dtype=bool)
    pinned = torch.zeros(3, 2, dtype=torch.bool)
    pinned[0, 1] = True  # the lowest score
    for budget, want in ((1 / 6, [(0, 1)]), (0.5, [(0, 1), (2, 1), (0, 0)])):
        roles = hard_roles(scores, budget, layers, pinned=pinned)
        assert sorted(zip(*np.nonzero(roles))) == sorted(want)
    assert not hard_roles(scores, 0.5, layers)[0, 1]


def test_scores_map_into_gates_that_binarise_to_the_same_sets():
    rng = np.random.default_rng(3)
    layers = np.array([True, True, False, True, True])
    scores = torch.from_numpy(rng.normal(size=(5, 4)) * 3.0)
    scores[0, :2] = 2.5  # a tie
    gates = scores_to_gates(scores, 0.25, layers).numpy()
    assert gates.min() >= 0 and gates.max() <= 1 and (gates[~layers] == 1).all()
    for budget in (0.1, 0.25, 0.4, 0.5, 0.75):
        assert np.array_equal(HeadPattern(gates).binarize(sparsity=1 - budget, layers=layers),
                              hard_roles(scores, budget, layers))
    at = HeadPattern(gates).binarize(sparsity=0.75, layers=layers)
    assert np.array_equal(at[layers], gates[layers] >= 0.5)  # the first hard budget is the 0.5 threshold
    assert int(at[layers].sum()) == round(0.25 * 16)


# -------------------------------------------------------------------------------------------- training
def test_hard_steps_find_the_long_range_head_from_the_wrong_start(tmp_path):
    """Started with the long-range head ranked last, the binarised training at a one-head budget moves it first."""
    model = one_long_range_head_model()
    start = np.ones((2, 2))
    start[LONG_HEAD] = 0.0
    HeadPattern(start, sink=2, recent=8).save(tmp_path / "init")
    budget = 1 / 4
    cfg = config(tmp_path, steps=10, hard_steps=10, hard_budgets=(budget,), hard_lr=0.05, full_term="student",
                 init=str(tmp_path / "init"))
    result = train(model, cfg)
    roles = HeadPattern(result.gates.numpy()).binarize(sparsity=1 - budget)
    assert roles.sum() == 1 and roles[LONG_HEAD]
    first = result.history[0]
    assert first["budget"] == budget and first["distill"] > 1e-3  # the first step streams the long-range head
    assert result.history[-1]["distill"] < 1e-12  # the last step keeps it: the binarised student is the teacher


def test_pinned_heads_stay_and_the_hard_steps_choose_what_a_larger_budget_adds(tmp_path):
    """Nested budgets: pinned at 25%, the init's first head stays first (unpinned, the same training at 25% moves
    the long-range head there instead), and the 50% set adds the long-range head to it."""
    model = one_long_range_head_model()
    start = np.array([[0.9, 0.8], [0.7, 0.6]])
    start[LONG_HEAD] = 0.0
    HeadPattern(start, sink=2, recent=8).save(tmp_path / "init")
    pinned = HeadPattern(start).binarize(sparsity=0.75)
    assert pinned.sum() == 1 and not pinned[LONG_HEAD]
    cfg = config(tmp_path, steps=10, hard_steps=10, hard_budgets=(0.5,), hard_lr=0.05, full_term="student",
                 init=str(tmp_path / "init"), pin_budget=0.25)
    result = HeadPattern(train(model, cfg).gates.numpy())
    np.testing.assert_array_equal(result.binarize(sparsity=0.75), pinned)
    want = pinned.copy()
    want[LONG_HEAD] = True
    np.testing.assert_array_equal(result.binarize(sparsity=0.5), want)
    free = config(tmp_path / "free", steps=10, hard_steps=10, hard_budgets=(0.25,), hard_lr=0.05,
                  full_term="student", init=str(tmp_path / "init"))
    assert HeadPattern(train(one_long_range_head_model(), free).gates.numpy()).binarize(sparsity=0.75)[LONG_HEAD]


def test_hard_budgets_take_turns_and_soft_steps_come_first(tmp_path):
    cfg = config(tmp_path, steps=7, hard_steps=4, hard_budgets=(0.25, 0.5), full_term="student")
    result = train(one_long_range_head_model(), cfg)
    assert [r.get("budget") for r in result.history] == [None, None, None, 0.25, 0.5, 0.25, 0.5]
    # each phase runs the schedule over its own steps, from its own peak
    want = [0.05 * lr_factor(s, 3) for s in range(3)] + [0.002 * lr_factor(s, 4) for s in range(4)]
    assert [r["lr"] for r in result.history] == pytest.approx(want)


def test_resume_across_the_switch_to_hard_steps_is_bit_for_bit(tmp_path):
    settings = dict(steps=8, hard_steps=4, save_every=3, full_term="student", hard_budgets=(0.25, 0.5))
    whole = train(one_long_range_head_model(), config(tmp_path / "a", **settings))

    def stop_at(n, fn):
        def samples(step):
            if step == n:
                raise KeyboardInterrupt
            return fn(step)
        return samples

    b = config(tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(one_long_range_head_model(), b, stop_at(7, random_samples(96, 16)))  # checkpoint at 6: a hard step
    with pytest.raises(KeyboardInterrupt):
        train(one_long_range_head_model(), config(tmp_path / "c", **settings),
              stop_at(4, random_samples(96, 16)))  # checkpoint at 3: the last soft step
    for name in ("b", "c"):
        resumed = train(one_long_range_head_model(), config(tmp_path / name, resume=True, **settings))
        assert torch.equal(resumed.gates, whole.gates)
        assert [r["distill"] for r in resumed.history] == [r["distill"] for r in whole.history]


@pytest.mark.parametrize("kwargs, match", [
    (dict(hard_steps=13), "hard_steps"),
    (dict(hard_steps=-1), "hard_steps"),
    (dict(hard_budgets=(0.25, 1.0)), "hard_budgets"),
    (dict(hard_budgets=()), "hard_budgets"),
    (dict(full_term="mixed"), "full_term"),
    (dict(hard_lr=0.0), "hard_lr"),
    (dict(init=" "), "init"),
    (dict(init="p", hard_steps=2, hard_budgets=(0.25, 0.5), pin_budget=0.25), "pin_budget"),
    (dict(init="p", hard_steps=2, pin_budget=0.0), "pin_budget"),
    (dict(hard_steps=2, hard_budgets=(0.5,), pin_budget=0.25), "pin_budget.*needs init"),
    (dict(init="p", hard_budgets=(0.5,), pin_budget=0.25), "pin_budget.*hard_steps"),
])
def test_bad_hard_settings_are_refused_by_name(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


def test_init_of_another_shape_is_refused(tmp_path):
    HeadPattern(np.ones((5, 2))).save(tmp_path / "p")
    with pytest.raises(ValueError, match=r"init pattern .* shape \(5, 2\).*\(3, 2\)"):
        train(tiny_llama(), config(tmp_path, steps=1, init=str(tmp_path / "p")), random_samples(40, 8))


# ------------------------------------------------------------------------------------------------ end to end
def test_identify_with_hard_steps_writes_gates_that_binarise_to_the_trained_set(tmp_path):
    from identify_helpers import CharTokenizer
    from test_identify_data import TEXT

    from duoattn.identify import identify

    haystack = tmp_path / "domain.txt"
    haystack.write_text(TEXT, encoding="utf-8")
    init = np.ones((2, 2))
    init[LONG_HEAD] = 0.0
    HeadPattern(init, sink=4, recent=32).save(tmp_path / "init")
    cfg = IdentifyConfig(out=str(tmp_path / "run"), steps=6, hard_steps=4, hard_budgets=(0.25, 0.5), hard_lr=0.2,
                         full_term="student", init=str(tmp_path / "init"), min_len=1200, max_len=1400,
                         num_passkeys=2, passkey_words=3, sink=4, recent=32, haystack=(str(haystack),),
                         val_samples=1, budgets=(0.25, 0.5))
    result = identify(cfg, model=one_long_range_head_model(), tokenizer=CharTokenizer(modulo=96), progress=False)
    written = HeadPattern.load(tmp_path / "run")
    np.testing.assert_array_equal(written.gates, result.pattern.gates)
    assert written.binarize(sparsity=0.75)[LONG_HEAD]  # the long-range head is the one kept at 25%
    assert np.array_equal(written.binarize(sparsity=0.75), written.gates >= 0.5)
    meta = written.metadata
    assert (meta["full_term"], meta["hard_steps"], meta["hard_budgets"], meta["init"]) == (
        "student", 4, [0.25, 0.5], str(tmp_path / "init"))
    assert [r.get("budget") for r in result.history] == [None, None, 0.25, 0.5, 0.25, 0.5]
    quarter = next(r for r in result.validation["trained"] if r["budget"] == 0.25)
    assert quarter["heads"] == [list(LONG_HEAD)] and quarter["loss"] < 1e-9


def test_cli_refuses_bad_hard_settings_by_name(tmp_path, capsys):
    from duoattn.cli import main

    out = tmp_path / "run"
    assert main(["identify", "--out", str(out), "--steps", "4", "--hard-steps", "5"]) == 2
    assert "hard_steps (5) must not exceed steps (4)" in capsys.readouterr().err
    assert main(["identify", "--out", str(out), "--init", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert not out.exists()


def test_a_hard_checkpoint_holds_scores_and_momentum_and_nothing_else(tmp_path):
    from safetensors.torch import load_file, save_file

    from duoattn.identify.checkpoint import load_checkpoint

    cfg = config(tmp_path, steps=3, hard_steps=2, save_every=1, full_term="student", hard_lr=0.5)
    train(one_long_range_head_model(), cfg)
    directory = Path(cfg.out) / "checkpoint"
    ckpt = load_checkpoint(directory)
    assert ckpt.step == 3 and set(ckpt.optimizer_state[0]) == {"momentum_buffer"}
    assert ckpt.gates.max() > 1 or ckpt.gates.min() < 0  # unclamped scores load as they are
    (path,) = directory.glob("step-*.safetensors")
    tensors = load_file(str(path))
    tensors["optimizer.0.exp_avg"] = torch.zeros_like(tensors["gates"])  # Adam's state beside SGD's
    save_file(tensors, str(path), metadata={"step": "3"})
    with pytest.raises(ValueError, match=r"unexpected tensors \['optimizer.0.exp_avg'\]"):
        load_checkpoint(directory)
