"""The measurements of ``duoattn bench``, all through ``model.generate``: what users run.

* ``generate`` rows (the headline): under ``duo_attention`` (every head retrieval = the ``full`` path, or a fraction
  of them = ``duo``), or on the unpatched model (``stock``: transformers' SDPA and dynamic cache).

  - random fill: the cache holds ``context`` random keys / values (speed does not depend on them) and ``generate``
    continues from it. Decode ms/token is ``(t(2 + steps) - t(2)) / steps`` of two ``generate`` calls on the same
    cache, so that both include the one-token prompt step and neither the first call's graph capture, which is
    reported on its own (``first_call_s``).
  - prefill: ``generate(max_new_tokens=1)`` on a random ``context``-token prompt, prefilled in chunks: seconds and
    peak memory.
* ``step`` rows (a diagnostic): the same cache's captured decode step replayed alone, without generate's own work.
* ``max_context`` rows: the longest context (a multiple of 64K) whose cache fits and decodes through ``generate``,
  searched downward from the estimate that the KV-bytes formula and the free memory give; one search serves every
  (ratio, kv_bits, weight_bits) setting.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm
from transformers import DynamicCache, GenerationConfig, PreTrainedModel

from ..cache import DuoCache, cache_kv_bytes
from ..deploy import DuoAttentionHandle, cache_kwarg, duo_attention
from ..hub import resolve_pattern_dir
from ..kernels.dispatch import KernelChoice
from ..models import default_device, load_model, text_config
from ..models import head_dim as model_head_dim
from ..pattern import HeadPattern
from ..quant.weights import quantize_linear_weights
from .config import BenchConfig, Row
from .profile import kernel_profile
from .shapes import build_random_model, weight_bytes_read
from .timing import median, peak_bytes, reset_peak, time_ms, time_once_s

OOM = (torch.cuda.OutOfMemoryError,)
CAPACITY_STEP = 1 << 16


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def path_name(ratio: float) -> str:
    return "full" if ratio >= 1.0 else "duo"


def head_pattern(model: PreTrainedModel, config: BenchConfig) -> HeadPattern:
    cfg = text_config(model)
    if config.pattern is not None:
        return HeadPattern.load(resolve_pattern_dir(config.pattern))
    return HeadPattern.random(cfg.num_hidden_layers, cfg.num_key_value_heads, seed=config.seed,
                              sink=config.sink, recent=config.recent)


def random_ids(model: PreTrainedModel, length: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, text_config(model).vocab_size, (1, length), generator=g).to(device)


def greedy(new_tokens: int, **kwargs) -> GenerationConfig:
    """Greedy decoding of exactly ``new_tokens`` tokens (no end-of-sequence stop: random weights)."""
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)


def rewind_dynamic(cache: DynamicCache, tokens: int) -> None:
    """Drop what ``generate`` appended to a stock cache after its first ``tokens`` positions."""
    extra = cache.get_seq_length() - tokens
    if extra > 0:
        cache.crop(-extra)


class Bench:
    """One model under test: runs the rows of one shape (or real model) at one weight precision."""

    def __init__(self, config: BenchConfig, model: PreTrainedModel, shape: str, device: torch.device,
                 weight_bits: int):
        self.config, self.model, self.shape, self.device = config, model, shape, device
        self.weight_bits = weight_bits
        self.weights = weight_bytes_read(model)
        self.kernels = KernelChoice(config.decode_kernel, config.streaming_kernel)
        self.pattern = head_pattern(model, config)
        self.cache_name = cache_kwarg(model)

    def row(self, kind: str, path: str, ratio: float, context: int, kv_bits: int = 16, **kw) -> Row:
        return Row(kind, path, self.shape, ratio, context, kv_bits=kv_bits, weight_bits=self.weight_bits, **kw)

    @contextmanager
    def duo(self, ratio: float, kv_bits: int) -> Iterator[DuoAttentionHandle]:
        c = self.config
        with duo_attention(self.model, self.pattern, sparsity=1.0 - ratio, sink=c.sink, recent=c.recent,
                           prefill_chunk_size=c.prefill_chunk, kv_bits=kv_bits, kernels=self.kernels,
                           cuda_graphs=c.graph) as handle:
            yield handle

    def bound_ms(self, kv_read: int) -> float:
        return (self.weights + kv_read) / self.config.bandwidth * 1e3

    def _finish(self, row: Row) -> Row:
        row.weight_read_bytes = self.weights
        if row.kv_read_bytes is not None and self.device.type == "cuda":  # a GPU memory-bandwidth bound
            row.bound_ms = self.bound_ms(row.kv_read_bytes)
        return row

    def _generate(self, ids: torch.Tensor, new_tokens: int, cache=None, rewind: Callable[[], None] | None = None):
        if rewind is not None:
            rewind()
        kwargs = {} if cache is None else {self.cache_name: cache}
        with torch.no_grad():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy(new_tokens),
                                       **kwargs)

    def _decode_timing(self, row: Row, ids: torch.Tensor, cache, rewind: Callable[[], None]) -> None:
        """Decode ms/token from two generate calls on the same filled cache (see the module docstring)."""
        steps = self.config.steps
        row.first_call_s = time_once_s(lambda: self._generate(ids, 2, cache, rewind), self.device)
        short = time_once_s(lambda: self._generate(ids, 2, cache, rewind), self.device)
        long = time_once_s(lambda: self._generate(ids, 2 + steps, cache, rewind), self.device)
        row.ms_per_token = max(long - short, 0.0) / steps * 1e3

    # ---------------------------------------------------------------------------------- generate: duo / full
    def generate_decode(self, ratio: float, kv_bits: int, context: int) -> list[Row]:
        """The ``generate`` row at ``context`` random tokens, and its ``step`` diagnostic row."""
        c = self.config
        row = self.row("generate", path_name(ratio), ratio, context, kv_bits, fill="random")
        rows = [row]
        cache = None
        release(self.device)
        reset_peak(self.device)
        try:
            with self.duo(ratio, kv_bits) as handle:
                cache = handle.new_cache(context + 3 * c.steps + 16, batch_size=1)
                cache.fill_random(context, torch.Generator(device=self.device).manual_seed(c.seed))
                ids = random_ids(self.model, context + 1, self.device, c.seed)
                self._decode_timing(row, ids, cache, lambda: cache.set_length(context))
                row.kv_bytes, row.kv_read_bytes = cache.kv_bytes(), cache.kv_bytes_read(context)
                row.kernels = {**cache.describe(), "cuda_graph": cache in handle.graphs.steps,
                               "graph_failure": handle.graphs.failed}
                row.peak_bytes = peak_bytes(self.device)
                if c.step_rows:
                    rows.append(self._step_row(handle, cache, ratio, kv_bits, context))
        except OOM as err:
            row.status, row.note = "oom", str(err).split("\n")[0][:160]
        finally:
            if row.peak_bytes is None:
                row.peak_bytes = peak_bytes(self.device)
            del cache
            release(self.device)
        for r in rows:
            self._finish(r)
        return rows

    def _step_row(self, handle: DuoAttentionHandle, cache: DuoCache, ratio: float, kv_bits: int,
                  context: int) -> Row:
        c = self.config
        row = self.row("step", path_name(ratio), ratio, context, kv_bits, fill="random")
        step = handle.graphs.steps.get(cache)
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        if step is None:
            row.note = "no CUDA graph: eager forward steps"

            def run() -> None:
                with torch.no_grad():
                    self.model(input_ids=token, use_cache=True, logits_to_keep=1, **{self.cache_name: cache})
        else:
            def run() -> None:
                step(token)

        cache.set_length(context)
        times = time_ms(run, self.device, min(3, c.steps), c.steps)
        row.ms_per_token, row.ms_spread = median(times), [min(times), max(times)]
        row.kv_bytes, row.kv_read_bytes = cache.kv_bytes(), cache.kv_bytes_read(context)
        if c.profile and step is not None:
            cache.set_length(context)
            row.profile = {"graph_replay": kernel_profile(run, self.device)}
        cache.set_length(context)
        return row

    def generate_prefill(self, ratio: float, kv_bits: int, context: int) -> Row:
        """``generate(max_new_tokens=1)`` on a ``context``-token prompt: prefill seconds and peak memory."""
        c = self.config
        chunk = min(c.prefill_chunk, context)
        row = self.row("generate", path_name(ratio), ratio, context, kv_bits, fill="prefill",
                       note=f"chunks of {chunk} tokens")
        out = None
        release(self.device)
        try:
            with self.duo(ratio, kv_bits):
                # Warm-up at the same chunk size: compiles FlexAttention for these shapes, outside the timing.
                self._generate(random_ids(self.model, min(2 * chunk, context), self.device, c.seed + 1), 1)
                release(self.device)
                reset_peak(self.device)
                ids = random_ids(self.model, context, self.device, c.seed)
                holder = {}
                row.prefill_s = time_once_s(lambda: holder.update(out=self._prefill_call(ids)), self.device)
                out = holder.pop("out")
                row.kv_bytes = cache_kv_bytes(out)
                row.kernels = out.describe()
                failed = out.state.workspace.kernel.get("flex_failed")
                if failed:
                    row.note += f"; FlexAttention failed, used SDPA blocks: {failed}"
        except OOM as err:
            row.status, row.note = "oom", str(err).split("\n")[0][:160]
        finally:
            row.peak_bytes = peak_bytes(self.device)
            del out
            release(self.device)
        return self._finish(row)

    def _prefill_call(self, ids: torch.Tensor):
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=greedy(1, return_dict_in_generate=True))
        return out[self.cache_name] if self.cache_name in out else out.past_key_values

    # ------------------------------------------------------------------------------------------------- stock
    def stock_decode(self, context: int) -> Row:
        """transformers' own path: the unpatched model and a DynamicCache filled with random keys / values."""
        c = self.config
        row = self.row("generate", "stock", 1.0, context, fill="random")
        cfg = text_config(self.model)
        head_dim = model_head_dim(cfg)
        cache = None
        release(self.device)
        reset_peak(self.device)
        try:
            cache = DynamicCache(config=cfg)
            g = torch.Generator(device=self.device).manual_seed(c.seed)
            shape = (1, cfg.num_key_value_heads, context, head_dim)
            for layer in range(cfg.num_hidden_layers):
                k = torch.empty(shape, dtype=self.model.dtype, device=self.device).normal_(generator=g)
                cache.update(k, torch.empty_like(k).normal_(generator=g), layer)
            ids = random_ids(self.model, context + 1, self.device, c.seed)
            self._decode_timing(row, ids, cache, lambda: rewind_dynamic(cache, context))
            row.kv_bytes = cache_kv_bytes(cache)
            row.kv_read_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * head_dim * \
                self.model.dtype.itemsize
            row.kernels = {"attention": "sdpa", "cache": "DynamicCache"}
        except OOM as err:
            row.status, row.note = "oom", str(err).split("\n")[0][:160]
        finally:
            row.peak_bytes = peak_bytes(self.device)
            del cache
            release(self.device)
        return self._finish(row)

    def stock_prefill(self, context: int) -> Row:
        c = self.config
        chunk = min(c.prefill_chunk, context)
        row = self.row("generate", "stock", 1.0, context, fill="prefill", note=f"chunks of {chunk} tokens")
        release(self.device)
        try:
            self._generate(random_ids(self.model, min(2 * chunk, context), self.device, c.seed + 1), 1)
            release(self.device)
            reset_peak(self.device)
            ids = random_ids(self.model, context, self.device, c.seed)

            def call() -> None:
                with torch.no_grad():
                    self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                        generation_config=greedy(1, prefill_chunk_size=chunk))

            row.prefill_s = time_once_s(call, self.device)
        except OOM as err:
            row.status, row.note = "oom", str(err).split("\n")[0][:160]
        finally:
            row.peak_bytes = peak_bytes(self.device)
            release(self.device)
        return self._finish(row)

    # ---------------------------------------------------------------------------------------- longest context
    def max_context(self, ratio: float, kv_bits: int, tries: int = 8) -> Row:
        """Largest context (a multiple of 64K tokens) whose cache fits and decodes 4 tokens through generate,
        searched downward from the estimate of the KV-bytes formula; the row notes the size that ran out."""
        row = self.row("max_context", path_name(ratio), ratio, 0, kv_bits, fill="random")
        if self.device.type != "cuda":
            row.status, row.note = "skipped", "needs a GPU"
            return row
        with self.duo(ratio, kv_bits) as handle:
            per_token = handle.expected_kv_bytes(1 << 24) / (1 << 24)
            release(self.device)
            free = torch.cuda.mem_get_info(self.device)[0] - int(self.config.reserve_gib * (1 << 30))
            n = int(free / per_token) // CAPACITY_STEP * CAPACITY_STEP
            failed: int | None = None
            for _ in range(tries):
                if n < CAPACITY_STEP:
                    break
                probe = self._fits(handle, n)
                if probe is not None:
                    row.context, row.peak_bytes, row.kv_bytes = n, *probe
                    break
                failed = n
                n = int(n * 0.97) // CAPACITY_STEP * CAPACITY_STEP
        if row.context == 0:
            row.status, row.note = "oom", f"no size down to {n} tokens fitted"
        else:
            row.note = (f"out of memory at {failed} tokens" if failed else "the first estimate fitted") + \
                f"; formula estimate {int(free / per_token)} tokens"
        return self._finish(row)

    def _fits(self, handle: DuoAttentionHandle, n: int) -> tuple[int, int] | None:
        cache = ids = None
        release(self.device)
        reset_peak(self.device)
        try:
            cache = handle.new_cache(n + 8, batch_size=1)
            cache.fill_random(n)
            ids = random_ids(self.model, n + 1, self.device, self.config.seed)
            self._generate(ids, 4, cache)
            return peak_bytes(self.device), cache.kv_bytes()
        except OOM:
            return None
        finally:
            del cache, ids
            handle.graphs.steps.clear()
            release(self.device)


