"""Tensor-parallel DuoAttention on 2 CPU processes (gloo, transformers' ``tp_plan="auto"``) against one process,
and the rank-balanced binarisation against an exhaustive search."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_logits, tiny_llama
from dist_helpers import spawn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from duoattn import HeadPattern, duo_attention
from duoattn.deploy import cache_kwarg
from duoattn.pattern import balanced_roles

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 layers x 4 KV heads; rank 0 holds heads 0-1, rank 1 heads 2-3. Threshold 0.5: layer 0 is S R | R S (both ranks
# reorder), layer 1 is R S | S S (rank 1 streams only).
GATES = np.array([[0.1, 0.9, 0.8, 0.2], [0.9, 0.1, 0.2, 0.3]])
SINK, RECENT, NEW = 2, 8, 6


def _ids() -> torch.Tensor:
    return torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(5))


def _run(model, pattern: HeadPattern, **kwargs) -> dict[str, torch.Tensor]:
    """Prompt logits (one pass), generated tokens and their logits (chunked prefill, greedy), KV bytes."""
    ids = _ids()
    with duo_attention(model, pattern, **kwargs) as handle:
        prompt = model(ids).logits
        cache = handle.new_cache(ids.shape[1] + NEW)
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW, prefill_chunk_size=7,
                             output_logits=True, return_dict_in_generate=True, **{cache_kwarg(model): cache})
        kv = torch.tensor([cache.kv_bytes(), handle.expected_kv_bytes(ids.shape[1] + NEW)])
        heads = torch.tensor([r.num_retrieval for r in handle.layer_roles])
    return dict(prompt=prompt, tokens=out.sequences, logits=torch.stack(out.logits), kv=kv, heads=heads)


def _tp_worker(world, model_dir: str, pattern_dir: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto")
    assert model.tp_size == 2
    pattern = HeadPattern.load(pattern_dir)
    weights = {n: p.to_local().clone() for n, p in model.named_parameters() if "self_attn" in n}
    for name, kwargs in (("plain", {}), ("balanced", dict(sparsity=0.5, balance_ranks=2))):
        result = _run(model, pattern, **kwargs)
        save_file({k: v.contiguous() for k, v in result.items()}, f"{out}/{name}-rank{world.rank}.safetensors")
    # disabling puts every rank's shard back bit for bit
    assert all(torch.equal(p.to_local(), weights[n]) for n, p in model.named_parameters() if n in weights)


def test_tensor_parallel_matches_one_process(tmp_path):
    model = tiny_llama(num_layers=2, heads=8, kv_heads=4, seed=2)
    model.save_pretrained(tmp_path / "model")
    pattern = HeadPattern(GATES, sink=SINK, recent=RECENT)
    pattern.save(tmp_path / "pattern")
    spawn(_tp_worker, str(tmp_path / "model"), str(tmp_path / "pattern"), str(tmp_path))
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for name, kwargs in (("plain", {}), ("balanced", dict(sparsity=0.5, balance_ranks=2))):
        want = _run(one, pattern, **kwargs)
        ranks = [load_file(str(tmp_path / f"{name}-rank{r}.safetensors")) for r in range(2)]
        for got in ranks:
            torch.testing.assert_close(got["prompt"], want["prompt"], rtol=0, atol=1e-12)
            torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-12)
            assert torch.equal(got["tokens"], want["tokens"])
            assert got["kv"][0] == got["kv"][1]  # each rank's cache is what its handle expects
        # each rank's cache holds its own heads only: together, the one-process cache
        assert ranks[0]["kv"][0] + ranks[1]["kv"][0] == want["kv"][0]
        assert torch.equal(ranks[0]["heads"] + ranks[1]["heads"], want["heads"])
        if name == "plain":
            assert ranks[0]["heads"].tolist() == [1, 1] and ranks[1]["heads"].tolist() == [1, 0]
        else:  # balanced: the same count on both ranks in every layer
            assert torch.equal(ranks[0]["heads"], ranks[1]["heads"])
    # the one-process DuoAttention itself is right: the dense oracle, for the plain pattern (3 retrieval heads)
    assert pattern.binarize().sum() == 3
    torch.testing.assert_close(_run(one, pattern)["prompt"], reference_logits(one, pattern, _ids()), rtol=0,
                               atol=1e-10)


# ------------------------------------------------------------------------------------------ balanced roles
def _exhaustive(gates: np.ndarray, units: int, ranks: int) -> float:
    """The largest sum of retrieval gates of a balanced choice with ``units * ranks`` retrieval heads."""
    layers, heads = gates.shape
    per = heads // ranks
    best = -np.inf
    for depth in itertools.product(range(per + 1), repeat=layers):
        if sum(depth) != units:
            continue
        total = 0.0
        for layer, d in enumerate(depth):
            groups = np.sort(gates[layer].reshape(ranks, per), axis=1)[:, ::-1]
            total += groups[:, :d].sum()
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balanced_roles_keep_the_most_gate_a_balanced_choice_can(seed):
    rng = np.random.default_rng(seed)
    layers, heads, ranks = 3, 6, 2 if seed % 2 else 3
    gates = rng.random((layers, heads))
    for retrieval in range(0, layers * heads + 1, ranks):
        roles = balanced_roles(gates, retrieval, ranks)
        counts = roles.reshape(layers, ranks, -1).sum(axis=-1)
        assert (counts == counts[:, :1]).all(), "every rank of a layer holds as many retrieval heads"
        assert roles.sum() == retrieval
        np.testing.assert_allclose(gates[roles].sum(), _exhaustive(gates, retrieval // ranks, ranks), atol=1e-12)


def test_balance_ranks_in_binarize():
    pattern = HeadPattern(GATES, sink=SINK, recent=RECENT)
    # plain sparsity 0.5: the 4 highest gates (0.9, 0.9, 0.8, 0.3) -> layer 1 has 0.9 on rank 0 and 0.3 on rank 1
    plain = pattern.binarize(sparsity=0.5)
    assert plain.tolist() == [[False, True, True, False], [True, False, False, True]]
    # balanced over 2 ranks: units (layer, depth) worth 0.9+0.8, 0.9+0.3, 0.1+0.2, 0.1+0.2 -> layer 0 and 1 at
    # depth 1: the same heads here, since each layer already has one per rank
    assert pattern.binarize(sparsity=0.5, balance_ranks=2).tolist() == plain.tolist()
    # 0.75 -> 2 retrieval heads: plain takes both 0.9s (layer 0 rank 0, layer 1 rank 0); balanced takes layer 0's unit
    # (0.9 + 0.8 = 1.7 > 0.9 + 0.3)
    assert pattern.binarize(sparsity=0.75).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert pattern.binarize(sparsity=0.75, balance_ranks=2).tolist() == [[False, True, True, False],
                                                                          [False, False, False, False]]
    for bad in (3, 0, 1.5, True):
        with pytest.raises(ValueError, match="balance_ranks must be a whole number >= 1 that divides the 4 KV"):
            pattern.binarize(balance_ranks=bad)
    assert json.dumps(pattern.binarize(balance_ranks=1).tolist()) == json.dumps(pattern.binarize().tolist())


def test_a_model_without_tensor_parallelism_has_no_head_shard():
    from duoattn.tensor_parallel import HeadShard, head_shard

    assert head_shard(tiny_llama(num_layers=1)) is None
    assert HeadShard(1, 2).kv_heads(8) == slice(4, 8)
    with pytest.raises(ValueError, match="3 KV heads cannot be split over 2 tensor-parallel ranks"):
        HeadShard(0, 2).kv_heads(3)
