"""Starting a server: load the model, enable DuoAttention, run the application under uvicorn."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from ..deploy import enable_duo_attention
from ..hub import resolve_pattern_dir
from ..models import EMBEDDED_NAME, load_model
from ..pattern import HeadPattern
from ..shipped import shipped_pattern_dir
from .app import build_app
from .config import ServeConfig
from .engine import Engine

log = logging.getLogger("duoattn.serve")


def served_name(config: ServeConfig) -> str:
    """The model name clients send: ``served_name``, else the embedded model's name, a file's stem, a directory's
    name or the hub id."""
    if config.served_name:
        return config.served_name
    if config.model is None:
        return EMBEDDED_NAME
    path = Path(config.model)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.is_dir() else config.model


def load_engine(config: ServeConfig) -> Engine:
    """The model of ``config`` with DuoAttention enabled, ready to serve."""
    name = served_name(config)
    if config.pattern is not None:
        pattern_dir = resolve_pattern_dir(config.pattern)
    else:
        pattern_dir = shipped_pattern_dir(EMBEDDED_NAME if config.model is None else name)
    pattern = HeadPattern.load(pattern_dir)
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    handle = enable_duo_attention(model, pattern, sparsity=config.sparsity, kv_bits=config.kv_bits,
                                  cuda_graphs=config.cuda_graphs, prefill=config.prefill)
    return Engine(model, tokenizer, handle, config, name)


def serve(config: ServeConfig) -> None:
    """Load and serve until interrupted."""
    engine = load_engine(config)
    if engine.model.device.type == "cuda":  # compiles and graph captures, before the port opens
        start = time.perf_counter()
        engine.scheduler.warm_up(config.max_batch)
        log.info("warmed up in %.1f s", time.perf_counter() - start)
    log.info("serving %s on http://%s:%d (KV pool %.2f GiB, retrieval heads %.0f%%, kv_bits %d)",
             engine.served_name, config.host, config.port, engine.pool.capacity / 2**30,
             100 * engine.handle.retrieval_ratio, engine.handle.kv_bits)
    uvicorn.run(build_app(engine), host=config.host, port=config.port, log_level="info")


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` under uvicorn on a background thread; yields its base URL (``port`` 0: a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="duoattn-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
