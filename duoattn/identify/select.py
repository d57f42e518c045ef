"""Budget-aware head selection: refine the binarised head set at target budgets on the validation loss.

The gates rank the heads once; a deployment keeps the top ``k`` of that ranking as retrieval heads. Nothing in
training checks that those ``k`` are the heads the *binarised* model needs. :func:`refine` does, by a bounded
greedy swap search at each target budget:

1. Start from the gates binarised at the budget (with the per-layer minimum, if any).
2. Candidates: the ``window`` weakest kept heads (lowest gates) and the ``window`` strongest dropped heads. Try
   swapping one kept head for one dropped head, pairs nearest the boundary first; keep a swap only if the
   validation loss goes down. After an accepted swap, candidates are drawn again from the new set; a set already
   evaluated is not tried again. Stop when a round accepts nothing or after ``max_evals`` evaluations.

Budgets are refined from the smallest up, and each budget keeps the heads chosen for the smaller ones (it swaps
only heads outside them). The sets are therefore nested, and one gates table encodes all of them:
:func:`rank_gates` re-ranks the trained gates so that binarising at each target budget gives its refined set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ..pattern import HeadPattern

Head = tuple[int, int]  # (layer, KV head)
# Re-ranked gates are the trained gate values, in the new order, blended with this much of a strictly decreasing
# ramp: ties (gates clamped to 0 or 1) cannot then reorder the heads, and the values move by at most this much.
RAMP = 1e-6


@dataclass
class Trial:
    """One swap tried: ``removed`` left the retrieval set, ``added`` joined it; the validation ``loss`` after."""

    removed: Head
    added: Head
    loss: float
    accepted: bool

    def record(self) -> dict[str, Any]:
        return {"removed": list(self.removed), "added": list(self.added), "loss": self.loss,
                "accepted": self.accepted}


@dataclass
class BudgetSelection:
    """The refinement at one budget: the set before and after, their losses, and every trial in order."""

    budget: float
    retrieval_heads: int
    start: list[Head]
    loss_before: float
    final: list[Head] = field(default_factory=list)
    loss_after: float = float("nan")
    trials: list[Trial] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "retrieval_heads": self.retrieval_heads,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "evaluations": len(self.trials),
            "accepted": sum(t.accepted for t in self.trials),
            "start": [list(h) for h in self.start],
            "final": [list(h) for h in self.final],
            "added": [list(h) for h in sorted(set(self.final) - set(self.start))],
            "removed": [list(h) for h in sorted(set(self.start) - set(self.final))],
            "trials": [t.record() for t in self.trials],
        }


@dataclass
class Selection:
    """The refined sets per budget (ascending) and the re-ranked gates that encode them."""

    budgets: list[BudgetSelection]
    gates: np.ndarray

    def record(self) -> dict[str, Any]:
        return {"budgets": [b.record() for b in self.budgets]}


def strength_order(gates: np.ndarray, layers: np.ndarray) -> list[Head]:
    """The heads of the selected ``layers``, strongest first, as :meth:`HeadPattern.binarize` ranks them (gate
    descending; among equal gates the later (layer, head) first)."""
    heads = [(int(l), int(h)) for l in np.flatnonzero(layers) for h in range(gates.shape[1])]
    flat = np.array([gates[l, h] for l, h in heads])
    return [heads[i] for i in np.lexsort((np.arange(flat.size), flat))[::-1]]


def rank_gates(gates: np.ndarray, order: Sequence[Head], layers: np.ndarray) -> np.ndarray:
    """Gates ``[num_layers, num_kv_heads]`` under which ``order`` (every head of the selected ``layers``) is the
    strength order: the trained values, sorted, handed out along ``order``, plus a tiny strictly decreasing ramp.
    Rows of unselected layers are kept as they are."""
    gates = np.asarray(gates, dtype=np.float64)
    heads = {(int(l), int(h)) for l in np.flatnonzero(layers) for h in range(gates.shape[1])}
    if len(order) != len(heads) or set(order) != heads:
        raise ValueError(f"order must hold every head of the selected layers once ({len(heads)} heads), got "
                         f"{len(order)} entries")
    values = np.sort(np.array([gates[h] for h in order]))[::-1]
    ramp = np.linspace(1.0, 0.0, len(order)) if len(order) > 1 else np.ones(1)
    out = gates.copy()
    for (l, h), value, r in zip(order, (1.0 - RAMP) * values + RAMP * ramp, ramp):
        out[l, h] = value
    return out


def _retrieval(roles: np.ndarray, layers: np.ndarray) -> set[Head]:
    return {(int(l), int(h)) for l, h in np.argwhere(roles & layers[:, None])}


def _roles(kept: set[Head], shape: tuple[int, int], layers: np.ndarray) -> np.ndarray:
    roles = np.zeros(shape, dtype=bool)
    roles[~layers] = True
    for l, h in kept:
        roles[l, h] = True
    return roles


def refine(
    evaluate: Callable[[np.ndarray], float],
    gates: np.ndarray,
    budgets: Sequence[float],
    layers: np.ndarray,
    window: int = 4,
    max_evals: int = 24,
    min_per_layer: int = 0,
    progress: bool = True,
) -> Selection:
    """Greedy swap refinement at each of ``budgets`` (fractions of retrieval heads) on ``evaluate(roles)``, the
    validation loss of a bool role table ``[num_layers, num_kv_heads]``; see the module docstring.

    ``max_evals`` bounds the swaps tried per budget (the starting set costs one more evaluation). Returns the
    refined sets and :func:`rank_gates` of the trained ``gates`` along them.
    """
    if window < 1 or max_evals < 0:
        raise ValueError(f"window must be >= 1 and max_evals >= 0, got {window} and {max_evals}")
    gates = np.asarray(gates, dtype=np.float64)
    layers = np.asarray(layers, dtype=bool)
    pattern = HeadPattern(gates)
    rank = strength_order(gates, layers)
    position = {h: i for i, h in enumerate(rank)}
    fixed: set[Head] = set()
    results: list[BudgetSelection] = []
    for budget in sorted(budgets):
        target = int(pattern.binarize(sparsity=1.0 - budget, layers=layers)[layers].sum())
        if not results:
            kept = _retrieval(pattern.binarize(sparsity=1.0 - budget, layers=layers, min_per_layer=min_per_layer),
                              layers)
        else:  # keep the smaller budgets' heads, fill up in gate order
            kept = set(fixed)
            kept.update([h for h in rank if h not in fixed][: max(0, target - len(fixed))])
        loss = evaluate(_roles(kept, gates.shape, layers))
        selection = BudgetSelection(budget, len(kept), sorted(kept, key=position.get), loss)
        seen = {frozenset(kept)}  # sets already evaluated: a swap back is never tried
        bar = tqdm(total=max_evals, desc=f"refine {budget:g}", unit="eval", disable=not progress, leave=False)
        improved = True
        while improved and len(selection.trials) < max_evals:
            improved = False
            per_layer = np.zeros(gates.shape[0], dtype=int)
            for l, _ in kept:
                per_layer[l] += 1
            weakest = [h for h in reversed(rank) if h in kept and h not in fixed][:window]
            strongest = [h for h in rank if h not in kept][:window]
            pairs = sorted(((i + j, i, out, inn) for i, out in enumerate(weakest) for j, inn in enumerate(strongest)))
            for _, _, out, inn in pairs:
                if len(selection.trials) >= max_evals:
                    break
                trial_set = (kept - {out}) | {inn}
                if frozenset(trial_set) in seen or (per_layer[out[0]] <= min_per_layer and out[0] != inn[0]):
                    continue
                seen.add(frozenset(trial_set))
                trial_loss = evaluate(_roles(trial_set, gates.shape, layers))
                accepted = trial_loss < loss
                selection.trials.append(Trial(out, inn, trial_loss, accepted))
                bar.update()
                if accepted:
                    kept, loss, improved = trial_set, trial_loss, True
                    bar.set_postfix(loss=f"{loss:.4g}")
                    break  # draw the candidates again from the new set
        bar.close()
        selection.final, selection.loss_after = sorted(kept, key=position.get), loss
        results.append(selection)
        fixed = set(kept)
    # Strongest first: each budget's heads after the smaller budgets' ones (each group in gate order), then the rest.
    order: list[Head] = []
    for selection in results:
        order += [h for h in selection.final if h not in order]
    order += [h for h in rank if h not in set(order)]
    ranked = rank_gates(gates, order, layers)
    check = HeadPattern(ranked)
    for selection in results:
        got = _retrieval(check.binarize(sparsity=1.0 - selection.budget, layers=layers), layers)
        if got != set(selection.final):
            raise RuntimeError(f"re-ranked gates do not give the refined set at budget {selection.budget:g}")
    return Selection(results, ranked)
