"""Head patterns: one gate per (layer, KV head), and how they turn into retrieval / streaming roles.

A pattern directory uses the upstream DuoAttention format, so patterns published with the original
implementation load unchanged:

* ``full_attention_heads.tsv``: tab-separated floats, one row per decoder layer, one column per KV head, no header.
* ``config.json``: a JSON object holding at least ``sink_size`` and ``recent_size`` (upstream stores every setting
  of the identification run there; so do we).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import UsageError
from .io import atomic_write_text, read_json, read_text, replace_directory

GATES_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"
DEFAULT_THRESHOLD = 0.5
# Gates are trained in [0, 1]; published upstream files stray from it by the last, unclamped optimiser step
# (about 1e-3). A file with values further out does not hold gates.
GATE_SLACK = 0.1


def _as_gates(gates: Any) -> np.ndarray:
    """Validate and clip gate values to a float64 array of shape [num_layers, num_kv_heads]."""
    try:
        given = np.asarray(gates)
    except (TypeError, ValueError) as err:
        raise UsageError(f"gates must be numeric, array-like [num_layers, num_kv_heads]: {err}") from None
    # Only real numbers: numpy would silently drop an imaginary part or parse strings.
    if given.dtype.kind not in "biuf":
        raise UsageError(f"gates must be real numeric values (bool, int or float), got an array of dtype {given.dtype}")
    arr = given.astype(np.float64)
    if arr.ndim == 1 and arr.size > 0:
        arr = arr[:, None]  # a model with a single KV head per layer, saved as one column
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"gates must have shape [num_layers, num_kv_heads], got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        layer, head = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"gates must be finite: gate of layer {layer}, KV head {head} is {arr[layer, head]}")
    # Published upstream files hold values slightly outside [0, 1] (the last optimiser step is not clamped).
    return np.clip(arr, 0.0, 1.0)




@dataclass
class HeadPattern:
    """Continuous gates per (layer, KV head) plus the streaming window (``sink`` first + ``recent`` last tokens).

    Args:
        gates: array-like ``[num_layers, num_kv_heads]``; higher means "needs the full context". Finite values outside
            [0, 1] are clipped; NaN or infinite values are refused.
        sink: number of leading tokens every streaming head keeps.
        recent: number of most recent tokens (the query's own included) every streaming head keeps.
        metadata: extra settings saved into ``config.json`` beside ``sink_size`` / ``recent_size``.
    """

    gates: np.ndarray
    sink: int = 64
    recent: int = 256
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gates = _as_gates(self.gates)
        for name in ("sink", "recent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.recent < 1:
            raise ValueError(f"recent must be >= 1 (a query always sees itself), got {self.recent}")

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, value: float = 1.0, **kwargs: Any) -> HeadPattern:
        """A pattern whose gates are all ``value`` (1.0: every head retrieval; 0.0: every head streaming)."""
        return cls(np.full((num_layers, num_kv_heads), float(value)), **kwargs)

    @classmethod
    def random(cls, num_layers: int, num_kv_heads: int, seed: int, **kwargs: Any) -> HeadPattern:
        """Uniformly random gates: the "random heads" baseline once binarised to a budget."""
        rng = np.random.default_rng(seed)
        return cls(rng.random((num_layers, num_kv_heads)), **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> HeadPattern:
        """Read a pattern directory in the upstream format (``full_attention_heads.tsv`` + ``config.json``)."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"pattern directory {str(directory)!r} is a file, not a directory")
        if not directory.is_dir():
            raise FileNotFoundError(f"pattern directory {str(directory)!r} does not exist")
        tsv, cfg = directory / GATES_FILE, directory / CONFIG_FILE
        for path in (tsv, cfg):
            if not path.is_file():
                raise FileNotFoundError(f"pattern directory {str(directory)!r} has no {path.name}")
        try:
            gates = np.loadtxt(io.StringIO(read_text(tsv, "gates file")), delimiter="\t", dtype=np.float64, ndmin=2)
        except ValueError as err:
            raise UsageError(f"{tsv} is not a tab-separated table of numbers: {err}") from None
        finite = gates[np.isfinite(gates)]
        if finite.size and (finite.min() < -GATE_SLACK or finite.max() > 1 + GATE_SLACK):
            raise UsageError(f"{tsv} holds values from {finite.min():g} to {finite.max():g}; gates must lie in "
                             f"[0, 1] (within {GATE_SLACK})")
        config = read_json(cfg, "pattern config")
        if not isinstance(config, dict):
            raise UsageError(f"{cfg} must hold a JSON object, got {type(config).__name__}")
        missing = [key for key in ("sink_size", "recent_size") if key not in config]
        if missing:
            raise UsageError(f"{cfg} lacks {', '.join(missing)}")
        # Patterns written by duoattn record their shape; a gates file of another shape is not theirs.
        for key, size in (("num_layers", gates.shape[0]), ("num_kv_heads", gates.shape[-1])):
            if key in config and config[key] != size:
                raise UsageError(f"{cfg} says {key}={config[key]!r} but {tsv} has {size} ({gates.shape[0]} rows "
                                 f"x {gates.shape[-1]} columns): the two files do not belong together")
        metadata = {k: v for k, v in config.items() if k not in ("sink_size", "recent_size")}
        try:
            return cls(gates, sink=config["sink_size"], recent=config["recent_size"], metadata=metadata)
        except ValueError as err:
            raise UsageError(f"{directory}: {err}") from None

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the pattern in the upstream format; the directory changes as a whole or not at all.

        The files are written into a new directory beside ``directory``, which then replaces it
        (:func:`duoattn.io.replace_directory`); other entries of an existing directory (a README, plots) are
        carried over unchanged. A failure at any point leaves the previous pattern in place.
        """
        return replace_directory(directory, self.write_files, keep=lambda name: name not in (GATES_FILE, CONFIG_FILE))

    def write_files(self, directory: str | os.PathLike[str]) -> None:
        """The two pattern files into the existing ``directory`` (one at a time: use :meth:`save` to replace a
        pattern; this is for building a new output directory that is swapped in as a whole)."""
        directory = Path(directory)
        rows = ["\t".join(f"{g:.18e}" for g in row) for row in self.gates]
        config = {**self.metadata, "sink_size": self.sink, "recent_size": self.recent}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write_text(directory / GATES_FILE, "\n".join(rows) + "\n")

    # ------------------------------------------------------------------------------------- names and the Hub
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> HeadPattern:
        """A pattern by shipped name, published name, local directory or Hugging Face Hub repo id (``duoattn.hub``)."""
        from .hub import resolve_pattern_dir  # duoattn.hub imports this module

        return cls.load(resolve_pattern_dir(name_or_path, revision=revision, cache_dir=cache_dir))

    def save_pretrained(
        self, directory: str | os.PathLike[str], model: str | None = None, command: str | None = None
    ) -> Path:
        """:meth:`save` plus a README.md model card naming ``model``, budgets and the ``command`` that made it."""
        from .hub import write_model_card

        self.save(directory)
        write_model_card(self, directory, model, command)
        return Path(directory)

    def push_to_hub(self, repo_id: str, model: str | None = None, command: str | None = None, **kwargs: Any) -> Any:
        """Upload the pattern and its model card to the Hub model repo ``repo_id`` (created if needed).

        ``kwargs``: ``private``, ``token``, ``revision``, ``commit_message`` (see ``duoattn.hub.push_pattern``).
        """
        from .hub import push_pattern

        return push_pattern(self, repo_id, model=model, command=command, **kwargs)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return int(self.gates.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.gates.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_kv_heads)

    # ---------------------------------------------------------------------------------------- binarisation
    def binarize(
        self, sparsity: float | None = None, threshold: float | None = None, layers: Any = None,
        min_per_layer: int = 0, balance_ranks: int | None = None,
    ) -> np.ndarray:
        """Boolean roles ``[num_layers, num_kv_heads]``: True = retrieval (full cache), False = streaming.

        ``sparsity=s`` makes the ``round(s * num_heads)`` heads with the lowest gates, ranked jointly over all
        layers, streaming. ``threshold=t`` makes heads with gate < t streaming. With neither, ``t = 0.5``.
        Ties are broken deterministically: among equal gates, the head that comes first in (layer, head) order
        becomes streaming first.

        ``layers`` (bool ``[num_layers]``, default all True) names the layers DuoAttention applies to, e.g. the
        global layers of Gemma. Only their heads are ranked and counted; the rows of the other layers are ignored
        and come back all True (DuoAttention evicts nothing there: they keep the model's own sliding window).

        ``min_per_layer=m`` keeps at least the ``m`` highest-gated heads of every selected layer as retrieval heads.
        With ``sparsity`` the number of retrieval heads stays the same: the per-layer heads come first and the rest
        of the budget goes to the highest gates of the other heads; a budget below ``m`` heads per layer is refused.

        ``balance_ranks=N`` (tensor parallelism over N ranks, each holding a contiguous ``num_kv_heads / N`` of
        every layer's KV heads): in every layer, each rank gets the same number of retrieval heads, so that no rank
        waits for another at the layer's all-reduce. The count of retrieval heads that ``sparsity`` or
        ``threshold`` gives is rounded to a multiple of N; :func:`balanced_roles` says which heads.
        """
        if sparsity is not None and threshold is not None:
            raise ValueError("give either sparsity or threshold, not both")
        if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, (int, np.integer)) or not (
                0 <= min_per_layer <= self.num_kv_heads):
            raise ValueError(f"min_per_layer must be an integer in [0, {self.num_kv_heads}] (the KV heads of a "
                             f"layer), got {min_per_layer!r}")
        if balance_ranks is not None and min_per_layer:
            raise ValueError("give either balance_ranks or min_per_layer, not both")
        if balance_ranks is not None:
            ranks = int(balance_ranks)
            if isinstance(balance_ranks, bool) or ranks != balance_ranks or ranks < 1 or self.gates.shape[1] % ranks:
                raise ValueError(f"balance_ranks must be a whole number >= 1 that divides the {self.gates.shape[1]} "
                                 f"KV heads of a layer, got {balance_ranks!r}")
            plain = self.binarize(sparsity, threshold, layers)
            selected = self._layer_mask(layers)
            roles = np.ones(self.gates.shape, dtype=bool)
            roles[selected] = balanced_roles(self.gates[selected], int(plain[selected].sum()), ranks)
            return roles
        selected = self._layer_mask(layers)
        roles = np.ones(self.gates.shape, dtype=bool)
        gates = self.gates[selected]
        # Heads of the selected layers, strongest first: gate descending, then the later (layer, head) first.
        flat = gates.reshape(-1)
        strongest = np.lexsort((np.arange(flat.size), flat))[::-1]
        floor = np.zeros(flat.size, dtype=bool)
        if min_per_layer:
            heads = gates.shape[1]
            for rank_in_layer in range(min_per_layer):
                for layer in range(gates.shape[0]):
                    in_layer = strongest[strongest // heads == layer]
                    floor[in_layer[rank_in_layer]] = True
        if sparsity is None:
            t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
            if not math.isfinite(t):
                raise ValueError(f"threshold must be a finite number, got {threshold!r}")
            roles[selected] = ((gates >= t).reshape(-1) | floor).reshape(gates.shape)
            return roles
        s = float(sparsity)
        if not (0.0 <= s <= 1.0):  # also refuses NaN
            raise ValueError(f"sparsity must be in [0, 1] (the fraction of streaming heads), got {sparsity!r}")
        num_streaming = int(math.floor(s * flat.size + 0.5))
        num_retrieval = flat.size - num_streaming
        if num_retrieval < int(floor.sum()):
            raise ValueError(
                f"sparsity {sparsity!r} leaves {num_retrieval} retrieval heads, fewer than min_per_layer="
                f"{min_per_layer} in each of {gates.shape[0]} layers ({int(floor.sum())}); lower the sparsity or "
                "min_per_layer"
            )
        chosen = floor.copy()
        rest = strongest[~floor[strongest]]
        chosen[rest[: num_retrieval - int(floor.sum())]] = True
        roles[selected] = chosen.reshape(gates.shape)
        return roles

    def _layer_mask(self, layers: Any) -> np.ndarray:
        if layers is None:
            return np.ones(self.num_layers, dtype=bool)
        mask = np.asarray(layers)
        if mask.dtype != bool or mask.shape != (self.num_layers,):
            raise ValueError(
                f"layers must be a bool array of shape ({self.num_layers},) (one entry per pattern row), "
                f"got dtype {mask.dtype} and shape {mask.shape}"
            )
        if not mask.any():
            raise ValueError("layers selects no layer: DuoAttention needs at least one layer to apply to")
        return mask

    def __repr__(self) -> str:
        return (
            f"HeadPattern(layers={self.num_layers}, kv_heads={self.num_kv_heads}, sink={self.sink}, "
            f"recent={self.recent}, mean_gate={self.gates.mean():.3f})"
        )


def balanced_roles(gates: np.ndarray, num_retrieval: int, ranks: int) -> np.ndarray:
    """Bool ``[layers, kv_heads]``: about ``num_retrieval`` retrieval heads (rounded to a multiple of ``ranks``)
    such that, in every layer, each of the ``ranks`` contiguous groups of ``kv_heads / ranks`` heads holds the same
    number of them.

    Within a group, the heads with the highest gates are retrieval heads. A layer's ``d``-th retrieval head per
    group is taken for all groups at once, so the choice is among units (layer, d) of ``ranks`` heads, worth the
    sum of the ``d``-th highest gate of each group; the units with the highest worth are taken (their worth falls
    with ``d``, so a layer's units are taken in order). This keeps the largest sum of gates that a balanced choice
    can keep. Ties go to the earlier layer, then the smaller ``d``.
    """
    num_layers, num_heads = gates.shape
    if num_heads % ranks:
        raise ValueError(f"{num_heads} KV heads cannot be split over {ranks} ranks")
    per = num_heads // ranks
    units = int(math.floor(num_retrieval / ranks + 0.5))
    # [layers, ranks, per]: each group's gates, highest first (stable: the earlier head first among equals)
    grouped = gates.reshape(num_layers, ranks, per)
    order = np.argsort(-grouped, axis=-1, kind="stable")
    ranked = np.take_along_axis(grouped, order, axis=-1)
    worth = ranked.sum(axis=1).reshape(-1)  # unit (layer, d) at index layer * per + d
    index = np.arange(worth.size)
    chosen_units = np.lexsort((index, -worth))[:units]
    depth = np.zeros(num_layers, dtype=int)
    for unit in chosen_units:
        depth[unit // per] += 1
    roles = np.zeros((num_layers, ranks, per), dtype=bool)
    for layer in range(num_layers):
        np.put_along_axis(roles[layer], order[layer][:, : depth[layer]], True, axis=-1)
    return roles.reshape(num_layers, num_heads)
