"""Prefill modes ("streaming", "full", "window:N") against the dense float64 oracle run on the unpatched model.

The oracle's rule, written here independently of duoattn.prefill: for a prompt of T tokens, a query at position i
sees key j on a streaming head iff j <= i and (j < sink or i - j < recent), except that prompt queries in the dense
span - the whole prompt for "full", positions >= T - N for "window:N" - see every j <= i. Decoded tokens stream.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from duoattn import HeadPattern, duo_attention
from duoattn.cache import DuoCache, DuoLayer
from duoattn.deploy import cache_kwarg
from duoattn.eval.methods import Method, parse_methods
from duoattn.kernels.reference import reference_attention
from duoattn.prefill import PrefillMode
from duoattn.quant.kv import KVQuantConfig, dequantize, quantize

torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine

SINK, RECENT = 2, 4
MODES = ["streaming", "full", "window:5", "window:17"]
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, max_position_embeddings=512, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
# name: (config class, model class, overrides, attention implementation before DuoAttention, local window)
FAMILIES = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa", None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, "sdpa", None),  # q/k norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # soft-capped scores, alternating local / global layers
               {"head_dim": 8, "sliding_window": 6, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 1.0,
                "initializer_range": 0.3}, "eager", 6),
}


def tol(family: str) -> dict[str, float]:
    """Gemma 2's local layers run its eager attention, whose softmax is float32 even for float64 inputs."""
    return dict(rtol=1e-5, atol=1e-5) if FAMILIES[family][3] == "eager" else dict(rtol=1e-9, atol=1e-9)


def tiny(family: str, kv_heads: int = 2, layers: int = 4, seed: int = 0):
    config_cls, model_cls, overrides, attn, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TINY, num_hidden_layers=layers, num_attention_heads=4,
                                               num_key_value_heads=kv_heads, attn_implementation=attn, **overrides)
    return getattr(transformers, model_cls)(config).to(torch.float64).eval()


def local_layers(model, family: str) -> list[int | None]:
    window = FAMILIES[family][4]
    if window is None:
        return [None] * model.config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in model.config.layer_types]


def gates(model, family: str) -> np.ndarray:
    """Gates of exactly 0 / 1 (binarised at 0.5 without ranking): every DuoAttention layer mixes both roles."""
    n, h = model.config.num_hidden_layers, model.config.num_key_value_heads
    g = np.zeros((n, h))
    for i in range(n):
        g[i, i % h] = 1.0
    return g


def dense_span(mode: str, prompt: int) -> tuple[int, int] | None:
    if mode == "streaming":
        return None
    if mode == "full":
        return 0, prompt
    return max(0, prompt - int(mode.split(":")[1])), prompt


def local_mask(*args, local_size=None, **kwargs):
    """No mask for global layers (the oracle masks by position); the eager mask for local layers."""
    return None if local_size is None else ALL_MASK_ATTENTION_FUNCTIONS["eager"](*args, local_size=local_size, **kwargs)


