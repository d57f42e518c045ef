"""A load generator for a running server: concurrent streaming clients, latency percentiles, throughput.

Each client sends streamed greedy ``/v1/completions`` requests one after another, with prompts of random token ids
(no tokenizer needed, every prompt exactly the requested length). Time to first token and the gaps between
streamed chunks are measured on the client side; a request may stop early at EOS, so throughput counts the tokens
the server reports. The run is bounded by the number of requests and by a deadline.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..checks import check_int
from ..io import atomic_write_text


@dataclass
class LoadConfig:
    """Settings of one load run.

    Attributes:
        url: the server's base URL (``http://host:port``).
        model: the served model name (None: the first one ``/v1/models`` lists).
        clients: concurrent streaming clients.
        requests: requests in all, shared by the clients.
        prompt_tokens, max_tokens: per request.
        vocab: prompts draw token ids from ``[3, vocab)``.
        deadline_s: no new request starts after this many seconds.
        out: directory for ``load.json`` (None: print only).
    """

    url: str = "http://127.0.0.1:8000"
    model: str | None = None
    clients: int = 8
    requests: int = 32
    prompt_tokens: int = 512
    max_tokens: int = 64
    vocab: int = 32000
    deadline_s: float = 600.0
    seed: int = 0
    out: str | None = None

    def __post_init__(self) -> None:
        for name in ("clients", "requests", "prompt_tokens", "max_tokens"):
            check_int(name, getattr(self, name), 1)
        check_int("vocab", self.vocab, 4)
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")


@dataclass
class LoadReport:
    """What one run measured (seconds; percentiles over all requests or all inter-chunk gaps)."""

    config: dict
    completed: int
    failed: int
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    ttft_s: dict[str, float] = field(default_factory=dict)
    itl_s: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean()), "max": float(arr.max())}


def run_load(config: LoadConfig) -> LoadReport:
    """Run the load; the report is also written to ``config.out/load.json`` when ``out`` is set."""
    try:
        import openai  # the client the load speaks through: a dev dependency, not needed to serve
    except ModuleNotFoundError:
        raise ModuleNotFoundError("duoattn load needs the openai client: pip install openai") from None

    client = openai.OpenAI(base_url=config.url.rstrip("/") + "/v1", api_key="unused", max_retries=0,
                           timeout=config.deadline_s)
    model = config.model or client.models.list().data[0].id
    rng = random.Random(config.seed)
    prompts = [[rng.randrange(3, config.vocab) for _ in range(config.prompt_tokens)] for _ in range(config.requests)]
    lock = threading.Lock()
    ttft: list[float] = []
    gaps: list[float] = []
    usage_tokens: list[int] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + config.deadline_s

    def one(prompt: list[int]) -> None:
        if time.perf_counter() > deadline:
            return
        sent = time.perf_counter()
        first: float | None = None
        last = sent
        my_gaps: list[float] = []
        tokens = 0
        try:
            stream = client.completions.create(model=model, prompt=prompt, max_tokens=config.max_tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].text:
                    continue
                if first is None:
                    first = now - sent
                else:
                    my_gaps.append(now - last)
                last = now
        except openai.APIError as err:
            with lock:
                errors.append(f"{type(err).__name__}: {err}"[:300])
            return
        with lock:
            if first is not None:
                ttft.append(first)
            gaps.extend(my_gaps)
            usage_tokens.append(tokens)

    with ThreadPoolExecutor(config.clients) as pool:
        list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    generated = sum(usage_tokens)
    report = LoadReport(config=asdict(config) | {"model": model}, completed=len(usage_tokens), failed=len(errors),
                        wall_s=wall, generated_tokens=generated, tokens_per_s=generated / wall if wall else 0.0,
                        ttft_s=_percentiles(ttft), itl_s=_percentiles(gaps), errors=errors[:20])
    if config.out is not None:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "load.json", json.dumps(asdict(report), indent=2))
    return report


def format_report(report: LoadReport) -> str:
    c = report.config
    lines = [f"{c['model']} at {c['url']}: {c['clients']} clients, {report.completed} of {c['requests']} requests "
             f"done ({report.failed} failed) in {report.wall_s:.1f} s; prompt {c['prompt_tokens']} + "
             f"{c['max_tokens']} tokens",
             f"aggregate decode: {report.tokens_per_s:.1f} tokens/s ({report.generated_tokens} tokens)"]
    for name, stats in (("time to first token", report.ttft_s), ("inter-token latency", report.itl_s)):
        if stats:
            lines.append(f"{name}: p50 {stats['p50'] * 1e3:.1f} ms, p90 {stats['p90'] * 1e3:.1f} ms, "
                         f"p99 {stats['p99'] * 1e3:.1f} ms, max {stats['max'] * 1e3:.1f} ms")
    lines += [f"error: {e}" for e in report.errors[:5]]
    return "\n".join(lines)
