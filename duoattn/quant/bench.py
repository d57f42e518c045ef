"""How long a context fits and how fast it decodes, with a quantised KV cache and 8-bit weights.

For each setting (retrieval-head ratio x KV bits x weight bits) on a randomly initialised model of a given shape
(speed and memory do not depend on weight values):

1. the KV bytes per token come from ``expected_kv_bytes`` (the formula the tests check against ``kv_bytes()``);
2. the capacity estimate is ``(free memory - reserve) / bytes per token``, then *checked*: the cache is filled to
   that length (random keys / values through ``DuoCache.update``, no prefill needed) and two tokens are decoded; on
   out-of-memory the length shrinks by 5% and the check runs again;
3. decode ms/token is timed at ``decode_len`` tokens (if it fits) on the deployment path (``model(...)`` with the
   DuoCache; on CUDA the retrieval heads go through the Triton split-KV kernel).

Writes ``results.json``, ``capacity.png`` and the ``config.json`` that made them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from ..bench.shapes import SHAPES, build_random_model  # noqa: E402
from ..io import save_figure, write_json  # noqa: E402
from ..models import head_dim as model_head_dim  # noqa: E402
from ..patch import DuoAttentionHandle, cache_kwarg, duo_attention  # noqa: E402
from ..pattern import HeadPattern  # noqa: E402
from .kv import KV_BITS  # noqa: E402
from .weights import WEIGHT_BITS, quantize_linear_weights  # noqa: E402


@dataclass
class QuantBenchConfig:
    """Settings of ``duoattn bench --kv-bits ... --weight-bits ...``.

    Attributes:
        retrieval: retrieval-head ratios (1.0 = full attention, run with kv_bits 16 only: the baseline).
        memory_budget_gib: memory for the KV cache; None = free GPU memory after loading the model, minus reserve.
        fill_chunk: tokens written into the cache per update while filling it.
    """

    out: str
    shape: str = "llama-3-8b"
    retrieval: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    kv_bits: list[int] = field(default_factory=lambda: [16, 8, 4])
    weight_bits: list[int] = field(default_factory=lambda: [16, 8])
    decode_len: int = 1 << 20
    steps: int = 10
    warmup: int = 3
    sink: int = 128
    recent: int = 256
    fill_chunk: int = 1 << 16
    memory_budget_gib: float | None = None
    reserve_gib: float = 3.0
    check_capacity: bool = True
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        if not self.retrieval or any(not 0.0 < r <= 1.0 for r in self.retrieval):
            raise ValueError(f"retrieval ratios must be in (0, 1], got {self.retrieval}")
        if not self.kv_bits or any(b not in KV_BITS for b in self.kv_bits):
            raise ValueError(f"kv_bits must be some of {KV_BITS}, got {self.kv_bits}")
        if not self.weight_bits or any(b not in WEIGHT_BITS for b in self.weight_bits):
            raise ValueError(f"weight_bits must be some of {WEIGHT_BITS}, got {self.weight_bits}")
        for name in ("decode_len", "steps", "fill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def settings(self) -> list[tuple[float, int]]:
        return [(r, b) for r in self.retrieval for b in self.kv_bits if r < 1.0 or b == 16]


def build_model(shape: str, device: torch.device, seed: int) -> PreTrainedModel:
    """A randomly initialised Llama of the given shape, bfloat16 on CUDA, float32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return build_random_model(shape, device, dtype, seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_bytes(device: torch.device, config: QuantBenchConfig) -> int:
    if config.memory_budget_gib is not None:
        return int(config.memory_budget_gib * 2**30)
    if device.type != "cuda":
        raise ValueError("memory_budget_gib is required on the CPU")
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0] - int(config.reserve_gib * 2**30)


def _filled_cache(model, handle: DuoAttentionHandle, length: int, extra: int, chunk: int):
    """A cache preallocated for ``length + extra`` tokens, holding ``length`` random ones."""
    cache = handle.new_cache(max_cache_len=length + extra)
    cfg = model.config
    head_dim = model_head_dim(cfg)
    piece = torch.randn(1, cfg.num_key_value_heads, min(chunk, length), head_dim, dtype=model.dtype,
                        device=model.device)
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        for layer in range(cfg.num_hidden_layers):
            cache.update(piece[:, :, :n], piece[:, :, :n], layer)
    return cache