def oracle_logits(model, family: str, ids: torch.Tensor, mode: str, prompt: int,
                  kv_quant: KVQuantConfig | None = None) -> torch.Tensor:
    """Logits of every position of ``ids`` on the unpatched model, attention by the dense oracle (no cache). With
    ``kv_quant`` the retrieval heads' keys and values make a quantise / dequantise round trip, as their cache does."""
    table, windows, span = gates(model, family) >= 0.5, local_layers(model, family), dense_span(mode, prompt)
    # Gemma 2's eager path (softmax in float32) for its local layers, with their sliding-window mask.
    local = sys.modules[type(model).__module__].eager_attention_forward

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        i, softcap = module.layer_idx, kwargs.get("softcap")
        if windows[i] is not None:  # DuoAttention leaves local layers to the model's own attention
            return local(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        retrieval = torch.from_numpy(table[i].copy())
        if kv_quant is not None:
            ret = retrieval[None, :, None, None]
            key = torch.where(ret, dequantize(quantize(key, kv_quant), key.dtype), key)
            value = torch.where(ret, dequantize(quantize(value, kv_quant), value.dtype), value)
        out = reference_attention(query, key, value, retrieval, SINK, RECENT, scale=scaling, softcap=softcap,
                                  dense_queries=span)
        return out.transpose(1, 2), None

    AttentionInterface.register("prefill_oracle", forward)
    AttentionMaskInterface.register("prefill_oracle", local_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("prefill_oracle")
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


def feed(model, ids: torch.Tensor, cache: DuoCache, sizes: list[int]) -> torch.Tensor:
    logits, start = [], 0
    for size in sizes:
        logits.append(model(ids[:, start : start + size], **{cache_kwarg(model): cache}, use_cache=True).logits)
        start += size
    assert start == ids.shape[1]
    return torch.cat(logits, dim=1)


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", MODES)
def test_prompt_logits_equal_the_oracle(family, mode):
    """No cache, one pass, and chunks cut anywhere (a one-token chunk, a chunk across the window's start)."""
    model, ids = tiny(family), ids_of(40)
    expected = oracle_logits(model, family, ids, mode, prompt=40)
    with duo_attention(model, HeadPattern(gates(model, family), sink=SINK, recent=RECENT), prefill=mode) as handle:
        got = {"no cache": model(ids, use_cache=False).logits, "one pass": model(ids).logits}
        for sizes in ([7, 13, 1, 19], [1, 1, 30, 8], [23, 12, 5]):
            cache = handle.new_cache(max_len=40)
            cache.begin_prompt(40)
            got[f"chunks {sizes}"] = feed(model, ids, cache, sizes)
            assert all(l.history is None for l in cache.layers if isinstance(l, DuoLayer)), "history not freed"
            assert cache.state.workspace.dense_k is None
    for name, logits in got.items():
        torch.testing.assert_close(logits, expected, **tol(family), msg=lambda m: f"{name}: {m}")


def test_the_modes_differ_where_they_should():
    """The oracle itself: modes agree before the dense span and differ inside it (so the tests above can fail)."""
    model, ids = tiny("llama-gqa"), ids_of(40)
    logits = {m: oracle_logits(model, "llama-gqa", ids, m, prompt=40) for m in ("streaming", "full", "window:5")}
    torch.testing.assert_close(logits["window:5"][:, :35], logits["streaming"][:, :35], rtol=0, atol=0)
    assert (logits["window:5"][:, 35:] - logits["streaming"][:, 35:]).abs().amax(-1).min() > 1e-4
    assert (logits["full"][:, RECENT + SINK :] - logits["streaming"][:, RECENT + SINK :]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk, kv_heads, family", [(None, 2, "llama-gqa"), (8, 2, "llama-gqa"),
                                                     (11, 4, "qwen3"), (16, 2, "gemma2")])
def test_greedy_generate_equals_the_oracle(mode, chunk, kv_heads, family):
    """Greedy tokens are the oracle's argmax at every step and the step scores its logits: prompt queries by the
    mode, decoded tokens by the streaming rule."""
    model, ids = tiny(family, kv_heads=kv_heads, layers=3 if family != "gemma2" else 4), ids_of(37, seed=2)
    pattern = HeadPattern(gates(model, family), sink=SINK, recent=RECENT)
    with duo_attention(model, pattern, prefill=mode, prefill_chunk_size=chunk):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cache = out[cache_kwarg(model)]
    assert all(l.history is None for l in cache.layers if isinstance(l, DuoLayer))
    seq = out.sequences
    expected = oracle_logits(model, family, seq[:, :-1], mode, prompt=ids.shape[1])[:, ids.shape[1] - 1 :]
    scores = torch.stack(out.scores, dim=1)  # generate keeps scores in float32
    torch.testing.assert_close(scores, expected.to(scores.dtype), rtol=1e-5, atol=1e-5)
    assert torch.equal(seq[:, ids.shape[1] :], expected.argmax(-1))


@pytest.mark.parametrize("mode", ["full", "window:9"])
def test_quantised_retrieval_heads_with_a_dense_mode(mode):
    """int8 retrieval storage is orthogonal to the mode: streaming heads' history stays in the model dtype."""
    model, ids = tiny("llama-gqa", layers=3), ids_of(33, seed=4)
    q = KVQuantConfig(bits=8)
    with duo_attention(model, HeadPattern(gates(model, "llama-gqa"), sink=SINK, recent=RECENT), prefill=mode,
                       kv_bits=8, prefill_chunk_size=10):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = oracle_logits(model, "llama-gqa", out.sequences[:, :-1], mode, 33, kv_quant=q)[:, 32:]
    scores = torch.stack(out.scores, dim=1)
    torch.testing.assert_close(scores, expected.to(scores.dtype), rtol=1e-5, atol=1e-5)


def test_window_history_is_offloaded_and_one_layer_is_brought_back():
    """``window:N`` keeps no full-length streaming buffer per layer: each chunk before the window is copied out once
    per layer, and the window chunk brings the history back into one room shared by all layers."""
    model, ids = tiny("llama-gqa"), ids_of(40)
    with duo_attention(model, HeadPattern(gates(model, "llama-gqa"), sink=SINK, recent=RECENT),
                       prefill="window:5") as handle:
        cache = handle.new_cache(max_len=40)
        cache.begin_prompt(40)
        feed(model, ids[:, :30], cache, [10, 10, 10])
        layers = [l for l in cache.layers if isinstance(l, DuoLayer)]
        assert all(l.history.k is None and [c[0] for c in l.history.chunks] == [0, 10, 20] for l in layers)
        assert cache.state.workspace.dense_k is None  # no dense query yet: nothing brought back
        feed(model, ids[:, 30:], cache, [10])  # the window chunk, positions 30..39
        assert all(l.history is None for l in layers) and cache.state.workspace.dense_k is None
        assert cache.kv_bytes() == handle.expected_kv_bytes(40)


def test_full_mode_history_lives_only_for_the_prompt():
    model, ids = tiny("llama-gqa"), ids_of(30)
    with duo_attention(model, HeadPattern(gates(model, "llama-gqa"), sink=SINK, recent=RECENT), prefill="full"
                       ) as handle:
        cache = handle.new_cache(max_len=40)
        cache.begin_prompt(30)
        feed(model, ids[:, :20], cache, [20])
        held = [l.history.k.shape for l in cache.layers if isinstance(l, DuoLayer)]
        assert held == [(1, 1, 30, 8)] * 4  # one streaming KV head per layer, the prompt's length
        feed(model, ids[:, 20:], cache, [10])
        assert all(l.history is None for l in cache.layers if isinstance(l, DuoLayer))
        assert cache.kv_bytes() == handle.expected_kv_bytes(40)


@pytest.mark.parametrize("value", ["window", "window:0", "window:-3", "sliding", "full:4", 3])
def test_bad_prefill_values_are_refused(value):
    model = tiny("llama-gqa", layers=2)
    pattern = HeadPattern(np.array([[1.0, 0.0], [0.0, 1.0]]), sink=SINK, recent=RECENT)
    with pytest.raises((ValueError, TypeError), match="prefill"):
        with duo_attention(model, pattern, prefill=value):
            pass
    assert getattr(model, "_duoattn_handle", None) is None


def test_parse_and_names():
    assert PrefillMode.parse("Window:64") == PrefillMode("window", 64)
    assert PrefillMode.parse(None).name == "streaming" and PrefillMode.parse("full").name == "full"
    assert PrefillMode.parse("window:64").dense_from(100) == 36 and PrefillMode.parse("window:640").dense_from(100) == 0
    assert [m.name for m in parse_methods("full,duo", [0.75], 1, prefill=["streaming", "window:64", "full"])] == [
        "full", "duo-25%", "duo-25%-window64", "duo-25%-fullprefill"]
    with pytest.raises(ValueError, match="prefill"):
        Method("full", prefill="full")


def test_a_dense_mode_refuses_to_continue_a_filled_cache_and_chunks_across_the_prompt():
    model, ids = tiny("llama-gqa", layers=2), ids_of(20)
    pattern = HeadPattern(np.array([[1.0, 0.0], [0.0, 1.0]]), sink=SINK, recent=RECENT)
    with duo_attention(model, pattern, prefill="window:4") as handle:
        cache = handle.new_cache(max_len=40)
        cache.begin_prompt(12)
        with pytest.raises(ValueError, match="crosses the end of the prompt"):
            feed(model, ids[:, :16], cache, [16])
        cache = handle.new_cache(max_len=40)
        feed(model, ids[:, :10], cache, [10])
        with pytest.raises(ValueError, match="prefill='window:4' needs the whole prompt in an empty cache"):
            model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=2, do_sample=False)


