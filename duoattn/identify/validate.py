"""How a binarised pattern does on held-out samples: its distillation loss and its passkey accuracy.

The gates are trained continuous, but a model is deployed with each head either retrieval (full attention over
its own keys) or streaming (sink + recent). :class:`Validator` measures the deployed model: it runs the model under
:func:`duoattn.deploy.duo_attention` with a given role table (no cache: the same rule by position as the cache
applies) on validation samples and compares with the full model (the teacher):

* **loss**: mean squared error of the final normalised hidden states at the loss positions (every token of the
  question-and-answer blocks, as in training), the mean over samples of each sample's mean.
* **accuracy**: the fraction of passkeys answered exactly by greedy decoding. With the true text before each
  answer, greedy decoding writes the passkey exactly iff the argmax of the logits at each answer position (shifted
  by one) is the next passkey token, so one forward pass scores every answer of a sample.
* **token accuracy**: the fraction of answer tokens that are that argmax. A small model rarely writes a long
  passkey exactly even with full attention (SmolLM2-135M: none of 32 passkeys of 16 words), so this graded score
  is the one that tells budgets apart there.

Validation samples come from a seed other than the training seed, at lengths spread evenly over their own range
(:func:`validation_samples`), so none of them is a training sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from ..data.passkeys import PasskeyDataset, PasskeySample
from ..deploy import duo_attention
from ..models import sliding_windows, text_config
from ..pattern import HeadPattern


def validation_lengths(count: int, min_len: int, max_len: int) -> list[int]:
    """``count`` lengths spread evenly over ``[min_len, max_len]`` (both ends included when ``count > 1``)."""
    if count == 1:
        return [(min_len + max_len) // 2]
    return [int(round(x)) for x in np.linspace(min_len, max_len, count)]


def validation_samples(dataset: PasskeyDataset, count: int) -> list[PasskeySample]:
    """Samples ``0..count-1`` of ``dataset`` (its own seed) at lengths spread evenly over its length range."""
    cfg = dataset.config
    return [dataset.sample(i, length) for i, length in enumerate(validation_lengths(count, cfg.min_len, cfg.max_len))]


@dataclass(frozen=True)
class Evaluation:
    """One role table on the validation samples: ``loss`` (mean over samples), ``accuracy`` (passkeys answered
    exactly over passkeys asked), and per sample ``losses`` and ``correct`` passkeys."""

    loss: float
    accuracy: float
    losses: tuple[float, ...]
    correct: tuple[int, ...]
    token_accuracy: float = float("nan")

    def record(self) -> dict[str, Any]:
        return {"loss": self.loss, "accuracy": self.accuracy, "token_accuracy": self.token_accuracy,
                "losses": list(self.losses), "correct": list(self.correct)}


class Validator:
    """Evaluates role tables on validation samples; the teacher's targets are computed once, results memoised.

    Args:
        model: the frozen model (DuoAttention not enabled).
        samples: validation samples (token ids, loss positions, answer spans).
        sink, recent: the streaming window of the deployed streaming heads.
        progress: show a tqdm bar while the teacher runs.
    """

    def __init__(self, model: PreTrainedModel, samples: Sequence[PasskeySample], sink: int, recent: int,
                 progress: bool = True):
        if not samples:
            raise ValueError("the validation needs at least one sample")
        self.model = model
        self.samples = list(samples)
        self.sink, self.recent = sink, recent
        cfg = text_config(model)
        self.shape = (cfg.num_hidden_layers, cfg.num_key_value_heads)
        # bool [num_layers]: the layers DuoAttention applies to (local sliding-window layers keep their window)
        self.layers = np.array([w is None for w in sliding_windows(cfg)])
        self.device = next(model.parameters()).device
        self.evaluations = 0  # forward passes of the whole validation set actually run (memoised ones excluded)
        self._memo: dict[bytes, Evaluation] = {}
        self._targets: list[torch.Tensor] = []  # per sample: float64 [N, hidden], the teacher at the loss positions
        correct, tokens = [], 0
        bar = tqdm(self.samples, desc="validation teacher", unit="sample", disable=not progress, leave=False)
        for sample in bar:
            hidden = self._hidden(sample)
            self._targets.append(hidden[sample.loss_positions.to(self.device)].double())
            exact, right = self._answered(sample, hidden)
            correct.append(exact)
            tokens += right
        self.full = Evaluation(0.0, sum(correct) / self.num_passkeys, (0.0,) * len(self.samples), tuple(correct),
                               tokens / self.num_answer_tokens)

    @property
    def num_passkeys(self) -> int:
        return sum(len(s.answer_spans) for s in self.samples)

    @property
    def num_answer_tokens(self) -> int:
        return sum(b - a for s in self.samples for a, b in s.answer_spans)

    def _hidden(self, sample: PasskeySample) -> torch.Tensor:
        """``[T, hidden]``: the final normalised hidden states of the model as it is now, without cache."""
        with torch.no_grad():
            ids = sample.input_ids.to(self.device)[None]
            return self.model.base_model(ids, use_cache=False).last_hidden_state[0]

    def _answered(self, sample: PasskeySample, hidden: torch.Tensor) -> tuple[int, int]:
        """How many passkeys of ``sample`` greedy decoding writes exactly (every answer token is the argmax of the
        logits one position earlier; a monotone logit soft-cap does not change the argmax), and how many answer
        tokens are that argmax."""
        head = self.model.get_output_embeddings()
        ids = sample.input_ids.to(self.device)
        exact = right = 0
        with torch.no_grad():
            for a, b in sample.answer_spans:
                hits = head(hidden[a - 1 : b - 1]).argmax(-1) == ids[a:b]
                exact += bool(hits.all())
                right += int(hits.sum())
        return exact, right

    def evaluate(self, roles: np.ndarray) -> Evaluation:
        """Loss and accuracy of the deployed model with ``roles`` (bool ``[num_layers, num_kv_heads]``, True =
        retrieval; rows of local layers are ignored)."""
        roles = np.asarray(roles, dtype=bool)
        if roles.shape != self.shape:
            raise ValueError(f"roles must have shape {self.shape} (layers x KV heads), got {roles.shape}")
        roles = roles | ~self.layers[:, None]
        key = np.packbits(roles).tobytes()
        if key in self._memo:
            return self._memo[key]
        # Gates 0 / 1 binarised at the default threshold give exactly these roles.
        pattern = HeadPattern(roles.astype(np.float64), sink=self.sink, recent=self.recent)
        losses, correct, tokens = [], [], 0
        with duo_attention(self.model, pattern):
            for sample, target in zip(self.samples, self._targets):
                hidden = self._hidden(sample)
                student = hidden[sample.loss_positions.to(self.device)].double()
                losses.append(float((student - target).pow(2).mean()))
                exact, right = self._answered(sample, hidden)
                correct.append(exact)
                tokens += right
        self.evaluations += 1
        result = Evaluation(float(np.mean(losses)), sum(correct) / self.num_passkeys, tuple(losses), tuple(correct),
                            tokens / self.num_answer_tokens)
        self._memo[key] = result
        return result


def retrieval_heads(roles: np.ndarray, layers: np.ndarray) -> list[list[int]]:
    """``[[layer, head], ...]``: the retrieval heads of the selected ``layers``, in (layer, head) order."""
    return [[int(l), int(h)] for l, h in np.argwhere(roles & layers[:, None])]


def budget_report(validator: Validator, gates: np.ndarray, budgets: Sequence[float], min_per_layer: int = 0,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Per budget (fraction of retrieval heads): ``gates`` binarised at it and its :class:`Evaluation`."""
    pattern = HeadPattern(gates)
    rows = []
    for budget in tqdm(budgets, desc="budgets", unit="budget", disable=not progress, leave=False):
        roles = pattern.binarize(sparsity=1.0 - budget, layers=validator.layers, min_per_layer=min_per_layer)
        evaluation = validator.evaluate(roles)
        rows.append({"budget": budget, "retrieval_heads": int(roles[validator.layers].sum()),
                     "heads": retrieval_heads(roles, validator.layers), **evaluation.record()})
    return rows


def validation_table(report: dict[str, Any]) -> str:
    """The per-budget report as a text table: retrieval heads, loss, exact and token accuracy, trained and
    selected gates."""
    selected = {r["budget"]: r for r in report.get("selected") or []}
    lines = [f"validation: {len(report['samples'])} samples, full attention answers "
             f"{report['full_accuracy']:.2f} of the passkeys exactly, "
             f"{report.get('full_token_accuracy', float('nan')):.2f} of their tokens",
             f"{'budget':>7} {'heads':>5} {'loss':>10} {'exact':>6} {'tokens':>6}"
             + ("   selected: loss  exact tokens" if selected else "")]
    for row in report["trained"]:
        line = (f"{100 * row['budget']:6.0f}% {row['retrieval_heads']:5d} {row['loss']:10.4g} {row['accuracy']:6.2f} "
                f"{row.get('token_accuracy', float('nan')):6.2f}")
        if row["budget"] in selected:
            s = selected[row["budget"]]
            line += f"   {s['loss']:14.4g} {s['accuracy']:5.2f} {s.get('token_accuracy', float('nan')):6.2f}"
        lines.append(line)
    return "\n".join(lines)
