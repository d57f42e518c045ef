"""Shared fixtures and helpers: tiny random models built in-process (nothing is downloaded), the dense oracle as an
attention function on the unpatched model, and the embedded SmolLM2."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

# Tests never reach a hub: a test that names a Hub model id resolves it from a local cache or a server it starts
# itself, or refuses it before loading. Set before huggingface_hub / transformers read their settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels (optional dependency) then run in Triton's interpreter. The flag must be set before anything
    # imports triton (transformers does), since triton.language's own helpers are defined at that moment.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, PreTrainedModel  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from duoattn.kernels.reference import reference_attention  # noqa: E402
from duoattn.deploy import cache_kwarg  # noqa: E402
from duoattn.quant.kv import dequantize, quantize  # noqa: E402

# `make mutants` runs the property tests without shrinking: a failing example is all mutation testing needs.
settings.register_profile("mutants", phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, max_position_embeddings=4096)
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llama(num_layers: int = 3, heads: int = 4, kv_heads: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough to run in milliseconds; float64 so that comparisons are tight."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **TINY,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="sdpa",
        **overrides,
    )
    return LlamaForCausalLM(config).to(torch.float64).eval()


@dataclass(frozen=True)
class Family:
    """How to build a tiny random model of one architecture family.

    ``attn`` is the implementation the model runs before DuoAttention (Gemma 2 has no SDPA path in recent
    transformers: soft-capping needs eager). ``window`` is the sliding window of its local layers, if any.
    """

    config: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    attn: str = "sdpa"
    window: int | None = None

    def build(self, num_layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> PreTrainedModel:
        torch.manual_seed(seed)
        config = getattr(transformers, self.config)(
            **TINY,
            **TOKENS,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            attn_implementation=self.attn,
            **self.overrides,
        )
        return getattr(transformers, self.model)(config).to(torch.float64).eval()


ALTERNATING = ["sliding_attention", "full_attention"] * 2  # 4 layers: local, global, local, global
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM"),
    "mistral": Family("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
    "qwen2-sliding": Family(  # use_sliding_window: the layers from max_window_layers on are local
        "Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
        window=8,
    ),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),  # q/k norms
    "qwen3-sliding": Family(
        "Qwen3Config", "Qwen3ForCausalLM",
        {"head_dim": 8, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        window=8,
    ),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM"),  # fused qkv projection
    # A window longer than the context never binds: Phi-3-128K style, its layers count as full attention.
    "phi3-long-window": Family("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 8192}),
    "gemma2": Family(  # soft-capped logits, query_pre_attn_scalar != head_dim, alternating local / global layers
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # initializer_range 0.3 makes attention scores large enough for the soft cap to bite
        {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 1.0,
         "initializer_range": 0.3},
        attn="eager",
        window=8,
    ),
    "gemma3": Family(  # q/k norms, local layers from layer_types, separate local RoPE
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 16, "layer_types": ALTERNATING},
        window=8,
    ),
}


def local_windows(model) -> list[int | None]:
    """Per layer, the sliding window of a local layer, None for a full-attention layer, read from the config as
    transformers does (``layer_types``, else one ``sliding_window`` for every layer); a window at least as long as
    the model's context never binds."""
    cfg = model.config.get_text_config(decoder=True)
    n, window = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["full_attention" if window is None else "sliding_attention"] * n
    binds = window is not None and window < cfg.max_position_embeddings
    return [window if t == "sliding_attention" and binds else None for t in types[:n]]


def roles_table(model, pattern, sparsity=None) -> np.ndarray:
    """Bool ``[layers, kv_heads]`` in the model's original head order, True = retrieval, computed here from the
    gates (not with duoattn's binarisation): threshold 0.5, or the ``round(sparsity * n)`` lowest gates of the
    full-attention layers streaming, ties broken by (layer, head) order. Rows of local layers are all True."""
    gates = np.asarray(pattern.gates, dtype=float)
    duo = [i for i, w in enumerate(local_windows(model)) if w is None]
    table = np.ones(gates.shape, dtype=bool)
    if sparsity is None:
        for i in duo:
            table[i] = gates[i] >= 0.5
        return table
    heads = sorted((gates[i, h], i, h) for i in duo for h in range(gates.shape[1]))
    for _, i, h in heads[: int(math.floor(sparsity * len(heads) + 0.5))]:
        table[i, h] = False
    return table


