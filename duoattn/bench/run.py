"""The measurements of ``duoattn bench``: decode ms/token, chunked prefill seconds, longest decodable context."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel

from ..cache import cache_kv_bytes
from ..engine import DecodeRunner, fast_duo_attention, prefill
from ..engine.cache import StaticDuoCache
from ..engine.runner import _forward
from ..kernels.dispatch import KernelChoice
from ..models import default_device, load_model, text_config
from ..models import head_dim as model_head_dim
from ..patch import cache_kwarg
from ..pattern import HeadPattern
from .config import BenchConfig, Row
from .profile import kernel_profile
from .shapes import build_random_model, weight_bytes_read
from .timing import median, peak_bytes, reset_peak, time_ms, time_once_s

OOM = (torch.cuda.OutOfMemoryError,)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def path_name(ratio: float) -> str:
    return "full" if ratio >= 1.0 else "duo"


def head_pattern(model: PreTrainedModel, config: BenchConfig) -> HeadPattern:
    cfg = text_config(model)
    if config.pattern is not None:
        return HeadPattern.load(config.pattern)
    return HeadPattern.random(cfg.num_hidden_layers, cfg.num_key_value_heads, seed=config.seed,
                              sink=config.sink, recent=config.recent)


def random_ids(model: PreTrainedModel, length: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, text_config(model).vocab_size, (1, length), generator=g).to(device)


class Bench:
    """One model under test: runs the rows of one shape (or real model)."""

    def __init__(self, config: BenchConfig, model: PreTrainedModel, shape: str, device: torch.device):
        self.config, self.model, self.shape, self.device = config, model, shape, device
        self.weights = weight_bytes_read(model)
        self.kernels = KernelChoice(config.decode_kernel, config.streaming_kernel)
        self.pattern = head_pattern(model, config)

    def bound_ms(self, kv_read: int) -> float:
        return (self.weights + kv_read) / self.config.bandwidth * 1e3

    @contextmanager
    def engine(self, ratio: float, compile_norms: bool = False) -> Iterator:
        c = self.config
        norms = "inductor" if compile_norms else None
        with fast_duo_attention(self.model, self.pattern, sparsity=1.0 - ratio, sink=c.sink, recent=c.recent,
                                compile_norms=norms) as engine:
            yield engine

    # ------------------------------------------------------------------------------------------------ decode
    def decode(self, ratio: float, context: int) -> Row:
        """Median ms/token of graph-replayed decode steps; if the graph or the Triton kernels fail, the row is
        measured again without them and says why."""
        row = self._decode(ratio, context, self.kernels, self.config.graph, self.config.compile)
        if row.status == "error" and self.device.type == "cuda":
            fallback = self._decode(ratio, context, KernelChoice("torch", self.config.streaming_kernel), False, "none")
            fallback.note = f"fallback to eager torch kernels, no compile, after: {row.note}"
            return fallback
        return row

    def _decode(self, ratio: float, context: int, kernels: KernelChoice, graph: bool, compile: str) -> Row:
        c = self.config
        row = Row("decode", path_name(ratio), self.shape, ratio, context, fill=c.decode_fill)
        cache = runner = None
        release(self.device)
        reset_peak(self.device)
        try:
            with self.engine(ratio, compile_norms=compile == "norms") as engine:
                cache = engine.new_cache(context + c.warmup + c.steps + 16, kernels=kernels)
                self._fill(cache, context)
                runner = DecodeRunner(self.model, cache, graph=graph and self.device.type == "cuda")
                times = time_ms(runner.replay, self.device, c.warmup, c.steps)
                row.ms_per_token, row.ms_spread = median(times), [min(times), max(times)]
                row.kv_bytes, row.kv_read_bytes = cache.kv_bytes(), cache.kv_bytes_read(context)
                row.kernels = {**cache.describe(), "cuda_graph": runner.graph is not None, "compile": compile}
                if c.profile:
                    row.profile = self._profile(runner)
        except OOM as err:
            row.status, row.note = "oom", str(err).split("\n")[0][:160]
        except Exception as err:  # noqa: BLE001 - measured again without graph / Triton by decode()
            row.status, row.note = "error", repr(err)[:300]
        finally:
            row.peak_bytes = peak_bytes(self.device)
            del cache, runner
            release(self.device)
        self._finish(row)
        return row

    def _profile(self, runner: DecodeRunner) -> dict | None:
        """Kernel time of graph replays, and of eager steps (the same kernels launched one by one)."""
        replay = kernel_profile(runner.replay, self.device)
        clock = runner.cache.clock
        saved = clock.clone()

        def eager() -> None:
            with torch.no_grad():
                _forward(self.model, runner.ids, runner.cache)
            clock.copy_(saved)

        # Wall time of the same step launched eagerly: the host-side cost that graph replay removes.
        wall = median(time_ms(eager, self.device, warmup=1, iters=3))
        return {"graph_replay": replay, "eager_step": kernel_profile(eager, self.device), "eager_step_wall_ms": wall}

    def _fill(self, cache: StaticDuoCache, context: int) -> None:
        if self.config.decode_fill == "random":
            cache.fill_random(context, torch.Generator(device=self.device).manual_seed(self.config.seed))
        else:
            ids = random_ids(self.model, context, self.device, self.config.seed)
            prefill(self.model, cache, ids, min(self.config.prefill_chunk, max(2, context)))

    def _finish(self, row: Row) -> None:
        row.weight_read_bytes = self.weights
        if row.kv_read_bytes is not None and self.device.type == "cuda":  # a GPU memory-bandwidth bound
            row.bound_ms = self.bound_ms(row.kv_read_bytes)

    def stock_decode(self, context: int) -> Row:
        """transformers' own path: the model's SDPA attention and a DynamicCache filled with random keys/values."""
        c = self.config
        row = Row("decode", "stock", self.shape, 1.0, context, fill="random")
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
            ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            kw = {cache_kwarg(self.model): cache, "use_cache": True, "logits_to_keep": 1}

            def step() -> None:
                with torch.no_grad():
                    self.model(input_ids=ids, **kw)

            times = time_ms(step, self.device, min(c.warmup, 3), min(c.steps, 10))
            row.ms_per_token, row.ms_spread = median(times), [min(times), max(times)]
            row.kv_bytes = cache_kv_bytes(cache)
            row.kv_read_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * head_dim * \
                self.model.dtype.itemsize
            row.kernels = {"attention": "sdpa", "cache": "DynamicCache", "cuda_graph": False}
            row.note = "steps grow the cache by concatenation, as transformers does"
        except OOM as err:
            row.status, row.note = "oom", str(err).split("\n")[0][:160]
        finally:
            row.peak_bytes = peak_bytes(self.device)
            del cache
            release(self.device)
        self._finish(row)
        return row

    # ----------------------------------------------------------------------------------------------- prefill
    def prefill(self, ratio: float, context: int) -> Row:
        c = self.config
        chunk = min(c.prefill_chunk, context)
        row = Row("prefill", path_name(ratio), self.shape, ratio, context, note=f"chunks of {chunk} tokens")
        cache = None
        release(self.device)
        try:
            with self.engine(ratio) as engine:
                # Warm-up at the same chunk size: compiles FlexAttention for these shapes, outside the timing.
                warm = engine.new_cache(2 * chunk, kernels=self.kernels)
                prefill(self.model, warm, random_ids(self.model, 2 * chunk, self.device, c.seed + 1), chunk)
                del warm
                release(self.device)
                reset_peak(self.device)
                cache = engine.new_cache(context, kernels=self.kernels)
                ids = random_ids(self.model, context, self.device, c.seed)
                row.prefill_s = time_once_s(lambda: prefill(self.model, cache, ids, chunk), self.device)
                row.kv_bytes = cache.kv_bytes()
                row.kernels = cache.describe()
                failed = cache.state.kernel_workspace.get("flex_failed")
                if failed:
                    row.note += f"; FlexAttention failed, used SDPA blocks: {failed}"
        except OOM as err:
            row.status, row.note = "oom", str(err).split("\n")[0][:160]
        finally:
            row.peak_bytes = peak_bytes(self.device)
            del cache
            release(self.device)
        row.weight_read_bytes = self.weights
        return row

    # ---------------------------------------------------------------------------------------- longest context
    def max_context(self, ratio: float, tries: int = 8) -> Row:
        """Largest context (a multiple of 64K tokens) whose cache fits and decodes, searched downward from an
        estimate made from free memory; the row notes the smallest size that ran out of memory."""
        row = Row("max_context", path_name(ratio), self.shape, ratio, 0, fill="random")
        if self.device.type != "cuda":
            row.status, row.note = "skipped", "needs a GPU"
            return row
        with self.engine(ratio) as engine:
            hkv, groups, head_dim = engine.geometry()
            per_token = 2 * sum(engine.order.num_retrieval) * head_dim * self.model.dtype.itemsize
            release(self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
            step = 1 << 16
            n = int((free - (3 << 30)) / per_token * 1.02) // step * step
            failed: int | None = None
            for _ in range(tries):
                probe = self.decode_probe(engine, n)
                if probe is not None:
                    row.context, row.ms_per_token, row.peak_bytes, row.kv_bytes, row.kv_read_bytes = n, *probe
                    break
                failed = n
                n = int(n * 0.98) // step * step
        if row.context == 0:
            row.status, row.note = "oom", f"no size down to {n} tokens fitted"
        else:
            row.note = f"out of memory at {failed} tokens" if failed else "largest size tried"
        self._finish(row)
        return row

    def decode_probe(self, engine, n: int) -> tuple[float, int, int, int] | None:
        """(ms/token, peak bytes, kv bytes, kv bytes read) of a few graph-replayed steps at ``n`` tokens, or None if
        it runs out of memory."""
        cache = runner = None
        release(self.device)
        reset_peak(self.device)
        try:
            cache = engine.new_cache(n + 16, kernels=self.kernels)
            cache.fill_random(n, torch.Generator(device=self.device).manual_seed(self.config.seed))
            runner = DecodeRunner(self.model, cache, graph=self.config.graph)
            ms = median(time_ms(runner.replay, self.device, 2, 8))
            return ms, peak_bytes(self.device), cache.kv_bytes(), cache.kv_bytes_read(n)
        except OOM:
            return None
        finally:
            del cache, runner
            release(self.device)


def models_under_test(
    config: BenchConfig, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, PreTrainedModel]]:
    if config.model is not None:
        model, _ = load_model(config.model, dtype=dtype, device=device)
        yield config.model, model
        return
    for shape in config.shapes:
        release(device)
        yield shape, build_random_model(shape, device, dtype, seed=config.seed)


def run_rows(config: BenchConfig, on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Every row the config asks for, in a stable order; progress on stderr. ``on_row`` sees the rows so far after
    each one (to save partial results of a long run)."""
    device = torch.device(config.device or default_device())
    dtype = getattr(torch, config.dtype)
    rows: list[Row] = []
    for shape, model in models_under_test(config, device, dtype):
        bench = Bench(config, model, shape, device)
        jobs = [("stock", 1.0, n) for n in config.stock_contexts]
        jobs += [("decode", r, n) for r in config.ratios for n in config.contexts]
        jobs += [("prefill", r, n) for r in config.ratios for n in config.prefill_contexts]
        jobs += [("max_context", r, 0) for r in config.max_context_ratios]
        run = {"stock": lambda r, n: bench.stock_decode(n), "decode": bench.decode, "prefill": bench.prefill,
               "max_context": lambda r, n: bench.max_context(r)}
        for kind, ratio, n in tqdm(jobs, desc=f"bench {shape}", unit="row"):
            try:
                rows.append(run[kind](ratio, n))
            except Exception as err:  # noqa: BLE001 - one broken row must not lose the others' measurements
                path = "stock" if kind == "stock" else path_name(ratio)
                rows.append(Row(kind, path, shape, ratio, n, status="error", note=repr(err)[:300]))
                release(device)
            if on_row is not None:
                on_row(rows)
        del bench, model
        release(device)
    return rows
