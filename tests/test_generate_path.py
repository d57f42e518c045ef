"""``model.generate`` under ``duo_attention`` (issue 11's list): greedy and sampling, ``return_dict_in_generate``,
stopping criteria, a user-passed cache, beam search, consecutive calls, exceptions inside the block, refused custom
masks, and decode steps whose allocations do not grow with the context.

The oracle is ``generate`` on the unpatched model with the dense per-head-mask attention and no cache
(``conftest.oracle_generate``): every step recomputes the whole sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, assert_restored, cache_kwarg, model_state, oracle_generate, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from duoattn import HeadPattern, duo_attention
from duoattn.cache import DuoCache

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = np.array([[1.0, 0.0], [0.0, 0.0], [0.2, 0.9]])
PATTERN = HeadPattern(MIXED, sink=2, recent=6)
NO_EOS = dict(eos_token_id=None, pad_token_id=0)  # random weights: never stop early unless a test asks


def ids_of(length, seed=1, batch=1):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_greedy_with_scores_equals_the_oracle(model):
    ids = ids_of(40)
    kw = dict(max_new_tokens=12, do_sample=False, output_scores=True, output_logits=True,
              return_dict_in_generate=True, **NO_EOS)
    expected = oracle_generate(model, PATTERN, ids, **kw)
    with duo_attention(model, PATTERN):
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences) and got.sequences.shape == (1, 52)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-9, atol=1e-9)
    assert isinstance(got[cache_kwarg(model)], DuoCache)


def test_sampling_with_a_fixed_seed_equals_the_same_sampling_on_the_oracle(model):
    ids = ids_of(30, seed=2)
    kw = dict(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=20, **NO_EOS)
    torch.manual_seed(123)
    expected = oracle_generate(model, PATTERN, ids, **kw)
    with duo_attention(model, PATTERN):
        torch.manual_seed(123)
        got = model.generate(ids, **kw)
        torch.manual_seed(124)
        other = model.generate(ids, **kw)
    assert torch.equal(got, expected)
    assert not torch.equal(other, got)  # the seed really drives the tokens: sampling happened


def test_two_consecutive_generate_calls_of_different_lengths_are_both_correct(model):
    short, long = ids_of(20, seed=3), ids_of(70, seed=4)
    kw = dict(do_sample=False, **NO_EOS)
    expected_short = oracle_generate(model, PATTERN, short, max_new_tokens=5, **kw)
    expected_long = oracle_generate(model, PATTERN, long, max_new_tokens=17, **kw)
    with duo_attention(model, PATTERN, prefill_chunk_size=16):
        got_long = model.generate(long, max_new_tokens=17, return_dict_in_generate=True, **kw)
        got_short = model.generate(short, max_new_tokens=5, return_dict_in_generate=True, **kw)
        again = model.generate(long, max_new_tokens=17, **kw)
    assert torch.equal(got_long.sequences, expected_long)
    assert torch.equal(got_short.sequences, expected_short)
    assert torch.equal(again, expected_long)
    caches = got_long[cache_kwarg(model)], got_short[cache_kwarg(model)]
    assert [c.max_len for c in caches] == [87, 25] and caches[0] is not caches[1]  # each sized to its request


def test_generate_with_a_user_passed_cache(model):
    ids = ids_of(40, seed=5)
    expected = oracle_generate(model, PATTERN, ids, max_new_tokens=10, do_sample=False, **NO_EOS)
    with duo_attention(model, PATTERN) as handle:
        cache = handle.new_cache(64)
        out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                             **{cache_kwarg(model): cache}, **NO_EOS)
        assert out[cache_kwarg(model)] is cache  # used, not replaced
        assert cache.length() == 49 and cache.kv_bytes() == handle.expected_kv_bytes(64)
        # continuing the same cache: the new tokens follow the 49 stored ones
        more = model.generate(out.sequences, max_new_tokens=5, do_sample=False, **{cache_kwarg(model): cache},
                              **NO_EOS)
    assert torch.equal(out.sequences, expected)
    continued = oracle_generate(model, PATTERN, out.sequences, max_new_tokens=5, do_sample=False, **NO_EOS)
    assert torch.equal(more, continued)


class StopAfter(StoppingCriteria):
    """Stop once the sequences reach ``length`` tokens."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_and_end_of_sequence(model):
    ids = ids_of(30, seed=6)
    expected = oracle_generate(model, PATTERN, ids, max_new_tokens=12, do_sample=False, **NO_EOS)
    eos = int(expected[0, 34])  # the 5th generated token; make sure it did not occur before
    first = int(torch.nonzero(expected[0, 30:] == eos)[0]) + 30
    with duo_attention(model, PATTERN):
        stopped = model.generate(ids, max_new_tokens=12, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([StopAfter(36)]), **NO_EOS)
        ended = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped, expected[:, :36])
    assert torch.equal(ended, expected[:, : first + 1])  # stops right after the end-of-sequence token