def oracle_attention(table, sink, recent, windows, kv_quant=None):
    """An attention function for the UNPATCHED model: explicit per-head masks over the whole (uncached) sequence,
    head roles looked up by ``module.layer_idx`` in ``table`` (original head order). A local layer of window W is
    every head streaming with sink 0 and recent W. With ``kv_quant``, the retrieval heads' keys and values go
    through a quantise / dequantise round trip (each token on its own, as the cache stores them)."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        i, softcap = module.layer_idx, kwargs.get("softcap")
        if windows[i] is not None:
            assert kwargs.get("sliding_window") == windows[i], (i, kwargs.get("sliding_window"))
            none = torch.zeros(key.shape[1], dtype=torch.bool)
            out = reference_attention(query, key, value, none, 0, windows[i], scale=scaling, softcap=softcap)
            return out.transpose(1, 2), None
        retrieval = torch.from_numpy(table[i].copy())
        if kv_quant is not None:
            ret = retrieval.to(key.device)[None, :, None, None]
            key = torch.where(ret, dequantize(quantize(key, kv_quant), key.dtype), key)
            value = torch.where(ret, dequantize(quantize(value, kv_quant), value.dtype), value)
        out = reference_attention(query, key, value, retrieval, sink, recent, scale=scaling, softcap=softcap)
        return out.transpose(1, 2), None

    return forward


def no_mask(*args, **kwargs):
    return None


def reference_logits(model, pattern, ids, sparsity=None, sink=None, recent=None, kv_quant=None, table=None):
    """Logits of the whole sequence on the unpatched model (DuoAttention not enabled) with explicit per-head masks
    (no cache). ``table`` overrides the roles computed by :func:`roles_table`."""
    assert getattr(model, "_duoattn_handle", None) is None, "the oracle runs on the model without DuoAttention"
    table = roles_table(model, pattern, sparsity) if table is None else np.asarray(table, dtype=bool)
    sink = pattern.sink if sink is None else sink
    recent = pattern.recent if recent is None else recent
    AttentionInterface.register("duoref", oracle_attention(table, sink, recent, local_windows(model), kv_quant))
    AttentionMaskInterface.register("duoref", no_mask)
    previous = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation("duoref")
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``|got - ref| / |ref|`` in float64; ``got`` must be finite."""
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all()
    return float((got - ref).norm() / ref.norm())


def run_chunks(model, ids, cache, sizes):
    """Feed ``ids`` through the model in chunks of the given sizes; return the logits of every position."""
    logits, start = [], 0
    for size in sizes:
        out = model(ids[:, start : start + size], **{cache_kwarg(model): cache}, use_cache=True)
        logits.append(out.logits)
        start += size
    assert start == ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine, two threads mostly wait for each other.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (float32, CPU)."""
    from duoattn import load_model

    return load_model(device="cpu")


def oracle_generate(model, pattern, ids, sparsity=None, **kwargs):
    """``model.generate`` on the unpatched model with the dense oracle as its attention and no cache: every step
    recomputes the whole sequence with explicit per-head masks."""
    assert getattr(model, "_duoattn_handle", None) is None, "the oracle runs on the model without DuoAttention"
    table = roles_table(model, pattern, sparsity)
    AttentionInterface.register("duoref", oracle_attention(table, pattern.sink, pattern.recent, local_windows(model)))
    AttentionMaskInterface.register("duoref", no_mask)
    previous = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation("duoref")
    try:
        with torch.no_grad():
            return model.generate(ids, use_cache=False, **kwargs)
    finally:
        model.set_attn_implementation(previous)


def model_state(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to compare bit for bit."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_restored(model, state, attn_implementation="sdpa"):
    """The model is exactly as before DuoAttention: weights bit for bit, attention implementation, no leftovers."""
    from duoattn.attention import LOCAL_ATTR, ROLES_ATTR

    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert model.config.get_text_config(decoder=True)._attn_implementation == attn_implementation
    assert "generate" not in vars(model) and "get_compiled_call" not in vars(model)
    assert not model._forward_pre_hooks
    assert not any(hasattr(m, ROLES_ATTR) or LOCAL_ATTR in vars(m) for m in model.modules())
    assert getattr(model, "_duoattn_handle", None) is None
