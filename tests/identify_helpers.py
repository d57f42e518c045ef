"""Helpers for the identification tests: a character tokenizer and a model with one long-range head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from conftest import tiny_llama


class CharTokenizer:
    """One token per character, so that positions in text and in tokens coincide.

    ``modulo`` folds the code points into a small vocabulary (ids 1..modulo) for tiny models; without it ids are the
    code points and :meth:`decode` inverts the encoding. ``bos`` is prepended when special tokens are asked for.
    """

    def __init__(self, modulo: int | None = None, bos: int | None = None):
        self.modulo = modulo
        self.bos = bos

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [ord(c) if self.modulo is None else ord(c) % self.modulo + 1 for c in text]
        return ([self.bos] if add_special_tokens and self.bos is not None else []) + ids

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [self._encode(t, add_special_tokens) for t in texts]}

    def decode(self, ids) -> str:
        assert self.modulo is None
        return "".join(chr(int(i)) for i in ids if self.bos is None or int(i) != self.bos)


@dataclass
class TokenSample:
    input_ids: torch.Tensor
    loss_positions: torch.Tensor


def random_samples(length: int, num_loss: int, vocab: int = 97, seed: int = 0):
    """``sample_fn(k)``: random tokens of ``length``; the loss positions are the last ``num_loss`` tokens."""

    def sample_fn(step: int) -> TokenSample:
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        ids = torch.randint(1, vocab, (length,), generator=gen)
        return TokenSample(ids, torch.arange(length - num_loss, length))

    return sample_fn


LONG_HEAD = (1, 0)  # (layer, KV head)


def one_long_range_head_model(scale: float = 4.0):
    """A 2-layer Llama (2 KV heads, 4 query heads) where only KV head 0 of layer 1 carries information.

    Every other KV head has zero value projections, so its output is zero whatever it attends to: it needs no
    context at all. The long-range head has zero query projections, so its query heads attend uniformly to every
    visible key: their full-attention output averages the whole prefix, their streaming output only the sink and
    the recent window, so streaming loses long-range information. Its values are scaled up so that it matters.
    """
    model = tiny_llama(num_layers=2, heads=4, kv_heads=2, seed=3)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad():
        for layer, attn in enumerate(a.self_attn for a in model.model.layers):
            for kv in range(model.config.num_key_value_heads):
                rows = slice(kv * head_dim, (kv + 1) * head_dim)
                if (layer, kv) == LONG_HEAD:
                    attn.q_proj.weight[kv * group * head_dim : (kv + 1) * group * head_dim] = 0.0
                    attn.v_proj.weight[rows] *= scale
                else:
                    attn.v_proj.weight[rows] = 0.0
    return model
