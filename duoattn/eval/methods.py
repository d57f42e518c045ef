"""The methods compared side by side: full attention, DuoAttention, StreamingLLM and random retrieval heads.

All of them run the same ``model.generate`` call; only the head pattern differs. StreamingLLM is DuoAttention
with every head streaming (same sink / recent); random heads draw uniform gates with a seed and keep the same
number of retrieval heads as DuoAttention at that sparsity. Every method but ``full`` runs in a prefill mode
(:mod:`duoattn.prefill`): ``streaming`` (the default), ``full`` or ``window:N``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedModel

from ..checks import UsageError
from ..models import text_config
from ..deploy import DuoAttentionHandle, duo_attention
from ..pattern import HeadPattern
from ..prefill import PrefillMode
from ..quant.kv import KV_BITS

KINDS = ("full", "duo", "streaming", "random")


@dataclass(frozen=True)
class Method:
    """One way of running the model.

    Attributes:
        kind: ``full``, ``duo`` (the learned pattern), ``streaming`` (every head streaming) or ``random``.
        sparsity: fraction of streaming heads, for ``duo`` and ``random``.
        seed: the seed of the random gates, for ``random``.
        kv_bits: how the retrieval heads store keys and values (16: the model dtype; 8 or 4: quantised).
        prefill: the prefill mode, ``"streaming"``, ``"full"`` or ``"window:N"``.
    """

    kind: str
    sparsity: float | None = None
    seed: int = 0
    kv_bits: int = 16
    prefill: str = "streaming"

    def __post_init__(self) -> None:
        mode = PrefillMode.parse(self.prefill)
        object.__setattr__(self, "prefill", mode.name)  # one spelling per mode: names and stored results agree
        if self.kind not in KINDS:
            raise ValueError(f"method kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in ("duo", "random"):
            if self.sparsity is None or not 0.0 <= self.sparsity <= 1.0:
                raise ValueError(f"method {self.kind!r} needs a sparsity in [0, 1], got {self.sparsity!r}")
        elif self.sparsity is not None:
            raise ValueError(f"method {self.kind!r} takes no sparsity")
        if self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {self.kv_bits!r}")
        if self.kind == "full" and self.kv_bits != 16:
            raise ValueError("method 'full' runs the unpatched model: its cache cannot be quantised")
        if self.kind == "full" and not mode.streams:
            raise ValueError("method 'full' runs the unpatched model: it takes no prefill mode")

    @property
    def name(self) -> str:
        suffix = "" if self.kv_bits == 16 else f"-kv{self.kv_bits}"
        mode = PrefillMode.parse(self.prefill)
        if mode.kind == "full":
            suffix += "-fullprefill"
        elif mode.kind == "window":
            suffix += f"-window{mode.window}"
        if self.kind in ("full", "streaming"):
            return self.kind + suffix
        retrieval = round(100 * (1 - self.sparsity))
        if self.kind == "duo":
            return f"duo-{retrieval}%{suffix}"
        return f"random-{retrieval}%{suffix}-seed{self.seed}"

    @property
    def label(self) -> str:
        """The name without the seed: random heads with several seeds share one label."""
        return self.name.split("-seed")[0]

    def pattern(self, model: PreTrainedModel, learned: HeadPattern | None, sink: int, recent: int) -> HeadPattern | None:
        """The head pattern this method runs with (None for full attention)."""
        if self.kind == "full":  # before reading the config: full attention runs any causal LM
            return None
        cfg = text_config(model)
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads)
        if self.kind == "streaming":
            return HeadPattern.uniform(*shape, value=0.0, sink=sink, recent=recent)
        if self.kind == "random":
            return HeadPattern.random(*shape, seed=self.seed, sink=sink, recent=recent)
        if learned is None:
            raise ValueError("method 'duo' needs a learned pattern (--pattern DIR)")
        return HeadPattern(learned.gates, sink=sink, recent=recent)

    @contextlib.contextmanager
    def applied(
        self, model: PreTrainedModel, learned: HeadPattern | None, sink: int, recent: int
    ) -> Iterator[DuoAttentionHandle | None]:
        """Run the body with this method in place on ``model``."""
        pattern = self.pattern(model, learned, sink, recent)
        if pattern is None:
            yield None
            return
        with duo_attention(model, pattern, sparsity=self.sparsity, kv_bits=self.kv_bits,
                           prefill=self.prefill) as handle:
            yield handle


def parse_methods(
    spec: str, sparsities: list[float], random_seeds: int, kv_bits: list[int] | tuple[int, ...] = (16,),
    prefill: list[str] | tuple[str, ...] = ("streaming",),
) -> list[Method]:
    """``"full,duo,streaming,random"`` -> methods; ``duo`` and ``random`` expand over the sparsities (and seeds),
    every method but ``full`` over ``kv_bits`` and the prefill modes."""
    methods: list[Method] = []
    for kind in (k.strip() for k in spec.split(",") if k.strip()):
        if kind == "full":
            methods.append(Method(kind))
        elif kind == "streaming":
            methods.extend(Method(kind, kv_bits=b, prefill=p) for b in kv_bits for p in prefill)
        elif kind == "duo":
            methods.extend(Method("duo", s, kv_bits=b, prefill=p) for s in sparsities for b in kv_bits for p in prefill)
        elif kind == "random":
            methods.extend(
                Method("random", s, seed, b, p)
                for s in sparsities for b in kv_bits for p in prefill for seed in range(random_seeds)
            )
        else:
            raise UsageError(f"unknown method {kind!r}; choose from {', '.join(KINDS)}")
    if any(b != 16 for b in kv_bits) and all(m.kind == "full" for m in methods):
        raise UsageError(
            f"kv_bits {list(kv_bits)} quantise the cache of duo, streaming and random heads; methods {spec!r} "
            "has none of them ('full' runs the unpatched model)"
        )
    return methods