def test_eval_command_line_takes_prefill_modes():
    from duoattn.cli import build_parser
    from duoattn.eval.harness import EvalConfig

    args = build_parser().parse_args(["eval", "passkey", "--methods", "duo", "--sparsity", "0.75",
                                      "--prefill", "streaming,Window:64,full"])
    config = EvalConfig(out_dir="unused", methods=args.methods, sparsities=args.sparsity, prefill=args.prefill)
    assert [m.prefill for m in config.method_list()] == ["streaming", "window:64", "full"]
    with pytest.raises(ValueError, match="prefill"):
        EvalConfig(out_dir="unused", methods="duo", prefill=["window:x"])


def test_a_chunk_past_a_streaming_prompt_streams():
    """In the streaming mode a chunk may run past the prompt declared with begin_prompt: its queries after the prompt
    are not prompt queries and follow the streaming rule like the rest (the oracle of one 16-token prompt)."""
    model, ids = tiny("llama-gqa", layers=2), ids_of(16)
    expected = oracle_logits(model, "llama-gqa", ids, "streaming", prompt=16)
    with duo_attention(model, HeadPattern(gates(model, "llama-gqa"), sink=SINK, recent=RECENT)) as handle:
        cache = handle.new_cache(max_len=40)
        cache.begin_prompt(12)
        got = feed(model, ids, cache, [16])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
