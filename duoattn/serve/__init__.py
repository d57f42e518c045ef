"""``duoattn serve``: an OpenAI-compatible HTTP server over the DuoAttention deployment path.

FastAPI + uvicorn serve the OpenAI completions / chat-completions API (:mod:`.app`, :mod:`.schema`); one worker
thread owns the model and interleaves the running requests between decode steps (:mod:`.scheduler`), each on its
own split cache whose memory is reserved from a pool sized at start-up (:mod:`.pool`). See ``docs/serving.md``.
"""

from typing import Any

from .config import ServeConfig

__all__ = ["Engine", "ServeConfig"]


def __getattr__(name: str) -> Any:
    # The web stack is imported only by what serves: the CLI's parser (every command) reads ServeConfig alone.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
