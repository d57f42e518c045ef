"""``duoattn bench-serve``: how many concurrent sessions fit, and what the batched decode step delivers at that load.

For one random-weight shape and each context, for full attention (every head retrieval, on the same path) and
DuoAttention at the given retrieval ratios, in each KV precision:

* **capacity**: the KV budget (free device memory after loading minus a reserve, or ``budget_gib``) divided by one
  session's exact cache bytes (``handle.expected_kv_bytes(context + steps + 2)``, what the server reserves); that
  many caches are then really allocated (``handle.new_cache`` + ``fill_random``), as many as fit;
* **throughput**: one batched ``[B, 1]`` decode step over every allocated session, as the server runs it (on CUDA
  replayed from the CUDA graph of its batch-size bucket, :class:`~duoattn.graphs.BatchGraphs`): aggregate tokens/s
  over ``steps`` steps;
* **latency**: ms per step of a batch of ``latency_batch`` sessions at ``latency_context`` against one session.

Outputs under ``out``: ``config.json``, ``serve.json``, ``serve.md`` (a markdown table) and ``serve.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checks import check_int
from ..deploy import DuoAttentionHandle, cache_kwarg, duo_attention
from ..graphs import BatchGraphs, GraphStep
from ..io import atomic_write_bytes, save_figure
from ..kernels.dispatch import DECODE_KERNELS, KernelChoice
from ..models import default_device
from ..pattern import HeadPattern
from ..quant.kv import KV_BITS
from .report import environment
from .run import OOM, release
from .shapes import SHAPES, build_random_model
from .timing import synchronize


@dataclass
class ServeBenchConfig:
    """Settings of ``duoattn bench-serve``.

    Attributes:
        shape: a random-weight model shape (:mod:`duoattn.bench.shapes`).
        contexts: tokens already in every session's cache.
        ratios: fractions of retrieval KV heads; 1.0 is full attention on the same path (16-bit KV only).
        kv_bits: retrieval-cache precisions.
        budget_gib: the KV budget; None: free device memory after loading minus ``reserve_gib`` (CUDA only).
        max_sessions: stop allocating at this many sessions (bounds the run).
        latency_batch, latency_context: the batch and context of the latency comparison against one session.
    """

    shape: str = "llama-3-8b"
    contexts: list[int] = field(default_factory=lambda: [32768, 131072])
    ratios: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    kv_bits: list[int] = field(default_factory=lambda: [16, 4])
    sink: int = 64
    recent: int = 256
    steps: int = 16
    warmup: int = 2
    budget_gib: float | None = None
    reserve_gib: float = 6.0
    max_sessions: int = 1024
    latency_batch: int = 16
    latency_context: int = 32768
    decode_kernel: str = "auto"
    dtype: str = "bfloat16"
    device: str | None = None
    seed: int = 0
    out: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if not self.contexts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.contexts):
            raise ValueError(f"contexts must be positive integers, got {self.contexts}")
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must lie in [0, 1] (fractions of retrieval heads), got {self.ratios}")
        if not self.kv_bits or any(b not in KV_BITS for b in self.kv_bits):
            raise ValueError(f"kv_bits must be some of {KV_BITS}, got {self.kv_bits}")
        for name, low in (("sink", 0), ("recent", 1), ("steps", 1), ("warmup", 0), ("max_sessions", 1),
                          ("latency_batch", 1), ("latency_context", 1)):
            check_int(name, getattr(self, name), low)
        if self.budget_gib is not None and not self.budget_gib > 0:
            raise ValueError(f"budget_gib must be positive, got {self.budget_gib!r}")
        if not self.reserve_gib >= 0:
            raise ValueError(f"reserve_gib must be >= 0, got {self.reserve_gib!r}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {self.decode_kernel!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")

    def settings(self) -> list[tuple[float, int]]:
        """``(ratio, kv_bits)`` pairs: full attention keeps the model dtype."""
        return [(r, b) for r in self.ratios for b in self.kv_bits if r < 1.0 or b == 16]

    def session_tokens(self, context: int) -> int:
        """Cache size of one session: the context plus the warm-up and timed steps."""
        return context + self.warmup + self.steps


@dataclass
class ServeRow:
    """One (context, ratio, kv_bits) setting."""

    context: int
    ratio: float
    kv_bits: int
    path: str
    session_bytes: int
    budget_bytes: int
    expected_sessions: int  # budget // session_bytes, capped by max_sessions
    sessions: int = 0  # really allocated
    tokens_per_s: float | None = None
    ms_per_step: float | None = None
    graph: bool = False  # the step was replayed from a CUDA graph
    status: str = "ok"
    note: str = ""


@dataclass
class LatencyRow:
    ratio: float
    kv_bits: int
    context: int
    batch: int
    ms_batch: float | None = None
    ms_single: float | None = None
    graph_batch: bool = False
    graph_single: bool = False
    status: str = "ok"


class _Sessions:
    """Allocated sessions of one setting, and the batched decode step over them."""

    def __init__(self, model: torch.nn.Module, handle: DuoAttentionHandle, tokens: int, context: int, gen):
        self.model, self.handle, self.tokens, self.context, self.gen = model, handle, tokens, context, gen
        # fill_random draws on the caches' device: its generator must live there (the token ids stay on the CPU).
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        self.fill_gen = torch.Generator(device=model.device).manual_seed(seed)
        self.caches: list[Any] = []
        self.cache_name = cache_kwarg(model)

    def allocate(self, count: int, desc: str) -> str:
        """Allocate up to ``count`` sessions; '' if all fit, else why not."""
        for _ in tqdm(range(count), desc=desc, unit="session", leave=False):
            try:
                cache = self.handle.new_cache(self.tokens, batch_size=1)
                cache.fill_random(self.context, generator=self.fill_gen)
            except OOM:
                release(self.model.device)
                return f"out of memory after {len(self.caches)} sessions"
            self.caches.append(cache)
        return ""

    def time_steps(self, caches: list[Any], warmup: int, steps: int) -> tuple[float, bool]:
        """Seconds per decode step over ``caches`` (after ``warmup`` untimed steps) as the server takes it: one
        session replays its cache's CUDA graph, several one batched step replayed from their bucket's graph (on
        CUDA with the Triton kernels; eager elsewhere). Also whether a graph was replayed."""
        device = self.model.device
        for c in caches:
            c.set_length(self.context)
        capture = device.type == "cuda" and caches[0].graph_safe
        graphs = None
        if len(caches) == 1 and capture:
            step = GraphStep(self.model, caches[0], self.cache_name)
            replayed = True

            def run(row: list[int]) -> Any:
                return step(torch.tensor([row], device=device))
        else:
            graphs = BatchGraphs(self.model, self.cache_name, self.handle.new_cache, self.tokens, capture=capture)

            def run(row: list[int]) -> Any:
                return graphs.step(caches, row)
        vocab = self.model.config.vocab_size
        tokens = torch.randint(0, vocab, (warmup + steps, len(caches)), generator=self.gen).tolist()
        t0 = time.perf_counter()
        for i, row in enumerate(tokens):
            if i == warmup:
                synchronize(device)
                t0 = time.perf_counter()
            run(row)
        synchronize(device)
        elapsed = time.perf_counter() - t0
        if graphs is not None:
            replayed = graphs.bound.state.batch in graphs.steps and graphs.steps[graphs.bound.state.batch].fits()
            graphs.unbind()
        return elapsed / steps, replayed


def _budget(config: ServeBenchConfig, device: torch.device) -> int:
    if config.budget_gib is not None:
        return int(config.budget_gib * (1 << 30))
    if device.type != "cuda":
        raise ValueError("budget_gib is needed off CUDA (the free memory of a CPU is not a KV budget)")
    release(device)
    return max(0, torch.cuda.mem_get_info(device)[0] - int(config.reserve_gib * (1 << 30)))


def _path(ratio: float) -> str:
    return "full" if ratio >= 1.0 else "duo"


def run_serve_bench(config: ServeBenchConfig) -> dict[str, Any]:
    """Measure every setting; write the outputs if ``config.out``; return the report."""
    device = torch.device(config.device or default_device())
    if config.budget_gib is None and device.type != "cuda":
        raise ValueError("budget_gib is needed off CUDA (the free memory of a CPU is not a KV budget)")
    model = build_random_model(config.shape, device, getattr(torch, config.dtype), seed=config.seed)
    cfg = model.config
    pattern = HeadPattern.random(cfg.num_hidden_layers, cfg.num_key_value_heads, seed=config.seed,
                                 sink=config.sink, recent=config.recent)
    kernels = KernelChoice(config.decode_kernel, "auto")
    gen = torch.Generator().manual_seed(config.seed)
    rows: list[ServeRow] = []
    latency: list[LatencyRow] = []
    jobs = [(n, r, b) for r, b in config.settings() for n in config.contexts]
    with torch.no_grad():
        for n, ratio, bits in tqdm(jobs, desc=f"bench-serve {config.shape}", unit="setting"):
            with duo_attention(model, pattern, sparsity=1.0 - ratio, sink=config.sink, recent=config.recent,
                               kv_bits=bits, kernels=kernels, cuda_graphs=False) as handle:
                tokens = config.session_tokens(n)
                per = handle.expected_kv_bytes(tokens)
                budget = _budget(config, device)
                row = ServeRow(n, ratio, bits, _path(ratio), per, budget, min(budget // per, config.max_sessions))
                sessions = _Sessions(model, handle, tokens, n, gen)
                try:
                    row.note = sessions.allocate(row.expected_sessions, f"allocate {n} tok r={ratio} kv{bits}")
                    row.sessions = len(sessions.caches)
                    if row.sessions:
                        s, row.graph = sessions.time_steps(sessions.caches, config.warmup, config.steps)
                        row.ms_per_step, row.tokens_per_s = s * 1e3, row.sessions / s
                    else:
                        row.status = "oom"
                except OOM as err:
                    row.status, row.note = "oom", repr(err)[:200]
                rows.append(row)
                del sessions
                release(device)
        for ratio, bits in tqdm(config.settings(), desc="latency", unit="setting"):
            lat = LatencyRow(ratio, bits, config.latency_context, config.latency_batch)
            with duo_attention(model, pattern, sparsity=1.0 - ratio, sink=config.sink, recent=config.recent,
                               kv_bits=bits, kernels=kernels, cuda_graphs=False) as handle:
                sessions = _Sessions(model, handle, config.session_tokens(config.latency_context),
                                     config.latency_context, gen)
                try:
                    if sessions.allocate(config.latency_batch, "allocate latency batch"):
                        lat.status = "oom"
                    else:
                        s, lat.graph_batch = sessions.time_steps(sessions.caches, config.warmup, config.steps)
                        one, lat.graph_single = sessions.time_steps(sessions.caches[:1], config.warmup,
                                                                    config.steps)
                        lat.ms_batch, lat.ms_single = s * 1e3, one * 1e3
                except OOM:
                    lat.status = "oom"
                latency.append(lat)
                del sessions
                release(device)
    report = {"config": asdict(config), "environment": environment(device),
              "rows": [asdict(r) for r in rows], "latency": [asdict(r) for r in latency]}
    if config.out:
        write_serve_outputs(config.out, config, report)
    return report


def markdown(report: dict[str, Any]) -> str:
    def step(graph: bool) -> str:
        return "graph" if graph else "eager"

    lines = ["| context | path | retrieval | KV bits | GiB / session | sessions (expected) | tokens/s | ms / step | step |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        ms = "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.2f}"
        lines.append(f"| {r['context']} | {r['path']} | {r['ratio']:.0%} | {r['kv_bits']} | "
                     f"{r['session_bytes'] / 2**30:.3f} | {r['sessions']} ({r['expected_sessions']}) | {tps} | {ms} | "
                     f"{step(r['graph'])} |")
    lines += ["", "| retrieval | KV bits | context | batch | ms / step (batch) | ms / step (one session) | ratio | step |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["latency"]:
        b = "-" if r["ms_batch"] is None else f"{r['ms_batch']:.2f}"
        one = "-" if r["ms_single"] is None else f"{r['ms_single']:.2f}"
        ratio = "-" if r["ms_batch"] is None or not r["ms_single"] else f"{r['ms_batch'] / r['ms_single']:.2f}x"
        lines.append(f"| {r['ratio']:.0%} | {r['kv_bits']} | {r['context']} | {r['batch']} | {b} | {one} | {ratio} | "
                     f"{step(r['graph_batch'])} / {step(r['graph_single'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "sessions", "concurrent sessions that fit"),
                           (axes[1], "tokens_per_s", "aggregate decode tokens/s (batched step)")):
        labels = sorted({(r["ratio"], r["kv_bits"]) for r in rows}, reverse=True)
        width = 0.8 / max(1, len(labels))
        for i, (ratio, bits) in enumerate(labels):
            vals = [next((r[key] or 0 for r in rows if r["context"] == n and r["ratio"] == ratio
                          and r["kv_bits"] == bits), 0) for n in contexts]
            ax.bar([j + i * width for j in range(len(contexts))], vals, width,
                   label=f"{'full' if ratio >= 1 else f'duo {ratio:.0%}'} kv{bits}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))], [f"{n // 1024}K" if n >= 1024 else str(n)
                                                                             for n in contexts])
        ax.set_title(title)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"duoattn bench-serve: {report['config']['shape']}, random weights")
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


def write_serve_outputs(out: str, config: ServeBenchConfig, report: dict[str, Any]) -> Path:
    """``config.json``, ``serve.json``, ``serve.md`` and ``serve.png`` under ``out`` (each written atomically)."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / "config.json", (json.dumps(asdict(config), indent=2) + "\n").encode())
    atomic_write_bytes(directory / "serve.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(directory / "serve.md", markdown(report).encode())
    plot(report, directory / "serve.png")
    return directory


__all__ = ["LatencyRow", "ServeBenchConfig", "ServeRow", "markdown", "run_serve_bench"]
