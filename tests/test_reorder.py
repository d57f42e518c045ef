"""Head reordering (retrieval heads first): the model computes the same function, and the inverse permutation
restores every weight bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from duoattn.quant.weights import quantize_linear_weights
from duoattn.reorder import HeadOrder, permute_heads


def ids_of(length, seed=1, vocab=97):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- reordering
@pytest.mark.parametrize("kv_heads, bias", [(2, False), (4, True), (1, False)])
def test_reordering_keeps_outputs_and_restores_weights_bit_for_bit(kv_heads, bias):
    model = tiny_llama(heads=4, kv_heads=kv_heads, attention_bias=bias)
    ids = ids_of(40)
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    roles = np.random.default_rng(kv_heads).random((3, kv_heads)) > 0.5
    order = HeadOrder.retrieval_first(roles)
    permute_heads(model, order)
    if not all(torch.equal(torch.sort(p).values, p) for p in order.perms):  # something moved
        assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-12)
    permute_heads(model, order.inverse())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_head_order_puts_retrieval_heads_first_stably():
    order = HeadOrder.retrieval_first(np.array([[False, True, False, True], [True, True, False, False]]))
    assert [p.tolist() for p in order.perms] == [[1, 3, 0, 2], [0, 1, 2, 3]]
    assert order.num_retrieval == (2, 2)
    assert order.roles.tolist() == [[True, True, False, False]] * 2
    assert [p.tolist() for p in order.inverse().perms] == [[2, 0, 3, 1], [0, 1, 2, 3]]
    assert order.inverse().num_retrieval == (2, 2)
    # 32 heads: each role keeps its heads in their original order (an unstable sort would not, at this size)
    row = np.random.default_rng(0).random(32) > 0.5
    (perm,) = HeadOrder.retrieval_first(row[None]).perms
    assert perm.tolist() == [h for h in range(32) if row[h]] + [h for h in range(32) if not row[h]]
    # any truthy table is read as roles: 0 / 1 floats as well as bools
    assert HeadOrder.retrieval_first(np.array([[0.0, 1.0, 1.0]])).perms[0].tolist() == [1, 2, 0]


def test_reordering_a_fused_qkv_projection_matches_separate_projections():
    """A fused ``qkv_proj`` is permuted exactly as q_proj, k_proj and v_proj stacked."""
    from duoattn.reorder import _permute_module

    torch.manual_seed(0)
    hq, hkv, d, hidden = 4, 2, 3, 5
    sep, fused = torch.nn.Module(), torch.nn.Module()
    for name, out in (("q_proj", hq * d), ("k_proj", hkv * d), ("v_proj", hkv * d)):
        setattr(sep, name, torch.nn.Linear(hidden, out))
    sep.o_proj, fused.o_proj = torch.nn.Linear(hq * d, hidden), torch.nn.Linear(hq * d, hidden)
    fused.qkv_proj = torch.nn.Linear(hidden, (hq + 2 * hkv) * d)
    with torch.no_grad():
        fused.o_proj.weight.copy_(sep.o_proj.weight)
        fused.qkv_proj.weight.copy_(torch.cat([sep.q_proj.weight, sep.k_proj.weight, sep.v_proj.weight]))
        fused.qkv_proj.bias.copy_(torch.cat([sep.q_proj.bias, sep.k_proj.bias, sep.v_proj.bias]))
    q_before = sep.q_proj.weight.clone()
    _permute_module(sep, torch.tensor([1, 0]), hq // hkv, d)
    _permute_module(fused, torch.tensor([1, 0]), hq // hkv, d)
    assert torch.equal(sep.q_proj.weight, torch.cat([q_before[2 * d :], q_before[: 2 * d]]))  # groups of 2 heads
    assert torch.equal(fused.qkv_proj.weight, torch.cat([sep.q_proj.weight, sep.k_proj.weight, sep.v_proj.weight]))
    assert torch.equal(fused.qkv_proj.bias, torch.cat([sep.q_proj.bias, sep.k_proj.bias, sep.v_proj.bias]))
    assert torch.equal(fused.o_proj.weight, sep.o_proj.weight)
    bad = torch.nn.Module()
    bad.qkv_proj, bad.o_proj = torch.nn.Linear(hidden, 7), torch.nn.Linear(hq * d, hidden)
    # q rows 4 heads x 3 = 12, k and v 2 x 3 = 6 each: 24 outputs expected
    with pytest.raises(ValueError, match=r"^Module\.qkv_proj has 7 outputs; expected q \+ k \+ v = 24$"):
        _permute_module(bad, torch.tensor([1, 0]), hq // hkv, d)
    with pytest.raises(ValueError, match="cannot reorder heads"):
        _permute_module(torch.nn.Module(), torch.tensor([1, 0]), hq // hkv, d)
    no_out = torch.nn.Module()  # a fused projection without o_proj is refused as clearly as no projection at all
    no_out.qkv_proj = torch.nn.Linear(hidden, (hq + 2 * hkv) * d)
    with pytest.raises(ValueError, match="cannot reorder heads of Module"):
        _permute_module(no_out, torch.tensor([1, 0]), hq // hkv, d)


def test_reordering_int8_weights_moves_their_scales_and_restores_them():
    model = tiny_llama(heads=4, kv_heads=2)
    quantize_linear_weights(model)
    ids = ids_of(30)
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    order = HeadOrder.retrieval_first(np.array([[False, True], [True, False], [False, True]]))
    permute_heads(model, order)
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.scale, state["model.layers.0.self_attn.k_proj.scale"])
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-12)
    permute_heads(model, order.inverse())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_permutations_are_refused_and_nothing_moves():
    model = tiny_llama(heads=4, kv_heads=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="is not a permutation"):
        permute_heads(model, HeadOrder((torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([0, 1])), (1, 1, 1)))
    with pytest.raises(ValueError, match="head order has 2 layers"):
        permute_heads(model, HeadOrder.retrieval_first(np.ones((2, 2), dtype=bool)))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_head_orders_name_what_was_expected():
    with pytest.raises(ValueError, match=r"roles must be a bool array \[layers, kv_heads\], got shape \(4,\)"):
        HeadOrder.retrieval_first(np.ones(4, dtype=bool))
    model = tiny_llama(heads=4, kv_heads=2)
    three = HeadOrder.retrieval_first(np.ones((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="layer 0: permutation of 3 heads, the model has 2"):
        permute_heads(model, three)
    with pytest.raises(ValueError, match="head order has 2 layers, the model 3"):
        permute_heads(model, HeadOrder.retrieval_first(np.ones((2, 2), dtype=bool)))


def test_a_layer_that_cannot_be_reordered_undoes_the_layers_before_it():
    model = tiny_llama(heads=4, kv_heads=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.layers[2].self_attn.k_proj = torch.nn.Identity()  # neither linear nor fused: refused
    order = HeadOrder.retrieval_first(np.array([[False, True]] * 3))
    with pytest.raises(ValueError, match="cannot reorder heads of LlamaAttention"):
        permute_heads(model, order)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items() if "layers.2.self_attn.k_proj" not in k)