@torch.inference_mode()
def _decode(model, cache, steps: int) -> float:
    """Decode ``steps`` tokens; seconds per token."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    kwarg = cache_kwarg(model)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        model(ids, **{kwarg: cache}, use_cache=True)
    _sync(model.device)
    return (time.perf_counter() - start) / steps


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _pattern(model, ratio: float, config: QuantBenchConfig) -> tuple[HeadPattern, float]:
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads)
    if ratio >= 1.0:
        return HeadPattern.uniform(*shape, 1.0, sink=config.sink, recent=config.recent), 0.0
    return HeadPattern.random(*shape, seed=config.seed, sink=config.sink, recent=config.recent), 1.0 - ratio


def _measure(model, ratio: float, kv_bits: int, config: QuantBenchConfig) -> dict:
    pattern, sparsity = _pattern(model, ratio, config)
    extra = config.warmup + config.steps
    row: dict = {"retrieval": ratio, "kv_bits": kv_bits}
    with duo_attention(model, pattern, sparsity=sparsity, kv_bits=kv_bits) as handle:
        n = config.decode_len
        per_token = (handle.expected_kv_bytes(2 * n) - handle.expected_kv_bytes(n)) / n
        fixed = handle.expected_kv_bytes(n) - per_token * n  # the streaming heads' ring
        budget = _free_bytes(model.device, config)
        estimate = int((budget - fixed) // per_token) - extra
        row.update(kv_bytes_per_token=per_token, budget_bytes=budget, capacity_estimate=max(0, estimate))
        if n <= estimate:
            cache = _filled_cache(model, handle, n, extra, config.fill_chunk)
            row["kv_bytes_at_decode_len"] = cache.kv_bytes()
            _decode(model, cache, config.warmup)
            row["decode_ms_per_token"] = 1e3 * _decode(model, cache, config.steps)
            del cache
        else:
            row["decode_ms_per_token"] = None  # does not fit
        if config.check_capacity and estimate > 0:
            row["capacity_checked"] = _check_capacity(model, handle, estimate, config)
    return row


def _check_capacity(model, handle: DuoAttentionHandle, estimate: int, config: QuantBenchConfig) -> int | None:
    """The longest length (estimate, or 5% less each time, 4 tries) at which a filled cache decodes 2 tokens."""
    length = estimate
    for _ in range(4):
        cache = None
        try:
            cache = _filled_cache(model, handle, length, 2, config.fill_chunk)
            _decode(model, cache, 2)
            return length
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
        finally:
            del cache
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        length = int(length * 0.95)
    return None


def run_quant_bench(config: QuantBenchConfig) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "rows": []}
    progress = tqdm(total=len(config.weight_bits) * len(config.settings()), desc="bench (quantised)", unit="setting")
    model = build_model(config.shape, device, config.seed)
    for weight_bits in sorted(config.weight_bits, reverse=True):
        quantize_linear_weights(model, bits=weight_bits)  # 16: nothing; 8: in place, after the 16-bit rows
        for ratio, kv_bits in config.settings():
            row = _measure(model, ratio, kv_bits, config)
            row["weight_bits"] = weight_bits
            results["rows"].append(row)
            write_json(out / "results.json", results)
            progress.update()
    progress.close()
    _plot(results, out / "capacity.png")
    print(format_table(results))
    return results


def _label(row: dict) -> str:
    attn = "full" if row["retrieval"] >= 1.0 else f"duo {row['retrieval']:.0%}"
    return f"{attn}, KV{row['kv_bits']}, W{row['weight_bits']}"


def format_table(results: dict) -> str:
    head = "| attention | KV bits | weight bits | KV bytes / token | capacity (estimate) | capacity (checked) | decode ms/token @ decode_len |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        attn = "full" if r["retrieval"] >= 1.0 else f"DuoAttention {r['retrieval']:.0%}"
        checked = r.get("capacity_checked")
        ms = r["decode_ms_per_token"]
        lines.append(
            f"| {attn} | {r['kv_bits']} | {r['weight_bits']} | {r['kv_bytes_per_token']:.0f} | "
            f"{r['capacity_estimate'] / 1e6:.2f}M | {'-' if checked is None else f'{checked / 1e6:.2f}M'} | "
            f"{'does not fit' if ms is None else f'{ms:.1f}'} |"
        )
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    values = [(r.get("capacity_checked") or r["capacity_estimate"]) / 1e6 for r in rows]
    ax.barh([_label(r) for r in rows], values)
    ax.set_xlabel("longest context that decodes (million tokens)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