def models_under_test(
    config: BenchConfig, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, int, PreTrainedModel]]:
    for bits in config.weight_bits:
        if config.model is not None:
            model, _ = load_model(config.model, dtype=dtype, device=device, weight_bits=bits)
            yield config.model, bits, model
            continue
        for shape in config.shapes:
            release(device)
            model = build_random_model(shape, device, dtype, seed=config.seed)
            if bits == 8:
                quantize_linear_weights(model)
            yield shape, bits, model


def run_rows(config: BenchConfig, on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Every row the config asks for, in a stable order; progress on stderr. ``on_row`` sees the rows so far after
    each one (to save partial results of a long run)."""
    device = torch.device(config.device or default_device())
    dtype = getattr(torch, config.dtype)
    rows: list[Row] = []
    for shape, bits, model in models_under_test(config, device, dtype):
        bench = Bench(config, model, shape, device, bits)
        jobs: list[tuple[str, float, int, int]] = []
        if config.stock and bits == 16:
            jobs += [("stock", 1.0, 16, n) for n in config.contexts]
            jobs += [("stock-prefill", 1.0, 16, n) for n in config.prefill_contexts]
        jobs += [("decode", r, b, n) for r, b in config.settings() for n in config.contexts]
        jobs += [("prefill", r, b, n) for r, b in config.settings() for n in config.prefill_contexts]
        if config.capacity:
            jobs += [("max_context", r, b, 0) for r, b in config.settings()]
        run = {
            "stock": lambda r, b, n: [bench.stock_decode(n)],
            "stock-prefill": lambda r, b, n: [bench.stock_prefill(n)],
            "decode": bench.generate_decode,
            "prefill": lambda r, b, n: [bench.generate_prefill(r, b, n)],
            "max_context": lambda r, b, n: [bench.max_context(r, b)],
        }
        for kind, ratio, kv_bits, n in tqdm(jobs, desc=f"bench {shape} w{bits}", unit="row"):
            try:
                rows.extend(run[kind](ratio, kv_bits, n))
            except Exception as err:  # noqa: BLE001 - one broken row must not lose the others' measurements
                path = "stock" if kind.startswith("stock") else path_name(ratio)
                rows.append(Row("max_context" if kind == "max_context" else "generate", path, shape, ratio, n,
                                kv_bits=kv_bits, weight_bits=bits, status="error", note=repr(err)[:300]))
                release(device)
            if on_row is not None:
                on_row(rows)
        del bench, model
        release(device)
    return rows
