"""Identification at a model's scale: seconds per step and peak memory of ``train_gates`` on a random-weight model
of a named shape (:mod:`.shapes`), at chosen sample lengths (``duoattn bench-identify``).

Samples are random token ids with the loss on the last ``loss_tokens`` positions, where a passkey sample has its
question-and-answer blocks (the paper preset's 10 passkeys of 32 words take about 600 tokens); speed and memory do
not depend on the weights or the token values, but they do depend on where the loss is (the student pass starts
``layers x recent`` tokens before the first loss position, see :meth:`GateSet.student_start`).

Peak memory: on CUDA the allocator's peak (weights included); on the CPU the weights plus the peak of the tensors
a step creates (:class:`.tensor_memory.PeakTensorMemory`, measured in one extra step, as it slows operators down).
A length that runs out of memory is recorded as such, and the longer ones are not tried.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

from ..checks import check_int
from ..identify.gates import GateSet
from ..identify.memory import CHECKPOINTING
from ..identify.streaming import KERNELS
from ..distributed import World, init_world, launched
from ..identify.train import PRESETS, IdentifyConfig, train_gates
from ..io import atomic_write_text, save_figure, write_json
from ..models import default_device, sliding_windows
from .report import GIB, environment
from .shapes import SHAPES, build_random_model, shape_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAPER = PRESETS["paper"]


@dataclass
class IdentifyBenchConfig:
    """Settings of ``duoattn bench-identify``.

    Attributes:
        out: directory for ``config.json``, ``results.json``, ``table.md`` and ``identify.png``.
        shape: a name of :data:`.shapes.SHAPES`.
        lengths: sample lengths in tokens, measured in this order (ascending is best: see ``out of memory``).
        steps: timed steps per length, after ``warmup`` untimed ones (compilation, allocator warm-up).
        loss_tokens: the loss positions are the last this many tokens of a sample.
        sink, recent: the streaming window (default: the paper preset's 128 / 256).
        dtype: of the frozen weights (gates are float32): default bfloat16 on CUDA, float32 on the CPU.
        device: default CUDA if available.
        checkpointing, student_kernel: as in :class:`~duoattn.identify.train.IdentifyConfig`.
        time_budget_s: skip a length whose estimated time would end the run after this many seconds.
        seed: of the weights and the token ids.
    """

    out: str
    shape: str = "tiny"
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    steps: int = 2
    warmup: int = 1
    loss_tokens: int = 640
    sink: int = PAPER["sink"]
    recent: int = PAPER["recent"]
    dtype: str | None = None
    device: str | None = None
    checkpointing: str = "auto"
    student_kernel: str = "auto"
    time_budget_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ValueError("out must name an output directory")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown model shape {self.shape!r}; known: {', '.join(SHAPES)}")
        self.lengths = [int(x) for x in self.lengths]
        if not self.lengths:
            raise ValueError("lengths must name at least one sample length")
        for length in self.lengths:
            check_int("lengths", length, 2)
        for name, minimum in (("steps", 1), ("warmup", 0), ("loss_tokens", 1), ("sink", 0), ("recent", 1),
                              ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.student_kernel not in KERNELS:
            raise ValueError(f"student_kernel must be one of {KERNELS}, got {self.student_kernel!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s!r}")


@dataclass
class _Sample:
    input_ids: torch.Tensor
    loss_positions: torch.Tensor


def random_samples(length: int, loss_tokens: int, vocab: int, seed: int) -> Any:
    """``sample_fn(k)``: ``length`` random ids, the loss on the last ``loss_tokens`` positions (at most
    ``length - 1``)."""
    n_loss = min(loss_tokens, length - 1)

    def sample_fn(step: int) -> _Sample:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return _Sample(torch.randint(0, vocab, (length,), generator=gen), torch.arange(length - n_loss, length))

    return sample_fn


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _measure(model: Any, config: IdentifyBenchConfig, length: int, dtype: str, device: torch.device,
             world: World | None = None) -> dict[str, Any]:
    """Time ``warmup + steps`` steps of samples of ``length`` tokens and measure their peak memory."""
    from .tensor_memory import PeakTensorMemory

    vocab = model.config.vocab_size
    sample_fn = random_samples(length, config.loss_tokens, vocab, config.seed)
    total = config.warmup + config.steps

    def run(steps: int) -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            ident = IdentifyConfig(out=tmp, steps=steps, min_len=length, max_len=length, sink=config.sink,
                                   recent=config.recent, dtype=dtype, device=device.type, save_every=steps,
                                   checkpointing=config.checkpointing, student_kernel=config.student_kernel)
            return train_gates(model, sample_fn, ident, ident.settings(), Path(tmp) / "checkpoint", progress=False,
                               world=world)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = run(total)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif world is not None:  # the counting mode cannot run SDPA's lower-right causal bias, which the ranks use
        peak = None
    else:
        with PeakTensorMemory() as tracker:
            run(1)
        peak = _weight_bytes(model) + tracker.peak
    seconds = [r["seconds"] for r in result.history]
    timed = seconds[config.warmup:]
    return {
        "status": "ok",
        "seconds_per_step": float(np.mean(timed)),
        "step_seconds": [round(s, 4) for s in seconds],
        "peak_gib": None if peak is None else round(peak / GIB, 3),
        "kernel": result.kernel,
        "checkpointing": result.checkpointing,
        "kernel_fallback": result.fallback,
        "gates_moved": float((result.gates < 1).float().mean()),
    }


def student_positions(config: IdentifyBenchConfig, length: int) -> int:
    """How many positions the student pass computes for a sample of ``length`` (:meth:`GateSet.student_start`)."""
    cfg = shape_config(config.shape)
    gates = torch.ones(cfg.num_hidden_layers, cfg.num_key_value_heads)
    gate_set = GateSet(gates, cfg.num_attention_heads, config.sink, config.recent, sliding_windows(cfg), "blocks")
    return length - gate_set.student_start(length - min(config.loss_tokens, length - 1))


def paper_estimate(rows: list[dict[str, Any]], max_len: int = PAPER["max_len"]) -> dict[str, Any] | None:
    """Hours of a paper-preset run (``steps`` samples of uniform length in ``[min_len, max_len]``) from the measured
    seconds per step, interpolated linearly in the length (held at the end values outside the measured range), or
    None unless the measured lengths reach ``max_len`` and go down to at most half of it (a row far beyond the
    range alone says nothing about the steps inside it)."""
    ok = sorted((r["length"], r["seconds_per_step"]) for r in rows if r["status"] == "ok")
    if not ok or ok[-1][0] < max_len or ok[0][0] > max_len // 2:
        return None
    grid = np.linspace(PAPER["min_len"], max_len, 256)
    mean = float(np.interp(grid, [x for x, _ in ok], [y for _, y in ok]).mean())
    return {"steps": PAPER["steps"], "min_len": PAPER["min_len"], "max_len": max_len,
            "mean_seconds_per_step": round(mean, 3), "hours": round(mean * PAPER["steps"] / 3600, 2),
            "method": "mean over uniform lengths of the measured seconds/step, interpolated linearly in the length"}


def _tokens(n: int) -> str:
    return f"{n >> 10}K" if n >= 1024 and n % 1024 == 0 else str(n)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| sample length | student positions | seconds / step | peak memory | kernel | checkpointing |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_gib']:.3g} GiB" if r.get("peak_gib") is not None else "-"
        if r["status"] == "ok":
            lines.append(f"| {_tokens(r['length'])} | {r['student_positions']} | {r['seconds_per_step']:.2f} | "
                         f"{peak} | {r['kernel']} | {'on' if r['checkpointing'] else 'off'} |")
        else:
            lines.append(f"| {_tokens(r['length'])} | {r['student_positions']} | {r['status']} | {peak} | | |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((left, "seconds_per_step", "seconds / step"), (right, "peak_gib", "peak memory (GiB)")):
        shown = [r for r in ok if r[key] is not None]
        ax.plot([r["length"] for r in shown], [r[key] for r in shown], "o-")
        for r in rows:
            if r["status"] != "ok":
                ax.axvline(r["length"], color="tab:red", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sample length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    try:
        save_figure(fig, path, bbox_inches="tight")
    finally:
        plt.close(fig)


def run_identify_bench(
    config: IdentifyBenchConfig, progress: bool = True, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Measure every length of ``config``; write the outputs after each one (an interrupted run keeps what it has);
    return the report (also ``results.json``). ``model``: one already built with :func:`.shapes.build_random_model`
    for ``config.shape`` on the device, in the dtype.

    Under ``torchrun --nproc-per-node N`` each sample is split along the sequence over the N ranks (every rank
    builds the same random model); rank 0 writes the outputs, and peak memory is rank 0's."""
    world = init_world(config.device) if launched() else None
    device = torch.device(config.device or default_device()) if world is None else world.device
    main = world is None or world.is_main
    dtype = config.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    out = Path(config.out)
    env = environment(device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"bench": {**asdict(config), "dtype": dtype}, "shape": SHAPES[config.shape],
                                         "environment": env, "sequence_parallel": 1 if world is None else world.size})
    tic = time.perf_counter()
    if model is None:
        model = build_random_model(config.shape, device, DTYPES[dtype], seed=config.seed)
    build_seconds = time.perf_counter() - tic
    rows: list[dict[str, Any]] = []
    last: tuple[int, float] | None = None  # (length, seconds per step) of the last length measured

    def report() -> dict[str, Any]:
        return {"shape": config.shape, "dtype": dtype, "device": env.get("device_name"), "sink": config.sink,
                "recent": config.recent, "loss_tokens": config.loss_tokens, "build_seconds": round(build_seconds, 1),
                "elapsed_seconds": round(time.perf_counter() - tic, 1), "rows": rows,
                "sequence_parallel": 1 if world is None else world.size,
                "longest_ok": max((r["length"] for r in rows if r["status"] == "ok"), default=None),
                "paper_preset_estimate": paper_estimate(rows)}

    stop: str | None = None
    for length in tqdm(config.lengths, desc="bench-identify", unit="length", disable=not progress):
        row: dict[str, Any] = {"length": length,
                               "student_positions": student_positions(config, length)}
        if last is not None and config.time_budget_s is not None and stop is None:
            # a step grows between linearly (layers) and quadratically (the teacher's full attention) in the length
            estimate = last[1] * (length / last[0]) ** 1.5 * (config.warmup + config.steps)
            if time.perf_counter() - tic + estimate > config.time_budget_s:
                stop = f"skipped: about {estimate:.0f} s would exceed the time budget of {config.time_budget_s:.0f} s"
            if world is not None:  # rank 0's clock decides for all: every rank must run the same lengths
                decision = [stop]
                torch.distributed.broadcast_object_list(decision, src=0)
                stop = decision[0]
        if stop is not None:
            row["status"] = stop
        else:
            try:
                row.update(_measure(model, config, length, dtype, device, world))
                last = (length, row["seconds_per_step"])
            except torch.OutOfMemoryError:
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                row.update(status="out of memory", peak_gib=None if peak is None else round(peak / GIB, 3))
                stop = f"skipped: {_tokens(length)} ran out of memory"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if main:
            write_json(out / "results.json", report())
    result = report()
    if not main:
        return result
    write_json(out / "results.json", result)
    atomic_write_text(out / "table.md", table(rows) + "\n")
    plot(rows, out / "identify.png", f"train_gates on {config.shape} ({dtype}, {env.get('device_name')})")
    return result