def test_beam_search_equals_beam_search_on_the_oracle(model):
    ids = ids_of(30, seed=7)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False, output_scores=True,
              return_dict_in_generate=True, **NO_EOS)
    expected = oracle_generate(model, PATTERN, ids, **kw)
    with duo_attention(model, PATTERN):
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-9, atol=1e-9)
    assert len({tuple(s.tolist()) for s in got.sequences}) == 3  # three different beams were kept
    cache = got[cache_kwarg(model)]
    assert isinstance(cache, DuoCache) and cache.state.batch_size == 3


def test_an_exception_inside_the_block_restores_the_model_bit_for_bit(model):
    ids = ids_of(30, seed=8)
    state = model_state(model)
    before = model(ids).logits
    with pytest.raises(KeyError, match="boom"):
        with duo_attention(model, PATTERN, prefill_chunk_size=8, kv_bits=8):
            model.generate(ids, max_new_tokens=3, do_sample=False, **NO_EOS)
            raise KeyError("boom")
    assert_restored(model, state)
    # an error raised by generate itself (the user's cache is too small for the request)
    with pytest.raises(ValueError, match="sized for 32 tokens"):
        with duo_attention(model, PATTERN) as handle:
            model.generate(ids, max_new_tokens=5, do_sample=False, **{cache_kwarg(model): handle.new_cache(32)},
                           **NO_EOS)
    assert_restored(model, state)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_exception_restores_every_family(family):
    """Fused qkv (Phi-3), biases, norms, and local layers that kept their own attention function (Gemma, Qwen)."""
    model = FAMILIES[family].build()
    ids = ids_of(20, seed=11)
    state = model_state(model)
    before = model(ids).logits
    pattern = HeadPattern(np.random.default_rng(2).random((4, 2)), sink=2, recent=4)
    with pytest.raises(RuntimeError, match="inside"):
        with duo_attention(model, pattern, sparsity=0.5):
            model.generate(ids, max_new_tokens=2, do_sample=False, **NO_EOS)
            raise RuntimeError("inside the block")
    assert_restored(model, state, FAMILIES[family].attn)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_a_custom_4d_mask_raises(model):
    ids = ids_of(12, seed=9)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]  # a causal mask, but a 4-D tensor
    with duo_attention(model, PATTERN):
        for use_cache in (True, False):
            with pytest.raises(ValueError, match="custom attention mask"):
                model(ids, attention_mask=mask, use_cache=use_cache)
    assert model(ids, attention_mask=mask).logits.shape == (1, 12, 97)  # the unpatched model takes it


# ------------------------------------------------------------------------------------- allocations per decode step
class AllocatedBytes(TorchDispatchMode):
    """Bytes of every tensor storage that an op creates (outputs that alias none of its inputs: no views, no
    in-place results), by op name."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                name = str(func)
                self.by_op[name] = self.by_op.get(name, 0) + t.untyped_storage().nbytes()
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def decode_step_bytes(model, context, cache_for):
    """Bytes allocated by one decode step after ``context`` tokens, with the cache ``cache_for(max_len)``."""
    ids = ids_of(context + 1, seed=10)
    cache = cache_for(context + 8)
    name = cache_kwarg(model)
    with torch.no_grad():
        model(ids[:, :context], **{name: cache})
        model(ids[:, context - 1 : context], **{name: cache})  # one step first: lazily built state is in place
        with AllocatedBytes() as counter:
            model(ids[:, context:], **{name: cache})
    return counter


def test_the_counter_sees_a_growing_copy():
    """Calibration: transformers' dynamic cache concatenates the whole cache every step, and the counter sees it."""
    model = tiny_llama()
    small = decode_step_bytes(model, 50, lambda n: DynamicCache(config=model.config))
    large = decode_step_bytes(model, 200, lambda n: DynamicCache(config=model.config))
    # 3 layers x (K, V) x 2 KV heads x head_dim 8 x float64 per token: the cat copies grow by this per token
    assert large.by_op["aten.cat.default"] - small.by_op["aten.cat.default"] == 150 * 3 * 2 * 2 * 8 * 8


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_decode_step_allocates_nothing_that_grows_with_the_context(kernels):
    from duoattn.kernels.dispatch import KernelChoice, triton_available

    if kernels == "triton":
        if not triton_available():
            pytest.skip("the triton package is not installed")
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)  # head_dim 16, float32: what the Triton kernels take (interpreted on the CPU)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)).eval()
    else:
        model = tiny_llama()
    with duo_attention(model, PATTERN, kernels=KernelChoice(decode=kernels)) as handle:
        small = decode_step_bytes(model, 50, lambda n: handle.new_cache(n))
        large = decode_step_bytes(model, 400, lambda n: handle.new_cache(n))
    assert small.total > 0
    assert large.by_op == small.by_op  # op for op, the same bytes at 8x the context


def test_empty_input_ids_are_refused_clearly(tiny_model):
    with duo_attention(tiny_model, HeadPattern(np.full((3, 2), 0.7))):
        empty = torch.zeros(1, 0, dtype=torch.long)
        with pytest.raises(ValueError, match="input_ids is empty"):
            tiny_model(empty)
        with pytest.raises(ValueError, match="input_ids is empty"):
            tiny_model.generate(empty, max_new_tokens=2)
